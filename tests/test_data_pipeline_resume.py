"""Interrupt-and-resume: the driver of `beit3 data build` is killed midway, and a re-run finishes the job with
the same shards (same sha256) as an uninterrupted run, no sample lost and none duplicated."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset
import yaml

from pipeline_inputs import data_config, make_imagenet, make_spm, make_text

pytestmark = pytest.mark.slow  # end to end: a Ray data build killed and rerun

BEIT3 = Path(sys.executable).parent / "beit3"


def shard_checksums(output: Path) -> dict[str, str]:
    manifest = json.loads((output / "manifest.json").read_text())
    return {entry["name"]: entry["sha256"] for entry in manifest["shards"]}


def manifest_shards(output: Path) -> int:
    try:
        return len(json.loads((output / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def write_config(path: Path, output: Path, root: Path, spm: Path) -> Path:
    config = data_config(str(output), str(root / "imagenet"), str(root / "text"), str(spm), samples_per_shard=1)
    path.write_text(yaml.safe_dump(config))
    return path


def test_killed_driver_then_rerun_equals_an_uninterrupted_run(tmp_path):
    root = tmp_path / "raw"
    good = make_imagenet(root / "imagenet", per_class=20)
    make_text(root / "text")
    spm = make_spm(root)
    expected_shards = len(good) + 4 + 3  # one image per shard (bad ones give empty shards) + three text files
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed_config = write_config(tmp_path / "killed.yaml", killed, root, spm)

    driver = subprocess.Popen([str(BEIT3), "data", "build", "--config", str(killed_config), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while manifest_shards(killed) == 0 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    done_at_kill = manifest_shards(killed)
    assert 0 < done_at_kill < expected_shards, f"interrupted after {done_at_kill} of {expected_shards} shards"
    for name, checksum in shard_checksums(killed).items():
        if checksum is not None:
            assert hashlib.sha256((killed / name).read_bytes()).hexdigest() == checksum, "only whole shards listed"

    rerun = subprocess.run([str(BEIT3), "data", "build", "--config", str(killed_config), "--quiet"],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{expected_shards - done_at_kill} built now, {done_at_kill} already done" in rerun.stdout
    clean_run = subprocess.run([str(BEIT3), "data", "build", "--config",
                                str(write_config(tmp_path / "clean.yaml", clean, root, spm)), "--quiet"],
                               capture_output=True, text=True, timeout=600)
    assert clean_run.returncode == 0, clean_run.stderr[-3000:]

    assert shard_checksums(killed) == shard_checksums(clean) and len(shard_checksums(clean)) == expected_shards
    assert len(list(killed.glob("*.tar"))) == expected_shards - 4, "a shard whose only input was bad has no file"
    keys = [sample["__key__"] for path in sorted(killed.glob("image-*.tar"))
            for sample in webdataset.WebDataset(str(path), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == len(good)
