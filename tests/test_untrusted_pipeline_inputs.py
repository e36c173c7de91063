"""Inputs that used to stop a build or exhaust a worker's memory: each is now a counted skip naming its file, the
build goes on and keeps every good sample, and small files that claim gigabytes stay bounded.

A real build on a local Ray instance (`untrusted_build`) reads, among good samples: an image that decodes but JPEG
cannot store, an EPS file (the format PIL hands to Ghostscript), JSON lines that Python's parser refuses for its own
limits, documents and captions past `max_document_bytes`, a field past the csv module's limit, COCO annotations of
the wrong shape, an unreadable Parquet table, a sparse tar member, a tar member declaring 8 GiB, compressed bombs,
cut and corrupt compressed corpora, byte-order marks and UTF-16. Fresh processes measure peak memory while bombs
are read; a storage wrapper counts the bytes read while a file of one long line is split.
"""

import codecs
import gzip
import io
import json
import logging
import pickle
import struct
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import webdataset
import zstandard
from PIL import Image

from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig, TextSource
from beit3.data_pipeline.job import _prepare, build
from beit3.data_pipeline.processing import (
    LINE_SEARCH_BYTES,
    SegmentPacker,
    ShardWork,
    pack_documents,
    prepare_images,
    prepare_text,
    read_documents,
    resize_shorter_side,
)
from beit3.data_pipeline.sources import ImageItem, ImageTar, ShardPlan, TextFile, list_text, plan_shards
from beit3.data_pipeline.storage import LocalStorage
from beit3.tokenizers.images import ImageDecodeError, decode_image
from beit3.tokenizers.text import TextTokenizer, TokenizerFileError
from beit3.tokenizers.text_training import iter_corpus_lines

from memory_probe import PEAK_SOURCE
from pipeline_inputs import (
    DEEP_JSON_LINE,
    HUGE_INTEGER_LINE,
    data_config,
    gzip_bomb,
    gzip_tar_bomb,
    make_spm,
    noise_image,
    tar_of,
    tar_with_sparse_member,
    wide_png,
    with_declared_size,
    zstd_bomb,
)

GIB = 2**30
LIMITS = {"max_document_bytes": 64 * 2**10, "max_decompressed_bytes": 64 * 2**20, "text_shard_bytes": 64 * 2**10}
"""Small bounds, so that the build's bombs are refused within a second."""
LONG_LINE = b"x" * 200_000


def eps_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="EPS")
    return buffer.getvalue()


def jsonl(*records) -> bytes:
    return b"\n".join(record if isinstance(record, bytes) else json.dumps(record).encode() for record in records)


def write_untrusted_inputs(root: Path) -> None:
    for folder, widths in (("n01", (40, 41)), ("n02", (42, 43))):
        (root / "images" / folder).mkdir(parents=True)
        for width in widths:
            (root / "images" / folder / f"{width}.jpg").write_bytes(noise_image(width))
    (root / "images" / "n01" / "wide.png").write_bytes(wide_png())
    (root / "images" / "n01" / "vector.jpg").write_bytes(eps_image())

    (root / "class_tars").mkdir()
    (root / "class_tars" / "n01.tar").write_bytes(
        tar_with_sparse_member({"a.jpg": noise_image(50), "b.jpg": noise_image(51)}, "holes.jpg", 4 * GIB))
    (root / "class_tars" / "n02.tar").write_bytes(with_declared_size(
        tar_of({"c.jpg": noise_image(52), "d.jpg": noise_image(53), "e.jpg": noise_image(54)}), "d.jpg", 8 * GIB))
    (root / "class_tars" / "n03.tar").write_bytes(gzip_tar_bomb("zeros.jpg", 4 * GIB))

    (root / "pair_tars").mkdir()
    (root / "pair_tars" / "00000.tar").write_bytes(tar_of({
        "000.jpg": noise_image(60), "000.txt": b"a good pair", "001.png": wide_png(), "001.txt": b"too wide to store",
        "002.jpg": noise_image(61), "002.txt": b"another good pair"}))

    (root / "table_images").mkdir()
    for index in range(4):
        (root / "table_images" / f"img{index}.jpg").write_bytes(noise_image(70 + index))
    (root / "table.jsonl").write_bytes(jsonl({"image": "img0.jpg", "caption": "a good row"}, HUGE_INTEGER_LINE,
                                             DEEP_JSON_LINE, {"image": "img1.jpg", "caption": "another good row"}))
    (root / "table.tsv").write_bytes(codecs.BOM_UTF8 + "\n".join([
        "image\tcaption", "img0.jpg\ta good tsv row", "img1.jpg\t" + "y" * 140_000, "img2.jpg\t" + "z " * 35_000,
        "img3.jpg\tthe last good tsv row"]).encode())
    coco = {"images": [{"id": 1, "file_name": "img0.jpg"}, {"id": 2, "file_name": "img1.jpg"},
                       {"id": [3], "file_name": "img2.jpg"}, "not an image entry"],
            "annotations": [{"id": 10, "image_id": 1, "caption": "a good annotation"}, ["a list"],
                            {"image_id": 1, "caption": "no id"}, {"id": 12, "image_id": 1, "caption": 42},
                            {"id": 13, "image_id": [1], "caption": "unhashable image id"},
                            {"id": 11, "image_id": 2, "caption": "another good annotation"}]}
    (root / "captions.json").write_bytes(codecs.BOM_UTF8 + json.dumps(coco).encode())
    (root / "deep_captions.json").write_bytes(
        b'{"images": [], "annotations": [{"id": 1, "image_id": 1, "caption": ' + DEEP_JSON_LINE + b"}]}")
    (root / "table.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")

    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a_good.jsonl").write_bytes(jsonl({"text": "the first good document"}, HUGE_INTEGER_LINE,
                                                {"text": "the second good document"}, DEEP_JSON_LINE,
                                                {"text": "x" * 70_000}, {"text": "the third good document"}))
    (corpus / "b_bom.txt").write_bytes(codecs.BOM_UTF8 + b"a document after a byte-order mark\nand another line\n")
    (corpus / "c_le.txt").write_bytes(
        codecs.BOM_UTF16_LE + "utf-16 little-endian: ünïcödé 文字\r\nsecond utf-16 line\r\n".encode("utf-16-le"))
    (corpus / "d_be.jsonl").write_bytes(codecs.BOM_UTF16_BE + '{"text": "big-endian json line"}\n'.encode("utf-16-be"))
    (corpus / "e_bomb.txt.zst").write_bytes(zstd_bomb(b"a", 4 * GIB))
    (corpus / "f_cut.jsonl.gz").write_bytes(gzip.compress(jsonl({"text": "kept before the cut"},
                                                                {"text": "also kept"}) + b"\n")[:-4])
    (corpus / "g_corrupt.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"kept from the whole frame\n")
                                               + b"not a zstd frame")
    (corpus / "h_long.txt").write_bytes(LONG_LINE + b"\na line after the long one\n")


GOOD_DOCUMENTS = ["the first good document", "the second good document", "the third good document",
                  "a document after a byte-order mark", "and another line", "utf-16 little-endian: ünïcödé 文字",
                  "second utf-16 line", "big-endian json line", "kept before the cut", "also kept",
                  "kept from the whole frame", "a line after the long one"]
EXPECTED_TOTALS = {
    "images": {"written": 4, "skipped": {"unencodable_image": 1, "not_an_image": 1}, "repaired": {}},
    "class_tars": {"written": 3, "skipped": {"sparse_member": 1, "truncated_tar": 1, "decompressed_too_large": 1},
                   "repaired": {}},
    "pair_tars": {"written": 2, "skipped": {"unencodable_image": 1}, "repaired": {}},
    "jsonl_table": {"written": 2, "skipped": {"json_over_limits": 2}, "repaired": {}},
    "tsv_table": {"written": 2, "skipped": {"bad_row": 1, "caption_too_long": 1}, "repaired": {}},
    "coco": {"written": 2, "skipped": {"bad_annotation": 4}, "repaired": {}},
    "deep_coco": {"written": 0, "skipped": {"unreadable_annotations": 1}, "repaired": {}},
    "parquet_table": {"written": 0, "skipped": {"unreadable_table": 1}, "repaired": {}},
    "corpus": {"skipped": {"json_over_limits": 2, "document_too_long": 2, "decompressed_too_large": 1,
                           "truncated_compressed_file": 1, "corrupt_compressed_file": 1}, "repaired": {}},
}


def untrusted_config(root: Path, spm: Path) -> DataConfig:
    images = str(root / "table_images")
    sources = [{"kind": "imagenet", "name": "images", "path": str(root / "images")},
               {"kind": "imagenet", "name": "class_tars", "path": str(root / "class_tars")},
               {"kind": "pairs_webdataset", "name": "pair_tars", "path": str(root / "pair_tars")},
               {"kind": "pairs_table", "name": "jsonl_table", "table": str(root / "table.jsonl"), "images": images},
               {"kind": "pairs_table", "name": "tsv_table", "table": str(root / "table.tsv"), "images": images},
               {"kind": "coco", "name": "coco", "annotations": str(root / "captions.json"), "images": images},
               {"kind": "coco", "name": "deep_coco", "annotations": str(root / "deep_captions.json"),
                "images": images},
               {"kind": "pairs_table", "name": "parquet_table", "table": str(root / "table.parquet"), "images": images},
               {"kind": "text", "name": "corpus", "paths": [str(root / "corpus")]}]
    raw = data_config(str(root / "shards"), "", "", str(spm), sources=sources, visual_tokenizer=None,
                      image={"shorter_side": 32, "views_per_image": 1}, **LIMITS)
    return validate_config(DataConfig, raw, "untrusted")


@pytest.fixture(scope="module")
def untrusted_build(tmp_path_factory):
    """The build, then a re-run after the files of every planned shard with a skipped sample are deleted."""
    root = tmp_path_factory.mktemp("untrusted")
    write_untrusted_inputs(root)
    spm = make_spm(root)
    config = untrusted_config(root, spm)
    shards = root / "shards"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = build(config, progress=False)
        manifest = (shards / "manifest.json").read_bytes()
        with_skips = [entry["name"] for entry in first.manifest.shards.values()
                      if entry["skipped"] and entry["samples"]]
        for name in with_skips:
            (shards / name).unlink()
        again = build(config, progress=False)
    finally:
        ray.shutdown()
    return {"first": first, "again": again, "rebuilt": with_skips, "manifest": manifest, "shards": shards,
            "spm": spm}


def shard_samples(folder: Path, kind: str) -> list[dict]:
    return [sample for path in sorted(folder.glob(f"{kind}-*.tar"))
            for sample in webdataset.WebDataset(str(path), shardshuffle=False)]


def test_the_build_counts_each_untrusted_input_with_its_reason_and_keeps_every_good_sample(untrusted_build):
    shards = untrusted_build["shards"]
    text = shard_samples(shards, "text")
    segments = sum(len(np.load(io.BytesIO(sample["ids.npy"]))) for sample in text)
    assert untrusted_build["first"].manifest.totals() == {
        **EXPECTED_TOTALS, "corpus": {**EXPECTED_TOTALS["corpus"], "written": segments}}
    widths = {kind: Counter(Image.open(io.BytesIO(sample["jpg"])).width for sample in shard_samples(shards, kind))
              for kind in ("image", "pair")}
    assert widths["image"] == Counter([40, 41, 42, 43, 50, 51, 52])
    assert widths["pair"] == Counter([60, 61, 70, 71, 70, 73, 70, 71])
    tokenizer = TextTokenizer(untrusted_build["spm"])
    rows = [row[row != 1].tolist() for sample in text for row in np.load(io.BytesIO(sample["ids.npy"]))]
    assert [i for row in rows for i in row[1:-1] if i != 2] == [
        i for ids in tokenizer.encode_batch(GOOD_DOCUMENTS) for i in ids[1:-1]], "every good document, in order"


def test_a_rerun_over_the_same_inputs_finishes_with_the_same_manifest(untrusted_build):
    again = untrusted_build["again"]
    assert len(untrusted_build["rebuilt"]) >= 5, "image, tar, pair and text shards with skips were deleted"
    assert again.shards_built == len(untrusted_build["rebuilt"])
    assert (untrusted_build["shards"] / "manifest.json").read_bytes() == untrusted_build["manifest"]


def test_eps_is_not_opened():
    """PIL would open it (and hand it to Ghostscript to load); the pipeline's decoder refuses the format."""
    assert Image.open(io.BytesIO(eps_image())).format == "EPS"
    with pytest.raises(ImageDecodeError) as error:
        decode_image(eps_image(), "vector.jpg")
    assert error.value.reason == "not_an_image"


def test_a_job_failure_names_the_shard_and_its_input(tmp_path):
    """With every sample and file behind a boundary, what stops a job is not the data (here: a missing
    tokenizer); the error still names the shard and its input file."""
    (tmp_path / "a.txt").write_text("one document\n")
    raw = data_config(str(tmp_path / "out"), "", "", str(tmp_path / "missing.model"), visual_tokenizer=None,
                      sources=[{"kind": "text", "name": "corpus", "paths": [str(tmp_path / "a.txt")]}])
    config = validate_config(DataConfig, raw, "t")
    (plan,) = plan_shards(config)
    with pytest.raises(TokenizerFileError) as error:
        _prepare({"plan": pickle.dumps(plan)}, config.model_dump_json())
    assert error.value.__notes__ == [f"while preparing text-000000.tar from {tmp_path}/a.txt"]


def test_an_error_no_check_foresaw_costs_one_sample_or_the_rest_of_one_file(tmp_path, monkeypatch, caplog):
    """The boundaries themselves, with a fault put into a real stage (the fuzzer finds no input that reaches
    them): a resize that raises what no check expects (a struct.error) on one image, a tokenizer that fails on a
    later batch of a file. Each is counted as unexpected_error and logged with its file; the other samples, and the
    text read before, are kept."""
    def resize_failing_on_width_41(image, shorter_side):
        if image.width == 41:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return resize_shorter_side(image, shorter_side)

    monkeypatch.setattr("beit3.data_pipeline.processing.resize_shorter_side", resize_failing_on_width_41)
    for width in (40, 41, 42):
        (tmp_path / f"{width}.jpg").write_bytes(noise_image(width))
    spm = make_spm(tmp_path)
    config = validate_config(DataConfig, data_config(str(tmp_path / "out"), "", "", str(spm), visual_tokenizer=None,
                                                     sources=[{"kind": "text", "name": "corpus", "paths": [
                                                         str(tmp_path / "a.txt")]}]), "t")
    items = tuple(ImageItem("images", str(tmp_path), f"{width}.jpg", "n0", index)
                  for index, width in enumerate((40, 41, 42)))
    with caplog.at_level(logging.WARNING):
        work = prepare_images(ShardPlan("image", 0, items), config)
    assert [Image.open(io.BytesIO(sample["jpg"])).width for sample in work.samples] == [40, 42]
    assert work.skipped == {("images", "unexpected_error"): 1}
    assert "images:41.jpg: skipped as unexpected_error (error: unpack requires a buffer of 4 bytes)" in caplog.text

    (tmp_path / "a.txt").write_bytes(b"the quick brown fox\n" * 20_000 + b"a short one\n" * 20_000)
    encode = TextTokenizer.encode_concatenated

    def failing_on_a_later_batch(self, texts):
        if texts[0] == "a short one":
            raise RuntimeError("the tokenizer failed")
        return encode(self, texts)

    monkeypatch.setattr(TextTokenizer, "encode_concatenated", failing_on_a_later_batch)
    work = prepare_text(ShardPlan("text", 0, (TextFile("corpus", str(tmp_path), "a.txt", 0),)), config)
    assert work.skipped == {("corpus", "unexpected_error"): 1}
    assert 0 < sum(count for _, count in work.sample_counts)
    assert f"{tmp_path}/a.txt: skipped as unexpected_error (RuntimeError: the tokenizer failed)" in caplog.text


def test_skips_are_logged_with_their_file_and_names_from_the_input_are_escaped(tmp_path, caplog):
    link = tarfile.TarInfo("evil\nFAKE: a forged log line")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.addfile(link)
    (tmp_path / "n0.tar").write_bytes(buffer.getvalue())
    (tmp_path / "docs.jsonl").write_bytes(jsonl({"text": "fine"}, HUGE_INTEGER_LINE, {"text": ""}))
    config = validate_config(DataConfig, data_config(str(tmp_path / "out"), str(tmp_path), "", "unused",
                                                     visual_tokenizer=None, text_tokenizer=None, sources=[
                                                         {"kind": "imagenet", "name": "tars", "path": str(tmp_path)}]),
                             "t")
    with caplog.at_level(logging.WARNING):
        prepare_images(ShardPlan("image", 0, (ImageTar("tars", str(tmp_path), "n0.tar", "n0", 0),)), config)
        read_documents(TextFile("corpus", str(tmp_path), "docs.jsonl", 0), "text", "line",
                       ShardWork(ShardPlan("text", 0, ())))
    assert caplog.messages == [
        f"{tmp_path}/n0.tar:evil\\nFAKE: a forged log line: skipped as not_a_regular_file",
        f"{tmp_path}/docs.jsonl: skipped empty_text: 1, json_over_limits: 1"]


# --- text: long lines, encodings, packing a batch at a time ------------------------------------------------------

def bytes_read_per_part(monkeypatch, folder: Path, name: str, part_bytes: int) -> tuple[list[int], Counter]:
    """Split `name` into parts of `part_bytes` as a build plans it, read each part's documents, and count the
    bytes each part read from storage."""
    parts = list_text(TextSource(kind="text", name="corpus", paths=[str(folder / name)]), part_bytes)
    read, original = [], LocalStorage.read_range

    def counting(self, file_name, start, stop):
        data = original(self, file_name, start, stop)
        read[-1] += len(data)
        return data

    monkeypatch.setattr(LocalStorage, "read_range", counting)
    work = ShardWork(ShardPlan("text", 0, ()))
    for part in parts:
        read.append(0)
        assert read_documents(part, "text", "line", work) == []
    return read, work.skipped


@pytest.mark.parametrize("megabytes", [16, 32])
def test_splitting_a_one_line_file_reads_each_byte_about_once(tmp_path, monkeypatch, megabytes):
    """Each part reads its own bytes, and the part where the line begins follows it only as far as a document may
    be long: 32 MiB in 256 KiB parts read 32 MiB (before: the first part read the whole line, 64 KiB at a time,
    copying what it had each time: quadratic)."""
    size, part_bytes, max_document_bytes = megabytes * 2**20, 256 * 2**10, 2**20
    (tmp_path / "one-line.txt").write_bytes(b"w" * size)
    read, skipped = bytes_read_per_part(monkeypatch, tmp_path, "one-line.txt", part_bytes)
    assert len(read) == size // part_bytes
    assert read[0] <= part_bytes + max_document_bytes + LINE_SEARCH_BYTES, "the first part stops past the limit"
    assert all(count == part_bytes + 1 for count in read[1:]), "the others read their own bytes and one before"
    assert sum(read) < size + max_document_bytes + LINE_SEARCH_BYTES + len(read)
    assert skipped == {("corpus", "document_too_long"): 1}


def test_byte_order_marks_are_dropped_and_utf16_is_decoded(tmp_path, caplog):
    text = "ünïcödé line\nanother line\n"
    files = {"utf8-bom.txt": codecs.BOM_UTF8 + text.encode(), "utf16-le.txt": text.encode("utf-16"),
             "utf16-be.txt": codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
             "utf32.txt": text.encode("utf-32"), "utf16.txt.gz": gzip.compress(text.encode("utf-16")),
             "utf16-bad.txt": codecs.BOM_UTF16_LE + "ünïcödé".encode("utf-16-le") + b"\x00\xd8" + "\nx".encode(
                 "utf-16-le")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        work = ShardWork(ShardPlan("text", 0, ()))
        documents = read_documents(TextFile("corpus", str(tmp_path), name, 0), "text", "line", work)
        if name == "utf16-bad.txt":
            assert documents == ["ünïcödé\ufffd", "x"]
            assert work.repaired == {("corpus", "invalid_utf16_replaced"): 1}
        else:
            assert documents == ["ünïcödé line", "another line"] and not work.skipped and not work.repaired, name
    # A UTF-16 file is never cut into parts (its newlines are two bytes); a UTF-8 one is, its mark only in part 0.
    big = "a line of text\n" * 2000
    (tmp_path / "big16.txt").write_bytes(big.encode("utf-16"))
    (tmp_path / "big8.txt").write_bytes(codecs.BOM_UTF8 + big.encode())
    parts = {name: list_text(TextSource(kind="text", name="corpus", paths=[str(tmp_path / name)]), 4096)
             for name in ("big16.txt", "big8.txt")}
    assert [(part.start, part.stop) for part in parts["big16.txt"]] == [(0, None)]
    assert len(parts["big8.txt"]) == 8
    for parted in parts.values():
        work = ShardWork(ShardPlan("text", 0, ()))
        assert [d for part in parted for d in read_documents(part, "text", "line", work)] == ["a line of text"] * 2000
    with caplog.at_level(logging.WARNING):
        (tmp_path / "bomb.txt.zst").write_bytes(zstd_bomb(b"a", GIB))
        work = ShardWork(ShardPlan("text", 0, ()))
        read_documents(TextFile("corpus", str(tmp_path), "bomb.txt.zst", 0), "text", "line", work,
                       max_decompressed_bytes=2**20)
    assert work.skipped == {("corpus", "decompressed_too_large"): 1}
    assert f"{tmp_path}/bomb.txt.zst: skipped as decompressed_too_large" in caplog.text


def test_packing_a_batch_at_a_time_gives_the_rows_of_packing_all_at_once():
    rng = np.random.default_rng(0)
    for text_len in (3, 8, 16):
        capacity = text_len - 2
        lengths = rng.choice([0, 1, 2, capacity - 1, capacity, capacity + 1, 3 * capacity + 2], size=300)
        ids = rng.integers(4, 60_000, size=int(lengths.sum())).astype(np.int32)
        cuts = np.sort(rng.choice(np.arange(1, len(lengths)), size=30, replace=False))
        packer, rows, offsets = SegmentPacker(text_len), [], np.concatenate([[0], np.cumsum(lengths)])
        for start, stop in zip([0, *cuts], [*cuts, len(lengths)]):
            rows.append(packer.add(ids[offsets[start] : offsets[stop]], lengths[start:stop]))
        rows.append(packer.finish())
        assert np.array_equal(np.concatenate(rows), pack_documents(ids, lengths, text_len)), text_len


def test_the_tokenizer_trainer_reads_corpora_as_they_arrive(tmp_path):
    """Its corpus reader drops a byte-order mark (it broke the first JSON line), knows suffixes in any case (an
    upper-case .ZST was read as text), skips a line too long to hold, and names the file and line of JSON that
    Python's parser refuses for its limits."""
    compress = zstandard.ZstdCompressor().compress
    (tmp_path / "a.TXT.ZST").write_bytes(compress(b"first frame\n") + compress(b"second frame\n"))
    (tmp_path / "b.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"text": "after a byte-order mark"}\n')
    (tmp_path / "c.txt.zst").write_bytes(compress(b"before\n") + zstd_bomb(b"a", 128 * 2**20) + compress(b"\nafter\n"))
    assert list(iter_corpus_lines([tmp_path / name for name in ("a.TXT.ZST", "b.jsonl", "c.txt.zst")])) == [
        "first frame", "second frame", "after a byte-order mark", "before", "after"]
    for number, line in enumerate((HUGE_INTEGER_LINE, DEEP_JSON_LINE), 2):
        (tmp_path / "d.jsonl").write_bytes(b'{"text": "fine"}\n' * (number - 1) + line + b"\n")
        with pytest.raises(ValueError, match=f"d.jsonl:{number}: not a JSON object"):
            list(iter_corpus_lines([tmp_path / "d.jsonl"]))


# --- peak memory in fresh processes -------------------------------------------------------------------------------

MEASURE = PEAK_SOURCE + """
import json, sys
from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.processing import prepare_images, prepare_text
from beit3.data_pipeline.sources import ImageTar, ShardPlan, TextFile
from beit3.tokenizers.text_training import iter_corpus_lines

folder, spm = sys.argv[1], sys.argv[2]
sources = [{"kind": "imagenet", "name": "bombs", "path": folder}, {"kind": "text", "name": "corpus", "paths": [folder]}]
config = validate_config(DataConfig, {"name": "bombs", "output": folder, "text_tokenizer": spm,
                                      "visual_tokenizer": None, "sources": sources}, "bombs")
reset_peak()
start = peak_kib()
for name in sys.argv[3:]:
    if name.startswith("train-"):
        lines = list(iter_corpus_lines([f"{folder}/{name}"]))
        print(json.dumps({"name": name, "skipped": {}, "samples": len(lines),
                          "peak_above_start": (peak_kib() - start) * 1024}))
        continue
    if name.endswith(".tar"):
        work = prepare_images(ShardPlan("image", 0, (ImageTar("bombs", folder, name, "n0", 0),)), config)
    else:
        work = prepare_text(ShardPlan("text", 0, (TextFile("corpus", folder, name, 0),)), config)
    peak = peak_kib()
    print(json.dumps({"name": name, "skipped": {reason: n for (_, reason), n in work.skipped.items()},
                      "samples": len(work.samples), "peak_above_start": (peak - start) * 1024}))
"""
BOMBS = {
    "line.txt.zst": (lambda: zstd_bomb(b"a", 4 * GIB), 4 * GIB, {"decompressed_too_large": 1}),
    "lines.jsonl.zst": (lambda: zstd_bomb(b'{"text": "a few words"}\n', 4 * GIB), 4 * GIB,
                        {"decompressed_too_large": 1}),
    "zeros.txt.gz": (lambda: gzip_bomb(b"\0", 4 * GIB), 4 * GIB, {"decompressed_too_large": 1}),
    "one-letter-lines.txt": (lambda: b"a\n" * (4 * 2**20), 2 * GIB, {}),
    "train-line.txt.zst": (lambda: zstd_bomb(b"a", GIB), GIB, {}),
    "sparse.tar": (lambda: tar_with_sparse_member({"x.jpg": noise_image(33)}, "holes.jpg", 4 * GIB), 4 * GIB,
                   {"sparse_member": 1}),
    "declared.tar": (lambda: with_declared_size(tar_of({"a.jpg": noise_image(34), "b.jpg": noise_image(35)}),
                                                "b.jpg", 8 * GIB), 8 * GIB, {"truncated_tar": 1}),
    "gzip-member.tar": (lambda: gzip_tar_bomb("zeros.jpg", 4 * GIB), 4 * GIB, {"decompressed_too_large": 1}),
}
"""File -> (its bytes, what it claims, the skips expected). The one-letter lines are 8 MiB that held 2 GB of
Python objects until tokenized, before documents were tokenized a batch at a time; `train-` files are read by
the tokenizer trainer's corpus reader."""
PEAK_BOUND = 256 * 2**20


@pytest.fixture(scope="module")
def bomb_peaks(tmp_path_factory) -> dict[str, dict]:
    """Every bomb read by the pipeline's stage in one fresh process, with default settings: its peak RSS above the
    start, measured after each (so each bound covers that bomb and the ones before it)."""
    folder = tmp_path_factory.mktemp("bombs")
    for name, (make, _, _) in BOMBS.items():
        (folder / name).write_bytes(make())
    spm = make_spm(tmp_path_factory.mktemp("spm"))
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(spm),
                             *BOMBS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {line["name"]: line for line in map(json.loads, result.stdout.splitlines())} | {
        "sizes": {name: (folder / name).stat().st_size for name in BOMBS}}


@pytest.mark.parametrize("name", list(BOMBS))
def test_small_files_that_claim_gigabytes_stay_bounded(bomb_peaks, name):
    _, claimed, skipped = BOMBS[name]
    measured = bomb_peaks[name]
    assert bomb_peaks["sizes"][name] < 10 * 2**20 and claimed >= GIB
    assert measured["skipped"] == skipped
    assert measured["peak_above_start"] < PEAK_BOUND, f"{measured['peak_above_start'] / 2**20:.0f} MiB"
