"""The work of one shard, stage by stage: read and validate, resize and choose views, visual codes, write.

Stages pass a `ShardWork` along. A bad sample never stops a shard: it is dropped and counted under its source
and a short reason, which the manifest reports.
"""

import functools
import gzip
import io
import itertools
import json
import tarfile
import tempfile
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
from .shards import ShardRecord, json_bytes, npy_bytes, tar_bytes
from .sources import IMAGE_SUFFIXES, ImageTar, PairTar, ShardPlan, TextFile
from .storage import StorageError, open_storage
from .views import choose_views, render_view, resize_shorter_side

CODE_BATCH = 64
"""Views per visual-tokenizer forward pass."""


@dataclass
class ShardWork:
    """A shard on its way through the stages, with per-source counts of what was written, skipped, repaired."""

    plan: ShardPlan
    samples: list[dict] = field(default_factory=list)
    written: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    tokenizer_views: list[torch.Tensor] = field(default_factory=list)

    def add(self, source: str, sample: dict, training_samples: int = 1) -> None:
        """A tar entry holding `training_samples` samples (text entries hold a block of segments)."""
        self.samples.append(sample)
        self.written[source] += training_samples

    def skip(self, source: str, reason: str) -> None:
        self.skipped[(source, reason)] += 1


def _tar_members(source: str, root: str, name: str, work: ShardWork) -> dict[str, dict[str, bytes]]:
    """Files of an input tar grouped by sample key (the name before the first dot): {key: {extension: bytes}}.
    An unreadable or truncated tar is counted; members read before the damage are kept."""
    try:
        archive = tarfile.open(fileobj=io.BytesIO(open_storage(root).read_bytes(name)))
    except (StorageError, tarfile.TarError):
        work.skip(source, "unreadable_tar")
        return {}
    members: dict[str, dict[str, bytes]] = {}
    with archive:
        try:
            for member in archive:
                if member.isfile():
                    key, _, extension = member.name.rpartition("/")[2].partition(".")
                    members.setdefault(key, {})[extension.lower()] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError):
            work.skip(source, "truncated_tar")
    return members


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
                        if f".{extension}".endswith(IMAGE_SUFFIXES))
        for position, (key, data) in enumerate(images):
            yield (image_tar.source, f"{image_tar.source}-{image_tar.index:06d}-{position:06d}",
                   (image_tar.index, position), data, {"file": image_tar.name, "member": key, "label": image_tar.label})
        return
    for item in items:
        try:
            data = open_storage(item.root).read_bytes(item.name)
        except StorageError:
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
            work.add(source, {"__key__": key, **fields, "json": json_bytes({"source": source, **provenance})})
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
        sample = members[key]
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
        ids = _caption_ids(work, source, caption, config)
        if ids is None:
            continue
        view_seed = sample_seed(config.seed, source, *position)
        fields = _image_fields(work, source, view_seed, image, f"{source}:{provenance['file']}", config)
        if fields is not None:
            work.add(source, {
                "__key__": key, **fields,
                "ids.npy": npy_bytes(np.asarray(ids, dtype=np.uint16)),
                "json": json_bytes({"source": source, "caption": caption, **provenance}),
            })
    return work


def _pairs_of_table(items: tuple, work: ShardWork):
    """(source, key, seed position, image bytes, caption, provenance) per table or COCO row (a chunk may span
    sources); missing images counted."""
    for item in items:
        try:
            image = open_storage(item.root).read_bytes(item.name) if item.name else None
        except StorageError:
            image = None
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


def iter_documents(text_file: TextFile, text_field: str, documents: str, work: ShardWork):
    """Documents of one corpus file or part; malformed JSON lines and empty documents are counted, not fatal."""
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
    text = text.replace("\x00", "")
    is_jsonl = ".jsonl" in text_file.name
    chunks = text.split("\n\n") if documents == "paragraph" and not is_jsonl else text.split("\n")
    for chunk in chunks:
        if not chunk.strip():
            continue
        if is_jsonl:
            try:
                chunk = str(json.loads(chunk).get(text_field) or "")
            except (json.JSONDecodeError, AttributeError):
                work.skip(text_file.source, "bad_json")
                continue
        chunk = " ".join(chunk.split())
        if chunk:
            yield chunk
        else:
            work.skip(text_file.source, "empty_text")


def pack_documents(documents: list[list[int]], text_len: int) -> list[np.ndarray]:
    """Pack documents (ids without bos/eos) into uint16 segments `[bos] body [eos]` of at most `text_len` ids.

    Documents in one segment are separated by eos; a document moves to a new segment when it does not fit in
    what is left, and only a document longer than a whole segment is split across segments.
    """
    capacity = text_len - 2
    lengths = [len(ids) for ids in documents]
    flat = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.uint16, count=sum(lengths))
    segments: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    used = position = 0
    for length in lengths:
        start, end = position, position + length
        position = end
        if current and used + 1 + length > capacity:
            segments.append(current)
            current, used = [], 0
        used += 1 if current else 0
        while used + end - start > capacity:
            room = capacity - used
            segments.append([*current, (start, start + room)])
            current, used, start = [], 0, start + room
        if end > start:
            current.append((start, end))
            used += end - start
    if current:
        segments.append(current)
    bos, eos = np.array([BOS], dtype=np.uint16), np.array([EOS], dtype=np.uint16)
    packed = []
    for ranges in segments:
        parts = [bos]
        for start, end in ranges:
            parts += [flat[start:end], eos]
        packed.append(np.concatenate(parts))
    return packed


@functools.lru_cache(maxsize=8)
def local_copy(url: str) -> str:
    """A local path for a file given as a local path or an s3:// URL (fetched once per worker process)."""
    if not url.startswith("s3://"):
        return url
    root, _, name = url.rpartition("/")
    with tempfile.NamedTemporaryFile(suffix=f"-{name}", delete=False) as handle:
        handle.write(open_storage(root).read_bytes(name))
    return handle.name


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
    try:
        documents = list(iter_documents(text_file, source.text_field, source.documents, work))
    except (StorageError, OSError, EOFError):
        work.skip(text_file.source, "unreadable_file")
        return work
    bodies = tokenizer.encode_batch(documents, with_specials=False)
    segments = pack_documents(bodies, config.text_len)
    block_size = config.text_segments_per_sample
    for block_index, first in enumerate(range(0, len(segments), block_size)):
        block = segments[first : first + block_size]
        ids = np.full((len(block), config.text_len), PAD, dtype=np.uint16)
        for row, segment in zip(ids, block):
            row[: len(segment)] = segment
        work.add(text_file.source, {
            "__key__": f"{text_file.source}-{text_file.index:06d}-{block_index:06d}",
            "ids.npy": npy_bytes(ids),
            "json": json_bytes({"file": text_file.name, "source": text_file.source, "start_byte": text_file.start,
                                "first_segment": first, "segments": len(block)}),
        }, training_samples=len(block))
    return work


def finish_shard(work: ShardWork) -> tuple[bytes, ShardRecord]:
    """The tar and its manifest record; a shard left with no samples gets a record with no bytes and no file."""
    samples = sum(work.written.values())
    if not work.samples:
        return b"", ShardRecord(work.plan.name, work.plan.kind, 0, 0, 0, None)
    data = tar_bytes(work.samples)
    return data, ShardRecord.of(work.plan.name, work.plan.kind, samples, len(work.samples), data)
