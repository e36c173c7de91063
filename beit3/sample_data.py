"""The embedded sample data: small raw corpora built from files that ship with installed packages.

- images: crops, flips and colour shifts of the photographs matplotlib ships (`mpl-data/sample_data`), filed
  in two class folders the way ImageNet is distributed;
- labelled images: generated pictures of eight classes (a shape in a colour, on varied backgrounds, sizes and
  places), in class folders, enough per class for a nearest-neighbour probe of the learned features;
- text: the docstrings of Python's standard library, one document per line;
- image-text pairs: generated pictures of coloured shapes with captions that describe them, as COCO-style
  annotations (the only part that is synthetic: no captioned photographs ship with the packages).

`write_sample_corpora` writes the raw inputs; `sample_data_config` describes a pipeline build over them, with
some of every source held out (`validation`) so that a run can be evaluated on samples it never trained on;
`build_sample_dataset` does both, trains a text tokenizer on the text and runs `beit3 data build`;
`tiny_recipe` points `configs/pretrain/tiny_cpu.yaml` at the result.
"""

import importlib
import inspect
import json
import random
import subprocess
import sys
from pathlib import Path

import matplotlib
import yaml
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from beit3.config import read_config_mapping
from beit3.tokenizers.text_training import train_text_tokenizer

TINY_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "tiny_cpu.yaml"
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
STDLIB_MODULES = ("collections", "itertools", "functools", "json", "pathlib", "random", "statistics", "string",
                  "textwrap", "re", "heapq", "bisect", "fractions", "decimal", "datetime", "calendar", "csv",
                  "argparse", "shutil", "tarfile", "zipfile", "gzip", "hashlib", "base64", "difflib")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
LABELLED_CLASSES = tuple(f"{colour}_{shape}" for shape in ("circle", "square")
                         for colour in ("red", "green", "blue", "yellow"))
"""The labelled images' classes, one folder each."""


def _photos() -> list[Image.Image]:
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [Image.open(folder / name).convert("RGB") for name in PHOTOS]


def _photo_variant(photo: Image.Image, rng: random.Random) -> Image.Image:
    width, height = photo.size
    side = int(min(width, height) * rng.uniform(0.5, 1.0))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    image = photo.crop((left, top, left + side, top + side)).resize((160, 160), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))


def _shape_picture(shape: str, colour: str, background: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (160, 160), COLOURS[background])
    draw = ImageDraw.Draw(image)
    size = rng.randint(50, 100)
    left, top = rng.randint(5, 155 - size), rng.randint(5, 155 - size)
    box = (left, top, left + size, top + size)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(left + size // 2, top), (left, top + size), (left + size, top + size)], fill=COLOURS[colour])
    return image


def stdlib_documents() -> list[str]:
    """Paragraphs of the standard library's docstrings, whitespace-joined, one document each."""
    documents = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        members = [module] + [value for _, value in sorted(vars(module).items()) if callable(value)]
        for member in members:
            doc = inspect.getdoc(member) or ""
            documents += [" ".join(p.split()) for p in doc.split("\n\n") if len(p.split()) >= 6]
    return list(dict.fromkeys(documents))


def write_sample_corpora(root: Path, images_per_class: int = 24, pairs: int = 48, text_files: int = 4,
                         seed: int = 0, labelled_per_class: int = 20) -> Path:
    """Write the raw sample inputs under `root` (imagenet/, labelled/, text/, pairs/); returns `root`."""
    rng = random.Random(seed)
    photos = _photos()
    for class_index, label in enumerate(("n00000001", "n00000002")):
        folder = root / "imagenet" / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            photo = photos[(class_index + index) % len(photos)]
            _photo_variant(photo, rng).save(folder / f"{label}_{index:04d}.JPEG", quality=90)
    for label in LABELLED_CLASSES:
        colour, shape = label.split("_")
        folder = root / "labelled" / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(labelled_per_class):
            background = rng.choice([c for c in COLOURS if c != colour])
            _shape_picture(shape, colour, background, rng).save(folder / f"{label}_{index:04d}.jpg", quality=90)
    documents = stdlib_documents()
    (root / "text").mkdir(parents=True, exist_ok=True)
    for part in range(text_files):
        (root / "text" / f"stdlib-{part}.txt").write_text("\n".join(documents[part::text_files]) + "\n")
    pictures = root / "pairs" / "images"
    pictures.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(pairs):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        background = rng.choice([c for c in COLOURS if c != colour])
        name = f"shape-{index:04d}.jpg"
        _shape_picture(shape, colour, background, rng).save(pictures / name, quality=90)
        images.append({"id": index, "file_name": name})
        annotations.append({"id": index, "image_id": index,
                            "caption": f"a {colour} {shape} on a {background} background"})
    (root / "pairs" / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def sample_data_config(root: Path, spm: Path, output: str, image_size: int = 112, patch_size: int = 16,
                       samples_per_shard: int = 8) -> dict:
    """A data build of the sample corpora whose codes fit a model of `image_size` with `patch_size` patches."""
    return {
        "name": "sample-data",
        "output": output,
        "seed": 0,
        "samples_per_shard": samples_per_shard,
        "sources": [{"kind": "imagenet", "name": "photos", "path": str(root / "imagenet"),
                     "validation": {"count": 4}},
                    {"kind": "imagenet", "name": "labelled_shapes", "path": str(root / "labelled"),
                     "validation": {"fraction": 0.25}},
                    {"kind": "text", "name": "stdlib", "paths": [str(root / "text")], "validation": {"fraction": 0.1}},
                    {"kind": "coco", "name": "shapes", "annotations": str(root / "pairs" / "captions.json"),
                     "images": str(root / "pairs" / "images"), "validation": {"count": 6}}],
        "text_tokenizer": str(spm),
        "text_len": 32,
        "text_segments_per_sample": 8,
        "caption_len": 32,
        "image": {"shorter_side": 128, "views_per_image": 2, "tokenizer_view_size": image_size},
        "visual_tokenizer": {"kind": "random", "seed": 0, "patch_size": patch_size, "codebook_size": 1024},
        "ray": {"tokenizer_actors": 1},
    }


def build_sample_dataset(root: Path, quiet: bool = True) -> dict:
    """Raw sample corpora, a 1,000-piece text tokenizer and their shards (`beit3 data build` in a process of
    its own, as a user runs it); returns {"shards": folder, "spm": model path}."""
    write_sample_corpora(root / "raw")
    spm = train_text_tokenizer(sorted((root / "raw" / "text").glob("*.txt")), root / "spm", vocab_size=1000,
                               num_threads=1).model_path
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(sample_data_config(root / "raw", spm, str(root / "shards"))))
    command = [sys.executable, "-m", "beit3.cli", "data", "build", "--config", str(data_yaml)]
    built = subprocess.run(command + (["--quiet"] if quiet else []), capture_output=quiet, text=True, cwd=root)
    if built.returncode != 0:
        raise RuntimeError(f"data build failed:\n{(built.stderr or '')[-4000:]}")
    return {"shards": root / "shards", "spm": spm}


def tiny_recipe(run_dir: Path, data: dict, **overrides) -> dict:
    """configs/pretrain/tiny_cpu.yaml on a built sample dataset, with fields overridden (nested dicts merge)."""
    recipe = read_config_mapping(TINY_RECIPE)
    recipe["model"] = str(TINY_RECIPE.parent / recipe["model"])
    recipe["run_dir"] = str(run_dir)
    recipe["data"].update(datasets=[str(data["shards"])], text_tokenizer=str(data["spm"]))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe
