"""The work of one shard, stage by stage: read and validate, resize and choose views, visual codes, write.

Stages pass a `ShardWork` along. A bad sample never stops a shard: it is dropped and counted under its source
and a short reason, which the manifest reports.
"""

import functools
import gzip
import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from beit3.pretrain.masking import sample_seed
from beit3.tokenizers.images import ImageDecodeError, decode_image
from beit3.tokenizers.text import BOS, EOS, PAD, TextTokenizer, truncate
from beit3.tokenizers.visual import VisualTokenizer

from .config import DataConfig
from .shards import ShardRecord, json_bytes, npy_bytes, part_bounds, sample_tar_bytes, shard_name, tar_bytes
from .sources import IMAGE_SUFFIXES, ImageTar, PairTar, ShardPlan, TextFile
from .storage import StorageError, local_copy, open_storage
from .views import choose_views, render_view, resize_shorter_side

CODE_BATCH = 64
"""Views per visual-tokenizer forward pass."""


@dataclass
class ShardWork:
    """A shard on its way through the stages: its tar entries, each with its source and training-sample count,
    and per-source counts of what was skipped and repaired."""

    plan: ShardPlan
    samples: list[dict] = field(default_factory=list)
    sample_counts: list[tuple[str, int]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    tokenizer_views: list[torch.Tensor] = field(default_factory=list)

    def add(self, source: str, sample: dict, training_samples: int = 1) -> None:
        """A tar entry holding `training_samples` samples (text entries hold a block of segments)."""
        self.samples.append(sample)
        self.sample_counts.append((source, training_samples))

    def skip(self, source: str, reason: str) -> None:
        self.skipped[(source, reason)] += 1

    def written(self, start: int, stop: int) -> Counter:
        """Training samples per source in tar entries [start, stop)."""
        counts: Counter = Counter()
        for source, training_samples in self.sample_counts[start:stop]:
            counts[source] += training_samples
        return counts


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> tuple[str, bool]:
    """The text with every lone UTF-16 surrogate (a JSON escape such as `\\ud800`, or a file-name byte that
    is not UTF-8) replaced by U+FFFD, and whether there was one: such strings cannot be written as UTF-8 or
    tokenized."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return LONE_SURROGATE.sub("\ufffd", text), True


def _provenance_json(fields: dict) -> bytes:
    """A sample's provenance (source, file, member, caption, ...) as JSON, its strings made valid Unicode."""
    return json_bytes({name: _valid_unicode(value)[0] if isinstance(value, str) else value
                       for name, value in fields.items()})


def _tar_members(source: str, root: str, name: str, work: ShardWork) -> dict[str, dict[str, bytes]]:
    """Files of an input tar grouped by sample key, WebDataset's way: the member's path up to the first dot of
    its file name, {key: {extension as written: bytes}}. So `a/x.jpg` and `b/x.jpg` are two samples; a path
    (`../`, a leading `/`) is only ever a key, never a place on disk.

    Damage is counted, never fatal: a name seen again (its first file is kept), links and devices (not
    followed), an unreadable tar, and a truncated or corrupt one, whose members before the damage are kept.
    """
    try:
        archive = tarfile.open(fileobj=io.BytesIO(open_storage(root).read_bytes(name)))
    except (OSError, tarfile.TarError, EOFError):
        work.skip(source, "unreadable_tar")
        return {}
    members: dict[str, dict[str, bytes]] = {}
    seen: set[str] = set()
    with archive:
        try:
            for member in archive:
                if member.isdir():
                    continue
                if not member.isfile():
                    work.skip(source, "not_a_regular_file")
                    continue
                if member.name in seen:
                    work.skip(source, "duplicate_member")
                    continue
                seen.add(member.name)
                folder, slash, file_name = member.name.rpartition("/")
                stem, _, extension = file_name.partition(".")
                members.setdefault(folder + slash + stem, {})[extension] = archive.extractfile(member).read()
            damage = _damage_after_last_member(archive)
        except (tarfile.TarError, OSError, EOFError):
            damage = "truncated_tar"
    if damage:
        work.skip(source, damage)
    return members


def _damage_after_last_member(archive: tarfile.TarFile) -> str | None:
    """Python's tarfile ends quietly at a header that is cut short or garbled, dropping every member after it;
    a whole tar has its zero end block there, and nothing but zeros after that."""
    archive.fileobj.seek(archive.offset)
    end_block = archive.fileobj.read(tarfile.BLOCKSIZE)
    if len(end_block) < tarfile.BLOCKSIZE:
        return "truncated_tar"
    if end_block.count(0) != tarfile.BLOCKSIZE:
        return "corrupt_tar"
    while rest := archive.fileobj.read(1 << 20):
        if rest.count(0) != len(rest):
            return "data_after_end_of_tar"
    return None


def _image_fields(
    work: ShardWork, source: str, view_seed: int, data: bytes, origin: str, config: DataConfig
) -> dict | None:
    """Decode, validate, resize and choose views for one image; None (and a counted skip) if it is unusable.

    The tokenizer-sized pixels of each view go to `work.tokenizer_views`, in step with the samples added.
    """
    settings = config.image
    try:
        image = decode_image(data, origin, settings.max_pixels)
    except ImageDecodeError as error:
        work.skip(source, error.reason)
        return None
    image = resize_shorter_side(image, settings.shorter_side)
    views = choose_views(image, settings.views_per_image, view_seed, settings.crop_scale, settings.crop_ratio,
                         settings.flip_probability)
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=settings.jpeg_quality)
    if config.visual_tokenizer is not None:
        # Codes are computed from the stored JPEG's pixels: exactly what the trainer will decode and crop.
        pixels = TF.pil_to_tensor(decode_image(encoded.getvalue()))
        work.tokenizer_views.append(torch.stack([render_view(pixels, view, settings.tokenizer_view_size)
                                                 for view in views]))
    return {"jpg": encoded.getvalue(), "views.json": json_bytes([view.to_json() for view in views])}


def _image_entries(items: tuple, work: ShardWork):
    """(source, key, seed position, image bytes, provenance) per image of a class-folder chunk (which may span
    sources) or of one per-class tar."""
    if isinstance(items[0], ImageTar):
        (image_tar,) = items
        members = _tar_members(image_tar.source, image_tar.root, image_tar.name, work)
        images = sorted((key, data) for key, files in members.items() for extension, data in files.items()
                        if f".{extension.lower()}".endswith(IMAGE_SUFFIXES))
        for position, (key, data) in enumerate(images):
            yield (image_tar.source, f"{image_tar.source}-{image_tar.index:06d}-{position:06d}",
                   (image_tar.index, position), data, {"file": image_tar.name, "member": key, "label": image_tar.label})
        return
    for item in items:
        try:
            data = open_storage(item.root).read_bytes(item.name)
        except OSError:  # StorageError, or a file that cannot be read (permissions)
            work.skip(item.source, "unreadable")
            continue
        yield item.source, f"{item.source}-{item.index:09d}", (item.index,), data, {"file": item.name,
                                                                                   "label": item.label}


def prepare_images(plan: ShardPlan, config: DataConfig) -> ShardWork:
    """Decode, validate, resize, choose views; keep the tokenizer-sized view pixels for the next stage."""
    work = ShardWork(plan)
    for source, key, position, data, provenance in _image_entries(plan.items, work):
        view_seed = sample_seed(config.seed, source, *position)
        fields = _image_fields(work, source, view_seed, data, f"{source}:{provenance['file']}", config)
        if fields is not None:
            work.add(source, {"__key__": key, **fields, "json": _provenance_json({"source": source, **provenance})})
    return work


def _caption_ids(work: ShardWork, source: str, caption: str, config: DataConfig) -> list[int] | None:
    caption = " ".join(caption.replace("\x00", "").split())
    if not caption:
        work.skip(source, "empty_caption")
        return None
    ids = load_text_tokenizer(config.text_tokenizer).encode(caption)
    if len(ids) > config.caption_len:
        work.repaired[(source, "caption_truncated")] += 1
        ids = truncate(ids, config.caption_len)
    return ids


def _pairs_of_tar(pair_tar: PairTar, work: ShardWork):
    """(source, key, seed position, image bytes, caption, provenance) per sample of a downloader-layout tar."""
    members = _tar_members(pair_tar.source, pair_tar.root, pair_tar.name, work)
    for position, key in enumerate(sorted(members)):
        # Extensions match in any case; of `x.JPG` and `x.jpg` both in one tar, the exact lower-case one is used.
        sample = {extension.lower(): data for extension, data in sorted(members[key].items())}
        image = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        if image is None:
            work.skip(pair_tar.source, "missing_image")
            continue
        if "txt" not in sample:
            work.skip(pair_tar.source, "missing_caption")
            continue
        caption = sample["txt"].decode("utf-8", errors="replace")
        if "\ufffd" in caption:
            work.repaired[(pair_tar.source, "invalid_utf8_replaced")] += 1
        yield (pair_tar.source, f"{pair_tar.source}-{pair_tar.index:06d}-{position:06d}", (pair_tar.index, position),
               image, caption, {"file": pair_tar.name, "key": key})


def prepare_pairs(plan: ShardPlan, config: DataConfig) -> ShardWork:
    """Image-text pairs: the image as for images, the caption tokenized (and truncated to caption_len)."""
    work = ShardWork(plan)
    if isinstance(plan.items[0], PairTar):
        entries = _pairs_of_tar(plan.items[0], work)
    else:
        entries = _pairs_of_table(plan.items, work)
    for source, key, position, image, caption, provenance in entries:
        caption, replaced = _valid_unicode(caption)
        if replaced:
            work.repaired[(source, "surrogates_replaced")] += 1
        ids = _caption_ids(work, source, caption, config)
        if ids is None:
            continue
        view_seed = sample_seed(config.seed, source, *position)
        fields = _image_fields(work, source, view_seed, image, f"{source}:{provenance['file']}", config)
        if fields is not None:
            work.add(source, {
                "__key__": key, **fields,
                "ids.npy": npy_bytes(np.asarray(ids, dtype=np.uint16)),
                "json": _provenance_json({"source": source, "caption": caption, **provenance}),
            })
    return work


def _pairs_of_table(items: tuple, work: ShardWork):
    """(source, key, seed position, image bytes, caption, provenance) per table or COCO row (a chunk may span
    sources); missing images, image paths no file can have (a NUL, a lone surrogate), unparsable rows and
    repaired text are counted."""
    for item in items:
        if item.skipped:
            work.skip(item.source, item.skipped)
            continue
        if item.repaired:
            work.repaired[(item.source, item.repaired)] += 1
        try:
            image = open_storage(item.root).read_bytes(item.name) if item.name else None
        except OSError:  # StorageError, a folder, a file that cannot be read
            image = None
        except ValueError:
            work.skip(item.source, "bad_image_path")
            continue
        if image is None:
            work.skip(item.source, "missing_image")
            continue
        yield (item.source, f"{item.source}-{item.index:012d}", (item.index,), image, item.caption,
               {"file": item.name, "index": item.index})


def add_codes(work: ShardWork, tokenizer: VisualTokenizer) -> ShardWork:
    """Visual codes (uint16) for every stored view, in batches of CODE_BATCH views."""
    if not work.tokenizer_views:
        return work
    views = torch.cat(work.tokenizer_views).float() / 255.0
    codes = torch.cat([tokenizer.encode(batch.to(next(tokenizer.buffers(), views).device)).cpu()
                       for batch in views.split(CODE_BATCH)])
    per_sample = codes.split([len(v) for v in work.tokenizer_views])
    for sample, sample_codes in zip(work.samples, per_sample):
        sample["codes.npy"] = npy_bytes(sample_codes.numpy().astype(np.uint16))
    work.tokenizer_views = []
    return work


def _decompressed(name: str, data: bytes) -> bytes:
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data


LINE_SEARCH_BYTES = 1 << 16
"""How far past a part's end to read at a time to finish its last line."""


def read_whole_lines(storage, name: str, start: int, stop: int) -> bytes:
    """The bytes of every line that begins in [start, stop): each line of a file in exactly one part."""
    data = storage.read_range(name, max(start - 1, 0), stop)
    if start > 0:
        first = data.find(b"\n")  # data[0] is the byte before start: a line begins after each newline
        data = data[first + 1 :] if first != -1 else b""
    if not data:
        return b""
    position = stop
    while not data.endswith(b"\n"):
        more = storage.read_range(name, position, position + LINE_SEARCH_BYTES)
        if not more:
            break
        end = more.find(b"\n")
        data += more if end == -1 else more[: end + 1]
        position += len(more)
    return data


def _read_text(text_file: TextFile, work: ShardWork) -> str:
    """The decoded text of one corpus file or part, NULs dropped; invalid UTF-8 is replaced and counted."""
    storage = open_storage(text_file.root)
    if text_file.stop is None:
        raw = _decompressed(text_file.name, storage.read_bytes(text_file.name))
    else:
        raw = read_whole_lines(storage, text_file.name, text_file.start, text_file.stop)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        work.repaired[(text_file.source, "invalid_utf8_replaced")] += 1
    return text.replace("\x00", "") if b"\x00" in raw else text  # searching bytes is cheaper than the text


def _json_documents(text: str, text_field: str, source: str, work: ShardWork) -> list[str]:
    documents = []
    for line in text.split("\n"):
        if not line or line.isspace():
            continue
        try:
            document = " ".join(str(json.loads(line).get(text_field) or "").replace("\x00", "").split())
        except (json.JSONDecodeError, AttributeError):
            work.skip(source, "bad_json")
            continue
        document, replaced = _valid_unicode(document)
        if replaced:
            work.repaired[(source, "surrogates_replaced")] += 1
        if document:
            documents.append(document)
        else:
            work.skip(source, "empty_text")
    return documents


def read_documents(text_file: TextFile, text_field: str, documents: str, work: ShardWork) -> list[str]:
    """The whitespace-normalised documents of one corpus file or part; malformed JSON lines and empty documents
    are counted, not fatal. Blank lines of a text file are no documents and are not counted."""
    text = _read_text(text_file, work)
    if ".jsonl" in text_file.name:
        return _json_documents(text, text_field, text_file.source, work)
    chunks = text.split("\n\n") if documents == "paragraph" else text.split("\n")
    # Builtins mapped over all chunks at once: per-document Python steps would cost about as much as tokenizing.
    return list(filter(None, map(" ".join, map(str.split, chunks))))


def pack_documents(ids: np.ndarray, lengths: np.ndarray, text_len: int) -> np.ndarray:
    """Pack documents (their ids end to end, without bos/eos, and each one's length) into `[bos] body [eos]`
    rows of `text_len` uint16 ids, right-padded with `<pad>`.

    Documents in one segment are separated by eos; a document moves to a new segment when it does not fit in
    what is left, and only a document longer than a whole segment is split across segments (into whole
    segments and a rest). Everything but a one-step-per-segment walk is numpy.
    """
    capacity = text_len - 2
    lengths = np.asarray(lengths, dtype=np.int64)
    pieces_per_document = np.maximum((lengths - 1) // capacity + 1, 1)
    piece_lengths = np.full(int(pieces_per_document.sum()), capacity, dtype=np.int64)
    piece_lengths[np.cumsum(pieces_per_document) - 1] = lengths - (pieces_per_document - 1) * capacity
    # A segment starts at a non-empty piece and takes the following pieces while they, each with the eos after
    # it, fill at most capacity + 1 places; an empty document takes one place too (the separator it would have
    # had) but adds no ids. Where a segment starting at each piece would stop, and where the next one would
    # start, is computed for every piece at once; the walk from segment to segment is then one step each.
    pieces = len(piece_lengths)
    fill_before = np.concatenate([[0], np.cumsum(piece_lengths + 1)])
    stop_if_first = np.searchsorted(fill_before, fill_before[:-1] + capacity + 1, side="right") - 1
    nonempty = np.flatnonzero(piece_lengths)
    next_nonempty = np.append(nonempty, pieces)[np.searchsorted(nonempty, np.arange(pieces + 1))]
    following_start = next_nonempty[stop_if_first].tolist()
    starts, first = [], int(next_nonempty[0])
    while first < pieces:
        starts.append(first)
        first = following_start[first]
    starts = np.array(starts, dtype=np.int64)
    stops = stop_if_first[starts]
    piece_ends = np.cumsum(piece_lengths)
    stream = np.insert(ids.astype(np.uint16, copy=False), piece_ends[nonempty], EOS)
    stream_before = np.concatenate([[0], np.cumsum(piece_lengths + (piece_lengths > 0))])
    row_lengths = stream_before[stops] - stream_before[starts]
    rows = np.full((len(starts), text_len), PAD, dtype=np.uint16)
    rows[:, 0] = BOS
    rows[:, 1:][np.arange(text_len - 1) < row_lengths[:, None]] = stream
    return rows


@functools.lru_cache(maxsize=4)
def load_text_tokenizer(url: str) -> TextTokenizer:
    """The SentencePiece model at a local path or s3:// URL, loaded once per worker process."""
    return TextTokenizer(local_copy(url), num_threads=1)  # a Ray task is one core


def prepare_text(plan: ShardPlan, config: DataConfig) -> ShardWork:
    """Tokenize every document of the shard's file (or file part), pack them into full-length segments, and
    store the segments in blocks of `text_segments_per_sample` per tar entry ([segments, text_len] uint16,
    right-padded with `<pad>`): one entry per 128-token segment would spend 2 KB of tar headers on 256 bytes
    of ids."""
    work = ShardWork(plan)
    (text_file,) = plan.items
    source = next(s for s in config.sources if s.name == text_file.source)
    tokenizer = load_text_tokenizer(config.text_tokenizer)
    if tokenizer.vocab_size > 2**16:
        raise ValueError(f"{config.text_tokenizer}: {tokenizer.vocab_size:,} ids do not fit the shards' uint16")
    try:
        documents = read_documents(text_file, source.text_field, source.documents, work)
    except (StorageError, OSError, EOFError):
        work.skip(text_file.source, "unreadable_file")
        return work
    rows = pack_documents(*tokenizer.encode_concatenated(documents), config.text_len)
    block_size = config.text_segments_per_sample
    for block_index, first in enumerate(range(0, len(rows), block_size)):
        block = rows[first : first + block_size]
        work.add(text_file.source, {
            "__key__": f"{text_file.source}-{text_file.index:06d}-{block_index:06d}",
            "ids.npy": npy_bytes(block),
            "json": _provenance_json({"file": text_file.name, "source": text_file.source, "start_byte": text_file.start,
                                "first_segment": first, "segments": len(block)}),
        }, training_samples=len(block))
    return work


def _by_source(counter: Counter) -> dict[str, dict[str, int]]:
    grouped: dict[str, dict[str, int]] = {}
    for (source, reason), count in counter.items():
        grouped.setdefault(source, {})[reason] = count
    return grouped


def finish_shard(work: ShardWork, config: DataConfig) -> list[tuple[bytes, dict]]:
    """The tars of a planned shard with their manifest entries, in order.

    Entries go to consecutive parts (see `part_bounds`): a part is closed at `samples_per_shard` images or
    pairs, or before the next entry would take it past `shard_bytes`. Skipped and repaired counts are listed
    with the first part. A shard left with no samples gets one entry with no bytes and no file.
    """
    plan = work.plan
    max_samples = None if plan.kind == "text" else config.samples_per_shard
    bounds = part_bounds([sample_tar_bytes(s) for s in work.samples], max_samples, config.shard_bytes) or [(0, 0)]
    parts = []
    for part, (start, stop) in enumerate(bounds):
        written = work.written(start, stop)
        name = shard_name(plan.kind, plan.index, part)
        data = tar_bytes(work.samples[start:stop]) if stop > start else b""
        record = (ShardRecord.of(name, plan.name, plan.kind, sum(written.values()), stop - start, data) if data
                  else ShardRecord(name, plan.name, plan.kind, 0, 0, 0, None))
        first = part == 0
        parts.append((data, {**record.__dict__, "written": dict(written),
                             "skipped": _by_source(work.skipped) if first else {},
                             "repaired": _by_source(work.repaired) if first else {}}))
    return parts
