"""Held-out samples: the seeded split by sample key, the validation shards a real Ray build writes for it, and the
per-source code usage the manifest records."""

import gzip
import hashlib
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from beit3.config import ConfigError, validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.holdout import document_splitter, key_hash, split_listed
from beit3.data_pipeline.job import build, summary_table
from beit3.data_pipeline.processing import load_text_tokenizer
from beit3.data_pipeline.sources import ImageItem, ImageTar, PairItem
from beit3.tokenizers.text import BOS, EOS, PAD

from pipeline_inputs import data_config, make_imagenet, make_spm, pack_class_tars, tar_of

SPM = "unused.model"


def config_with(sources: list[dict], seed: int = 0, **overrides) -> DataConfig:
    raw = {"name": "t", "output": "out", "seed": seed, "sources": sources, "text_tokenizer": SPM, **overrides}
    return validate_config(DataConfig, raw, "holdout")


def images(source: str, count: int) -> list[ImageItem]:
    return [ImageItem(source, "root", f"n{index % 7:08d}/img_{index:05d}.JPEG", f"n{index % 7:08d}", index)
            for index in range(count)]


@pytest.mark.parametrize("source, message", [
    ({"kind": "text", "name": "t", "paths": ["corpus"], "validation": {"count": 5}},
     "sources.0.text.validation: count needs samples listed before the build"),
    ({"kind": "imagenet", "name": "i", "path": "in", "validation": {"count": 5, "fraction": 0.1}},
     "sources.0.imagenet.validation: give either fraction or count"),
    ({"kind": "imagenet", "name": "i", "path": "in", "validation": {}},
     "sources.0.imagenet.validation: give either fraction or count"),
    ({"kind": "coco", "name": "c", "annotations": "a.json", "images": "im", "validation": {"fraction": 1.0}},
     "sources.0.coco.validation.fraction: Input should be less than 1"),
    ({"kind": "imagenet", "name": "i", "path": "in", "validation": {"count": 0}},
     "sources.0.imagenet.validation.count: Input should be greater than 0"),
])
def test_bad_validation_settings_are_refused_naming_the_field(source, message):
    with pytest.raises(ConfigError, match="holdout: invalid config") as raised:
        config_with([source])
    assert message in str(raised.value)


def test_split_depends_on_keys_only_not_on_other_sources_or_listing_order():
    validated = {"kind": "imagenet", "name": "a", "path": "a", "validation": {"fraction": 0.2}}
    alone = config_with([validated])
    with_more = config_with([{"kind": "imagenet", "name": "b", "path": "b", "validation": {"fraction": 0.5}},
                             validated])
    listing = images("a", 2000)
    _, held_alone = split_listed(listing, alone)
    others = images("b", 500)
    mixed = others + listing[::-1]
    training, held_mixed = split_listed(mixed, with_more)
    assert {i.name for i in held_alone} == {i.name for i in held_mixed if i.source == "a"}
    assert 0.17 < len(held_alone) / 2000 < 0.23
    assert len(training) + len(held_mixed) == len(mixed) and not set(training) & set(held_mixed)
    assert [i for i in mixed if i in set(held_mixed)] == held_mixed, "both sides keep the listing order"
    _, other_seed = split_listed(listing, config_with([validated], seed=1))
    assert {i.name for i in other_seed} != {i.name for i in held_alone}


def test_count_holds_out_exactly_that_many_keys_with_every_caption_of_an_image():
    config = config_with([{"kind": "coco", "name": "c", "annotations": "a.json", "images": "im",
                           "validation": {"count": 30}}])
    pairs = [PairItem("c", "im", f"img_{index // 3:04d}.jpg", f"caption {index}", index) for index in range(600)]
    pairs.append(PairItem("c", "im", "", "", 600, skipped="bad_annotation"))
    training, held = split_listed(pairs, config)
    held_images = {pair.name for pair in held}
    assert len(held_images) == 30 and len(held) == 90, "30 images, each with its 3 captions"
    assert not held_images & {pair.name for pair in training}
    assert training[-1].skipped == "bad_annotation", "a row to be counted as skipped stays where it is counted"
    smallest = sorted({pair.name for pair in pairs[:-1]}, key=lambda name: key_hash(0, "c", name))[:30]
    assert held_images == set(smallest)


def test_count_is_refused_for_a_source_with_tars_read_only_while_building():
    config = config_with([{"kind": "imagenet", "name": "i", "path": "in", "validation": {"count": 3}}])
    with pytest.raises(ValueError, match="source i: validation.count needs every sample listed.*n1.tar"):
        split_listed(images("i", 10), config, [ImageTar("i", "in", "n1.tar", "n1", 0)])
    with pytest.raises(ValueError, match="source i: validation.count 3 leaves nothing to train on"):
        split_listed(images("i", 3), config)


def test_documents_are_held_out_by_their_text():
    config = config_with([{"kind": "text", "name": "t", "paths": ["c"], "validation": {"fraction": 0.3}}])
    documents = [f"document {index} of the corpus" for index in range(1000)]
    split = document_splitter(config, "t")
    training, held = split(documents)
    assert 0.25 < len(held) / 1000 < 0.35 and len(training) + len(held) == 1000
    again_training, again_held = split(documents[::-1] + held)
    assert set(again_held) == set(held) and set(again_training) == set(training), "a duplicate goes the same way"
    assert document_splitter(config_with([{"kind": "text", "name": "t", "paths": ["c"]}]), "t") is None


# A real Ray build: class folders (fraction), uncompressed and compressed class tars (fraction), COCO (count),
# text (fraction).

TEXT_FILES = {"a.txt": [f"alpha document {index} tells of item {index * 7}" for index in range(60)],
              "b.txt": [f"beta document {index}" + " with more words" * (index % 9) for index in range(60)]}
COCO_IMAGES, COCO_COUNT = 10, 3


def write_inputs(root: Path) -> dict:
    good = make_imagenet(root / "imagenet", per_class=8)
    pack_class_tars(root / "imagenet", root / "tars")
    compressed = {f"z_{index:02d}.png": (root / "imagenet" / name).read_bytes()
                  for index, name in enumerate(sorted(good)[:6])}
    (root / "tars" / "n09999999.tar").write_bytes(gzip.compress(tar_of(compressed)))
    (root / "text").mkdir()
    for name, documents in TEXT_FILES.items():
        (root / "text" / name).write_text("\n".join(documents) + "\n")
    (root / "coco").mkdir()
    image_list, annotations = [], []
    for index in range(COCO_IMAGES):
        (root / "coco" / f"c{index}.jpg").write_bytes((root / "imagenet" / sorted(good)[index]).read_bytes())
        image_list.append({"id": index, "file_name": f"c{index}.jpg"})
        annotations += [{"id": 2 * index + k, "image_id": index, "caption": f"picture {index} caption {k}"}
                        for k in range(2)]
    (root / "captions.json").write_text(json.dumps({"images": image_list, "annotations": annotations}))
    return {"good": good, "compressed": sorted(compressed)}


def holdout_config(root: Path, spm: Path, output: Path) -> DataConfig:
    sources = [
        {"kind": "imagenet", "name": "in21k", "path": str(root / "imagenet"), "validation": {"fraction": 0.3}},
        {"kind": "imagenet", "name": "tars", "path": str(root / "tars"), "validation": {"fraction": 0.5}},
        {"kind": "text", "name": "corpus", "paths": [str(root / "text")], "validation": {"fraction": 0.3}},
        {"kind": "coco", "name": "coco", "annotations": str(root / "captions.json"), "images": str(root / "coco"),
         "validation": {"count": COCO_COUNT}}]
    raw = data_config(str(output), "", "", str(spm), sources=sources, text_len=12)
    return validate_config(DataConfig, raw, "holdout")


def read_tar(path: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            key, _, field = member.name.partition(".")
            samples.setdefault(key, {})[field] = archive.extractfile(member).read()
    return [{"__key__": key, **fields} for key, fields in samples.items()]


def samples_of(output: Path, entries: list[dict]) -> list[dict]:
    return [sample for entry in entries if entry["samples"] for sample in read_tar(output / entry["name"])]


def text_tokens(samples: list[dict], file: str) -> list[int]:
    """The ids of every document a text file's blocks hold, in order, without bos, eos and padding."""
    blocks = sorted((json.loads(s["json"])["first_segment"], np.load(io.BytesIO(s["ids.npy"])))
                    for s in samples if "ids.npy" in s and "jpg" not in s and json.loads(s["json"])["file"] == file)
    return [int(token) for _, block in blocks for row in block for token in row[1:]
            if token not in (BOS, EOS, PAD)]


@pytest.fixture(scope="module")
def holdout_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    inputs = write_inputs(root / "raw")
    spm = make_spm(root)
    first = build(holdout_config(root / "raw", spm, root / "first"), progress=False)
    second = build(holdout_config(root / "raw", spm, root / "second"), progress=False)
    return {"root": root, "inputs": inputs, "spm": spm, "first": first, "second": second}


def manifest_of(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())


@pytest.mark.slow
def test_training_and_validation_shards_split_every_sample_once(holdout_builds):
    root, inputs = holdout_builds["root"], holdout_builds["inputs"]
    manifest = manifest_of(root / "first")
    assert {entry["kind"] for entry in manifest["validation_shards"]} == {"image", "text", "pair"}
    assert all(entry["name"].startswith("val-") for entry in manifest["validation_shards"])
    assert not any(entry["name"].startswith("val-") for entry in manifest["shards"])
    assert set(manifest["shards"][0]) == set(manifest["validation_shards"][0]), "one entry schema"
    training = samples_of(root / "first", manifest["shards"])
    held = samples_of(root / "first", manifest["validation_shards"])
    assert not {s["__key__"] for s in training} & {s["__key__"] for s in held}

    def identities(samples, source):
        found = [json.loads(s["json"]) for s in samples if json.loads(s["json"])["source"] == source]
        return Counter(f"{p['file']}:{p['member']}" if "member" in p else p["file"] for p in found)

    good = set(inputs["good"])
    folders_training, folders_held = identities(training, "in21k"), identities(held, "in21k")
    assert set(folders_training) | set(folders_held) == good and not set(folders_training) & set(folders_held)
    assert max((folders_training + folders_held).values()) == 1, "each image once"
    assert set(folders_held) == {name for name in good if key_hash(3, "in21k", name) < 0.3 * 2**64}
    assert manifest["sources"]["in21k"]["skipped"] == {"empty": 1, "not_an_image": 1, "corrupt": 1,
                                                       "too_many_pixels": 1}

    tar_members = {f"{label}.tar:{name.split('/')[1].split('.')[0]}" for name, label in inputs["good"].items()}
    tar_members |= {f"n09999999.tar:{name.split('.')[0]}" for name in inputs["compressed"]}
    tars_training, tars_held = identities(training, "tars"), identities(held, "tars")
    assert set(tars_training) | set(tars_held) == tar_members and not set(tars_training) & set(tars_held)
    assert set(tars_held) == {key for key in tar_members if key_hash(3, "tars", key) < 0.5 * 2**64}
    assert any(key.startswith("n09999999.tar:") for key in tars_held), "a compressed tar's members routed too"
    assert all(json.loads(s["json"])["label"] for s in held if json.loads(s["json"])["source"] == "tars")

    coco_training, coco_held = identities(training, "coco"), identities(held, "coco")
    assert len(coco_held) == COCO_COUNT and set(coco_held.values()) == {2}, "whole images with both captions"
    assert set(coco_training) | set(coco_held) == {f"c{index}.jpg" for index in range(COCO_IMAGES)}
    assert manifest["sources"]["coco"]["validation"] == 2 * COCO_COUNT

    tokenizer = load_text_tokenizer(str(holdout_builds["spm"]))
    split = document_splitter(holdout_config(root / "raw", holdout_builds["spm"], root / "x"), "corpus")
    for file, documents in TEXT_FILES.items():
        kept, held_documents = split(documents)
        assert kept and held_documents
        assert text_tokens(training, file) == [i for ids in tokenizer.encode_batch(kept, with_specials=False)
                                               for i in ids]
        assert text_tokens(held, file) == [i for ids in tokenizer.encode_batch(held_documents, with_specials=False)
                                           for i in ids]
    for entry in manifest["validation_shards"]:
        assert hashlib.sha256((root / "first" / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]


@pytest.mark.slow
def test_a_rerun_is_byte_identical_and_a_lost_validation_file_is_rebuilt(holdout_builds):
    root = holdout_builds["root"]
    first, second = manifest_of(root / "first"), manifest_of(root / "second")
    for key in ("shards", "validation_shards", "sources", "code_usage"):
        assert first[key] == second[key], key
    lost = next(entry for entry in first["validation_shards"] if entry["name"].startswith("val-image"))
    (root / "first" / lost["name"]).unlink()
    again = build(holdout_config(root / "raw", holdout_builds["spm"], root / "first"), progress=False)
    assert again.shards_built == 1
    assert hashlib.sha256((root / "first" / lost["name"]).read_bytes()).hexdigest() == lost["sha256"]
    assert manifest_of(root / "first") == first, "code counts of a redone shard are not added twice"
    assert "held out" in summary_table(again)


# The sample build's manifest: code usage per source, and held-out shards of every kind.

@pytest.fixture(scope="module")
def sample_build(training_data):
    """The session's sample build (the demo's data), read only."""
    from beit3.sample_data import LABELLED_CLASSES

    return training_data, LABELLED_CLASSES


@pytest.mark.slow
def test_sample_build_records_code_usage_per_source(sample_build):
    data, _ = sample_build
    shards = Path(data["shards"])
    manifest = manifest_of(shards)
    codebook = manifest["contract"]["visual_tokenizer"]["codebook_size"]
    codes: dict[str, Counter] = {}
    for entry in manifest["shards"] + manifest["validation_shards"]:
        for sample in samples_of(shards, [entry]):
            if "codes.npy" in sample:
                source = json.loads(sample["json"])["source"]
                codes.setdefault(source, Counter()).update(np.load(io.BytesIO(sample["codes.npy"])).ravel().tolist())
    assert set(manifest["code_usage"]) == set(codes) == {"photos", "labelled_shapes", "shapes"}
    for source, counts in codes.items():
        usage = manifest["code_usage"][source]
        total = sum(counts.values())
        shares = np.array(list(counts.values())) / total
        assert usage["codes_used"] == len(counts) <= codebook
        assert usage["perplexity"] == pytest.approx(math.exp(-(shares * np.log(shares)).sum()), abs=1e-3)
        assert usage["top_code_share"] == pytest.approx(max(counts.values()) / total, abs=1e-6)
        assert usage["codes_seen"] == total and len(usage["histogram"]) == codebook
        assert 1 <= usage["perplexity"] <= usage["codes_used"]


@pytest.mark.slow
def test_sample_build_holds_out_labelled_images_text_and_pairs(sample_build):
    data, classes = sample_build
    shards = Path(data["shards"])
    manifest = manifest_of(shards)
    assert {entry["kind"] for entry in manifest["validation_shards"] if entry["samples"]} == {"image", "text", "pair"}
    held = [json.loads(s["json"]) for s in samples_of(shards, manifest["validation_shards"]) if "jpg" in s]
    labels = Counter(p["label"] for p in held if p["source"] == "labelled_shapes")
    trained = Counter(json.loads(s["json"])["label"] for s in samples_of(shards, manifest["shards"])
                      if "jpg" in s and json.loads(s["json"])["source"] == "labelled_shapes")
    assert len(classes) >= 8 and set(labels) == set(trained) == set(classes), "every class on both sides"
    assert sum(trained.values()) >= 8 * len(classes)
    assert manifest["sources"]["photos"]["validation"] == 4 and manifest["sources"]["shapes"]["validation"] == 6
