"""Text (SentencePiece, XLM-R id layout) and visual (BEiT v2 VQ-KD) tokenizers, installed as `beit3.tokenizers`.

Python started from the repository root puts this folder on the path as a top-level `tokenizers`, which
would shadow the widely used package of that name (and break everything that imports it, transformers
included). Reached under that name, this module hands the name back to the installed package.
"""

if __name__ == "tokenizers":
    import importlib
    import os
    import sys

    _checkout_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved_path = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout_root]
    del sys.modules[__name__]
    try:
        sys.modules[__name__] = importlib.import_module(__name__)
    finally:
        sys.path[:] = _saved_path
