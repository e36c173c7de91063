"""Data pipeline throughput per core against its ceiling, measured side by side in one run, taking turns.

Images: the pipeline's image path (read, decode, validate, resize, choose views, JPEG-encode, write the shard)
with the visual tokenizer stage disabled, against a bare Pillow decode + resize of the same files. Text: the
pipeline's text path (read, decode, tokenize, pack, write) against a bare SentencePiece encode of the same
documents (Python lists of ids); the path's own encode call (SentencePiece's int32 buffers) is timed alone
too, for what reading, normalising, packing and writing add to it. Both run the stage functions in this
process on one core (what each Ray worker does); the whole Ray job on the same inputs is timed too, for the
scheduling overhead at this small size.

    python benchmarks/pipeline_speed.py [--images 400]
"""

import argparse
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import sentencepiece
import torch
from PIL import Image

from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.job import build
from beit3.data_pipeline.processing import finish_shard, load_text_tokenizer, prepare_images, prepare_text
from beit3.data_pipeline.sources import plan_shards
from beit3.data_pipeline.storage import open_storage
from beit3.data_pipeline.views import resize_shorter_side
from beit3.tokenizers.text_training import train_text_tokenizer
from synthetic_inputs import synthetic_jpegs


def write_images(folder: Path, count: int) -> list[Path]:
    """ImageNet-sized JPEGs in two class folders."""
    paths = []
    for index, data in enumerate(synthetic_jpegs(count)):
        path = folder / ("n01440764" if index % 2 else "n01443537") / f"{index:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def write_text(folder: Path, lines: int) -> Path:
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    collected: list[str] = []
    for root in sorted(roots):
        for path in sorted(root.rglob("*.txt")):
            collected += [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if len(collected) >= lines:
                break
    path = folder / "text" / "corpus.txt"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(collected[:lines]), encoding="utf-8")
    return path


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def interleaved_medians(repeats: int, works: dict) -> dict[str, float]:
    """Median time of each work, the works taking turns, so that a change in the machine's load while measuring
    falls on both sides of a ratio alike."""
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            times[name].append(timed(work))
    return {name: statistics.median(samples) for name, samples in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        image_paths = write_images(root / "imagenet", args.images)
        corpus = write_text(root, args.lines)
        spm = train_text_tokenizer([corpus], root / "spm", vocab_size=8000, num_threads=1).model_path
        raw = {"name": "bench", "output": str(root / "out"), "samples_per_shard": args.images,
               "sources": [{"kind": "imagenet", "name": "in", "path": str(root / "imagenet")},
                           {"kind": "text", "name": "text", "paths": [str(corpus)]}],
               "text_tokenizer": str(spm), "visual_tokenizer": None}
        config = validate_config(DataConfig, raw, "benchmark")
        image_plan, text_plan = plan_shards(config)
        storage = open_storage(config.output)

        def bare_images():
            for path in image_paths:
                resize_shorter_side(Image.open(path).convert("RGB"), config.image.shorter_side)

        def store(work):
            for data, entry in finish_shard(work, config):
                storage.write_atomic(f"stages/{entry['name']}", data)

        def pipeline_images():
            store(prepare_images(image_plan, config))

        documents = [" ".join(line.split()) for line in corpus.read_text(encoding="utf-8").splitlines()]
        bare_processor = sentencepiece.SentencePieceProcessor(model_file=str(spm), num_threads=1)
        token_count = sum(len(ids) for ids in bare_processor.Encode(documents))

        def bare_text():
            bare_processor.Encode(documents, num_threads=1)

        def pipeline_text():
            store(prepare_text(text_plan, config))

        def pipeline_encode():
            load_text_tokenizer(config.text_tokenizer).encode_concatenated(documents)

        pipeline_text()  # loads the tokenizer once, as a worker does before its first shard
        times = {**interleaved_medians(args.repeats, {"bare images": bare_images, "pipeline images": pipeline_images}),
                 **interleaved_medians(args.repeats, {"bare text": bare_text, "pipeline text": pipeline_text,
                                                      "pipeline encode": pipeline_encode})}
        ray_seconds = timed(lambda: build(config, progress=False))

    images, rate = args.images, lambda name: args.images / times[name]
    print(f"pipeline_speed: {images} JPEGs of 500x375 to shorter side {config.image.shorter_side}, "
          f"{len(documents):,} text lines ({token_count:,} pieces), one core, median of {args.repeats} taking turns")
    print(f"  bare Pillow decode + resize      {rate('bare images'):8.1f} images/s")
    print(f"  pipeline image path, no codes    {rate('pipeline images'):8.1f} images/s   "
          f"{times['bare images'] / times['pipeline images']:.2f}x of bare")
    print(f"  bare SentencePiece encode        {token_count / times['bare text'] / 1e6:8.2f} M tokens/s")
    print(f"  pipeline text path               {token_count / times['pipeline text'] / 1e6:8.2f} M tokens/s   "
          f"{times['bare text'] / times['pipeline text']:.2f}x of bare")
    print(f"    its encode alone (int32 arrays) {token_count / times['pipeline encode'] / 1e6:7.2f} M tokens/s   "
          f"{times['bare text'] / times['pipeline encode']:.2f}x of bare")
    print(f"  whole Ray job (2 shards, start-up included): {ray_seconds:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
