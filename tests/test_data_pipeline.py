"""The Ray pipeline on a local Ray instance: real images and corpora in, shards read back with webdataset."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
import webdataset
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from beit3.config import ConfigError, validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.job import build, summary_table
from beit3.data_pipeline.manifest import ManifestMismatch
from beit3.data_pipeline.processing import (
    ShardWork,
    finish_shard,
    pack_documents,
    prepare_text,
    read_documents,
    read_whole_lines,
)
from beit3.data_pipeline.sources import ShardPlan, TextFile, plan_shards
from beit3.data_pipeline.storage import open_storage
from beit3.data_pipeline.views import View
from beit3.tokenizers.text import BOS, EOS, PAD, TextTokenizer
from beit3.tokenizers.visual import VisualTokenizerConfig, build_visual_tokenizer

from s3_endpoint import CREDENTIALS
from pipeline_inputs import (
    BAD_IMAGES,
    data_config,
    make_imagenet,
    make_pairs,
    make_spm,
    make_text,
    pack_class_tars,
    pair_sources,
)

pytestmark = pytest.mark.slow  # end to end: Ray data builds


@pytest.fixture(scope="module")
def ray_instance(s3_endpoint_url):
    """A local Ray instance whose workers see the loopback S3 endpoint in their AWS environment."""
    environment = {"AWS_ENDPOINT_URL": s3_endpoint_url, **CREDENTIALS}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": environment})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    good = make_imagenet(root / "imagenet")
    documents = make_text(root / "text")
    return {"root": root, "good": good, "documents": documents, "spm": make_spm(root)}


def config_for(inputs, output, **overrides) -> DataConfig:
    root = inputs["root"]
    raw = data_config(str(output), str(root / "imagenet"), str(root / "text"), str(inputs["spm"]), **overrides)
    return validate_config(DataConfig, raw, "test")


@pytest.fixture(scope="module")
def local_build(ray_instance, inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("shards")
    config = config_for(inputs, output)
    return config, build(config, progress=False), output


def read_shards(output, kind):
    return [sample for path in sorted(output.glob(f"{kind}-*.tar"))
            for sample in webdataset.WebDataset(str(path), shardshuffle=False)]


def test_every_image_written_once_or_skipped_with_its_reason(local_build, inputs):
    config, result, output = local_build
    samples = read_shards(output, "image")
    provenance = [json.loads(s["json"]) for s in samples]
    written = {f"{p['label']}/{p['file'].split('/')[-1]}": p["label"] for p in provenance}
    assert written == inputs["good"] and len(samples) == len(inputs["good"])
    assert len({s["__key__"] for s in samples}) == len(samples)
    totals = result.manifest.totals()["in21k"]
    assert totals["written"] == len(inputs["good"])
    assert totals["skipped"] == {reason: 1 for reason in BAD_IMAGES.values()}
    assert "too_many_pixels: 1" in summary_table(result)


def test_codes_belong_to_the_stored_views(local_build):
    config, _, output = local_build
    tokenizer, _ = build_visual_tokenizer(VisualTokenizerConfig(kind="random", seed=0, codebook_size=512))
    for sample in read_shards(output, "image")[:5]:
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert min(image.size) <= 96
        codes = np.load(io.BytesIO(sample["codes.npy"]))
        views = [View.from_json(v) for v in json.loads(sample["views.json"])]
        assert codes.dtype == np.uint16 and codes.shape == (2, 4, 4) and len(views) == 2
        assert {len(view.jitter) for view in views} == {3}, "BEiT v2's ColorJitter(0.4, 0.4, 0.4)"
        for view, view_codes in zip(views, codes):
            assert view.top + view.height <= image.height and view.left + view.width <= image.width
            # BEiT v2's chain written out: jitter in the recorded order, flip, then the box at the tokenizer's
            # size with Lanczos; the codes are those of exactly these pixels.
            pixels = image.convert("RGB")
            for operation, factor in view.jitter:
                pixels = getattr(TF, f"adjust_{operation}")(pixels, factor)
            pixels = TF.hflip(pixels) if view.flip else pixels
            crop = TF.resized_crop(pixels, view.top, view.left, view.height, view.width, [64, 64],
                                      InterpolationMode.LANCZOS)
            rendered = TF.pil_to_tensor(crop).float().unsqueeze(0) / 255.0
            assert np.array_equal(tokenizer.encode(rendered)[0].numpy(), view_codes)


def test_text_is_tokenized_and_packed_without_loss(local_build, inputs):
    config, result, output = local_build
    tokenizer = TextTokenizer(inputs["spm"])
    blocks = [np.load(io.BytesIO(s["ids.npy"])) for s in read_shards(output, "text")]
    assert all(block.dtype == np.uint16 and block.shape[1] == 16 and 1 <= len(block) <= 3 for block in blocks)
    segments = [row[row != 1].tolist() for block in blocks for row in block]  # pads only trail a segment
    assert all(s[0] == 0 and s[-1] == 2 for s in segments)
    assert sum(len(block) for block in blocks) == result.manifest.totals()["corpus"]["written"]
    packed = [i for s in segments for i in s[1:-1] if i != 2]  # documents never contain eos: it separates them
    assert packed == [i for ids in tokenizer.encode_batch(inputs["documents"]) for i in ids[1:-1]]
    totals = result.manifest.totals()["corpus"]
    assert totals["skipped"] == {"bad_json": 1, "empty_text": 1}
    assert totals["repaired"] == {"invalid_utf8_replaced": 1}


def test_concatenated_encoding_matches_the_batch_encoder(inputs):
    """The packer's encoder (SentencePiece's buffer binding, lengths from eos) gives the public encoder's ids."""
    tokenizer = TextTokenizer(inputs["spm"], num_threads=1)
    texts = [*inputs["documents"], "", "\u200b", "</s> <s> <pad> <unk>", "x" * 500]
    ids, lengths = tokenizer.encode_concatenated(texts)
    expected = tokenizer.encode_batch(texts, with_specials=False)
    assert lengths.tolist() == [len(sequence) for sequence in expected] and 0 in lengths.tolist()
    assert ids.tolist() == [i for sequence in expected for i in sequence]


def test_manifest_matches_the_files(local_build):
    _, result, output = local_build
    document = json.loads((output / "manifest.json").read_text())
    assert document["sources"] == result.manifest.totals()
    for entry in filter(lambda e: e["samples"], document["shards"]):
        data = (output / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["entries"] == sum(1 for _ in webdataset.WebDataset(str(output / entry["name"]),
                                                                           shardshuffle=False))
        assert entry["samples"] == sum(entry["written"].values())
    stored = sorted(e["name"] for e in document["shards"] if e["samples"])
    assert stored == sorted(p.name for p in output.glob("*.tar"))


def test_rerun_skips_finished_shards_and_rebuilds_lost_ones_identically(local_build, inputs):
    config, first, output = local_build
    manifest_before = (output / "manifest.json").read_bytes()
    (output / "image-000001.tar").unlink()
    again = build(config, progress=False)
    assert again.shards_built == 1 and again.shards_skipped == len(first.manifest.shards) - 1
    assert (output / "manifest.json").read_bytes() == manifest_before


def sample_fields(samples: list[dict]) -> dict[str, dict]:
    """Key -> stored fields, without what webdataset adds (the shard's URL)."""
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in samples}


def test_shards_respect_the_byte_target_and_hold_every_sample_once(ray_instance, inputs, local_build, tmp_path):
    """With a byte target below a planned shard's size its samples continue in further parts, each within the
    target unless one entry alone exceeds it, holding exactly the samples of the unsplit build."""
    shard_bytes = 60_000
    output = tmp_path / "out"
    config = config_for(inputs, output, shard_bytes=shard_bytes)
    result = build(config, progress=False)
    _, whole, whole_output = local_build
    entries = list(result.manifest.shards.values())
    assert all(e["bytes"] <= shard_bytes or e["entries"] == 1 for e in entries)
    parts = [e for e in entries if e["name"] != e["shard"]]
    assert parts and all(e["name"].startswith(e["shard"].removesuffix(".tar") + "-") for e in parts)
    assert result.manifest.totals() == whole.manifest.totals()
    for kind in ("image", "text"):
        samples = read_shards(output, kind)
        assert len({s["__key__"] for s in samples}) == len(samples)
        assert sample_fields(samples) == sample_fields(read_shards(whole_output, kind))

    manifest_before = (output / "manifest.json").read_bytes()
    lost = parts[0]
    (output / lost["name"]).unlink()
    again = build(config, progress=False)
    assert again.shards_built == 1 and (output / "manifest.json").read_bytes() == manifest_before
    assert hashlib.sha256((output / lost["name"]).read_bytes()).hexdigest() == lost["sha256"]


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive]


def test_text_shards_continue_in_parts_past_the_byte_target(inputs, tmp_path):
    """The write stage on real text shards: parts within the target, together holding every entry in order."""
    config = config_for(inputs, tmp_path, shard_bytes=15_000)
    split = 0
    for plan in (plan for plan in plan_shards(config) if plan.kind == "text"):
        work = prepare_text(plan, config)
        parts = finish_shard(work, config)
        assert all(len(data) <= 15_000 or entry["entries"] == 1 for data, entry in parts)
        assert [member for data, _ in parts for member in tar_members(data)] == [
            (f"{sample['__key__']}.{name}", sample[name]) for sample in work.samples for name in sorted(sample)
            if name != "__key__"]
        assert sum(entry["samples"] for _, entry in parts) == sum(count for _, count in work.sample_counts)
        split += len(parts) > 1
    assert split


def test_changed_content_settings_refuse_to_resume(local_build, inputs):
    _, _, output = local_build
    with pytest.raises(ManifestMismatch, match="different content settings"):
        build(config_for(inputs, output, seed=4), progress=False)


def test_object_storage_gives_the_same_shards(ray_instance, inputs, local_build, s3_bucket):
    """Inputs, tokenizer and output on the loopback S3 endpoint: identical shards to the local run."""
    client = boto3.client("s3")
    root = inputs["root"]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_bucket, f"raw/{path.relative_to(root).as_posix()}")
    url = f"s3://{s3_bucket}/raw"
    config = validate_config(DataConfig, data_config(f"s3://{s3_bucket}/shards", f"{url}/imagenet", f"{url}/text",
                                                     f"{url}/spm.model"), "s3 test")
    result = build(config, progress=False)
    _, local, local_output = local_build
    assert {n: e["sha256"] for n, e in result.manifest.shards.items()} == {
        n: e["sha256"] for n, e in local.manifest.shards.items()}
    names = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="shards/")["Contents"])
    stored = [n for n, e in local.manifest.shards.items() if e["samples"]]
    assert names == sorted(f"shards/{n}" for n in [*stored, "manifest.json"])
    stored = client.get_object(Bucket=s3_bucket, Key="shards/image-000000.tar")["Body"].read()
    assert stored == (local_output / "image-000000.tar").read_bytes()


def test_per_class_tars_are_read_like_folders_and_mixed_across_shards(ray_instance, inputs, tmp_path):
    pack_class_tars(inputs["root"] / "imagenet", tmp_path / "tars")
    raw = data_config(str(tmp_path / "out"), str(tmp_path / "tars"), str(inputs["root"] / "text"), str(inputs["spm"]),
                      sources=[{"kind": "imagenet", "name": "tars", "path": str(tmp_path / "tars")}],
                      text_tokenizer=None)
    result = build(validate_config(DataConfig, raw, "tars"), progress=False)
    totals = result.manifest.totals()["tars"]
    assert totals["written"] == len(inputs["good"])
    assert totals["skipped"] == {reason: 1 for reason in BAD_IMAGES.values()}
    labels = {json.loads(s["json"])["label"] for s in read_shards(tmp_path / "out", "image")}
    assert labels == set(inputs["good"].values())
    files = {name: entry["samples"] for name, entry in result.manifest.shards.items()}
    assert sorted(files) == [f"image-{index:06d}.tar" for index in range(len(files))], "a planned shard in parts"
    assert all(count <= 4 for count in files.values()) and sum(files.values()) == len(inputs["good"])
    classes = [{json.loads(s["json"])["label"] for s in webdataset.WebDataset(str(tmp_path / "out" / name),
                                                                             shardshuffle=False)} for name in files]
    assert any(len(labels) > 1 for labels in classes), "the samples of class tars are not mixed across shards"


def packed_rows(documents: list[list[int]], text_len: int) -> np.ndarray:
    ids = np.array([i for document in documents for i in document], dtype=np.int32)
    return pack_documents(ids, np.array([len(d) for d in documents]), text_len)


def test_packing_keeps_documents_whole_when_they_fit():
    def packed(documents, text_len):
        return [row[row != PAD].tolist() for row in packed_rows(documents, text_len)]

    assert packed([[5, 6], [7, 8, 9], [10]], text_len=8) == [[0, 5, 6, 2, 7, 8, 9, 2], [0, 10, 2]]
    assert packed([list(range(10, 23))], text_len=8) == [[0, 10, 11, 12, 13, 14, 15, 2],
                                                         [0, 16, 17, 18, 19, 20, 21, 2], [0, 22, 2]]
    assert packed([[5, 6, 7], list(range(10, 17)), [8]], text_len=8) == [
        [0, 5, 6, 7, 2], [0, 10, 11, 12, 13, 14, 15, 2], [0, 16, 2, 8, 2]]
    assert packed([], text_len=8) == []
    assert packed_rows([[5]], text_len=6).tolist() == [[0, 5, 2, 1, 1, 1]]


def packed_one_document_at_a_time(documents: list[list[int]], text_len: int) -> list[list[int]]:
    """The packing rule stated one document at a time. An empty document adds no ids but still takes the place
    of a separator when deciding whether the next document fits."""
    capacity = text_len - 2
    segments, current, used = [], None, 0
    for ids in documents:
        if current is not None and used + 1 + len(ids) > capacity:
            segments.append(current)
            current = None
        if current is not None:
            used += 1 + len(ids)
            current += [*ids, EOS] if ids else []
            continue
        while len(ids) > capacity:
            segments.append([*ids[:capacity], EOS])
            ids = ids[capacity:]
        if ids:
            current, used = [*ids, EOS], len(ids)
    segments += [current] if current is not None else []
    return [[BOS, *body] + [PAD] * (text_len - 1 - len(body)) for body in segments]


@pytest.mark.parametrize("text_len", [3, 8, 16])
def test_packing_matches_the_rule_stated_per_document(text_len):
    rng = np.random.default_rng(text_len)
    capacity = text_len - 2
    length_choices = [0, 0, 1, 2, capacity - 1, capacity, capacity + 1, 2 * capacity, 3 * capacity + 1]
    for _ in range(40):
        lengths = rng.choice(length_choices, size=rng.integers(0, 30))
        documents = [rng.integers(4, 60_000, size=n).tolist() for n in lengths]
        assert packed_rows(documents, text_len).tolist() == packed_one_document_at_a_time(documents, text_len)


def test_config_errors_name_the_field(inputs, tmp_path):
    raw = data_config(str(tmp_path), "x", "y", "z", samples_per_shard=0)
    with pytest.raises(ConfigError, match="samples_per_shard: Input should be greater than 0"):
        validate_config(DataConfig, raw, "data.yaml")
    raw = data_config(str(tmp_path), "x", "y", "z", shard_bytes=0)
    with pytest.raises(ConfigError, match="shard_bytes: Input should be greater than 0"):
        validate_config(DataConfig, raw, "data.yaml")
    raw = data_config(str(tmp_path), "x", "y", "z", text_tokenizer=None)
    with pytest.raises(ConfigError, match="pair sources need text_tokenizer"):
        validate_config(DataConfig, raw, "data.yaml")
    raw = data_config(str(tmp_path), "x", "y", "z")
    raw["sources"][0]["name"] = "bad.name"
    with pytest.raises(ConfigError, match="sources.0.imagenet.name"):
        validate_config(DataConfig, raw, "data.yaml")


def test_empty_source_is_a_clear_error(ray_instance, inputs, tmp_path):
    (tmp_path / "empty").mkdir()
    raw = data_config(str(tmp_path / "out"), str(tmp_path / "empty"), str(inputs["root"] / "text"), str(inputs["spm"]))
    with pytest.raises(FileNotFoundError, match="no images under"):
        build(validate_config(DataConfig, raw, "t"), progress=False)



def test_image_text_pairs_from_webdataset_tables_and_coco(ray_instance, inputs, tmp_path):
    expected = make_pairs(tmp_path / "pairs")
    raw = data_config(str(tmp_path / "out"), "x", "y", str(inputs["spm"]), sources=pair_sources(tmp_path / "pairs"),
                      caption_len=40)
    result = build(validate_config(DataConfig, raw, "pairs"), progress=False)
    assert result.manifest.totals() == expected
    samples = read_shards(tmp_path / "out", "pair")
    assert len(samples) == sum(counts["written"] for counts in expected.values())
    for sample in samples:
        ids = np.load(io.BytesIO(sample["ids.npy"]))
        assert ids[0] == 0 and ids[-1] == 2 and len(ids) <= 40
        assert np.load(io.BytesIO(sample["codes.npy"])).shape == (2, 4, 4)
    captions = sorted(json.loads(s["json"])["caption"] for s in samples)
    assert "a photo of a cat" in captions and "another caption of the cat" in captions


def test_table_without_the_configured_columns_fails_before_work(inputs, tmp_path):
    make_pairs(tmp_path / "pairs")
    source = {"kind": "pairs_table", "name": "table", "table": str(tmp_path / "pairs" / "pairs.parquet"),
              "images": str(tmp_path / "pairs" / "images")}
    raw = data_config(str(tmp_path / "out"), "x", "y", str(inputs["spm"]), sources=[source])
    with pytest.raises(ValueError, match="has no column 'image', 'caption' \\(columns: url, text\\)"):
        build(validate_config(DataConfig, raw, "pairs"), progress=False)
    assert not (tmp_path / "out").exists()


def test_paragraph_documents_and_whitespace(tmp_path):
    (tmp_path / "book.txt").write_text("First paragraph\nwraps here.\n\n\nSecond  one.\n", encoding="utf-8")
    work = ShardWork(ShardPlan("text", 0, ()))
    documents = read_documents(TextFile("books", str(tmp_path), "book.txt", 0), "text", "paragraph", work)
    assert documents == ["First paragraph wraps here.", "Second one."] and not work.skipped


@pytest.mark.parametrize("part_bytes", [1, 7, 30, 64, 10_000])
def test_file_parts_hold_every_line_exactly_once(tmp_path, part_bytes, monkeypatch):
    monkeypatch.setattr("beit3.data_pipeline.processing.LINE_SEARCH_BYTES", 5)
    lines = ["first line", "", "a much longer second line with words", "x", "last line without newline"]
    (tmp_path / "c.txt").write_text("\n".join(lines), encoding="utf-8")
    storage = open_storage(tmp_path)
    size = storage.size("c.txt")
    parts = [read_whole_lines(storage, "c.txt", start, min(start + part_bytes, size))
             for start in range(0, size, part_bytes)]
    assert b"".join(parts).decode().split("\n") == lines
    assert all(part == b"" or part.endswith(b"\n") or part.endswith(b"newline") for part in parts)


def test_large_corpus_files_are_split_into_shards(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "big.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(40)))
    raw = data_config(str(tmp_path / "out"), "x", str(tmp_path / "text"), "spm.model", text_shard_bytes=100,
                      sources=[{"kind": "text", "name": "corpus", "paths": [str(tmp_path / "text")]}])
    plans = plan_shards(validate_config(DataConfig, raw, "t"))
    assert len(plans) > 5 and all(p.kind == "text" for p in plans)
    assert [p.items[0].start for p in plans] == list(range(0, 100 * len(plans), 100))
    assert len({p.items[0].index for p in plans}) == len(plans)


def test_data_build_command_reports_bad_configs_without_a_traceback(tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text("name: x\noutput: out\nsamples_per_shard: 0\nsources: []\n")
    beit3 = Path(sys.executable).parent / "beit3"
    result = subprocess.run([str(beit3), "data", "build", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "samples_per_shard: Input should be greater than 0" in result.stderr and "sources:" in result.stderr
