"""Shards mix their whole source: per-class and downloader tars are planned sample by sample across shards, read
back by range requests with the same checks as whole tars, and the trainer's micro-batches mix classes as
uniform sampling does."""

import gzip
import importlib.util
import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import boto3
import pytest
from pipeline_inputs import make_spm

from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.job import BuildResult, view_passes
from beit3.data_pipeline.manifest import Manifest
from beit3.data_pipeline.processing import prepare_images, prepare_pairs
from beit3.data_pipeline.sources import ImageTar, PairTar, ShardPlan, plan_shards
from beit3.data_pipeline.tar_index import TarSample, TarSkip, index_tar, pair_samples, read_sample

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("class_mixing", REPO / "benchmarks" / "class_mixing.py")
class_mixing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(class_mixing)


def image_config(path: Path, samples_per_shard: int = 4, kind: str = "imagenet", views: int = 1,
                 **extra) -> DataConfig:
    source = {"kind": kind, "name": "tars", "path": str(path)}
    raw = {"name": "mixing", "output": str(path / "out"), "seed": 1, "samples_per_shard": samples_per_shard,
           "sources": [source], "text_tokenizer": extra.pop("text_tokenizer", None), "visual_tokenizer": None,
           "image": {"shorter_side": 24, "views_per_image": views}, **extra}
    return validate_config(DataConfig, raw, "mixing")


def member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, target: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def test_per_class_tars_are_planned_across_shards_exactly_once_and_the_same_way_every_time(tmp_path):
    folders, tars = class_mixing.write_inputs(tmp_path, classes=6, images=5)
    plans = plan_shards(image_config(tars))
    assert plans == plan_shards(image_config(tars))
    planned = Counter((item.name, item.position) for plan in plans for item in plan.items)
    assert planned == Counter((f"n{label:03d}.tar", position) for label in range(6) for position in range(5))
    assert [len(plan.items) for plan in plans] == [4] * 7 + [2]
    mixed = [len({item.name for item in plan.items}) > 1 for plan in plans]
    assert sum(mixed) >= len(plans) - 1, f"shards of one input tar: {mixed}"


def test_tar_samples_and_class_folder_files_of_one_source_share_one_permutation(tmp_path):
    folders, tars = class_mixing.write_inputs(tmp_path, classes=3, images=4)
    for tar in tars.iterdir():
        (folders / tar.name).write_bytes(tar.read_bytes())
    plans = plan_shards(image_config(folders))
    kinds = [Counter(type(item).__name__ for item in plan.items) for plan in plans]
    assert sum(kinds, Counter()) == {"ImageItem": 12, "TarSample": 12}
    assert sum(1 for counts in kinds if len(counts) == 2) >= 3, "files and tar samples are not mixed"


def test_a_compressed_tar_is_read_whole_into_a_shard_of_its_own_and_says_so(tmp_path, caplog):
    folders, tars = class_mixing.write_inputs(tmp_path, classes=2, images=3)
    (tars / "n001.tar").write_bytes(gzip.compress((tars / "n001.tar").read_bytes()))
    with caplog.at_level(logging.WARNING):
        plans = plan_shards(image_config(tars))
    assert [item for plan in plans for item in plan.items if isinstance(item, ImageTar)] == [
        ImageTar("tars", str(tars), "n001.tar", "n001", 1)]
    assert "n001.tar is compressed" in caplog.text
    work = prepare_images(next(plan for plan in plans if isinstance(plan.items[0], ImageTar)), image_config(tars))
    assert [sample["__key__"] for sample in work.samples] == [f"tars-000001-{i:06d}" for i in range(3)]


def test_findings_of_an_indexed_tar_are_counted_once_in_the_shard_that_holds_them(tmp_path):
    """Planned sample by sample, a damaged tar gives the samples and skip counts that reading it whole gives."""
    image = (class_mixing.write_inputs(tmp_path / "inputs", 1, 1)[0] / "n000" / "i000.jpg").read_bytes()
    members = [member(f"{name}.jpg", image) for name in "abcdef"] + [
        member("a.jpg", image), member("link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")]
    data = tar_bytes(members)
    folder = tmp_path / "tars"
    folder.mkdir()
    (folder / "n0.tar").write_bytes(data + b"bytes after the end of the archive")
    config = image_config(folder, samples_per_shard=2)
    whole = prepare_images(ShardPlan("image", 0, (ImageTar("tars", str(folder), "n0.tar", "n0", 0),)), config)
    works = [prepare_images(plan, config) for plan in plan_shards(config)]
    assert len(works) > 1
    assert sum((work.skipped for work in works), Counter()) == whole.skipped == {
        ("tars", "duplicate_member"): 1, ("tars", "not_a_regular_file"): 1, ("tars", "data_after_end_of_tar"): 1}
    assert sorted(s["__key__"] for work in works for s in work.samples) == sorted(s["__key__"] for s in whole.samples)
    assert len(whole.samples) == 6


def test_a_sample_whose_bytes_are_gone_since_indexing_is_a_counted_skip(tmp_path):
    folders, tars = class_mixing.write_inputs(tmp_path, classes=1, images=3)
    config = image_config(tars, samples_per_shard=3)
    (plan,) = plan_shards(config)
    data = (tars / "n000.tar").read_bytes()
    last = max(plan.items, key=lambda item: item.files[0][1])
    (tars / "n000.tar").write_bytes(data[: last.files[0][1] + 10])
    work = prepare_images(plan, config)
    assert work.skipped == {("tars", "truncated_tar"): 1}
    assert len(work.samples) == 2


def test_pairs_of_downloader_tars_are_planned_by_key_with_missing_files_counted(tmp_path):
    image = (class_mixing.write_inputs(tmp_path / "inputs", 1, 1)[0] / "n000" / "i000.jpg").read_bytes()
    folder = tmp_path / "pairs"
    folder.mkdir()
    for shard in range(3):
        (folder / f"{shard:05d}.tar").write_bytes(tar_bytes(
            [member(f"{shard}{key}.jpg", image) for key in "abcd"] + [member(f"{shard}{key}.txt", b"a red square")
                                                                     for key in "abce"]))
    config = image_config(folder, kind="pairs_webdataset", text_tokenizer=str(make_spm(tmp_path)))
    plans = plan_shards(config)
    assert sum(len({item.name for item in plan.items}) > 1 for plan in plans) >= len(plans) - 1
    works = [prepare_pairs(plan, config) for plan in plans]
    assert sum((work.skipped for work in works), Counter()) == {("tars", "missing_caption"): 3,
                                                                ("tars", "missing_image"): 3}
    assert len([s for work in works for s in work.samples]) == 9


def test_input_tars_on_s3_are_indexed_and_read_by_ranges(tmp_path, s3_bucket):
    image = (class_mixing.write_inputs(tmp_path, 1, 1)[0] / "n000" / "i000.jpg").read_bytes()
    data = tar_bytes([member("x.jpg", image), member("x.txt", b"caption"), member("y.jpg", image)])
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="pairs/0.tar", Body=data)
    root = f"s3://{s3_bucket}/pairs"
    items = pair_samples("web", root, "0.tar", 0, index_tar(root, "0.tar"))
    sample, skip = (next(i for i in items if isinstance(i, kind)) for kind in (TarSample, TarSkip))
    assert read_sample(sample) == {"image": image, "txt": b"caption"}
    assert (skip.reason, skip.origin) == ("missing_caption", "web:0.tar:y")


def test_the_build_summary_gives_passes_per_stored_view_and_warns_past_the_limit(tmp_path):
    config = image_config(tmp_path, views=2, planned_use={"image_samples": 12_000, "pair_samples": 1_000,
                                                          "max_passes_per_view": 5})
    entries = {"image-000000.tar": {"name": "image-000000.tar", "kind": "image", "samples": 1000},
               "val-image-000000.tar": {"name": "val-image-000000.tar", "kind": "image", "samples": 50},
               "pair-000000.tar": {"name": "pair-000000.tar", "kind": "pair", "samples": 500}}
    result = BuildResult(Manifest("m", "digest", {}, entries), 2, 0, 1.0)
    assert view_passes(result, config) == [
        "image: 1,000 samples x 2 stored views; 12,000 planned draws make 12.0 passes, 6.0 per view",
        "warning: image: each stored view would be seen 6.0 times (more than 5): crop augmentation is in effect "
        "reduced; raise image.views_per_image or add data",
        "pair: 500 samples x 2 stored views; 1,000 planned draws make 2.0 passes, 1.0 per view"]


@pytest.mark.slow
def test_micro_batches_mix_classes_as_uniform_sampling_does(tmp_path):
    """50 classes x 40 images as class folders and as per-class tars, shards of 20 (smaller than a class), read by
    the trainer's stream with a window of 8 shards: distinct classes per 16-image micro-batch at least 90% of
    uniform, classes shared by consecutive micro-batches at most 20% above uniform."""
    results = class_mixing.measure(tmp_path, classes=50, images=40, samples_per_shard=20, window=8)
    for layout, figures in results.items():
        assert figures["samples"] == 2000, layout
        assert figures["distinct_ratio"] >= 0.9, (layout, figures)
        assert figures["shared_ratio"] <= 1.2, (layout, figures)
