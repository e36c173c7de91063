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
from sentencepiece import sentencepiece_model_pb2

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIAL_IDS = (BOS, PAD, EOS, UNK)
PIECE_OFFSET = 1
"""XLM-R (fairseq) shifts SentencePiece ids by one to make room for `<pad>` at 1."""
RELEASED_MASK_ID = 64_000 + PIECE_OFFSET
"""`<mask>` of the released 64,000-piece `beit3.spm`."""


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
    specials = (processor.unk_id(), processor.bos_id(), processor.eos_id())
    if specials != (0, 1, 2):
        raise TokenizerFileError(
            f"{path}: the XLM-R id layout needs <unk>, <s>, </s> at SentencePiece ids 0, 1, 2 (this model has "
            f"them at {', '.join(map(str, specials))}); train with unk_id=0, bos_id=1, eos_id=2, pad_id=-1"
        )
    return processor


def xlmr_layout_processor(processor: sentencepiece.SentencePieceProcessor) -> sentencepiece.SentencePieceProcessor:
    """The same model with its pieces renumbered so that SentencePiece itself emits XLM-R ids.

    The three special pieces at 0-2 are replaced by `<s>`, `<pad>`, `</s>`, `<unk>` at 0-3, which moves every
    regular piece up by one; segmentation is unchanged. Encoding then runs entirely in SentencePiece's threads.
    """
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(processor.serialized_model_proto())
    regular = list(model.pieces[3:])
    del model.pieces[:]
    kind = sentencepiece_model_pb2.ModelProto.SentencePiece
    for piece, piece_type in (("<s>", kind.CONTROL), ("<pad>", kind.CONTROL), ("</s>", kind.CONTROL),
                              ("<unk>", kind.UNKNOWN)):
        model.pieces.add(piece=piece, score=0.0, type=piece_type)
    model.pieces.extend(regular)
    spec = model.trainer_spec
    spec.bos_id, spec.pad_id, spec.eos_id, spec.unk_id = BOS, PAD, EOS, UNK
    spec.bos_piece, spec.pad_piece, spec.eos_piece, spec.unk_piece = "<s>", "<pad>", "</s>", "<unk>"
    renumbered = sentencepiece.SentencePieceProcessor()
    renumbered.LoadFromSerializedProto(model.SerializeToString())
    return renumbered


def truncate(sequence: list[int], max_len: int) -> list[int]:
    """`[bos] ... [eos]` cut to at most `max_len` ids, keeping the closing eos."""
    return sequence if len(sequence) <= max_len else [*sequence[: max_len - 1], EOS]


class TextTokenizer:
    """Encodes text to XLM-R-layout ids; batch encoding runs on all cores through SentencePiece's threads."""

    def __init__(self, model_path: str | Path, num_threads: int | None = None):
        self.model_path = Path(model_path)
        self.processor = load_sentencepiece(self.model_path)
        self.layout = xlmr_layout_processor(self.processor)
        self.num_threads = num_threads or os.cpu_count() or 1
        pieces = self.processor.GetPieceSize()
        self.mask_id = pieces + PIECE_OFFSET
        self.vocab_size = pieces + PIECE_OFFSET + 1

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """One text to `[bos] + ids + [eos]`, truncated so that the whole is at most `max_len` ids."""
        return self.encode_batch([text], max_len)[0]

    def encode_batch(
        self, texts: list[str], max_len: int | None = None, with_specials: bool = True
    ) -> list[list[int]]:
        """Many texts at once, encoded in parallel by SentencePiece (`with_specials=False`: no bos/eos, for
        packing several documents into one sequence)."""
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must leave room for bos and eos (got {max_len})")
        sequences = self.layout.Encode(list(texts), add_bos=with_specials, add_eos=with_specials,
                                       num_threads=self.num_threads)
        if max_len is not None and sequences and max(map(len, sequences)) > max_len:
            sequences = [truncate(sequence, max_len) for sequence in sequences]
        return sequences

    def encode_concatenated(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of many texts (no bos/eos) end to end in one int32 array, and each text's length: what packing
        needs, with no Python object per id or per text.

        SentencePiece's batch encoder fills one int32 buffer per text, here each ending in eos, and the buffers
        are joined at once; eos, a control piece, never comes out of text, so its positions give the lengths.
        The public `return_type="numpy"` wraps every buffer in an array of its own first, which on a corpus of
        short lines costs more than a Python int per id. The binding's arguments, all positional: texts,
        threads, thread pool, sampling, nbest size, alpha, bos, eos, reverse.
        """
        buffers = self.layout._processor._EncodeAsBufferBatch(list(texts), self.num_threads, None, False, -1, 0.0,
                                                              False, True, False)
        ids = np.frombuffer(b"".join(buffers), dtype=np.int32)
        is_eos = ids == EOS
        return ids[~is_eos], np.diff(np.flatnonzero(is_eos), prepend=-1) - 1

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
        return self.layout.Decode([i for i in ids if i not in SPECIAL_IDS and i != self.mask_id])
