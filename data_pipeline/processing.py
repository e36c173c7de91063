"""The work of one shard, stage by stage: read and validate, resize and choose views, visual codes, write.

Stages pass a `ShardWork` along. A bad sample never stops a shard: it is dropped and counted under its source
and a short reason, which the manifest reports. Each sample (and each text file) is built inside one error
boundary, so that bytes that make a decoder, encoder or parser fail in a way no check foresaw are counted as
`unexpected_error` and logged with the file, and the shard goes on.

Every size an input declares is bounded before it is trusted: tar members against the bytes the tar holds (or,
compressed, `max_decompressed_bytes`), compressed corpus files by counting what they expand to (against
`max_compression_ratio` times their size) before keeping any of it, documents by `max_document_bytes` while they
are read, images by `max_pixels`.
"""

import functools
import hashlib
import io
import logging
import lzma
import os
import re
import sys
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import zstandard

from beit3.pretrain.masking import sample_seed
from beit3.tokenizers.images import ImageDecodeError, decode_image
from beit3.tokenizers.text import BOS, EOS, PAD, TextTokenizer, truncate

from .config import MAX_COMPRESSION_RATIO, MAX_DOCUMENT_BYTES, DataConfig
from .holdout import document_splitter, held_out_while_building, validation_name
from .shards import (ShardRecord, json_bytes, npy_bytes, part_bounds, sample_tar_bytes, shard_name, tar_bytes,
                     tar_size)
from .sources import IMAGE_SUFFIXES, ImageTar, PairTar, ShardPlan, TextFile, decoded_text, parse_json, text_encoding
from .storage import Storage, StoreUnusable, local_copy, open_storage
from .tar_index import (PAIR_IMAGE_EXTENSIONS, TarSample, TarSkip, damage_after_last_member, image_samples,
                        index_tar, pair_samples, read_sample)
from .views import choose_views, render_view, resize_shorter_side

if TYPE_CHECKING:  # the tokenizer's module imports timm, which shard workers do not need
    from beit3.tokenizers.visual import VisualTokenizer

CODE_BATCH = 64
"""Views per visual-tokenizer forward pass."""

log = logging.getLogger(__name__)


@dataclass
class ShardWork:
    """A shard on its way through the stages: its tar entries, each with its source, training-sample count and
    whether it is held out, per-source counts of what was skipped and repaired, and per-source histograms of
    the visual codes stored."""

    plan: ShardPlan
    samples: list[dict] = field(default_factory=list)
    sample_counts: list[tuple[str, int]] = field(default_factory=list)
    held_out: list[bool] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    tokenizer_views: list[torch.Tensor] = field(default_factory=list)
    code_counts: dict[str, np.ndarray] = field(default_factory=dict)
    parts: list[tuple[bytes, dict]] | None = None
    """The shard's tars with their manifest entries when the prepare stage wrote them itself (a text shard,
    streamed part by part); a tar already stored has no bytes here."""

    def add(self, source: str, sample: dict, training_samples: int = 1,
            tokenizer_views: torch.Tensor | None = None, held_out: bool = False) -> None:
        """A tar entry holding `training_samples` samples (text entries hold a block of segments), with the
        tokenizer-sized pixels of its views when it has any; a `held_out` one goes to the validation shards."""
        self.samples.append(sample)
        self.sample_counts.append((source, training_samples))
        self.held_out.append(held_out)
        if tokenizer_views is not None:
            self.tokenizer_views.append(tokenizer_views)

    def skip(self, source: str, reason: str, origin: str = "", detail: str = "") -> None:
        """Count a skipped input under its source and reason; one given with its `origin` (the file, and the
        member) is logged too, so that it can be found. Names and details come from the input: they are logged
        escaped, so that a newline or a lone surrogate in a member name cannot forge or break a log line."""
        self.skipped[(source, reason)] += 1
        if origin:
            log.warning("%s: skipped as %s%s", _escaped(origin), reason, f" ({_escaped(detail)})" if detail else "")

    def failed(self, source: str, origin: str, error: Exception) -> None:
        """A sample or file whose bytes made a decoder, encoder or parser fail in a way no check foresaw. A store
        that stays unusable after the storage layer's retries is no fault of the input: it stops the job."""
        if isinstance(error, StoreUnusable):
            raise error
        self.skip(source, "unexpected_error", origin, f"{type(error).__name__}: {error}")

    def written(self, entries: list[int]) -> Counter:
        """Training samples per source in these tar entries."""
        counts: Counter = Counter()
        for entry in entries:
            source, training_samples = self.sample_counts[entry]
            counts[source] += training_samples
        return counts


def _escaped(text: str) -> str:
    """Text from an input as Python writes it in a string literal, without the quotes: control characters and
    lone surrogates escaped, everything else as it is."""
    return repr(text)[1:-1]


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


TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
"""What reading a damaged tar, or a damaged gzip, bzip2 or xz stream of one, raises."""


def _tar_members(source: str, root: str, name: str, work: ShardWork,
                 max_decompressed_bytes: int) -> dict[str, dict[str, bytes]]:
    """Files of a compressed input tar, which cannot be read by ranges (see `tar_index`), grouped by sample key, WebDataset's way: the member's path up to the first dot of
    its file name, {key: {extension as written: bytes}}. So `a/x.jpg` and `b/x.jpg` are two samples; a path
    (`../`, a leading `/`) is only ever a key, never a place on disk.

    Damage is counted, never fatal: a name seen again (its first file is kept), links and devices (not
    followed), an unreadable tar, and a truncated or corrupt one, whose members before the damage are kept.
    A member's declared size is checked before it is read: past the bytes the tar holds it is a truncation; in
    a compressed tar, past `max_decompressed_bytes` it ends the reading (decompressed_too_large). A sparse member
    (mostly holes, filled in as zeros when read: a few bytes can declare gigabytes) is skipped as sparse_member.
    """
    origin = open_storage(root).url(name)
    try:
        data = open_storage(root).read_bytes(name)
        archive = tarfile.open(fileobj=io.BytesIO(data))
    except TAR_ERRORS as error:
        work.skip(source, "unreadable_tar", origin, f"{type(error).__name__}: {error}")
        return {}
    compressed = not isinstance(archive.fileobj, io.BytesIO)
    end_of_data = max_decompressed_bytes if compressed else len(data)
    members: dict[str, dict[str, bytes]] = {}
    seen: set[str] = set()
    damage = None
    with archive:
        try:
            for member in archive:
                if member.isdir():
                    continue
                if not member.isfile():
                    work.skip(source, "not_a_regular_file", f"{origin}:{member.name}")
                    continue
                if member.issparse():
                    work.skip(source, "sparse_member", f"{origin}:{member.name}", f"{member.size:,} bytes declared")
                    continue
                if member.offset_data + member.size > end_of_data:
                    damage = "decompressed_too_large" if compressed else "truncated_tar"
                    break
                if member.name in seen:
                    work.skip(source, "duplicate_member", f"{origin}:{member.name}")
                    continue
                seen.add(member.name)
                folder, slash, file_name = member.name.rpartition("/")
                stem, _, extension = file_name.partition(".")
                members.setdefault(folder + slash + stem, {})[extension] = archive.extractfile(member).read()
            else:
                damage = damage_after_last_member(archive, end_of_data)
        except TAR_ERRORS:
            damage = "truncated_tar"
        except Exception as error:  # tarfile on bytes no check foresaw: the members before them are kept
            work.failed(source, origin, error)
    if damage:
        work.skip(source, damage, origin)
    return members


def _image_fields(
    work: ShardWork, source: str, view_seed: int, data: bytes, origin: str, config: DataConfig
) -> tuple[dict, torch.Tensor | None] | None:
    """Decode, validate, resize and choose views for one image: its tar fields and the tokenizer-sized pixels of
    its views (None without a visual tokenizer); None (and a counted skip) if it is unusable."""
    settings = config.image
    try:
        image = decode_image(data, origin, settings.max_pixels)
    except ImageDecodeError as error:
        work.skip(source, error.reason, origin, error.detail)
        return None
    image = resize_shorter_side(image, settings.shorter_side)
    views = choose_views(image, settings.views_per_image, view_seed, settings.views)
    encoded = io.BytesIO()
    try:
        image.save(encoded, format="JPEG", quality=settings.jpeg_quality)
    except (OSError, ValueError) as error:  # JPEG stores at most 65,500 pixels a side: a 70000 x 1 PNG decodes
        work.skip(source, "unencodable_image", origin, f"{image.width}x{image.height}: {error}")
        return None
    tokenizer_views = None
    if config.visual_tokenizer is not None:
        # Codes come from the stored JPEG's pixels after each view's jitter and flip: exactly what the trainer
        # decodes and renders for the model, cut from the same jittered, flipped pixels.
        stored = decode_image(encoded.getvalue())
        tokenizer_views = torch.stack([render_view(stored, view, settings.tokenizer_view_size,
                                                   settings.views.tokenizer_interpolation) for view in views])
    return {"jpg": encoded.getvalue(), "views.json": json_bytes([view.to_json() for view in views])}, tokenizer_views


def _tar_skip(work: ShardWork, skip: TarSkip) -> None:
    work.skip(skip.source, skip.reason, skip.origin, skip.detail)


def _tar_sample_files(work: ShardWork, sample: TarSample) -> dict[str, bytes] | None:
    """A planned input-tar sample's files; a read that fails or comes back short is a counted skip."""
    origin = f"{open_storage(sample.root).url(sample.name)}:{sample.key}"
    try:
        files = read_sample(sample)
    except OSError as error:  # StorageError, or a file that cannot be read (permissions)
        work.skip(sample.source, "unreadable", origin, str(error))
        return None
    if files is None:
        work.skip(sample.source, "truncated_tar", origin)
    return files


def _compressed_image_tar(image_tar: ImageTar, work: ShardWork, config: DataConfig):
    members = _tar_members(image_tar.source, image_tar.root, image_tar.name, work, config.max_decompressed_bytes)
    images = sorted((key, data) for key, files in members.items() for extension, data in files.items()
                    if f".{extension.lower()}".endswith(IMAGE_SUFFIXES))
    for position, (key, data) in enumerate(images):
        yield (image_tar.source, f"{image_tar.source}-{image_tar.index:06d}-{position:06d}",
               (image_tar.index, position), data, {"file": image_tar.name, "member": key, "label": image_tar.label})


def _image_entries(items: tuple, work: ShardWork, config: DataConfig):
    """(source, key, seed position, image bytes, provenance) per image of a planned chunk, whose items are class-
    folder images and input-tar samples of any sources, or of one whole input tar."""
    for item in items:
        if isinstance(item, ImageTar):
            index = index_tar(item.root, item.name)
            if index.compressed:
                yield from _compressed_image_tar(item, work, config)
            else:
                yield from _image_entries(image_samples(item.source, item.root, item.name, item.index, item.label,
                                                        index, IMAGE_SUFFIXES), work, config)
        elif isinstance(item, TarSkip):
            _tar_skip(work, item)
        elif isinstance(item, TarSample):
            files = _tar_sample_files(work, item)
            if files is not None:
                yield (item.source, f"{item.source}-{item.tar_index:06d}-{item.position:06d}",
                       (item.tar_index, item.position), files["image"],
                       {"file": item.name, "member": item.key, "label": item.label})
        else:
            try:
                data = open_storage(item.root).read_bytes(item.name)
            except OSError as error:  # StorageError, or a file that cannot be read (permissions)
                work.skip(item.source, "unreadable", f"{item.source}:{item.name}", str(error))
                continue
            yield item.source, f"{item.source}-{item.index:09d}", (item.index,), data, {"file": item.name,
                                                                                       "label": item.label}


def _origin(source: str, provenance: dict) -> str:
    """Where a sample came from, for messages: source, file and member."""
    member = provenance.get("member") or provenance.get("key")
    return f"{source}:{provenance['file']}" + (f":{member}" if member is not None else "")


def prepare_images(plan: ShardPlan, config: DataConfig) -> ShardWork:
    """Decode, validate, resize, choose views; keep the tokenizer-sized view pixels for the next stage."""
    work = ShardWork(plan)
    for source, key, position, data, provenance in _image_entries(plan.items, work, config):
        origin = _origin(source, provenance)
        try:
            image = _image_fields(work, source, sample_seed(config.seed, source, *position), data, origin, config)
        except Exception as error:  # one sample never stops a shard, whatever its bytes make a decoder do
            work.failed(source, origin, error)
            continue
        if image is not None:
            fields, tokenizer_views = image
            work.add(source, {"__key__": key, **fields, "json": _provenance_json({"source": source, **provenance})},
                     tokenizer_views=tokenizer_views,
                     held_out=held_out_while_building(plan, source, provenance, config))
    return work


def _caption_ids(work: ShardWork, source: str, caption: str, config: DataConfig, origin: str) -> list[int] | None:
    if len(caption.encode("utf-8")) > config.max_document_bytes:
        work.skip(source, "caption_too_long", origin, f"more than {config.max_document_bytes:,} bytes")
        return None
    caption = " ".join(caption.replace("\x00", "").split())
    if not caption:
        work.skip(source, "empty_caption", origin)
        return None
    ids = load_text_tokenizer(config.text_tokenizer).encode(caption)
    if len(ids) > config.caption_len:
        work.repaired[(source, "caption_truncated")] += 1
        ids = truncate(ids, config.caption_len)
    return ids


def _compressed_pair_tar(pair_tar: PairTar, work: ShardWork, config: DataConfig):
    members = _tar_members(pair_tar.source, pair_tar.root, pair_tar.name, work, config.max_decompressed_bytes)
    for position, key in enumerate(sorted(members)):
        # Extensions match in any case; of `x.JPG` and `x.jpg` both in one tar, the exact lower-case one is used.
        sample = {extension.lower(): data for extension, data in sorted(members[key].items())}
        image = next((sample[e] for e in PAIR_IMAGE_EXTENSIONS if e in sample), None)
        origin = f"{pair_tar.source}:{pair_tar.name}:{key}"
        if image is None:
            work.skip(pair_tar.source, "missing_image", origin)
            continue
        if "txt" not in sample:
            work.skip(pair_tar.source, "missing_caption", origin)
            continue
        yield _tar_pair(work, pair_tar.source, pair_tar.name, pair_tar.index, position, key, image, sample["txt"])


def _tar_pair(work: ShardWork, source: str, name: str, tar_index: int, position: int, key: str, image: bytes,
              caption: bytes) -> tuple:
    text, repair = decoded_text(caption)
    if repair:
        work.repaired[(source, repair)] += 1
    return (source, f"{source}-{tar_index:06d}-{position:06d}", (tar_index, position), image, text,
            {"file": name, "key": key})


def _pair_entries(items: tuple, work: ShardWork, config: DataConfig):
    """(source, key, seed position, image bytes, caption, provenance) per pair of a planned chunk, whose items are
    table or COCO rows and input-tar samples of any sources, or of one whole input tar."""
    for item in items:
        if isinstance(item, PairTar):
            index = index_tar(item.root, item.name)
            if index.compressed:
                yield from _compressed_pair_tar(item, work, config)
            else:
                yield from _pair_entries(pair_samples(item.source, item.root, item.name, item.index, index), work,
                                         config)
        elif isinstance(item, TarSkip):
            _tar_skip(work, item)
        elif isinstance(item, TarSample):
            files = _tar_sample_files(work, item)
            if files is not None:
                yield _tar_pair(work, item.source, item.name, item.tar_index, item.position, item.key,
                                files["image"], files["txt"])
        else:
            yield from _pairs_of_table((item,), work)


def prepare_pairs(plan: ShardPlan, config: DataConfig) -> ShardWork:
    """Image-text pairs: the image as for images, the caption tokenized (and truncated to caption_len)."""
    work = ShardWork(plan)
    for source, key, position, image, caption, provenance in _pair_entries(plan.items, work, config):
        origin = _origin(source, provenance)
        try:
            caption, replaced = _valid_unicode(caption)
            if replaced:
                work.repaired[(source, "surrogates_replaced")] += 1
            ids = _caption_ids(work, source, caption, config, origin)
            if ids is None:
                continue
            image = _image_fields(work, source, sample_seed(config.seed, source, *position), image, origin, config)
        except Exception as error:  # one sample never stops a shard, whatever its bytes make a decoder do
            work.failed(source, origin, error)
            continue
        if image is not None:
            fields, tokenizer_views = image
            work.add(source, {
                "__key__": key, **fields,
                "ids.npy": npy_bytes(np.asarray(ids, dtype=np.uint16)),
                "json": _provenance_json({"source": source, "caption": caption, **provenance}),
            }, tokenizer_views=tokenizer_views, held_out=held_out_while_building(plan, source, provenance, config))
    return work


def _pairs_of_table(items: tuple, work: ShardWork):
    """(source, key, seed position, image bytes, caption, provenance) per table or COCO row (a chunk may span
    sources); missing images, image paths no file can have (a NUL, a lone surrogate), unparsable rows and
    repaired text are counted (rows skipped while the table was listed were logged then)."""
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
            work.skip(item.source, "bad_image_path", f"{item.source}:{item.name}")
            continue
        if image is None:
            work.skip(item.source, "missing_image", f"{item.source}:{item.name}")
            continue
        yield (item.source, f"{item.source}-{item.index:012d}", (item.index,), image, item.caption,
               {"file": item.name, "index": item.index})


def add_codes(work: ShardWork, tokenizer: "VisualTokenizer") -> ShardWork:
    """Visual codes (uint16) for every stored view, in batches of CODE_BATCH views."""
    if not work.tokenizer_views:
        return work
    views = torch.cat(work.tokenizer_views).float() / 255.0
    codes = torch.cat([tokenizer.encode(batch.to(next(tokenizer.buffers(), views).device)).cpu()
                       for batch in views.split(CODE_BATCH)])
    per_sample = codes.split([len(v) for v in work.tokenizer_views])
    for sample, (source, _), sample_codes in zip(work.samples, work.sample_counts, per_sample):
        sample["codes.npy"] = npy_bytes(sample_codes.numpy().astype(np.uint16))
        counts = np.bincount(sample_codes.flatten().numpy(), minlength=tokenizer.codebook_size)
        work.code_counts[source] = work.code_counts.get(source, 0) + counts
    work.tokenizer_views = []
    return work


READ_BYTES = 1 << 22
"""Bytes per storage read, or per decompression step, of a corpus file."""
BATCH_BYTES = 1 << 18
"""Text is cut into documents, tokenized and packed this many bytes at a time: until tokenized, a one-letter line
costs about 500 bytes of Python objects."""
LINE_SEARCH_BYTES = 1 << 16
"""How far past a part's end to read at a time to finish its last line."""
ZSTD_INPUT_BYTES = 1 << 10
"""Compressed bytes given to the zstd decoder at a time: a zstd block expands at most 32768-fold, so one step
gives at most 32 MiB."""
DECOMPRESSION_ERRORS = (EOFError, zlib.error, zstandard.ZstdError)


def _line_part(storage, name: str, start: int, stop: int, max_line_bytes: int) -> Iterator[bytes]:
    """The bytes of every line that begins in [start, stop), in chunks: each line of a file in exactly one part.
    The last line is followed past `stop` until it ends, or until it is longer than `max_line_bytes` (the reader
    drops it then), so a part reads at most its own bytes, the line before it up to `stop`, and that bound:
    splitting a file is linear in its size however long its lines."""
    position, in_line_before = max(start - 1, 0), start > 0  # the byte before start: a line begins after a newline
    line_ends = True
    while position < stop and (chunk := storage.read_range(name, position, min(position + READ_BYTES, stop))):
        position += len(chunk)
        if in_line_before:
            newline = chunk.find(b"\n")
            if newline == -1:
                continue
            chunk, in_line_before = chunk[newline + 1 :], False
        if chunk:
            line_ends = chunk.endswith(b"\n")
            yield chunk
    if in_line_before or line_ends:
        return
    followed = 0
    while followed <= max_line_bytes and (more := storage.read_range(name, position, position + LINE_SEARCH_BYTES)):
        newline = more.find(b"\n")
        if newline != -1:
            yield more[: newline + 1]
            return
        yield more
        position += len(more)
        followed += len(more)


def read_whole_lines(storage, name: str, start: int, stop: int) -> bytes:
    """The bytes of every line that begins in [start, stop), however long."""
    return b"".join(_line_part(storage, name, start, stop, sys.maxsize))


def _rechunked(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Decompressed pieces joined into chunks of about READ_BYTES; where decompression fails, the bytes before
    the damage come out first."""
    output, size = [], 0
    try:
        for piece in pieces:
            output.append(piece)
            size += len(piece)
            if size >= READ_BYTES:
                yield b"".join(output)
                output, size = [], 0
    except Exception:
        yield b"".join(output)
        raise
    yield b"".join(output)


def _gzip_pieces(compressed_chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Every member of a .gz stream decompressed, LINE_SEARCH_BYTES at most at a time. Python's GzipFile meets a
    cut in the read that decompresses the bytes before it, and drops them; here they come first, then EOFError.
    Zero bytes after the last member are padding; anything else after them, or where a member should begin, is
    a corrupt member (zlib.error)."""
    member, padding = None, False
    for data in compressed_chunks:
        view, position = memoryview(data), 0
        while position < len(data):
            if member is None:
                if padding or data[position] == 0:
                    if data.count(0, position) != len(data) - position:
                        raise zlib.error("bytes after the zero padding that ends a gzip file")
                    padding = True
                    break
                member = zlib.decompressobj(16 + zlib.MAX_WBITS)  # with the gzip header and trailer
            compressed = view[position : position + LINE_SEARCH_BYTES]
            piece = member.decompress(compressed, LINE_SEARCH_BYTES)
            position += len(compressed) - len(member.unused_data if member.eof else member.unconsumed_tail)
            member = None if member.eof else member
            yield piece
    while member is not None:  # all input given: what the member still holds, then its end
        piece = member.decompress(b"", LINE_SEARCH_BYTES)
        if not piece and not member.eof:
            raise EOFError("the last gzip member is cut short")
        member = None if member.eof else member
        yield piece


def _zstd_pieces(compressed_chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Every frame of a .zst stream decompressed. zstandard's stream readers end quietly where a file is cut;
    here a frame left unfinished raises EOFError, and bytes after a frame that do not begin another raise
    ZstdError."""
    decompressor, frame = zstandard.ZstdDecompressor(), None
    for data in compressed_chunks:
        view = memoryview(data)
        for offset in range(0, len(data), ZSTD_INPUT_BYTES):
            compressed = view[offset : offset + ZSTD_INPUT_BYTES]
            while compressed:
                if frame is None:
                    frame = decompressor.decompressobj()
                yield frame.decompress(compressed)
                compressed, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    if frame is not None:
        raise EOFError("the last zstd frame is cut short")


DECOMPRESSORS = {".gz": lambda chunks: _rechunked(_gzip_pieces(chunks)),
                 ".zst": lambda chunks: _rechunked(_zstd_pieces(chunks))}
"""Decompressed chunks of a corpus file's compressed chunks, by its last suffix."""


def _decompressed_size_exceeds(chunks: Iterator[bytes], limit: float) -> bool:
    """Whether a compressed file expands past `limit` bytes, counted chunk by chunk and nothing kept: a bomb
    costs time, never memory. Damage ends the count; the reading pass meets it again and counts it."""
    size = 0
    try:
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                return True
    except DECOMPRESSION_ERRORS:
        pass
    return False


def _stored_chunks(storage, name: str) -> Iterator[bytes]:
    """A stored file's bytes, READ_BYTES at a time (each read one range request on S3, retried as any)."""
    position = 0
    while chunk := storage.read_range(name, position, position + READ_BYTES):
        position += len(chunk)
        yield chunk


def _text_chunks(text_file: TextFile, work: ShardWork, max_document_bytes: int, max_decompressed_bytes: int | None,
                 max_compression_ratio: float) -> Iterator[bytes]:
    """The bytes of a corpus file (decompressed) or part, READ_BYTES or so at a time. A compressed file is read
    as a stream, twice: counted first (nothing kept), then read once known to expand to at most
    `max_compression_ratio` times its size (and `max_decompressed_bytes`, when given); a file past either is a
    decompression bomb, skipped whole."""
    storage, name = open_storage(text_file.root), text_file.name
    if text_file.stop is not None:
        yield from _line_part(storage, name, text_file.start, text_file.stop, max_document_bytes)
        return
    decompress = DECOMPRESSORS.get(name[name.rfind(".") :].lower())
    if decompress is None:
        yield from _stored_chunks(storage, name)
        return
    size = storage.size(name)
    limit = min(max_compression_ratio * size, max_decompressed_bytes or float("inf"))
    if _decompressed_size_exceeds(decompress(_stored_chunks(storage, name)), limit):
        work.skip(text_file.source, "decompressed_too_large", storage.url(name),
                  f"{size:,} bytes expand past {limit:,.0f} (max_compression_ratio {max_compression_ratio:g}"
                  + (f", max_decompressed_bytes {max_decompressed_bytes:,})" if max_decompressed_bytes else ")"))
        return
    yield from decompress(_stored_chunks(storage, name))


def _as_utf8(chunks: Iterator[bytes], at_file_start: bool, work: ShardWork, source: str) -> Iterator[bytes]:
    """The chunks of a text file as UTF-8, as corpora arrive: a UTF-8 byte-order mark is dropped, and a file that
    begins with a UTF-16 or UTF-32 one (such files are never split into parts) is decoded whole."""
    head = b""
    while at_file_start and len(head) < 4 and (chunk := next(chunks, None)) is not None:
        head += chunk
    encoding = text_encoding(head)
    if encoding == "utf-8-sig":
        head = head[3:]
    elif encoding != "utf-8":
        text, repair = decoded_text(b"".join([head, *chunks]))
        if repair:
            work.repaired[(source, repair)] += 1
        yield text.encode("utf-8")
        return
    if head:
        yield head
    yield from chunks


def _document_runs(chunks: Iterator[bytes], separator: bytes, max_document_bytes: int,
                   too_long: Callable[[], None]) -> Iterator[bytes]:
    """The bytes cut into runs of whole documents, about BATCH_BYTES each (separators between the documents of a
    run, none at its ends). A document longer than `max_document_bytes` is dropped, and counted through
    `too_long`, as soon as it passes that bound: no more of one is ever kept."""
    pending, dropping = b"", False
    for chunk in chunks:
        for offset in range(0, len(chunk), BATCH_BYTES):
            data = pending + chunk[offset : offset + BATCH_BYTES]
            end = data.rfind(separator)
            if end == -1:
                pending = data
            else:
                begin = data.find(separator) + len(separator) if dropping else 0  # the rest of a dropped one
                run, pending, dropping = data[begin:end], data[end + len(separator) :], False
                if len(run) > max_document_bytes:
                    documents = run.split(separator)
                    kept = [document for document in documents if len(document) <= max_document_bytes]
                    for _ in range(len(documents) - len(kept)):
                        too_long()
                    run = separator.join(kept)
                if run:
                    yield run
            if len(pending) > max_document_bytes:
                if not dropping:
                    too_long()
                dropping = True
                pending = pending[len(pending) - len(separator) + 1 :]  # a separator may begin in its last bytes
    if pending and not dropping:
        yield pending


def _json_documents(text: str, text_field: str, source: str, work: ShardWork) -> list[str]:
    documents = []
    for line in text.split("\n"):
        if not line or line.isspace():
            continue
        record, reason = parse_json(line)
        if not isinstance(record, dict):
            work.skip(source, reason or "bad_json")
            continue
        document = " ".join(str(record.get(text_field) or "").replace("\x00", "").split())
        document, replaced = _valid_unicode(document)
        if replaced:
            work.repaired[(source, "surrogates_replaced")] += 1
        if document:
            documents.append(document)
        else:
            work.skip(source, "empty_text")
    return documents


def document_batches(text_file: TextFile, text_field: str, documents: str, work: ShardWork,
                     max_document_bytes: int = MAX_DOCUMENT_BYTES, max_decompressed_bytes: int | None = None,
                     max_compression_ratio: float = MAX_COMPRESSION_RATIO) -> Iterator[list[str]]:
    """The whitespace-normalised documents of one corpus file or part, a batch (see BATCH_BYTES) at a time;
    a compressed file is read as a stream, so memory does not grow with its size.

    Counted, not fatal: malformed and over-limit JSON lines, empty documents, documents past
    `max_document_bytes`, invalid UTF-8 (replaced), a compressed file that expands past `max_compression_ratio`
    times its size or past `max_decompressed_bytes` (none: no such bound; nothing of it is read) and one that is
    cut short or corrupt (its documents before the damage are kept). Blank lines of a text file are no documents and are not counted. What was
    skipped is logged with the file at the end."""
    source, name = text_file.source, text_file.name.lower()
    origin = open_storage(text_file.root).url(text_file.name)
    if text_file.stop is not None:
        origin += f" bytes {text_file.start}-{text_file.stop}"
    skipped_before = Counter(work.skipped)
    jsonl = name.removesuffix(".gz").removesuffix(".zst").endswith(".jsonl")
    separator = "\n\n" if documents == "paragraph" and not jsonl else "\n"
    chunks = _as_utf8(_text_chunks(text_file, work, max_document_bytes, max_decompressed_bytes,
                                   max_compression_ratio), text_file.start == 0, work, source)
    runs = _document_runs(chunks, separator.encode(), max_document_bytes,
                          lambda: work.skip(source, "document_too_long"))
    replaced = False
    try:
        for run in runs:
            try:
                text = run.decode("utf-8")
            except UnicodeDecodeError:
                text, replaced = run.decode("utf-8", errors="replace"), True
            if b"\x00" in run:  # searching bytes is cheaper than the text
                text = text.replace("\x00", "")
            if jsonl:
                yield _json_documents(text, text_field, source, work)
            else:
                # Builtins mapped over all documents at once: per-document Python steps would cost about as
                # much as tokenizing.
                yield list(filter(None, map(" ".join, map(str.split, text.split(separator)))))
    except EOFError as error:
        work.skip(source, "truncated_compressed_file", origin, str(error))
    except DECOMPRESSION_ERRORS as error:
        work.skip(source, "corrupt_compressed_file", origin, f"{type(error).__name__}: {error}")
    except OSError as error:  # StorageError, or a file that cannot be read (permissions)
        work.skip(source, "unreadable_file", origin, str(error))
    if replaced:
        work.repaired[(source, "invalid_utf8_replaced")] += 1
    if skipped := work.skipped - skipped_before:
        log.warning("%s: skipped %s", _escaped(origin), ", ".join(f"{reason}: {count}" for (_, reason), count
                                                                   in sorted(skipped.items())))


def read_documents(text_file: TextFile, text_field: str, documents: str, work: ShardWork, **limits) -> list[str]:
    """Every document of `document_batches` in one list."""
    return [document for batch in document_batches(text_file, text_field, documents, work, **limits)
            for document in batch]


def _packed(ids: np.ndarray, lengths: np.ndarray, text_len: int) -> tuple[np.ndarray, int, int]:
    """The rows of `pack_documents`, and where its last segment's documents begin: the row, and the document
    (for a document longer than a segment, its first row and itself)."""
    capacity = text_len - 2
    lengths = np.asarray(lengths, dtype=np.int64)
    pieces_per_document = np.maximum((lengths - 1) // capacity + 1, 1)
    document_ends = np.cumsum(pieces_per_document)
    piece_lengths = np.full(int(pieces_per_document.sum()), capacity, dtype=np.int64)
    piece_lengths[document_ends - 1] = lengths - (pieces_per_document - 1) * capacity
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
    if not len(starts):
        return rows, 0, len(lengths)
    # A document longer than a segment begins a segment (its first piece fills one), so the last segment's
    # first document begins a row.
    last_document = int(np.searchsorted(document_ends, starts[-1], side="right"))
    first_piece = int(document_ends[last_document - 1]) if last_document else 0
    return rows, int(np.searchsorted(starts, first_piece)), last_document


def pack_documents(ids: np.ndarray, lengths: np.ndarray, text_len: int) -> np.ndarray:
    """Pack documents (their ids end to end, without bos/eos, and each one's length) into `[bos] body [eos]`
    rows of `text_len` uint16 ids, right-padded with `<pad>`.

    Documents in one segment are separated by eos; a document moves to a new segment when it does not fit in
    what is left, and only a document longer than a whole segment is split across segments (into whole
    segments and a rest). Everything but a one-step-per-segment walk is numpy.
    """
    return _packed(ids, lengths, text_len)[0]


class SegmentPacker:
    """`pack_documents` a batch of documents at a time, with the same rows as packing them all at once: the
    documents of the last segment, which later ones may still join, wait for the next batch."""

    def __init__(self, text_len: int):
        self.text_len = text_len
        self.ids = np.empty(0, dtype=np.int32)
        self.lengths = np.empty(0, dtype=np.int64)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The rows these documents finish."""
        ids, lengths = np.concatenate([self.ids, ids]), np.concatenate([self.lengths, lengths])
        rows, open_row, open_document = _packed(ids, lengths, self.text_len)
        self.ids, self.lengths = ids[int(lengths[:open_document].sum()) :], lengths[open_document:]
        return rows[:open_row]

    def finish(self) -> np.ndarray:
        return pack_documents(self.ids, self.lengths, self.text_len)


def load_text_tokenizer(url: str) -> TextTokenizer:
    """The SentencePiece model at a local path or s3:// URL, loaded once per worker process and version of the
    file: a worker that outlives one build (a Ray instance kept between builds) never tokenizes with a model
    retrained since."""
    path = local_copy(url)
    try:
        status = os.stat(path)
        version = (status.st_mtime_ns, status.st_size)
    except OSError:
        version = None  # no file: TextTokenizer's own error names it
    return _tokenizer_at(path, version)


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str, version: tuple[int, int] | None) -> TextTokenizer:
    return TextTokenizer(path, num_threads=1)  # a Ray task is one core


def prepare_text(plan: ShardPlan, config: DataConfig, storage: Storage | None = None) -> ShardWork:
    """Tokenize every document of the shard's file (or file part), pack them into full-length segments, and
    store the segments in blocks of `text_segments_per_sample` per tar entry ([segments, text_len] uint16,
    right-padded with `<pad>`): one entry per 128-token segment would spend 2 KB of tar headers on 256 bytes
    of ids. Documents are read (a compressed file as a stream), tokenized and packed a batch at a time.

    Given the output `storage` (the build does), each tar is spooled to local disk as its entries come and
    stored as soon as it is full (`shard_bytes`, the parts `finish_shard` would cut), so a worker holds a batch
    of text and a chunk of entries whatever the size of the file or of a part; without, the entries stay in the
    work for `finish_shard`.

    With the source's `validation`, held-out documents (see `holdout`) are packed apart, into blocks of the
    shard's validation file."""
    work = ShardWork(plan)
    (text_file,) = plan.items
    source = next(s for s in config.sources if s.name == text_file.source)
    tokenizer = load_text_tokenizer(config.text_tokenizer)
    if tokenizer.vocab_size > 2**16:
        raise ValueError(f"{config.text_tokenizer}: {tokenizer.vocab_size:,} ids do not fit the shards' uint16")
    split = document_splitter(config, text_file.source)
    training, held_out = (_SegmentBlocks(work, config, held_out, storage) for held_out in (False, True))
    try:
        for documents in document_batches(text_file, source.text_field, source.documents, work,
                                          config.max_document_bytes,
                                          max_compression_ratio=config.max_compression_ratio):
            documents, held_out_documents = split(documents) if split else (documents, [])
            training.add(*tokenizer.encode_concatenated(documents))
            if held_out_documents:
                held_out.add(*tokenizer.encode_concatenated(held_out_documents))
    except Exception as error:  # a file never stops the build: what was read before the error is kept
        work.failed(text_file.source, open_storage(text_file.root).url(text_file.name), error)
    training.finish()
    held_out.finish()
    if storage is not None:
        work.parts = training.parts.finish() + held_out.parts.finish()
    return work


MEMBER_CHUNK_BYTES = 1 << 20
"""Tar members are made (and a streamed part spooled) this many bytes of entries at a time."""


def _member_chunks(samples: Iterable[dict]) -> Iterator[bytes]:
    """The tar members of samples in order, as `tar_bytes` lays them out without its end blocks, about
    MEMBER_CHUNK_BYTES at a time: a tar made chunk by chunk never holds its members twice."""
    batch, size = [], 0
    for sample in samples:
        batch.append(sample)
        size += sample_tar_bytes(sample)
        if size >= MEMBER_CHUNK_BYTES:
            yield tar_bytes(batch)[:size]
            batch, size = [], 0
    if batch:
        yield tar_bytes(batch)[:size]


class _StreamedParts:
    """A text stream's tar entries written as the consecutive parts `finish_shard` would cut: a part is closed
    before the next entry would take it past `shard_bytes`. Entries go to a local spool file as they come (hashed
    on the way), which is uploaded when its part closes: a worker holds a chunk of entries, never a part's entries
    and its tar, so `shard_bytes` costs local disk (`Storage.upload_atomic` copies or streams from the file)."""

    def __init__(self, plan: ShardPlan, config: DataConfig, held_out: bool, storage: Storage):
        self.plan, self.storage, self.max_bytes = plan, storage, config.shard_bytes
        self.name_of = validation_name if held_out else shard_name
        self.pending: list[dict] = []
        self.pending_bytes, self.entries, self.member_bytes = 0, 0, 0
        self.written: Counter = Counter()
        self.spool, self.digest = None, hashlib.sha256()
        self.stored: list[tuple[bytes, dict]] = []

    def add(self, source: str, sample: dict, training_samples: int) -> None:
        size = sample_tar_bytes(sample)
        if self.entries and tar_size(self.member_bytes + size) > self.max_bytes:
            self._close()
        self.pending.append(sample)
        self.written[source] += training_samples
        self.entries += 1
        self.member_bytes += size
        self.pending_bytes += size
        if self.pending_bytes >= MEMBER_CHUNK_BYTES:
            self._spool_pending()

    def finish(self) -> list[tuple[bytes, dict]]:
        """The stored parts, each with no bytes and its manifest entry."""
        self._close()
        return self.stored

    def _append(self, data: bytes) -> None:
        if self.spool is None:
            self.spool = tempfile.NamedTemporaryFile(prefix="beit3-part-", suffix=".tar")
        self.spool.write(data)
        self.digest.update(data)

    def _spool_pending(self) -> None:
        for chunk in _member_chunks(self.pending):
            self._append(chunk)
        self.pending, self.pending_bytes = [], 0

    def _close(self) -> None:
        if not self.entries:
            return
        self._spool_pending()
        self._append(bytes(tar_size(self.member_bytes) - self.member_bytes))  # the end blocks and record padding
        self.spool.flush()
        name = self.name_of(self.plan.kind, self.plan.index, len(self.stored))
        record = ShardRecord(name, self.plan.name, self.plan.kind, sum(self.written.values()), self.entries,
                             tar_size(self.member_bytes), self.digest.hexdigest())
        self.storage.upload_atomic(name, Path(self.spool.name))
        self.spool.close()  # which deletes it
        self.stored.append((b"", {**record.__dict__, "written": dict(self.written), "skipped": {}, "repaired": {}}))
        self.spool, self.digest, self.written = None, hashlib.sha256(), Counter()
        self.entries, self.member_bytes = 0, 0


class _SegmentBlocks:
    """One stream of a text shard's documents (its training or its held-out ones) packed into segments and
    stored in blocks of `text_segments_per_sample` as they fill; held-out block keys end in `-val{block}`. With
    a `storage`, blocks go to parts written as they fill (`_StreamedParts`), else to the work."""

    def __init__(self, work: ShardWork, config: DataConfig, held_out: bool, storage: Storage | None = None):
        self.work, self.held_out, self.block_size = work, held_out, config.text_segments_per_sample
        self.packer = SegmentPacker(config.text_len)
        self.unstored, self.stored = np.empty((0, config.text_len), dtype=np.uint16), 0
        self.parts = None if storage is None else _StreamedParts(work.plan, config, held_out, storage)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self._store(self.packer.add(ids, lengths))

    def finish(self) -> None:
        self._store(self.packer.finish(), last=True)

    def _store(self, rows: np.ndarray, last: bool = False) -> None:
        (text_file,) = self.work.plan.items
        rows = np.concatenate([self.unstored, rows])
        whole = len(rows) if last else len(rows) // self.block_size * self.block_size
        for first in range(0, whole, self.block_size):
            block = rows[first : first + self.block_size]
            number = (self.stored + first) // self.block_size
            sample = {
                "__key__": f"{text_file.source}-{text_file.index:06d}-{'val' if self.held_out else ''}{number:06d}",
                "ids.npy": npy_bytes(block),
                "json": _provenance_json({"file": text_file.name, "source": text_file.source,
                                          "start_byte": text_file.start, "first_segment": self.stored + first,
                                          "segments": len(block)}),
            }
            if self.parts is None:
                self.work.add(text_file.source, sample, training_samples=len(block), held_out=self.held_out)
            else:
                self.parts.add(text_file.source, sample, len(block))
        self.unstored, self.stored = rows[whole:], self.stored + whole


def _by_source(counter: Counter) -> dict[str, dict[str, int]]:
    grouped: dict[str, dict[str, int]] = {}
    for (source, reason), count in counter.items():
        grouped.setdefault(source, {})[reason] = count
    return grouped


def _tar_filled(samples: list[dict], member_bytes: int) -> bytearray:
    """`tar_bytes(samples)`, filled in chunk by chunk: the tar is the one copy of the members made."""
    data, position = bytearray(tar_size(member_bytes)), 0
    for chunk in _member_chunks(samples):
        data[position : position + len(chunk)] = chunk
        position += len(chunk)
    return data


def finish_shard(work: ShardWork, config: DataConfig) -> list[tuple[bytes | bytearray, dict]]:
    """The tars of a planned shard with their manifest entries, in order.

    Entries go to consecutive parts (see `part_bounds`): a part is closed at `samples_per_shard` images or
    pairs, or before the next entry would take it past `shard_bytes`. Held-out entries (see `holdout`) fill
    parts of their own named `val-{kind}-{index:06d}[-{part:03d}].tar` (a `ValidationPlan` holds only them).
    Skipped and repaired counts, and the histogram of its visual codes per source (`code_counts`, which the
    manifest adds up rather than lists), go with the first file. A shard left with no samples gets one entry
    with no bytes and no file. Parts the prepare stage already stored (`work.parts`) are taken as they are.
    """
    plan = work.plan
    max_samples = None if plan.kind == "text" else config.samples_per_shard
    parts = list(work.parts or [])
    for held_out, name_of in ((False, shard_name), (True, validation_name)) if work.parts is None else ():
        entries = [entry for entry, held in enumerate(work.held_out) if held == held_out]
        sizes = [sample_tar_bytes(work.samples[entry]) for entry in entries]
        for part, (start, stop) in enumerate(part_bounds(sizes, max_samples, config.shard_bytes)):
            chosen = entries[start:stop]
            written, name = work.written(chosen), name_of(plan.kind, plan.index, part)
            data = _tar_filled([work.samples[entry] for entry in chosen], sum(sizes[start:stop]))
            record = ShardRecord.of(name, plan.name, plan.kind, sum(written.values()), len(chosen), data)
            parts.append((data, {**record.__dict__, "written": dict(written), "skipped": {}, "repaired": {}}))
    if not parts:
        record = ShardRecord(plan.name, plan.name, plan.kind, 0, 0, 0, None)
        parts.append((b"", {**record.__dict__, "written": {}, "skipped": {}, "repaired": {}}))
    first = parts[0][1]
    first.update(skipped=_by_source(work.skipped), repaired=_by_source(work.repaired))
    if work.code_counts:
        first["code_counts"] = {source: counts.tolist() for source, counts in sorted(work.code_counts.items())}
    return parts
