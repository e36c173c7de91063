"""Faults during `beit3 data build`, on a local Ray instance with real processes on loopback: the S3 endpoint goes
away mid-upload and comes back, and a Ray worker dies while running a map task. Either way the job finishes with
exactly the shards of an undisturbed run, and nothing partial is ever visible in storage."""

import hashlib
import json
import os
import threading
import time
import uuid

import boto3
import psutil
import pytest
import ray
import webdataset

from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.job import build
from beit3.data_pipeline.manifest import MANIFEST_NAME

from network_faults import cuttable_endpoint
from pipeline_inputs import data_config, make_imagenet, make_spm, make_text
from s3_endpoint import CREDENTIALS, point_boto3_at

pytestmark = pytest.mark.slow  # end to end: Ray data builds under injected faults

POLL_SECONDS = 0.02
IMAGES_PER_CLASS = 50


@pytest.fixture(scope="module")
def endpoint(s3_endpoint_url, tmp_path_factory):
    """The loopback S3 endpoint behind a forwarder that can cut it off."""
    with cuttable_endpoint(s3_endpoint_url, tmp_path_factory.mktemp("forwarder")) as forwarder:
        yield forwarder


@pytest.fixture(scope="module")
def ray_through_forwarder(endpoint):
    """A local Ray instance whose workers reach S3 only through the forwarder, so a cut reaches them too."""
    environment = {"AWS_ENDPOINT_URL": endpoint.url, **CREDENTIALS}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": environment})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("raw")
    return {"root": root, "good": make_imagenet(root / "imagenet", per_class=IMAGES_PER_CLASS),
            "documents": make_text(root / "text"), "spm": make_spm(root)}


def one_image_per_shard(raw: dict, output: str) -> DataConfig:
    """A planned shard per image (broken ones included) and per text file: over a hundred shards, a few seconds of
    steady uploads in which a fault lands well before the end. No visual tokenizer: its actor imports for
    seconds whenever it starts, which would only lengthen the tests; the stages that store shards are the same."""
    root = raw["root"]
    config = data_config(output, str(root / "imagenet"), str(root / "text"), str(raw["spm"]), samples_per_shard=1,
                         visual_tokenizer=None)
    return validate_config(DataConfig, config, "fault test")


@pytest.fixture(scope="module")
def undisturbed(ray_through_forwarder, raw, tmp_path_factory) -> dict:
    """Shard name -> sha256 of an undisturbed run on local disk (the digest ignores where the output goes)."""
    output = tmp_path_factory.mktemp("undisturbed")
    result = build(one_image_per_shard(raw, str(output)), progress=False)
    return {"checksums": checksums(result.manifest.shards.values()), "keys": sample_keys(output)}


def checksums(entries) -> dict[str, str | None]:
    return {entry["name"]: entry["sha256"] for entry in entries}


def sample_keys(output) -> list[str]:
    return [sample["__key__"] for path in sorted(output.glob("*.tar"))
            for sample in webdataset.WebDataset(str(path), shardshuffle=False)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Fault(threading.Thread):
    """Injects a fault beside the running job; `outcome` holds what it saw, `error` whatever went wrong."""

    def __init__(self, inject):
        super().__init__(daemon=True)
        self.inject, self.outcome, self.error = inject, None, None

    def run(self) -> None:
        try:
            self.outcome = self.inject()
        except BaseException as error:  # re-raised in the test's thread by result()
            self.error = error

    def result(self, timeout: float = 120.0):
        self.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.outcome is not None, "the fault was never injected"
        return self.outcome


def poll(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f}s")
        time.sleep(POLL_SECONDS)
    return value


def bucket_snapshot(client, bucket: str) -> dict[str, bytes]:
    names = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
             for item in page.get("Contents", [])]
    return {name: client.get_object(Bucket=bucket, Key=name)["Body"].read() for name in names}


def stored_manifest(client, bucket: str) -> dict | None:
    try:
        return json.loads(client.get_object(Bucket=bucket, Key=f"shards/{MANIFEST_NAME}")["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def test_s3_endpoint_cut_mid_upload_then_restored(endpoint, s3_endpoint_url, undisturbed, raw, monkeypatch):
    """The endpoint is cut once some shards are stored; uploads are retried until it is back. While it is away the
    bucket holds only whole shards and a manifest naming only those, and the finished job equals an undisturbed
    run."""
    point_boto3_at(monkeypatch, endpoint.url)
    direct = boto3.client("s3", endpoint_url=s3_endpoint_url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=bucket)

    def cut_then_restore() -> dict:
        poll(lambda: any(entry["samples"] for entry in (stored_manifest(direct, bucket) or {}).get("shards", [])),
             "stored shard in the manifest")
        endpoint.cut()
        try:
            refused = endpoint.wait_for_refusals(endpoint.refusals() + 3, timeout=60)
            # The manifest first: every shard it names was stored before it, so it is among the objects listed next.
            manifest = stored_manifest(direct, bucket)
            return {"manifest": manifest, "objects": bucket_snapshot(direct, bucket), "refused": refused}
        finally:
            endpoint.restore()

    fault = Fault(cut_then_restore)
    fault.start()
    result = build(one_image_per_shard(raw, f"s3://{bucket}/shards"), progress=False)
    snapshot = fault.result()

    final = checksums(result.manifest.shards.values())
    assert final == undisturbed["checksums"]
    manifest_then = snapshot["manifest"]
    listed_then = [entry for entry in manifest_then["shards"] if entry["samples"]]
    assert listed_then and len(manifest_then["shards"]) < len(final), "the cut landed after a stored shard, mid-job"
    for entry in listed_then:
        assert sha256(snapshot["objects"][f"shards/{entry['name']}"]) == entry["sha256"], entry["name"]
    tars_then = {name.removeprefix("shards/"): data for name, data in snapshot["objects"].items()
                 if name.endswith(".tar")}
    assert {name: sha256(data) for name, data in tars_then.items()} == {name: final.get(name) for name in tars_then}
    stored_now = sorted(bucket_snapshot(direct, bucket))
    stored_files = [name for name, checksum in final.items() if checksum is not None] + [MANIFEST_NAME]
    assert stored_now == sorted(f"shards/{name}" for name in stored_files), "no partial or stray objects"
    print(f"cut after {len(manifest_then['shards'])} of {len(final)} shards listed ({len(tars_then)} tars stored), "
          f"{snapshot['refused']} connections refused during the outage")


MAP_TASK_TITLE = "ray::Map("
"""Ray titles a worker process `ray::<task name>` while it runs a task (`ray::Map(_prepare)->Map(_write)` here) and
`ray::IDLE` between tasks."""


def map_task_title(process: psutil.Process) -> str | None:
    title = " ".join(process.cmdline()).strip()
    return title if title.startswith(MAP_TASK_TITLE) else None


def kill_a_worker_running_a_map_task() -> dict:
    """SIGKILL one of this driver's Ray workers while it runs a map task; its title is checked again with the process
    stopped, so the task cannot finish in between."""
    def stopped_worker_running_a_map_task():
        for process in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if map_task_title(process) is None:
                    continue
                process.suspend()
                if title := map_task_title(process):
                    return process, title
                process.resume()
            except psutil.Error:
                continue
        return None

    process, title = poll(stopped_worker_running_a_map_task, "worker running a map task")
    process.kill()
    process.wait(timeout=30)
    return {"pid": process.pid, "title": title}


def test_ray_worker_killed_during_a_map_task(undisturbed, raw, tmp_path):
    """Ray Data retries a map task whose worker died, so the shards hold every sample exactly once."""
    output = tmp_path / "out"
    fault = Fault(kill_a_worker_running_a_map_task)
    fault.start()
    result = build(one_image_per_shard(raw, str(output)), progress=False)
    killed = fault.result()

    assert killed["title"].startswith(MAP_TASK_TITLE), "the killed worker was running a map task"
    assert checksums(result.manifest.shards.values()) == undisturbed["checksums"]
    keys = sample_keys(output)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(undisturbed["keys"])
    assert sum(1 for key in keys if key.startswith("in21k")) == len(raw["good"])
    print(f"killed pid {killed['pid']} ({killed['title']}); {len(keys)} samples in {len(result.manifest.shards)} "
          "shards")
