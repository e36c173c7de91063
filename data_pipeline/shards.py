"""The shard format: WebDataset tars named `{kind}-{index:06d}.tar`, byte-for-byte reproducible.

A planned shard whose samples would overflow the sample or byte target continues in parts named
`{kind}-{index:06d}-{part:03d}.tar` (part 1 onwards); see `part_bounds`.

Per sample (fields present by kind):
- `jpg`: the image, resized to the configured shorter side and re-encoded;
- `codes.npy`: uint16 visual codes, [views, rows, cols], one grid per stored view;
- `views.json`: the crop box and flip of each view, in the stored image's pixels;
- `ids.npy`: uint16 text ids (XLM-R layout: bos ... eos): a caption's, unpadded, in pair shards; in text
  shards a [segments, text_len] block of packed segments right-padded with `<pad>` (1);
- `json`: provenance (source, file, index within it, label when there is one).

Tar members carry fixed owners and timestamps, so the same samples always give the same bytes and sha256.
WebDataset reads them back (`webdataset.WebDataset(url)`).
"""

import functools
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

KINDS = ("image", "text", "pair")


def shard_name(kind: str, index: int, part: int = 0) -> str:
    """The planned shard's name, or that of a further part of it (`part` 1 onwards)."""
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r} (expected one of {', '.join(KINDS)})")
    return f"{kind}-{index:06d}.tar" if part == 0 else f"{kind}-{index:06d}-{part:03d}.tar"


@functools.lru_cache(maxsize=1024)
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()[: -int(np.prod(shape)) * np.dtype(dtype).itemsize or None]


def npy_bytes(array: np.ndarray) -> bytes:
    """The `.npy` file of an array (the header is cached per shape and dtype: shards hold many alike)."""
    array = np.ascontiguousarray(array)
    return _npy_header(array.shape, array.dtype.str) + array.tobytes()


def json_bytes(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


BLOCK = 512
RECORD = 20 * BLOCK


def _member(name: str, data: bytes) -> bytes:
    """One regular-file member in POSIX ustar layout: read-only, owner beit3, timestamp 0.

    Python's tarfile spends ~100 us per member; text shards hold tens of thousands of tiny samples, so the
    fixed header is filled in directly. Every tar reader (webdataset's included) reads it like any other.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size = b"%011o\0" % len(data)
    checksum = _FIXED_HEADER_SUM + sum(encoded) + sum(size)
    header = b"".join((encoded, bytes(100 - len(encoded)), _HEADER_MODE_TO_SIZE, size, _HEADER_MTIME,
                       b"%06o\0 " % checksum, _HEADER_REST))
    return header + data + b"\0" * (-len(data) % BLOCK)


def _fixed_header_parts() -> tuple[bytes, bytes, bytes]:
    mode_to_size = b"0000444\0" + b"0000000\0" * 2  # mode, uid, gid (bytes 100-124)
    mtime = b"00000000000\0"  # bytes 136-148
    rest = bytearray(BLOCK - 156)  # typeflag (156) onwards
    rest[0:1] = b"0"
    rest[257 - 156 : 265 - 156] = b"ustar\x0000"
    rest[265 - 156 : 270 - 156] = rest[297 - 156 : 302 - 156] = b"beit3"
    rest[329 - 156 : 337 - 156] = rest[337 - 156 : 345 - 156] = b"0000000\0"
    return mode_to_size, mtime, bytes(rest)


_HEADER_MODE_TO_SIZE, _HEADER_MTIME, _HEADER_REST = _fixed_header_parts()
_FIXED_HEADER_SUM = sum(_HEADER_MODE_TO_SIZE) + sum(_HEADER_MTIME) + sum(b" " * 8) + sum(_HEADER_REST)
"""Checksum of the header fields every member shares (the checksum field itself counts as spaces)."""


def sample_tar_bytes(sample: dict[str, bytes]) -> int:
    """The bytes a sample's members take in a tar (a header block each, data padded to whole blocks)."""
    return sum(BLOCK + len(data) + (-len(data) % BLOCK) for field, data in sample.items() if field != "__key__")


def tar_size(member_bytes: int) -> int:
    """The size of a tar whose members take `member_bytes`: two end blocks, padded to a whole record."""
    body = member_bytes + 2 * BLOCK
    return body + (-body % RECORD)


def part_bounds(sample_bytes: list[int], max_samples: int | None, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of samples, one tar each: a part is closed when it holds `max_samples`
    samples (None: no limit) or when the next sample would make its tar larger than `max_bytes`. A sample
    larger than that on its own gets a part of its own (samples are never cut)."""
    bounds, start, member_bytes = [], 0, 0
    for index, size in enumerate(sample_bytes):
        full = max_samples is not None and index - start == max_samples
        if index > start and (full or tar_size(member_bytes + size) > max_bytes):
            bounds.append((start, index))
            start, member_bytes = index, 0
        member_bytes += size
    if start < len(sample_bytes):
        bounds.append((start, len(sample_bytes)))
    return bounds


def tar_bytes(samples: list[dict[str, bytes]]) -> bytes:
    """Samples (`__key__` plus field name -> bytes) as one tar: samples in the given order, each sample's
    fields sorted by name (as webdataset's TarWriter orders them)."""
    members = [_member(f"{sample['__key__']}.{field}", sample[field])
               for sample in samples for field in sorted(sample) if field != "__key__"]
    body = b"".join(members) + b"\0" * (2 * BLOCK)
    return body + b"\0" * (-len(body) % RECORD)


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard file as the manifest lists it: the planned shard it belongs to (its own name, unless
    it is a further part), training samples (images, pairs, text segments), tar entries, bytes and sha256."""

    name: str
    shard: str
    kind: str
    samples: int
    entries: int
    bytes: int
    sha256: str | None

    @classmethod
    def of(cls, name: str, shard: str, kind: str, samples: int, entries: int, data: bytes) -> "ShardRecord":
        return cls(name, shard, kind, samples, entries, len(data), hashlib.sha256(data).hexdigest())
