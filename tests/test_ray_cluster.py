"""The data build across Ray nodes and under a slow stage: a two-node cluster on loopback stores the shards of a local
build, byte for byte, with both nodes running shard tasks; and the object store budget (`ray.object_store_*`)
holds the prepare stage back while the visual-tokenizer stage after it is slower."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from PIL import Image

from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.job import build
from beit3.launch.ray.local_cluster import loopback_cluster
from pipeline_inputs import BAD_IMAGES, BOMB_PIXELS_CAP, make_imagenet

pytestmark = pytest.mark.slow  # end to end: Ray clusters and data builds

NODE_COUNTS = re.compile(r"^planned shards per Ray node \(id prefix\): prepare ([^;]+)", re.MULTILINE)


def image_config(images: Path, output: Path, **overrides) -> dict:
    config = {"name": "ray-cluster", "output": str(output), "seed": 3, "samples_per_shard": 2,
              "sources": [{"kind": "imagenet", "name": "images", "path": str(images)}],
              "image": {"shorter_side": 96, "tokenizer_view_size": 64, "max_pixels": BOMB_PIXELS_CAP},
              "visual_tokenizer": None}
    config.update(overrides)
    return config


def digests(output: Path) -> dict[str, str]:
    """sha256 of every file the build stored: the shards and the manifest."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(output.iterdir())}


def test_a_two_node_cluster_stores_the_shards_of_a_local_build(tmp_path):
    """`beit3 data build --ray-address` on a head and a second node (one CPU each) against a local build."""
    good = make_imagenet(tmp_path / "imagenet", per_class=6)
    planned = (len(good) + len(BAD_IMAGES)) // 2
    local_config = image_config(tmp_path / "imagenet", tmp_path / "local")
    build(validate_config(DataConfig, local_config, "local build"), progress=False)
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(image_config(tmp_path / "imagenet", tmp_path / "cluster")))

    with loopback_cluster(2, tmp_path) as cluster:
        # The cluster's environment tells Ray to use token authentication, which it would not for an explicit address.
        command = subprocess.run([sys.executable, "-m", "beit3.cli", "data", "build", "--config", str(config),
                                  "--ray-address", cluster.address, "--quiet"], env=cluster.environment,
                                 capture_output=True, text=True, timeout=300)
    assert cluster.leftovers == [], f"Ray processes outlived the cluster: {cluster.leftovers}"
    assert command.returncode == 0, command.stdout[-3000:] + command.stderr[-3000:]

    assert digests(tmp_path / "cluster") == digests(tmp_path / "local")
    per_node = dict(item.rsplit(" ", 1) for item in NODE_COUNTS.search(command.stdout).group(1).split(", "))
    assert len(per_node) == 2, command.stdout
    assert sum(map(int, per_node.values())) == planned


@pytest.fixture
def three_cpu_ray():
    """A local Ray instance with a CPU each for prepare tasks, the tokenizer actor and write tasks, so that what
    holds prepare back is the object store budget, not a write stage waiting for a CPU."""
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_slow_tokenizer_stage_holds_prepare_back_within_the_object_store_budget(tmp_path, three_cpu_ray):
    """Ten planned shards of two small images, each with a 224-pixel tokenizer view (150 KiB) for a ViT-S-sized
    encoder: preparing a shard takes milliseconds, coding it far longer (and the actor first starts and builds its
    model). Under Ray Data's default share of the object store, prepare runs ahead until nearly every shard waits
    in front of the tokenizer; with a 1 MiB budget, which holds the views of 3 shards (294 KiB each), at most those
    and the one being prepared are in flight. Both store the same bytes. Both run on worker processes that a build
    without a tokenizer started and warmed first: a fresh instance's start-up makes prepare the slow stage, and
    lets it run ahead of a budget it has no output size to check against yet (see README, "Memory between
    stages")."""
    images = tmp_path / "images" / "n01440764"
    images.mkdir(parents=True)
    for index in range(20):
        pixels = np.random.default_rng(index).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{index:03d}.JPEG", format="JPEG")
    slow_tokenizer = {"kind": "vqkd", "width": 384, "depth": 12, "heads": 6, "codebook_size": 512}

    def run(name: str, tokenizer: dict | None = slow_tokenizer, **ray_settings):
        config = image_config(tmp_path / "images", tmp_path / name, visual_tokenizer=tokenizer,
                              image={"shorter_side": 48, "tokenizer_view_size": 224}, ray=ray_settings)
        return build(validate_config(DataConfig, config, name), progress=False)

    run("warm-up", tokenizer=None)
    unbounded = run("unbounded")
    bounded = run("bounded", object_store_bytes=2**20)

    in_flight = {"unbounded": unbounded.most_shards_in_flight, "bounded": bounded.most_shards_in_flight,
                 "seconds": (round(unbounded.seconds), round(bounded.seconds))}
    assert unbounded.most_shards_in_flight >= 8, f"the tokenizer stage was not the slow one: {in_flight}"
    assert bounded.most_shards_in_flight <= 4, in_flight
    assert digests(tmp_path / "bounded") == digests(tmp_path / "unbounded")
