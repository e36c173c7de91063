"""A corpus of hostile inputs, built here: each gets a counted skip or a clear error naming the file and the reason,
never a traceback, and no good sample is lost.

Kinds covered elsewhere and not repeated: corrupt image bytes of every kind (test_images.py: empty, not an image,
truncated JPEG and PNG, pixel bombs; test_data_pipeline.py: the same in class folders and per-class tars, and a
corrupt image in a pair tar), altered shards (test_shard_streams.py), shards missing from storage
(test_train_config.py), out-of-range and unknown config fields checked in-process (test_train_config.py,
test_data_pipeline.py), and NUL bytes and invalid UTF-8 in .txt corpora and pair-tar captions
(test_data_pipeline.py).
"""

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import webdataset
import yaml
from PIL import Image

from beit3.cli import error_message, main
from beit3.config import ConfigError, validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.job import build
from beit3.data_pipeline.processing import prepare_images
from beit3.data_pipeline.shards import tar_bytes
from beit3.data_pipeline.sources import ImageTar, ShardPlan
from beit3.data_pipeline.storage import StorageError
from beit3.pretrain.shard_streams import (
    MicroBatchStream,
    ShardDataError,
    ShardRef,
    StreamSettings,
    build_loader,
    index_datasets,
    read_shard_samples,
)
from beit3.pretrain.train_config import load_pretrain_config
from beit3.pretrain.trainer import preflight
from beit3.sample_data import tiny_recipe
from beit3.tokenizers.text import TextTokenizer

from pipeline_inputs import data_config, make_spm

BEIT3 = Path(sys.executable).parent / "beit3"
SHORTER_SIDE = 32
pytestmark = pytest.mark.usefixtures("command_line_runs")  # started first, they run beside the other tests


def image_bytes(width: int, fmt: str = "JPEG") -> bytes:
    """A noise image `width` x SHORTER_SIDE pixels: its width identifies it among the stored images."""
    pixels = np.random.default_rng(width).integers(0, 256, (SHORTER_SIDE, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar written by Python's tarfile; names are stored exactly as given (`../`, a leading `/`, odd bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member_offsets(data: bytes) -> list[tuple[int, int]]:
    """(header offset, data offset) of each member."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [(member.offset, member.offset_data) for member in archive]


def stored_widths(samples: list[dict]) -> Counter:
    return Counter(Image.open(io.BytesIO(sample["jpg"])).width for sample in samples)


# A per-class tar whose members collide under file-name keys, repeat a name, escape by path and link out.
CLASS_TAR = [
    (regular("a/x.jpg", image_bytes(40)), "kept"),
    (regular("b/x.jpg", image_bytes(41)), "kept"),
    (regular("x.jpg", image_bytes(42)), "kept"),
    (regular("x.JPG", image_bytes(43)), "kept"),
    (regular("x.jpg", image_bytes(44)), "duplicate_member"),
    (regular("../escape.jpg", image_bytes(45)), "kept"),
    (regular("/absolute.png", image_bytes(46, "PNG")), "kept"),
    (regular("deep/../../up.jpg", image_bytes(47)), "kept"),
    (regular("not-utf8-\udcff.jpg", image_bytes(48)), "kept"),
    (special("link.jpg", tarfile.SYMTYPE, "/etc/passwd"), "not_a_regular_file"),
    (special("hard.jpg", tarfile.LNKTYPE, "x.jpg"), "not_a_regular_file"),
    (special("fifo.jpg", tarfile.FIFOTYPE), "not_a_regular_file"),
    (special("device.jpg", tarfile.CHRTYPE), "not_a_regular_file"),
    (special("a", tarfile.DIRTYPE), "ignored"),
]


@pytest.fixture(scope="module")
def image_config(tmp_path_factory) -> DataConfig:
    out = tmp_path_factory.mktemp("unused-output")
    raw = data_config(str(out), str(out), str(out), "unused", text_tokenizer=None, visual_tokenizer=None,
                      sources=[{"kind": "imagenet", "name": "tars", "path": str(out)}],
                      image={"shorter_side": SHORTER_SIDE, "views_per_image": 1})
    return validate_config(DataConfig, raw, "hostile")


def prepared(folder: Path, name: str, data: bytes, config: DataConfig):
    (folder / name).write_bytes(data)
    return prepare_images(ShardPlan("image", 0, (ImageTar("tars", str(folder), name, "n0", 0),)), config)


def test_member_paths_are_keys_only_and_every_distinct_member_is_kept(tmp_path, image_config):
    """`a/x.jpg` and `b/x.jpg` are two samples; a name repeated keeps its first file; paths that climb out or
    start at / are kept as samples and never touch the disk; links, devices and fifos are counted, not followed."""
    work = prepared(tmp_path, "n0.tar", tar_of([member for member, _ in CLASS_TAR]), image_config)
    outcomes = Counter(outcome for _, outcome in CLASS_TAR)
    kept_widths = Counter(40 + index for index, (_, outcome) in enumerate(CLASS_TAR) if outcome == "kept")
    assert stored_widths(work.samples) == kept_widths, "every good image once, the first of a repeated name"
    assert dict(work.skipped) == {("tars", reason): outcomes[reason]
                                  for reason in ("duplicate_member", "not_a_regular_file")}
    members = [json.loads(sample["json"])["member"] for sample in work.samples]
    assert Counter(members) == Counter(["a/x", "b/x", "x", "x", "../escape", "/absolute", "deep/../../up",
                                        "not-utf8-\ufffd"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n0.tar"], "nothing was extracted"
    assert not (tmp_path.parent / "escape.jpg").exists() and not Path("/absolute.png").exists()


FOUR_IMAGES = tar_of([regular(f"img{index}.jpg", image_bytes(50 + index)) for index in range(4)])
HEADERS = member_offsets(FOUR_IMAGES)
LAST_MEMBER_END = HEADERS[-1][1] + len(image_bytes(53)) + (-len(image_bytes(53)) % 512)


def garbled(data: bytes, start: int) -> bytes:
    return data[:start] + b"\x07" * 512 + data[start + 512:]


@pytest.mark.parametrize("data, kept, reason", [
    (FOUR_IMAGES[: HEADERS[2][0] + 100], 2, "truncated_tar"),
    (FOUR_IMAGES[: HEADERS[2][0]], 2, "truncated_tar"),
    (FOUR_IMAGES[: HEADERS[2][1] + 10], 2, "truncated_tar"),
    (FOUR_IMAGES[:LAST_MEMBER_END], 4, "truncated_tar"),
    (garbled(FOUR_IMAGES, HEADERS[2][0]), 2, "corrupt_tar"),
    (FOUR_IMAGES + tar_of([regular("img9.jpg", image_bytes(59))]), 4, "data_after_end_of_tar"),
    (FOUR_IMAGES[:300], 0, "unreadable_tar"),
    (b"", 0, "unreadable_tar"),
    (b"this is not a tar archive at all" * 40, 0, "unreadable_tar"),
    (gzip.compress(FOUR_IMAGES)[:-8], 4, "truncated_tar"),
], ids=["cut-in-a-header", "cut-at-a-header", "cut-in-member-data", "cut-before-the-end-blocks", "garbled-header",
        "another-tar-appended", "cut-in-the-first-header", "empty-file", "not-a-tar", "gzip-without-its-trailer"])
def test_damaged_tars_keep_every_member_before_the_damage_and_count_it(tmp_path, image_config, data, kept, reason):
    work = prepared(tmp_path, "n0.tar", data, image_config)
    assert stored_widths(work.samples) == Counter(range(50, 50 + kept))
    assert dict(work.skipped) == {("tars", reason): 1}


def test_whole_tars_report_no_damage(tmp_path, image_config):
    """Tars as Python's tarfile (ustar, GNU, PAX) and the pipeline's own writer produce them: no false alarm."""
    for index, tar_format in enumerate((tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
            for info, data in (regular("folder-" + "n" * 80 + "/" + "n" * 80 + ".jpg", image_bytes(60)),
                               regular("y.jpg", image_bytes(61))):
                archive.addfile(info, io.BytesIO(data))
        work = prepared(tmp_path, f"{index}.tar", buffer.getvalue(), image_config)
        assert stored_widths(work.samples) == Counter([60, 61]) and not work.skipped
    work = prepared(tmp_path, "own.tar", tar_bytes([{"__key__": "k", "jpg": image_bytes(62)}]), image_config)
    assert stored_widths(work.samples) == Counter([62]) and not work.skipped


# --- one real pipeline run over every hostile raw input kind -----------------------------------------------------

PAIR_TAR = [
    ("part0/000.jpg", image_bytes(70)), ("part0/000.txt", b"the first folder"),
    ("part1/000.jpg", image_bytes(71)), ("part1/000.txt", b"the second folder"),
    ("001.jpg", image_bytes(72)), ("001.txt", b"the first caption"), ("001.txt", b"a repeated caption"),
    ("002.jpg", image_bytes(73)), ("002.txt", b"a nul\x00 and a bad \xff byte"),
    ("../003.jpg", image_bytes(74)), ("../003.txt", b"a climbing path"),
    ("/004.jpg", image_bytes(75)), ("/004.txt", b"an absolute path"),
    ("005.JPG", image_bytes(76)), ("005.TXT", b"upper-case extensions"),
]
CUT_PAIR_TAR = [("000.jpg", image_bytes(77)), ("000.txt", b"before the cut"), ("001.jpg", image_bytes(78)),
                ("001.txt", b"also before the cut"), ("002.jpg", image_bytes(79)), ("002.txt", b"lost in the cut")]
JSONL_TEXT = b"\n".join([
    b'{"text": "a plain good document"}',
    b'{"text": "a raw nul\x00 inside"}',
    b'{"text": "an escaped nul\\u0000 inside"}',
    b'{"text": "a lone surrogate \\ud800 here"}',
    b'{"text": "bad utf8 \xff\xfe bytes"}',
    b"[1, 2]",
    b'"just a string"',
    b'{"text": null}',
    b"{not json",
])
GZ_TEXT = b"gz line with a nul\x00\nand \xc3\x28 invalid\n"
DOCUMENTS = ["a plain good document", "a raw nul inside", "an escaped nul inside", "a lone surrogate \ufffd here",
             "bad utf8 \ufffd\ufffd bytes", "gz line with a nul", "and \ufffd( invalid"]


def write_raw_inputs(root: Path) -> None:
    (root / "classes").mkdir()
    (root / "classes" / "n01.tar").write_bytes(tar_of([member for member, _ in CLASS_TAR]))
    (root / "classes" / "n02.tar").write_bytes(FOUR_IMAGES[: HEADERS[3][0] + 100])
    (root / "classes" / "n03.tar").write_bytes(b"")
    (root / "pairs").mkdir()
    (root / "pairs" / "00000.tar").write_bytes(tar_of([regular(name, data) for name, data in PAIR_TAR]))
    cut = tar_of([regular(name, data) for name, data in CUT_PAIR_TAR])
    (root / "pairs" / "00001.tar").write_bytes(cut[: member_offsets(cut)[4][1] + 50])
    (root / "text").mkdir()
    (root / "text" / "docs.jsonl").write_bytes(JSONL_TEXT)
    (root / "text" / "more.txt.gz").write_bytes(gzip.compress(GZ_TEXT))
    images = root / "images"
    images.mkdir()
    for index in range(4):
        (images / f"img{index}.jpg").write_bytes(image_bytes(80 + index))
    (root / "outside.jpg").write_bytes(image_bytes(89))
    rows = [b'{"image": "img0.jpg", "caption": "a good row"}', b"{broken", b"[1, 2]",
            b'{"image": "img\\u0000.jpg", "caption": "a nul in the path"}',
            b'{"image": "../outside.jpg", "caption": "a path out of the folder"}',
            b'{"image": "%s", "caption": "an absolute path"}' % str(root / "outside.jpg").encode(),
            b'{"image": "img1.jpg", "caption": "a lone \\ud800 surrogate"}',
            b'{"image": "img2.jpg", "caption": "a bad \xff byte"}',
            b'{"image": "img3.jpg", "caption": "a nul\\u0000 caption"}',
            b'{"image": "img\\udc00.jpg", "caption": "a surrogate in the path"}']
    (root / "table.jsonl").write_bytes(b"\n".join(rows))
    (root / "table.tsv").write_bytes(b"image\tcaption\nimg0.jpg\ta bad \xfe byte\nimg1.jpg\ta nul\x00 caption\n"
                                     b"img2.jpg\t\x00\n")


EXPECTED_TOTALS = {
    "classes": {"written": 11, "skipped": {"duplicate_member": 1, "not_a_regular_file": 4, "truncated_tar": 1,
                                           "unreadable_tar": 1}, "repaired": {}},
    "pairs": {"written": 9, "skipped": {"duplicate_member": 1, "truncated_tar": 1},
              "repaired": {"invalid_utf8_replaced": 1}},
    "corpus": {"skipped": {"bad_json": 3, "empty_text": 1},
               "repaired": {"invalid_utf8_replaced": 2, "surrogates_replaced": 1}},
    "jsonl_table": {"written": 4, "skipped": {"bad_json": 2, "bad_image_path": 2, "missing_image": 2},
                    "repaired": {"invalid_utf8_replaced": 1, "surrogates_replaced": 1}},
    "tsv_table": {"written": 2, "skipped": {"empty_caption": 1}, "repaired": {"invalid_utf8_replaced": 1}},
}
GOOD_CAPTIONS = {
    "pairs": ["the first folder", "the second folder", "the first caption", "a nul\x00 and a bad \ufffd byte",
              "a climbing path", "an absolute path", "upper-case extensions", "before the cut", "also before the cut"],
    "jsonl_table": ["a good row", "a lone \ufffd surrogate", "a bad \ufffd byte", "a nul\x00 caption"],
    "tsv_table": ["a bad \ufffd byte", "a nul\x00 caption"],
}


@pytest.fixture(scope="module")
def hostile_build(tmp_path_factory):
    """Every hostile raw input through `build` on a local Ray instance (no visual codes: not what is tested)."""
    root = tmp_path_factory.mktemp("hostile")
    write_raw_inputs(root)
    spm = make_spm(root)
    sources = [{"kind": "imagenet", "name": "classes", "path": str(root / "classes")},
               {"kind": "pairs_webdataset", "name": "pairs", "path": str(root / "pairs")},
               {"kind": "text", "name": "corpus", "paths": [str(root / "text")]},
               {"kind": "pairs_table", "name": "jsonl_table", "table": str(root / "table.jsonl"),
                "images": str(root / "images")},
               {"kind": "pairs_table", "name": "tsv_table", "table": str(root / "table.tsv"),
                "images": str(root / "images")}]
    raw = data_config(str(root / "shards"), "", "", str(spm), sources=sources, visual_tokenizer=None,
                      image={"shorter_side": SHORTER_SIDE, "views_per_image": 1})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = build(validate_config(DataConfig, raw, "hostile"), progress=False)
    finally:
        ray.shutdown()
    return {"result": result, "shards": root / "shards", "spm": spm, "root": root}


def shard_samples(folder: Path, kind: str) -> list[dict]:
    return [sample for path in sorted(folder.glob(f"{kind}-*.tar"))
            for sample in webdataset.WebDataset(str(path), shardshuffle=False)]


def test_the_pipeline_counts_every_hostile_input_and_keeps_every_good_sample(hostile_build):
    samples = {kind: shard_samples(hostile_build["shards"], kind) for kind in ("image", "pair", "text")}
    segments = sum(len(np.load(io.BytesIO(sample["ids.npy"]))) for sample in samples["text"])
    assert hostile_build["result"].manifest.totals() == {
        **EXPECTED_TOTALS, "corpus": {**EXPECTED_TOTALS["corpus"], "written": segments}}
    # Provenance is strict UTF-8 JSON whatever bytes the input names and captions held.
    provenance = {kind: [json.loads(sample["json"].decode("utf-8")) for sample in found]
                  for kind, found in samples.items()}
    assert stored_widths(samples["image"]) == Counter([40, 41, 42, 43, 45, 46, 47, 48, 50, 51, 52])
    assert stored_widths(samples["pair"]) == Counter([*range(70, 79), 80, 81, 82, 83, 80, 81]), \
        "every good pair once; the image outside the table's folder (89) never read"
    for source, captions in GOOD_CAPTIONS.items():
        assert Counter(record["caption"] for record in provenance["pair"] if record["source"] == source) == Counter(
            captions), source


def test_text_with_nul_bytes_escapes_and_invalid_utf8_keeps_every_document(hostile_build):
    tokenizer = TextTokenizer(hostile_build["spm"])
    blocks = [np.load(io.BytesIO(sample["ids.npy"])) for sample in shard_samples(hostile_build["shards"], "text")]
    segments = [row[row != 1].tolist() for block in blocks for row in block]
    packed = [i for segment in segments for i in segment[1:-1] if i != 2]
    assert packed == [i for ids in tokenizer.encode_batch(DOCUMENTS) for i in ids[1:-1]]


# --- the trainer's side: manifests and shards it cannot trust ----------------------------------------------------

def dataset_with(tmp_path: Path, entries: object, key: str = "shards") -> str:
    folder = tmp_path / "dataset"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"format": 2, key: entries}))
    return str(folder)


def entry(name: str, kind: str = "image", samples: object = 3, sha256: object = "0" * 64) -> dict:
    return {"name": name, "shard": name, "kind": kind, "samples": samples, "sha256": sha256}


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "pipe:touch {marker}", "sub/image-000000.tar",
                                  "image-000000.tar; touch {marker}", "s3://elsewhere/image-000000.tar", "",
                                  "image-000000.tar/../../outside.tar", "image-000000.TAR"])
def test_manifest_names_that_are_not_shard_names_are_refused_before_any_read(tmp_path, name):
    """Refused although the file a path names exists, and before the missing first shard would be noticed."""
    marker = tmp_path / "marker"
    name = name.format(marker=marker)
    (tmp_path / "outside.tar").write_bytes(FOUR_IMAGES)
    dataset = dataset_with(tmp_path, [entry("image-000000.tar"), entry(name)])
    with pytest.raises(ShardDataError) as error:
        index_datasets([dataset])
    assert str(error.value) == (f"{dataset}: manifest shards entry 1: name {name!r:.80} is not a shard file name "
                                "such as image-000000.tar")
    assert not marker.exists()


@pytest.mark.parametrize("entries, message", [
    ([{"shard": "image-000000.tar", "kind": "image", "samples": 3}],
     "manifest shards entry 0: name None is not a shard file name such as image-000000.tar"),
    ([entry("image-000000.tar", kind="video")], "manifest shards entry 0: image-000000.tar: kind 'video' does not "
     "match the name (expected one of image, text, pair)"),
    ([entry("image-000000.tar", kind="text")], "manifest shards entry 0: image-000000.tar: kind 'text' does not "
     "match the name (expected one of image, text, pair)"),
    ([entry("image-000000.tar"), entry("pair-000000.tar", kind=None)], "manifest shards entry 1: pair-000000.tar: "
     "kind None does not match the name (expected one of image, text, pair)"),
    ([entry("image-000000.tar", samples="3")], "manifest shards entry 0: image-000000.tar: samples '3' is not a count"),
    ([entry("image-000000.tar", samples=-1)], "manifest shards entry 0: image-000000.tar: samples -1 is not a count"),
    ([entry("image-000000.tar", samples=True)],
     "manifest shards entry 0: image-000000.tar: samples True is not a count"),
    ([entry("image-000000.tar", sha256=None)],
     "manifest shards entry 0: image-000000.tar: sha256 None is not a sha256 hex digest"),
    ([entry("image-000000.tar", sha256="abc")],
     "manifest shards entry 0: image-000000.tar: sha256 'abc' is not a sha256 hex digest"),
    (["image-000000.tar"], "manifest shards entry 0: expected a shard entry, got str 'image-000000.tar'"),
    ({"image-000000.tar": 3}, "the manifest lists no shards (is this the output of `beit3 data build`?)"),
], ids=["no-name", "unknown-kind", "kind-not-the-name's", "no-kind", "count-as-text", "negative-count",
        "count-as-boolean", "no-sha256", "short-sha256", "entry-not-an-object", "shards-not-a-list"])
def test_manifest_entries_with_missing_or_wrong_fields_are_named(tmp_path, entries, message):
    dataset = dataset_with(tmp_path, entries)
    with pytest.raises(ShardDataError) as error:
        index_datasets([dataset])
    assert str(error.value) == f"{dataset}: {message}"


def test_a_manifest_without_shards_is_named(tmp_path):
    dataset = dataset_with(tmp_path, [], key="files")
    with pytest.raises(ShardDataError, match=f"{dataset}: the manifest lists no shards"):
        index_datasets([dataset])
    (Path(dataset) / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ShardDataError, match=f"{dataset}: the manifest lists no shards"):
        index_datasets([dataset])


def test_pipe_urls_from_configs_never_run_a_command(tmp_path, image_config):
    """A `pipe:` dataset in a pretrain config, a `pipe:` source in a data config and a shard reference named like a
    command: each a clear error, and the command never runs."""
    marker = tmp_path / "marker"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", {"shards": f"pipe:touch {marker}",
                                                                     "spm": "unused.model"})))
    with pytest.raises(StorageError, match=re.escape(f"'pipe:touch {marker}' is not a local path or an s3:// URL")):
        preflight(load_pretrain_config(recipe), world_size=1)
    raw = image_config.model_dump(mode="json")
    raw["sources"][0]["path"] = f"pipe:touch {marker}"
    with pytest.raises(ConfigError, match=re.escape(f"sources.0.imagenet.path: 'pipe:touch {marker}' is not a")):
        validate_config(DataConfig, raw, "data.yaml")
    ref = ShardRef(str(tmp_path), f"pipe:touch {marker}", 1, "0" * 64)
    with pytest.raises(ShardDataError, match="is not a shard file name"):
        read_shard_samples(ref, verify_sha256=False, attempts=1)
    assert not marker.exists()


@pytest.fixture
def pair_shard(hostile_build, tmp_path):
    """A copy of the built dataset and the reference to its largest pair shard."""
    copy = tmp_path / "shards"
    shutil.copytree(hostile_build["shards"], copy)
    refs = index_datasets([str(copy)]).shards["pair"]
    return max(refs, key=lambda ref: ref.samples)


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive]


def test_a_truncated_or_garbled_shard_is_a_clear_error_without_sha256_checks(pair_shard):
    """Wherever a cut falls (between members too, where tar readers stop without a word) and whatever header is
    garbled, the error names the shard: with verify_sha256 off nothing else would notice."""
    path = Path(pair_shard.dataset) / pair_shard.name
    whole = path.read_bytes()
    offsets = member_offsets(whole)
    for cut in (offsets[3][0] + 100, offsets[3][1] + 10, offsets[-1][0], offsets[1][0], 100, 0):
        path.write_bytes(whole[:cut])
        with pytest.raises(ShardDataError, match=re.escape(f"{path}: truncated (it does not end with a tar's two")):
            read_shard_samples(pair_shard, verify_sha256=False, attempts=1)
    path.write_bytes(whole[: len(whole) - 600])
    assert len(read_shard_samples(pair_shard, verify_sha256=False)) == pair_shard.samples, "a cut in the padding"
    # Members of a sample are stored in field order: ids.npy, jpg, json, views.json; member 5 is the second jpg.
    for member, missing in ((5, "jpg, views.json"), (len(offsets) - 1, "views.json")):
        path.write_bytes(garbled(whole, offsets[member][0]))
        with pytest.raises(ShardDataError, match=re.escape(f"{path}: sample ") + r"\S+" + re.escape(
                f" has no {missing} (the shard was truncated or altered)")):
            read_shard_samples(pair_shard, verify_sha256=False, attempts=1)


def test_duplicate_members_and_keys_in_a_shard_are_clear_errors_without_sha256_checks(pair_shard):
    path = Path(pair_shard.dataset) / pair_shard.name
    members = members_of(path.read_bytes())
    path.write_bytes(tar_of([regular(name, data) for name, data in members[:2] + members[1:]]))
    with pytest.raises(ShardDataError, match=re.escape(f"{path}: duplicate member")):
        read_shard_samples(pair_shard, verify_sha256=False, attempts=1)
    by_key: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in members:
        by_key.setdefault(name.partition(".")[0], []).append((name, data))
    (first, first_members), (_, second_members) = list(by_key.items())[:2]
    path.write_bytes(tar_of([regular(name, data) for name, data in first_members + second_members + first_members]))
    with pytest.raises(ShardDataError, match=re.escape(f"{path}: duplicate sample key '{first}'")):
        read_shard_samples(pair_shard, verify_sha256=False, attempts=1)


def test_a_damaged_shard_read_by_a_loader_worker_reaches_the_user_in_one_line(pair_shard):
    path = Path(pair_shard.dataset) / pair_shard.name
    path.write_bytes(path.read_bytes()[:3000])
    settings = StreamSettings(stream="pair", micro_batch=1, seed=0, image_size=32, grid=2, mask_id=4,
                              verify_sha256=False, read_attempts=1)
    loader = build_loader(MicroBatchStream([pair_shard], settings, rank=0, world_size=1), workers=1,
                          prefetch_batches=1)
    with pytest.raises(ShardDataError) as error:
        next(iter(loader))
    traceback.clear_frames(error.tb)  # the loader's iterator goes now: see first_batch in test_untrusted_shard_contents
    assert "Traceback" in str(error.value), "PyTorch carries the worker's traceback in the message"
    assert error_message(error.value).startswith(f"{path}: ") and "\n" not in error_message(error.value)


# --- configs: `beit3 data build` and `beit3 train` as a user runs them ---------------------------------------------

@pytest.fixture(scope="module")
def command_line_runs(tmp_path_factory, image_config) -> dict:
    """Wrong types, unknown keys, a `pipe:` source and a batch no rank count can divide, through the command line.
    Started with the module (see pytestmark): most of their seconds go to importing torch, beside the other tests."""
    folder = tmp_path_factory.mktemp("bad-configs")
    marker = folder / "marker"
    data = image_config.model_dump(mode="json")
    data.update(samples_per_shard="many", shard_size=3, output=str(folder / "out"))
    data["image"]["quality"] = 90
    data["sources"][0]["path"] = f"pipe:touch {marker}"
    (folder / "data.yaml").write_text(yaml.safe_dump(data))
    shards = {"shards": folder / "no-shards", "spm": folder / "no.model"}
    types = tiny_recipe(folder / "run", shards, steps="many")
    types["data"]["workerz"] = 2
    (folder / "types.yaml").write_text(yaml.safe_dump(types))
    (folder / "batch.yaml").write_text(yaml.safe_dump(tiny_recipe(folder / "run", shards,
                                                                  batch={"image": 7, "gradient_accumulation": 2})))
    commands = {"data": ["data", "build", "--config", "data.yaml"], "types": ["train", "--config", "types.yaml"],
                "batch": ["train", "--config", "batch.yaml"]}
    environment = {name: value for name, value in os.environ.items() if name != "WORLD_SIZE"}
    running = {name: subprocess.Popen([str(BEIT3), *arguments], cwd=folder, env=environment, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, arguments in commands.items()}
    yield {"folder": folder, "marker": marker, "running": running}
    for process in running.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_bad_configs_fail_before_any_work_with_the_fields_named(command_line_runs):
    """Exit code 2, each bad field named on a line of its own, no traceback, nothing started or run."""
    folder, marker = command_line_runs["folder"], command_line_runs["marker"]
    errors = {}
    for name, process in command_line_runs["running"].items():
        _, errors[name] = process.communicate(timeout=300)
        assert process.returncode == 2 and "Traceback" not in errors[name], errors[name]
    assert errors["data"].splitlines() == [
        "beit3 data: data.yaml: invalid config",
        "  samples_per_shard: Input should be a valid integer, unable to parse string as an integer",
        f"  sources.0.imagenet.path: 'pipe:touch {marker}' is not a local path or an s3:// URL",
        "  image.quality: unknown field (check its spelling)",
        "  shard_size: unknown field (check its spelling)",
    ]
    assert errors["types"].splitlines() == [
        "beit3 train: types.yaml: invalid config",
        "  data.workerz: unknown field (check its spelling)",
        "  steps: Input should be a valid integer, unable to parse string as an integer",
    ]
    (batch_error,) = errors["batch"].splitlines()
    assert batch_error.startswith("beit3 train: batch.image: 7 samples per step do not divide over 1 ranks x 2 ")
    assert not marker.exists() and not (folder / "out").exists() and not (folder / "run").exists()


def test_training_started_without_a_launcher_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Without torchrun's variables DeepSpeed looks for MPI and fails importing mpi4py (as here, where it is not
    installed): the user is told how to start training instead."""
    def deepspeed_without_a_launcher(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'mpi4py'", name="mpi4py")

    monkeypatch.setattr("beit3.pretrain.trainer.train", deepspeed_without_a_launcher)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", {"shards": tmp_path, "spm": "unused.model"})))
    assert main(["train", "--config", str(recipe)]) == 2
    assert capsys.readouterr().err == ("beit3 train: no launcher set RANK, WORLD_SIZE and MASTER_ADDR: start training "
                                       "with torchrun or deepspeed (see configs/pretrain/tiny_cpu.yaml)\n")
