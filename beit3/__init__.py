"""BEiT-3 pretraining: the Multiway Transformer, its data pipeline, tokenizers, trainer and launchers.

The repository's top-level folders are installed as subpackages of this one namespace
(`beit3.pretrain`, `beit3.tokenizers`, `beit3.data_pipeline`, `beit3.launch`) so that installing the
project never shadows a package of the same short name, such as the widely used `tokenizers`.
"""

__version__ = "0.1.0"
