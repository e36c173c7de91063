"""Text (SentencePiece, XLM-R id layout) and visual (BEiT v2 VQ-KD) tokenizers, installed as `beit3.tokenizers`."""
