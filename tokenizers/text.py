"""The text tokenizer: a SentencePiece model read through XLM-R's id layout, as the released BEiT-3 uses it.

Ids: `<s>` = 0 (bos/cls), `<pad>` = 1, `</s>` = 2 (eos), `<unk>` = 3, every other piece = its SentencePiece id
+ 1, and `<mask>` = pieces + 1 (64001 for the released 64,000-piece `beit3.spm`). A sequence is
`[0] + ids[:max_len - 2] + [2]`, right-padded with 1.
"""

import os
from pathlib import Path

import numpy as np
import sentencepiece
import torch

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIAL_IDS = (BOS, PAD, EOS, UNK)
PIECE_OFFSET = 1
"""XLM-R (fairseq) shifts SentencePiece ids by one to make room for `<pad>` at 1."""


class TokenizerFileError(ValueError):
    """A tokenizer file that is missing, truncated or of the wrong kind."""


def load_sentencepiece(path: str | Path) -> sentencepiece.SentencePieceProcessor:
    """Load a `.spm`/`.model` file with an error that names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerFileError(f"{path}: SentencePiece model not found")
    data = path.read_bytes()
    if not data:
        raise TokenizerFileError(f"{path}: SentencePiece model is empty (0 bytes)")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as error:
        raise TokenizerFileError(
            f"{path}: not a valid SentencePiece model ({len(data)} bytes; truncated, or another kind of file): "
            f"{error}"
        ) from None
    if processor.GetPieceSize() < 4:
        raise TokenizerFileError(f"{path}: SentencePiece model has only {processor.GetPieceSize()} pieces")
    if processor.unk_id() != 0:
        raise TokenizerFileError(
            f"{path}: the XLM-R id layout needs <unk> at SentencePiece id 0 (this model has it at "
            f"{processor.unk_id()}); train with unk_id=0, bos_id=1, eos_id=2, pad_id=-1"
        )
    return processor


class TextTokenizer:
    """Encodes text to XLM-R-layout ids; batch encoding runs on all cores through SentencePiece's threads."""

    def __init__(self, model_path: str | Path, num_threads: int | None = None):
        self.model_path = Path(model_path)
        self.processor = load_sentencepiece(self.model_path)
        self.num_threads = num_threads or os.cpu_count() or 1
        pieces = self.processor.GetPieceSize()
        self.mask_id = pieces + PIECE_OFFSET
        self.vocab_size = pieces + PIECE_OFFSET + 1

    def _to_layout(self, piece_ids: np.ndarray) -> np.ndarray:
        """SentencePiece ids -> XLM-R ids: shift by one, with SentencePiece's unknown mapped to `<unk>`."""
        shifted = piece_ids + PIECE_OFFSET
        shifted[piece_ids == 0] = UNK
        return shifted

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """One text to `[bos] + ids + [eos]`, truncated so that the whole is at most `max_len` ids."""
        return self.encode_batch([text], max_len)[0]

    def encode_batch(self, texts: list[str], max_len: int | None = None) -> list[list[int]]:
        """Many texts at once, encoded in parallel by SentencePiece."""
        encoded = self.processor.Encode(list(texts), num_threads=self.num_threads)
        keep = None if max_len is None else max_len - 2
        if keep is not None and keep < 0:
            raise ValueError(f"max_len must leave room for bos and eos (got {max_len})")
        sequences = []
        for piece_ids in encoded:
            body = self._to_layout(np.asarray(piece_ids[:keep], dtype=np.int64))
            sequences.append([BOS, *body.tolist(), EOS])
        return sequences

    def pad(self, sequences: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to `length` (default: the longest); returns (ids [B, L], padding mask [B, L], True on pads)."""
        length = length or max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if len(sequence) > length:
                raise ValueError(f"sequence {row} has {len(sequence)} ids, more than the {length} to pad to")
            ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        return ids, ids == PAD

    def decode(self, ids: list[int]) -> str:
        pieces = [i - PIECE_OFFSET for i in ids if i not in SPECIAL_IDS and i != self.mask_id]
        return self.processor.Decode(pieces)
