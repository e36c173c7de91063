"""Raw inputs for pipeline tests: real JPEG/PNG files of many modes plus broken ones, and text corpora."""

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet
import zstandard
from PIL import Image

from beit3.tokenizers.text_training import train_text_tokenizer

CLASSES = ("n01440764", "n01443537")
BAD_IMAGES = {"zero.JPEG": "empty", "text.JPEG": "not_an_image", "cut.JPEG": "corrupt", "bomb.png": "too_many_pixels"}
BOMB_PIXELS_CAP = 1_000_000
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Tiếng Việt là ngôn ngữ chính thức của Việt Nam.",
    "我爱自然语言处理和计算机视觉。",
    "Masked data modeling unifies images, texts and image-text pairs. " * 6,
    "A short one.",
]


def _image(mode: str, seed: int) -> tuple[str, bytes]:
    rng = np.random.default_rng(seed)
    height, width = 100 + 10 * (seed % 5), 140 - 7 * (seed % 4)
    base = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
    suffix, fmt = (".JPEG", "JPEG") if mode in ("RGB", "CMYK", "L") else (".png", "PNG")
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(
        (rng.random((height, width)) * 65535).astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return suffix, buffer.getvalue()


def make_imagenet(root: Path, per_class: int = 6) -> dict[str, str]:
    """Class folders of good images in several modes plus the broken ones; returns {relative name: label}."""
    good = {}
    modes = ["RGB", "L", "RGBA", "CMYK", "P", "I;16"]
    for class_index, label in enumerate(CLASSES):
        folder = root / label
        folder.mkdir(parents=True)
        for index in range(per_class):
            suffix, data = _image(modes[index % len(modes)], seed=class_index * 100 + index)
            name = f"{label}_{index:04d}{suffix}"
            (folder / name).write_bytes(data)
            good[f"{label}/{name}"] = label
    broken = root / CLASSES[0]
    (broken / "zero.JPEG").write_bytes(b"")
    (broken / "text.JPEG").write_bytes(b"definitely not an image")
    (broken / "cut.JPEG").write_bytes(_image("RGB", 7)[1][:300])
    bomb = io.BytesIO()
    Image.new("L", (1100, 1000)).save(bomb, format="PNG")
    (broken / "bomb.png").write_bytes(bomb.getvalue())
    return good


def pack_class_tars(root: Path, target: Path) -> None:
    """ImageNet-21K's other distribution: one tar per class, members at the top level."""
    target.mkdir(parents=True)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        with tarfile.open(target / f"{folder.name}.tar", "w") as archive:
            for path in sorted(folder.iterdir()):
                archive.add(path, arcname=path.name)


def make_text(root: Path) -> list[str]:
    """A .txt corpus with NUL bytes and invalid UTF-8, and a .jsonl.gz with a bad line and an empty record;
    returns the documents as the pipeline should read them (whitespace-normalised, NULs dropped)."""
    root.mkdir(parents=True, exist_ok=True)
    txt = "\n".join(DOCUMENTS[:3]).encode() + b"\nbroken \xff\xfe bytes and a NUL\x00 here\n\n"
    (root / "a.txt").write_bytes(txt)
    records = [json.dumps({"text": DOCUMENTS[3]}), "{not json", json.dumps({"text": ""}),
               json.dumps({"text": DOCUMENTS[4]})]
    (root / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(records).encode()))
    paragraphs = "A paragraph\nthat spans two lines.\n\nAnother paragraph."
    (root / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(paragraphs.encode()))
    return [*DOCUMENTS[:3], "broken \ufffd\ufffd bytes and a NUL here", " ".join(DOCUMENTS[3].split()), DOCUMENTS[4],
            "A paragraph", "that spans two lines.", "Another paragraph."]


def make_spm(root: Path) -> Path:
    corpus = root / "spm_corpus.txt"
    corpus.write_text("\n".join(DOCUMENTS * 20), encoding="utf-8")
    return train_text_tokenizer([corpus], root / "spm", vocab_size=70, num_threads=1).model_path


def data_config(output: str, imagenet: str, text: str, spm: str, **overrides) -> dict:
    config = {
        "name": "test-data",
        "output": output,
        "seed": 3,
        "samples_per_shard": 4,
        "sources": [{"kind": "imagenet", "name": "in21k", "path": imagenet},
                    {"kind": "text", "name": "corpus", "paths": [text]}],
        "text_tokenizer": spm,
        "text_len": 16,
        "text_segments_per_sample": 3,
        "image": {"shorter_side": 96, "views_per_image": 2, "tokenizer_view_size": 64,
                  "max_pixels": BOMB_PIXELS_CAP},
        "visual_tokenizer": {"kind": "random", "seed": 0, "codebook_size": 512},
        "ray": {"tokenizer_actors": 1},
    }
    config.update(overrides)
    return config


def tar_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


LONG_CAPTION = "a very long caption that goes on " * 40


def make_pairs(root: Path) -> dict[str, dict]:
    """Pairs in the three layouts, each with broken entries; returns the expected counts per source."""
    image = _image("RGB", 1)[1]
    (root / "wds").mkdir(parents=True)
    (root / "wds" / "00000.tar").write_bytes(tar_of({
        "000.jpg": image, "000.txt": b"a photo of a cat", "000.json": b"{}",
        "001.jpg": image, "001.txt": b"broken \xff caption",
        "002.jpg": image,
        "003.txt": b"caption without an image",
        "004.jpg": image, "004.txt": b"   ",
        "005.jpg": image, "005.txt": LONG_CAPTION.encode(),
        "006.jpg": b"not a jpeg", "006.txt": b"corrupt image",
    }))
    images = root / "images"
    images.mkdir()
    for index in range(3):
        (images / f"img{index}.jpg").write_bytes(_image("RGB", 10 + index)[1])
    rows = [("img0.jpg", "first caption"), ("img1.jpg", "second caption"), ("absent.jpg", "no such image"),
            ("img2.jpg", "")]
    pyarrow.parquet.write_table(pyarrow.table({"url": [r[0] for r in rows], "text": [r[1] for r in rows]}),
                                root / "pairs.parquet")
    (root / "pairs.tsv").write_text("image\tcaption\n" + "\n".join(f"{a}\t{b}" for a, b in rows[:2]) + "\n")
    coco = {"images": [{"id": 1, "file_name": "img0.jpg"}, {"id": 2, "file_name": "img1.jpg"}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "a cat"},
                            {"id": 11, "image_id": 2, "caption": "a dog"},
                            {"id": 12, "image_id": 1, "caption": "another caption of the cat"}]}
    (root / "captions.json").write_text(json.dumps(coco))
    return {
        "webdataset": {"written": 3, "skipped": {"missing_caption": 1, "missing_image": 1, "empty_caption": 1,
                                                 "not_an_image": 1},
                       "repaired": {"invalid_utf8_replaced": 1, "caption_truncated": 1}},
        "table": {"written": 2, "skipped": {"missing_image": 1, "empty_caption": 1}, "repaired": {}},
        "tsv": {"written": 2, "skipped": {}, "repaired": {}},
        "coco": {"written": 3, "skipped": {}, "repaired": {}},
    }


def pair_sources(root: Path) -> list[dict]:
    return [
        {"kind": "pairs_webdataset", "name": "webdataset", "path": str(root / "wds")},
        {"kind": "pairs_table", "name": "table", "table": str(root / "pairs.parquet"), "images": str(root / "images"),
         "image_column": "url", "caption_column": "text"},
        {"kind": "pairs_table", "name": "tsv", "table": str(root / "pairs.tsv"), "images": str(root / "images")},
        {"kind": "coco", "name": "coco", "annotations": str(root / "captions.json"), "images": str(root / "images")},
    ]


# --- hostile inputs, built byte by byte: small files that decode badly or claim huge sizes -----------------------

BOMB_UNIT = 64 * 2**20
"""Bytes one compressed unit of a bomb expands to; the unit is compressed once and written again and again."""
HUGE_INTEGER_LINE = b'{"text": ' + b"7" * 5000 + b"}"
"""JSON that Python's parser refuses: more than 4300 digits in an integer (a ValueError, not a JSONDecodeError)."""
DEEP_JSON_LINE = b'{"text": "deep", "nested": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
"""JSON that Python's parser refuses: nesting past the recursion limit (a RecursionError)."""


def noise_image(width: int, height: int = 32, fmt: str = "JPEG") -> bytes:
    """A noise image `width` x `height` pixels: its width identifies it among stored images of that height."""
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def wide_png(width: int = 70_000) -> bytes:
    """A PNG of `width` x 1 pixels, a few hundred bytes: it decodes, but JPEG stores at most 65,500 a side."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, 1), (30, 60, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def zstd_bomb(pattern: bytes, expanded_bytes: int) -> bytes:
    """A small .zst that expands to about `expanded_bytes` of `pattern` repeated, in frames of BOMB_UNIT."""
    frame = zstandard.ZstdCompressor().compress(pattern * (BOMB_UNIT // len(pattern)))
    return frame * (expanded_bytes // BOMB_UNIT)


def gzip_bomb(pattern: bytes, expanded_bytes: int, head: bytes = b"") -> bytes:
    """A small .gz (one gzip member per BOMB_UNIT) that expands to `head`, then about `expanded_bytes` of
    `pattern` repeated."""
    member = gzip.compress(pattern * (BOMB_UNIT // len(pattern)), compresslevel=9)
    return (gzip.compress(head) if head else b"") + member * (expanded_bytes // BOMB_UNIT)


def tar_header_at(data: bytes, name: str) -> int:
    """The offset of member `name`'s header in a tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getmember(name).offset


def with_declared_size(data: bytes, name: str, declared: int) -> bytes:
    """The tar with member `name`'s size field set to `declared` (base-256, as GNU tar writes sizes of 8 GiB and
    more) and its header checksum made right again: a size far beyond the bytes the file holds."""
    header = bytearray(data[(offset := tar_header_at(data, name)) : offset + tarfile.BLOCKSIZE])
    header[124:136] = b"\x80" + declared.to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:offset] + bytes(header) + data[offset + tarfile.BLOCKSIZE :]


def tar_with_sparse_member(members: dict[str, bytes], sparse_name: str, real_size: int) -> bytes:
    """A PAX tar of `members` with a sparse member first: 10 stored bytes at the end of `real_size` bytes of
    holes, which tarfile fills in with zeros when the member is read."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(sparse_name)
        info.size = 10
        info.pax_headers = {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.size": str(real_size),
                            "GNU.sparse.map": f"{real_size - 10},10"}
        archive.addfile(info, io.BytesIO(b"\xff" * 10))
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def gzip_tar_bomb(name: str, expanded_bytes: int) -> bytes:
    """A gzip-compressed tar, a few megabytes, whose one member `name` declares and holds `expanded_bytes` zeros."""
    info = tarfile.TarInfo(name)
    info.size = expanded_bytes
    return gzip_bomb(b"\0", expanded_bytes, head=info.tobuf(format=tarfile.GNU_FORMAT))
