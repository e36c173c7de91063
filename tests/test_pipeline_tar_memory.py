"""Image and pair builds from input tars at scale: a worker reads each planned sample of a tar by range, so the
peak memory of building a shard depends on `samples_per_shard`, not on the size of the tars it comes from."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_inputs import make_spm

from memory_probe import PEAK_SOURCE

SAMPLES_PER_SHARD = 40
IMAGE_SIDE = 400
"""Noise images of 400x400 pixels: about 150 KB each as JPEG, so the large inputs hold 60 MB of tar."""

MEASURE = PEAK_SOURCE + """
import json, os, pickle, sys
from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.processing import finish_shard, load_text_tokenizer, prepare_images, prepare_pairs
from beit3.data_pipeline.sources import plan_shards
from beit3.data_pipeline.storage import open_storage


def measure(raw):
    # Each stage as a Ray worker runs it on each planned shard in turn: prepare, the work pickled to the write
    # stage, the shard's tars made and stored; the largest peak above the start of a shard.
    config = validate_config(DataConfig, raw, "memory test")
    if config.text_tokenizer:
        load_text_tokenizer(config.text_tokenizer)  # loaded once per worker, before its first shard
    storage, largest, samples, plans = open_storage(config.output), 0, 0, plan_shards(config)
    for plan in plans:
        reset_peak()
        start = peak_kib()
        work = (prepare_pairs if plan.kind == "pair" else prepare_images)(plan, config)
        row = pickle.dumps(work)
        del work
        for data, entry in finish_shard(pickle.loads(row), config):
            storage.write_atomic(entry["name"], data)
            samples += entry["samples"]
        largest = max(largest, (peak_kib() - start) * 1024)
    return {"shard_peak": largest, "shards": len(plans), "samples": samples}


results = []
for raw in json.loads(sys.argv[1]):
    child = os.fork()  # each size from the same imported state, with a peak of its own
    if child == 0:
        print(json.dumps(measure(raw)), flush=True)
        os._exit(0)
    os.waitpid(child, 0)
"""


def noise_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def inputs(root: Path, kind: str, samples: int, spm: Path) -> dict:
    """A per-class tar (imagenet) or a downloader tar of pairs with `samples` samples, and the build's config."""
    images = [noise_jpeg(seed) for seed in range(4)]
    root.mkdir(parents=True)
    if kind == "imagenet":
        write_tar(root / "n01440764.tar", {f"{i:06d}.JPEG": images[i % 4] for i in range(samples)})
    else:
        write_tar(root / "00000.tar", {f"{i:09d}.{extension}": data for i in range(samples) for extension, data in
                                       (("jpg", images[i % 4]), ("txt", b"a photo of noise"), ("json", b"{}"))})
    return {"name": "tar-memory", "output": str(root / "out"), "samples_per_shard": SAMPLES_PER_SHARD,
            "visual_tokenizer": None, "text_tokenizer": str(spm) if kind != "imagenet" else None,
            "sources": [{"kind": kind, "name": "tars", "path": str(root)}]}


@pytest.mark.slow  # a fresh process, forked per input, building 880 images: 10-30 s on two shared cores
def test_the_peak_memory_of_building_a_shard_does_not_grow_with_its_input_tars(tmp_path):
    spm = make_spm(tmp_path)
    configs = [inputs(tmp_path / f"{kind}-{count}", kind, count, spm)
               for kind in ("imagenet", "pairs_webdataset") for count in (SAMPLES_PER_SHARD, 10 * SAMPLES_PER_SHARD)]
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(configs)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    small_images, large_images, small_pairs, large_pairs = map(json.loads, result.stdout.splitlines()[-4:])
    print({name: f"{measured['shard_peak'] / 2**20:.1f} MiB over {measured['shards']} shards"
           for name, measured in zip(("images", "images x10", "pairs", "pairs x10"),
                                     (small_images, large_images, small_pairs, large_pairs))})
    for small, large in ((small_images, large_images), (small_pairs, large_pairs)):
        assert small["samples"] == SAMPLES_PER_SHARD and large["samples"] == 10 * SAMPLES_PER_SHARD
        assert large["shards"] == 10 * small["shards"]
        # A large tar is 60 MB: holding it, or its headers' objects, would show many times over this margin.
        assert large["shard_peak"] < small["shard_peak"] + 8 * 2**20, (small, large)
