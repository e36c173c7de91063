"""Seeded mutation fuzzing of every pipeline reader: valid inputs cut, flipped, with size fields inflated (tar sizes,
PNG chunk lengths and dimensions, JPEG dimensions, gzip and zstd headers), nested and repeated, then read by the
stage functions a build runs. Nothing may escape a reader, memory stays bounded, and where a reader's unit is
known beforehand (image files, JSON lines, table rows, COCO annotations) every unit is written or skipped.

The mutants run in one fresh process (`fuzz_report`) so that its peak memory is theirs; a handful then go
through a real build.
"""

import gzip
import io
import json
import random
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import ray
import zstandard
from PIL import Image

from beit3.config import validate_config
from beit3.data_pipeline.config import CocoPairSource, DataConfig, TablePairSource
from beit3.data_pipeline.job import build
from beit3.data_pipeline.processing import ShardWork, prepare_images, prepare_pairs, read_documents
from beit3.data_pipeline.sources import (
    ImageItem,
    ImageTar,
    PairTar,
    ShardPlan,
    TextFile,
    decoded_text,
    list_coco,
    list_pair_table,
)

from memory_probe import peak_kib, reset_peak
from pipeline_inputs import data_config, make_spm, noise_image, tar_of

SEED = 1
ITERATIONS = {"image": 800, "class_tar": 600, "pair_tar": 400, "text": 1200, "table": 600, "coco": 400}
"""Mutants per family: about 15 seconds on two busy cores."""
PEAK_BOUND = 512 * 2**20
MAX_DOCUMENT_BYTES = 16 * 2**10
IMAGE_WIDTHS = (40, 41, 42)
GOOD_LINES = ["plain words on a line", "ünïcödé and 文字 too", "a third document", "last one"]


# --- valid inputs and how they are mutated -----------------------------------------------------------------------

def png(width: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(noise_image(width))).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def seeds() -> dict[str, dict[str, bytes]]:
    """Valid inputs of each family, by the file name a mutant of each is written under."""
    jsonl = "\n".join(json.dumps({"text": line}) for line in GOOD_LINES).encode() + b"\n"
    pairs = {}
    for index, width in enumerate(IMAGE_WIDTHS):
        pairs |= {f"{index:03d}.jpg": noise_image(width), f"{index:03d}.txt": GOOD_LINES[index].encode(),
                  f"{index:03d}.json": b"{}"}
    coco = {"images": [{"id": index, "file_name": f"img{index}.jpg"} for index in range(3)],
            "annotations": [{"id": 10 + index, "image_id": index, "caption": line}
                            for index, line in enumerate(GOOD_LINES[:3])]}
    parquet = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.table({"image": ["img0.jpg", "img1.jpg"], "caption": GOOD_LINES[:2]}), parquet)
    return {
        "image": {"x.jpg": noise_image(40), "x.png": png(41), "p.png": png(42, "P")},
        "class_tar": {"n0.tar": tar_of({f"{width}.jpg": noise_image(width) for width in IMAGE_WIDTHS})},
        "pair_tar": {"pairs.tar": tar_of(pairs)},
        "text": {"docs.jsonl": jsonl, "docs.txt": "\n".join(GOOD_LINES).encode() + b"\n"},
        "table": {"pairs.jsonl": b"".join(json.dumps({"image": f"img{i}.jpg", "caption": line}).encode() + b"\n"
                                          for i, line in enumerate(GOOD_LINES[:3])),
                  "pairs.tsv": ("image\tcaption\n" + "".join(f"img{i}.jpg\t{line}\n"
                                                            for i, line in enumerate(GOOD_LINES[:3]))).encode(),
                  "pairs.parquet": parquet.getvalue()},
        "coco": {"captions.json": json.dumps(coco).encode()},
    }


EXTREMES = (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x01\x00\x00", b"\x80\x00\x00\x00")


def inflate_sizes(data: bytes, rng: random.Random) -> bytes:
    """A size field of the format set to a huge value: a tar member's size (checksum made right), a PNG chunk's
    length or IHDR dimensions (CRC made right), a JPEG frame's dimensions, a gzip FEXTRA length, a zstd frame's
    content size."""
    data = bytearray(data)
    if data[257:262] == b"ustar":
        headers = [offset for offset in range(0, len(data) - 512, 512) if data[offset + 257 : offset + 262] == b"ustar"]
        offset = rng.choice(headers)
        data[offset + 124 : offset + 136] = b"\x80" + rng.choice([2**33, 2**40, 10**6]).to_bytes(11, "big")
        data[offset + 148 : offset + 156] = b" " * 8
        data[offset + 148 : offset + 156] = b"%06o\0 " % sum(data[offset : offset + 512])
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if rng.random() < 0.5:  # IHDR width and height, CRC fixed
            data[16:24] = rng.choice([(70_000).to_bytes(4, "big") + (1).to_bytes(4, "big"),
                                      (65_535).to_bytes(4, "big") * 2, (1).to_bytes(4, "big") * 2])
            data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
        else:  # a later chunk's length
            chunks, offset = [], 8
            while offset + 8 <= len(data):
                chunks.append(offset)
                offset += 12 + int.from_bytes(data[offset : offset + 4], "big")
            data[(chosen := rng.choice(chunks)) : chosen + 4] = rng.choice(EXTREMES)
    elif data[:2] == b"\xff\xd8" and (frame := data.find(b"\xff\xc0")) != -1:
        data[frame + 5 : frame + 9] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x01\xff\xff", b"\x00\x00\x00\x00"])
    elif data[:2] == b"\x1f\x8b":
        data[3] |= 0x04  # FEXTRA with a long extra field the data does not hold
        data[10:10] = rng.choice([b"\xff\xff", b"\x00\x10"])
    elif data[:4] == b"\x28\xb5\x2f\xfd":
        data[4] |= 0xC0  # an 8-byte frame content size
        data[5:5] = (2**40).to_bytes(8, "little")
    return bytes(data)


def json_value_position(data: bytes, rng: random.Random) -> int | None:
    """Where a JSON value begins (after `": `), if the data has one."""
    found, start = [], 0
    while (start := data.find(b'": ', start) + 1) and len(found) < 50:
        found.append(start + 2)
    return rng.choice(found) if found else None


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three of: cut, flip bytes, write an extreme 32-bit value, repeat a slice, insert random bytes, nest
    arrays past the recursion limit or write an integer past 4300 digits (as a JSON value where there is one, so
    that the line stays JSON), inflate a size field."""
    for _ in range(rng.randint(1, 3)):
        if not data:
            return data
        operation = rng.randrange(8)
        position = rng.randrange(len(data))
        if operation == 0:
            data = data[:position]
        elif operation == 1:
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            data = bytes(flipped)
        elif operation == 2:
            data = data[:position] + rng.choice(EXTREMES) + data[position + 4 :]
        elif operation == 3:
            repeated = data[position : position + rng.randint(1, 600)] * rng.randint(2, 50)
            data = data[:position] + repeated + data[position:]
        elif operation == 4:
            data = data[:position] + rng.randbytes(rng.randint(1, 64)) + data[position:]
        elif operation in (5, 6):
            depth = rng.choice([10, 1500, 6000])
            value = b"[" * depth + b"1" + b"]" * depth if operation == 5 else b"9" * rng.choice([400, 4400, 9000])
            position = json_value_position(data, rng) or position
            data = data[:position] + value + b', "was": ' + data[position:]
        else:
            data = inflate_sizes(data, rng)
    return data


# --- the readers, each mutant through the stage a build runs -------------------------------------------------------

class Fuzz:
    """Mutants of each family written under `folder` and read; what escaped a reader and what was not accounted
    for are collected, with the skip reasons met."""

    def __init__(self, folder: Path, spm: str):
        self.folder, self.rng = folder, random.Random(SEED)
        self.images = folder / "table_images"
        self.images.mkdir(parents=True, exist_ok=True)
        for index, width in enumerate(IMAGE_WIDTHS):
            (self.images / f"img{index}.jpg").write_bytes(noise_image(width))
        raw = data_config(str(folder / "out"), str(folder), str(folder), spm, visual_tokenizer=None,
                          sources=[{"kind": "text", "name": "fuzz", "paths": [str(folder)]}],
                          image={"shorter_side": 32, "views_per_image": 1}, max_document_bytes=MAX_DOCUMENT_BYTES)
        self.config = validate_config(DataConfig, raw, "fuzz")
        self.escaped: list[str] = []
        self.unaccounted: list[str] = []
        self.reasons: dict[str, Counter] = {}

    def run(self, family: str, iterations: int, valid: dict[str, bytes]) -> None:
        folder = self.folder / family
        folder.mkdir()
        for index in range(iterations):
            name = self.rng.choice(sorted(valid))
            data = mutate(valid[name], self.rng)
            if family == "class_tar" and self.rng.random() < 0.2:
                data = gzip.compress(data)
            elif family == "text" and (compression := self.rng.choice(["", "", ".gz", ".zst"])):
                data = gzip.compress(data) if compression == ".gz" else zstandard.ZstdCompressor().compress(data)
                data, name = (mutate(data, self.rng) if self.rng.random() < 0.5 else data), name + compression
            name = f"{index:04d}-{name}"
            (folder / name).write_bytes(data)
            try:
                work, units, written = getattr(self, family)(index, str(folder), name, data)
            except Exception as error:
                self.escaped.append(f"{family} {name}: {type(error).__name__}: {str(error)[:200]}")
                continue
            self.reasons.setdefault(family, Counter()).update(reason for (_, reason) in work.skipped.elements())
            skipped = sum(work.skipped.values())
            if units is not None and written + skipped != units:
                self.unaccounted.append(f"{family} {name}: {units} read, {written} written, {skipped} skipped")

    # Each reader returns the shard work, the units read when they are known beforehand, and the units written.

    def image(self, index: int, root: str, name: str, data: bytes):
        work = prepare_images(ShardPlan("image", index, (ImageItem("fuzz", root, name, "n0", index),)), self.config)
        return work, 1, len(work.samples)

    def class_tar(self, index: int, root: str, name: str, data: bytes):
        work = prepare_images(ShardPlan("image", index, (ImageTar("fuzz", root, name, "n0", index),)), self.config)
        return work, None, len(work.samples)

    def pair_tar(self, index: int, root: str, name: str, data: bytes):
        work = prepare_pairs(ShardPlan("pair", index, (PairTar("fuzz", root, name, index),)), self.config)
        return work, None, len(work.samples)

    def text(self, index: int, root: str, name: str, data: bytes):
        work = ShardWork(ShardPlan("text", index, ()))
        documents = read_documents(TextFile("fuzz", root, name, index), "text", "line", work,
                                   max_document_bytes=MAX_DOCUMENT_BYTES)
        lines = None
        if name.endswith((".jsonl", ".txt")):  # uncompressed: every line with text is a document or a skip
            text = decoded_text(data)[0].replace("\0", "").split("\n")
            has_text = (lambda line: line and not line.isspace()) if name.endswith(".jsonl") else str.split
            lines = sum(1 for line in text if has_text(line))
        return work, lines, len(documents)

    def table(self, index: int, root: str, name: str, data: bytes):
        source = TablePairSource(kind="pairs_table", name="fuzz", table=f"{root}/{name}", images=str(self.images))
        return self.pairs(index, root, name, lambda: list_pair_table(source))

    def coco(self, index: int, root: str, name: str, data: bytes):
        source = CocoPairSource(kind="coco", name="fuzz", annotations=f"{root}/{name}", images=str(self.images))
        return self.pairs(index, root, name, lambda: list_coco(source))

    def pairs(self, index: int, root: str, name: str, listed):
        """A table's or COCO file's rows through the pair stage. Columns gone, or no COCO lists at all, is an error
        before any work that names the file: the config names the wrong file, a build never starts."""
        try:
            items = listed()
        except ValueError as error:
            assert f"{root}/{name}" in str(error), error
            return ShardWork(ShardPlan("pair", index, ())), None, 0
        work = prepare_pairs(ShardPlan("pair", index, tuple(items)), self.config) if items else ShardWork(
            ShardPlan("pair", index, ()))
        return work, len(items), len(work.samples)


def run_all(folder: str, spm: str) -> dict:
    """Every family's mutants, in this process; its peak memory above the start, and what was found."""
    fuzz = Fuzz(Path(folder), spm)
    reset_peak()
    start = peak_kib()
    for family, valid in seeds().items():
        fuzz.run(family, ITERATIONS[family], valid)
    return {"escaped": fuzz.escaped, "unaccounted": fuzz.unaccounted,
            "reasons": {family: dict(reasons) for family, reasons in fuzz.reasons.items()},
            "peak_above_start": (peak_kib() - start) * 1024}


RUN = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
logging.disable(logging.WARNING)
from test_fuzz_pipeline_readers import run_all
print(json.dumps(run_all(sys.argv[2], sys.argv[3])))
"""


@pytest.fixture(scope="module")
def fuzz_report(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fuzz")
    spm = make_spm(tmp_path_factory.mktemp("spm"))
    result = subprocess.run([sys.executable, "-c", RUN, str(Path(__file__).parent), str(folder), str(spm)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads(result.stdout.splitlines()[-1]), "folder": folder, "spm": spm}


def test_no_mutant_escapes_a_reader(fuzz_report):
    assert fuzz_report["escaped"] == []


def test_every_image_line_row_and_annotation_is_written_or_skipped(fuzz_report):
    assert fuzz_report["unaccounted"] == []


def test_mutants_meet_the_specific_reasons(fuzz_report):
    """The fuzzer reaches the checks it is meant to: decoder failures, declared sizes, parser limits, damage."""
    reasons = fuzz_report["reasons"]
    assert {"corrupt", "not_an_image", "too_many_pixels"} <= set(reasons["image"])
    assert {"truncated_tar", "unreadable_tar"} <= set(reasons["class_tar"])
    assert {"json_over_limits", "bad_json", "corrupt_compressed_file", "truncated_compressed_file",
            "document_too_long"} <= set(reasons["text"])
    assert {"json_over_limits", "unreadable_table"} <= set(reasons["table"])
    assert "unreadable_annotations" in reasons["coco"]
    assert all("unexpected_error" not in found for found in reasons.values()), reasons


def test_memory_stays_bounded_across_all_mutants(fuzz_report):
    assert fuzz_report["peak_above_start"] < PEAK_BOUND


@pytest.mark.slow
def test_a_build_over_mutants_finishes_and_counts_every_image(fuzz_report, tmp_path):
    """A handful of the mutants laid out as sources of a real build on local Ray."""
    folder = fuzz_report["folder"]
    images = tmp_path / "images" / "n0"
    images.mkdir(parents=True)
    mutants = sorted((folder / "image").glob("*-x.jpg"))[:8]
    for path in mutants:
        (images / path.name).write_bytes(path.read_bytes())
    for family, pattern in (("class_tar", "*.tar"), ("pair_tar", "*.tar"), ("text", "*-docs.*")):
        (tmp_path / family).mkdir()
        for path in sorted((folder / family).glob(pattern))[:4]:
            (tmp_path / family / path.name).write_bytes(path.read_bytes())
    sources = [{"kind": "imagenet", "name": "images", "path": str(tmp_path / "images")},
               {"kind": "imagenet", "name": "class_tars", "path": str(tmp_path / "class_tar")},
               {"kind": "pairs_webdataset", "name": "pair_tars", "path": str(tmp_path / "pair_tar")},
               {"kind": "text", "name": "text", "paths": [str(tmp_path / "text")]}]
    raw = data_config(str(tmp_path / "out"), "", "", str(fuzz_report["spm"]), sources=sources, visual_tokenizer=None,
                      image={"shorter_side": 32, "views_per_image": 1}, max_document_bytes=MAX_DOCUMENT_BYTES)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = build(validate_config(DataConfig, raw, "fuzz build"), progress=False)
    finally:
        ray.shutdown()
    totals = result.manifest.totals()
    assert totals["images"]["written"] + sum(totals["images"]["skipped"].values()) == len(mutants)
    assert all("unexpected_error" not in counts["skipped"] for counts in totals.values()), totals
