"""The shard format: WebDataset tars named `{kind}-{index:06d}.tar`, byte-for-byte reproducible.

Per sample (fields present by kind):
- `jpg`: the image, resized to the configured shorter side and re-encoded;
- `codes.npy`: uint16 visual codes, [views, rows, cols], one grid per stored view;
- `views.json`: the crop box and flip of each view, in the stored image's pixels;
- `ids.npy`: uint16 text ids (XLM-R layout: bos ... eos, unpadded);
- `json`: provenance (source, file, index within it, label when there is one).

Tar members carry fixed owners and timestamps, so the same samples always give the same bytes and sha256.
"""

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import webdataset

KINDS = ("image", "text", "pair")


def shard_name(kind: str, index: int) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r} (expected one of {', '.join(KINDS)})")
    return f"{kind}-{index:06d}.tar"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def json_bytes(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def tar_bytes(samples: list[dict[str, bytes | str]]) -> bytes:
    """Samples (`__key__` plus field name -> bytes) as one tar, in the given order."""
    buffer = io.BytesIO()
    writer = webdataset.TarWriter(buffer, user="beit3", group="beit3", encoder=False, mtime=0.0)
    for sample in samples:
        writer.write(sample)
    writer.close()
    return buffer.getvalue()


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard as the manifest lists it."""

    name: str
    kind: str
    samples: int
    bytes: int
    sha256: str | None

    @classmethod
    def of(cls, name: str, kind: str, samples: int, data: bytes) -> "ShardRecord":
        return cls(name, kind, samples, len(data), hashlib.sha256(data).hexdigest())
