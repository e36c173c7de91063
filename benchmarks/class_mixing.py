"""How well the trainer's image micro-batches mix classes, against uniform sampling.

An ImageNet-style input of CLASSES x IMAGES small JPEGs is given twice, as class folders and as one tar per
class, and each is built by `beit3 data build` with shards smaller than a class (as at paper scale, where a class
is ~650 images and a shard 1,000). The trainer's own stream then reads each build with the released base recipe's
settings (configs/pretrain/base_released.yaml: the paper's shuffle window), and its 16-image micro-batches of one
epoch are compared with those of uniformly shuffled epochs:

- distinct classes per micro-batch (goal: at least 90% of uniform);
- classes shared by consecutive micro-batches (goal: at most 20% above uniform), so that hundreds of
  consecutive steps do not see the same few classes.

    python benchmarks/class_mixing.py [--classes 50] [--images 40] [--samples-per-shard 20] [--window 8]
"""

import argparse
import io
import json
import random
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.job import build
from beit3.pretrain.shard_streams import MicroBatchStream, index_datasets, stream_settings
from beit3.pretrain.train_config import PretrainConfig, load_pretrain_config
from beit3.tokenizers.text import TextTokenizer
from beit3.tokenizers.text_training import train_text_tokenizer

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "base_released.yaml"
MICRO_BATCH = 16
UNIFORM_EPOCHS = 400


def write_inputs(root: Path, classes: int, images: int) -> tuple[Path, Path]:
    """The same images as class folders (`n000/i000.jpg`) and as per-class tars (`n000.tar`)."""
    folders, tars = root / "folders", root / "tars"
    tars.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for label in range(classes):
        synset = f"n{label:03d}"
        (folders / synset).mkdir(parents=True)
        with tarfile.open(tars / f"{synset}.tar", "w") as archive:
            for image in range(images):
                pixels = generator.integers(0, 256, (24, 32, 3), dtype=np.uint8)
                encoded = io.BytesIO()
                Image.fromarray(pixels).save(encoded, format="JPEG", quality=80)
                (folders / synset / f"i{image:03d}.jpg").write_bytes(encoded.getvalue())
                member = tarfile.TarInfo(f"i{image:03d}.jpg")
                member.size = len(encoded.getvalue())
                archive.addfile(member, io.BytesIO(encoded.getvalue()))
    return folders, tars


def build_images(source: Path, output: Path, samples_per_shard: int) -> str:
    raw = {"name": "mixing", "output": str(output), "seed": 0, "samples_per_shard": samples_per_shard,
           "sources": [{"kind": "imagenet", "name": "classes", "path": str(source)}],
           "text_tokenizer": None, "visual_tokenizer": None,
           "image": {"shorter_side": 24, "views_per_image": 1}, "ray": {"tokenizer_actors": 1}}
    build(validate_config(DataConfig, raw, "class mixing"), progress=False)
    return str(output)


def labels_by_key(dataset: str) -> dict[str, str]:
    """Each stored sample's class, from the provenance the build wrote beside it (`<shard>/<key>` -> label)."""
    labels = {}
    for shard in sorted(Path(dataset).glob("image-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive:
                key, _, extension = member.name.partition(".")
                if extension == "json":
                    labels[f"{shard.name}/{key}"] = json.loads(archive.extractfile(member).read())["label"]
    return labels


def text_tokenizer(root: Path) -> TextTokenizer:
    """A recipe names a text tokenizer; the image stream reads no text, so a small one trained on this file's
    docstring serves."""
    corpus = root / "corpus.txt"
    corpus.write_text(__doc__)
    return train_text_tokenizer([corpus], root / "spm", vocab_size=70, num_threads=1)


def recipe(dataset: str, window: int, tokenizer: TextTokenizer) -> PretrainConfig:
    """The released base recipe (224-px images in 14 x 14 patches, seed 0) reading `dataset` with a shuffle
    window of `window` shards."""
    released = load_pretrain_config(RECIPE)
    data = released.data.model_copy(update={"datasets": [dataset], "text_tokenizer": str(tokenizer.model_path),
                                            "shuffle_window_shards": window})
    return released.model_copy(update={"data": data})


def trainer_order(config: PretrainConfig, tokenizer: TextTokenizer, samples: int) -> list[str]:
    """The keys of one epoch in the order the trainer's image stream reads them (one rank, one worker)."""
    shards = index_datasets(config.data.datasets).shards["image"]
    settings = stream_settings(config, "image", MICRO_BATCH, tokenizer)
    stream = MicroBatchStream(shards, settings, rank=0, world_size=1)._samples(0, 1, 0)
    return [key for key, _, _ in (next(stream) for _ in range(samples))]


def mixing(labels: list[str]) -> tuple[float, float]:
    """Mean distinct classes per micro-batch, and mean classes shared by consecutive micro-batches."""
    batches = [set(labels[i : i + MICRO_BATCH]) for i in range(0, len(labels) - MICRO_BATCH + 1, MICRO_BATCH)]
    return (statistics.fmean(len(batch) for batch in batches),
            statistics.fmean(len(a & b) for a, b in zip(batches, batches[1:])))


def uniform_mixing(labels: list[str], epochs: int = UNIFORM_EPOCHS) -> tuple[float, float]:
    """The same figures for uniformly shuffled epochs of the same labels (mean over seeded shuffles)."""
    figures = []
    for seed in range(epochs):
        shuffled = list(labels)
        random.Random(seed).shuffle(shuffled)
        figures.append(mixing(shuffled))
    return statistics.fmean(f[0] for f in figures), statistics.fmean(f[1] for f in figures)


def measure(root: Path, classes: int, images: int, samples_per_shard: int, window: int) -> dict[str, dict]:
    """Per input layout: the trainer's figures, uniform's, and their ratios."""
    results, tokenizer = {}, text_tokenizer(root)
    for layout, source in zip(("class folders", "per-class tars"), write_inputs(root, classes, images)):
        dataset = build_images(source, root / f"shards-{source.name}", samples_per_shard)
        labels = labels_by_key(dataset)
        order = [labels[key] for key in trainer_order(recipe(dataset, window, tokenizer), tokenizer, len(labels))]
        distinct, shared = mixing(order)
        uniform_distinct, uniform_shared = uniform_mixing(order)
        results[layout] = {"samples": len(labels), "distinct": distinct, "uniform_distinct": uniform_distinct,
                           "distinct_ratio": distinct / uniform_distinct, "shared": shared,
                           "uniform_shared": uniform_shared, "shared_ratio": shared / uniform_shared}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--images", type=int, default=40, help="images per class")
    parser.add_argument("--samples-per-shard", type=int, default=20)
    parser.add_argument("--window", type=int, default=8, help="the trainer's shuffle window, in shards")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = measure(Path(folder), args.classes, args.images, args.samples_per_shard, args.window)
    print(f"{args.classes} classes x {args.images} images, {args.samples_per_shard} samples per shard, shuffle window "
          f"{args.window} shards, {MICRO_BATCH}-image micro-batches")
    print(f"{'input':<16}{'distinct':>9}{'uniform':>9}{'ratio':>7}{'shared':>9}{'uniform':>9}{'ratio':>7}")
    for layout, r in results.items():
        print(f"{layout:<16}{r['distinct']:>9.2f}{r['uniform_distinct']:>9.2f}{r['distinct_ratio']:>7.2f}"
              f"{r['shared']:>9.2f}{r['uniform_shared']:>9.2f}{r['shared_ratio']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
