"""Raw inputs for pipeline tests: real JPEG/PNG files of many modes plus broken ones, and text corpora."""

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
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
    records = [json.dumps({"text": DOCUMENTS[3]}), "{not json", json.dumps({"text": ""}), json.dumps({"text": DOCUMENTS[4]})]
    (root / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(records).encode()))
    return [*DOCUMENTS[:3], "broken \ufffd\ufffd bytes and a NUL here", " ".join(DOCUMENTS[3].split()), DOCUMENTS[4]]


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
        "image": {"shorter_side": 96, "views_per_image": 2, "tokenizer_view_size": 64,
                  "max_pixels": BOMB_PIXELS_CAP},
        "visual_tokenizer": {"kind": "random", "seed": 0, "codebook_size": 512},
        "ray": {"tokenizer_actors": 1},
    }
    config.update(overrides)
    return config
