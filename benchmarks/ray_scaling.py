"""The data build on one Ray node and on two: samples/s of each, the ratio, where the shard tasks ran, and that
both store byte-identical shards and manifests.

The clusters run on this machine over loopback (`beit3.launch.ray.local_cluster`): a head alone, then a head and
a second node, each node offering one CPU to Ray, so the second cluster has twice the CPUs of the first. Input:
`--images` class-folder JPEGs of 500x375 (ImageNet's typical size, `synthetic_inputs`) in planned shards of
`--samples-per-shard`, visual tokenizer off (so each shard is one task: read, decode, resize, choose views, write).
Each cluster gets a fresh driver process (`ray.init(address=...)` then `build`), which first builds a warm-up
output of one shard per node, so that every node's worker has started and imported the pipeline before the timed
build. Two rates are given: over the whole build (what a user sees, start-up of the run's stages included) and
between the first and the last shard stored (their file times), the rate once the stages run. With `--repeats`
the two clusters take turns and each figure is the median.

The ratio only means something on a machine with a core per node to spare, plus some for the driver and Ray's own
processes: the load average before and after each run is printed with it.

    python benchmarks/ray_scaling.py [--images 4000] [--samples-per-shard 250] [--nodes 2] [--repeats 2] [--work DIR]
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from beit3.launch.ray.local_cluster import loopback_cluster
from synthetic_inputs import synthetic_jpegs

CLASSES = ("n01440764", "n01443537")


def write_images(folder: Path, count: int) -> None:
    """`count` JPEGs in two class folders, made once per work folder."""
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.JPEG")) == count:
        return
    shutil.rmtree(folder, ignore_errors=True)
    for index, data in enumerate(synthetic_jpegs(count)):
        path = folder / CLASSES[index % 2] / f"{index:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def write_config(path: Path, images: Path, output: Path, samples_per_shard: int) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "ray-scaling", "output": str(output), "samples_per_shard": samples_per_shard,
        "sources": [{"kind": "imagenet", "name": "images", "path": str(images)}], "visual_tokenizer": None}))
    return path


def drive(address: str, config: Path, warmup: Path) -> None:
    """In the driver process: join the cluster, build the warm-up output, time the build; print the figures."""
    import ray

    from beit3.config import load_config
    from beit3.data_pipeline.config import DataConfig
    from beit3.data_pipeline.job import build

    ray.init(address=address, log_to_driver=False)
    nodes = sum(node["Alive"] for node in ray.nodes())
    build(load_config(DataConfig, warmup), progress=False)
    start = time.perf_counter()
    result = build(load_config(DataConfig, config), progress=False)
    seconds = time.perf_counter() - start
    ray.shutdown()
    samples = sum(entry["samples"] for entry in result.manifest.shards.values())
    print(json.dumps({"nodes": nodes, "seconds": seconds, "samples": samples,
                      "shards_per_node": result.shards_per_node.get("prepare", {}),
                      "most_in_flight": result.most_shards_in_flight}))


def timed_build(nodes: int, work: Path, images: Path, warmup_images: Path, samples_per_shard: int,
                run: int) -> dict:
    """One cluster of `nodes`, one driver; the figures, the output folder and the load averages around it."""
    output = work / f"output-{nodes}-nodes-{run}"
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(work / "warmup-output", ignore_errors=True)
    config = write_config(work / f"config-{nodes}.yaml", images, output, samples_per_shard)
    warmup = write_config(work / "warmup.yaml", warmup_images, work / "warmup-output", samples_per_shard)
    logs = work / f"logs-{nodes}-nodes-{run}"
    logs.mkdir(exist_ok=True)
    load_before = os.getloadavg()[0]
    with loopback_cluster(nodes, logs) as cluster:
        # The cluster's environment tells Ray to use token authentication, which it would not for an explicit address.
        driver = subprocess.run([sys.executable, __file__, "--drive", cluster.address, "--config", str(config),
                                 "--warmup", str(warmup)], env=cluster.environment, capture_output=True, text=True,
                                timeout=3600)
    if driver.returncode != 0:
        raise RuntimeError(f"driver failed:\n{driver.stderr[-4000:]}")
    figures = json.loads(driver.stdout.strip().splitlines()[-1])
    return {**figures, "output": output, "steady": steady_rate(output), "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def steady_rate(output: Path) -> float:
    """Samples per second between the first shard stored and the last (file modification times)."""
    manifest = json.loads((output / "manifest.json").read_text())
    stored = sorted(((output / entry["name"]).stat().st_mtime, entry["samples"])
                    for entry in manifest["shards"] + manifest["validation_shards"] if entry["samples"])
    return sum(samples for _, samples in stored[1:]) / (stored[-1][0] - stored[0][0])


def digests(output: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(output.iterdir())}


def manifest_shards(output: Path) -> list:
    manifest = json.loads((output / "manifest.json").read_text())
    return manifest["shards"] + manifest["validation_shards"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--samples-per-shard", type=int, default=250,
                        help="per-shard work must outweigh the driver's per-shard cost")
    parser.add_argument("--nodes", type=int, default=2, help="nodes of the larger cluster (the other has one)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, help="keeps the generated images between runs (default: a temp dir)")
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive, args.config, args.warmup)
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    write_images(work / "images", args.images)
    warmup_images = work / "warmup-images"
    shutil.rmtree(warmup_images, ignore_errors=True)
    for path in sorted((work / "images").rglob("*.JPEG"))[: args.nodes * args.samples_per_shard]:
        (warmup_images / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, warmup_images / path.parent.name / path.name)
    print(f"{args.images} JPEGs of 500x375 in shards of {args.samples_per_shard}, visual tokenizer off; "
          f"{os.cpu_count()} cores on this machine; work folder {work}", flush=True)

    runs: dict[int, list[dict]] = {1: [], args.nodes: []}
    for run in range(args.repeats):
        for nodes in runs:
            figures = timed_build(nodes, work, work / "images", warmup_images, args.samples_per_shard, run)
            runs[nodes].append(figures)
            spread = ", ".join(f"{node[:8]} {count}" for node, count in sorted(figures["shards_per_node"].items()))
            print(f"{nodes} node(s): {figures['samples']} samples in {figures['seconds']:.1f}s = "
                  f"{figures['samples'] / figures['seconds']:.1f} samples/s ({figures['steady']:.1f} between the first "
                  f"and last shard stored); shards per node: {spread}, at most "
                  f"{figures['most_in_flight']} at once; "
                  f"load average {figures['load_before']:.1f} before, {figures['load_after']:.1f} after",
                  flush=True)

    rate = {nodes: statistics.median(f["samples"] / f["seconds"] for f in figures) for nodes, figures in runs.items()}
    steady = {nodes: statistics.median(f["steady"] for f in figures) for nodes, figures in runs.items()}
    print(f"median samples/s, whole build: 1 node {rate[1]:.1f}, {args.nodes} nodes {rate[args.nodes]:.1f}, ratio "
          f"{rate[args.nodes] / rate[1]:.2f}x; between first and last shard: 1 node {steady[1]:.1f}, {args.nodes} "
          f"nodes {steady[args.nodes]:.1f}, ratio {steady[args.nodes] / steady[1]:.2f}x")
    outputs = [figures["output"] for all_runs in runs.values() for figures in all_runs]
    reference = digests(outputs[0])
    identical = all(digests(output) == reference for output in outputs[1:])
    same_lists = all(manifest_shards(output) == manifest_shards(outputs[0]) for output in outputs[1:])
    print(f"{len(reference)} files per output (shards and manifest); sha256 of every file identical across runs: "
          f"{identical}; manifests' shard lists identical: {same_lists}")
    if not (identical and same_lists):
        sys.exit(1)


if __name__ == "__main__":
    main()
