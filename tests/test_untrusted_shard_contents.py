"""Shards whose bytes break the data contract although their sha256 matches (the digest comes from a manifest
stored beside them, which can be forged as easily): every decoded field is checked before use, and each
violation is one line naming the shard and the sample, from a loader worker too, with memory bounded.

Shards are written to disk with the pipeline's own writer (`tar_bytes`, `npy_bytes`, the manifest of
`load_or_start`) and read back through the real reader and loader.
"""

import io
import json
import re
import subprocess
import sys
import tarfile
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit3.cli import error_message
from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.manifest import MANIFEST_NAME, DataContract, load_or_start
from beit3.data_pipeline.shards import ShardRecord, json_bytes, npy_bytes, tar_bytes
from beit3.data_pipeline.storage import open_storage
from beit3.data_pipeline.views import ViewSettings
from beit3.pretrain.shard_streams import (
    MicroBatchStream,
    ShardDataError,
    StreamSettings,
    build_loader,
    index_datasets,
    read_shard_samples,
)
from memory_probe import PEAK_SOURCE

GRID, IMAGE_SIZE, TEXT_VOCAB, CODEBOOK = 2, 32, 1000, 1024
WIDTH, HEIGHT = 40, 24
"""The stored image: its shorter side is the build's `shorter_side`."""
TEXT_LEN, CAPTION_LEN, MAX_PIXELS, SEGMENTS = 8, 6, 4096, 3
VIEWS = [{"top": 0, "left": 0, "height": 24, "width": 24, "flip": False, "jitter": []},
         {"top": 4, "left": 10, "height": 20, "width": 30, "flip": True,
          "jitter": [["saturation", 1.3], ["brightness", 0.7], ["contrast", 1.0]]}]
CODES = (np.arange(len(VIEWS) * GRID * GRID) * 37 % CODEBOOK).astype(np.uint16).reshape(len(VIEWS), GRID, GRID)
CAPTION = np.array([0, 5, 6, 2], dtype=np.uint16)
TEXT_BLOCK = np.array([[0, 7, 8, 9, 2, 1, 1, 1]] * SEGMENTS, dtype=np.uint16)
BOMB_SHAPE = (2, 40000, 37581)
"""6,012,960,000 bytes (5.6 GiB) of uint16 codes."""


def data_config(output: Path) -> DataConfig:
    return validate_config(DataConfig, {
        "name": "contract", "output": str(output), "text_len": TEXT_LEN, "caption_len": CAPTION_LEN,
        "sources": [{"kind": "imagenet", "name": "photos", "path": str(output)}],
        "image": {"shorter_side": HEIGHT, "views_per_image": len(VIEWS), "max_pixels": MAX_PIXELS}}, "data.yaml")


def jpeg(width: int = WIDTH, height: int = HEIGHT, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    """np.save's bytes, whatever the dtype or memory order (the shard writer's `npy_bytes` always writes C order)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_claiming(shape: tuple[int, ...], data: bytes = bytes(10)) -> bytes:
    """A `.npy` whose header declares a uint16 array of `shape`, followed by only `data`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<u2", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def image_sample(key: str, **fields: bytes) -> dict:
    return {"__key__": key, "jpg": jpeg(), "views.json": json_bytes(VIEWS), "codes.npy": npy_bytes(CODES),
            "json": json_bytes({"source": "photos"}), **fields}


def pair_sample(key: str, **fields: bytes) -> dict:
    return image_sample(key, **{"ids.npy": npy_bytes(CAPTION), **fields})


def text_sample(key: str, **fields: bytes) -> dict:
    return {"__key__": key, "ids.npy": npy_bytes(TEXT_BLOCK), "json": json_bytes({"source": "corpus"}), **fields}


SAMPLE = {"image": image_sample, "pair": pair_sample, "text": text_sample}
PER_ENTRY = {"image": 1, "pair": 1, "text": SEGMENTS}


def write_dataset(folder: Path, shards: dict[str, bytes], entries: int = 2) -> str:
    """Shard files of `entries` tar entries each and the manifest the pipeline writes for them (contract,
    counts and sha256 included)."""
    folder.mkdir(parents=True, exist_ok=True)
    storage = open_storage(folder)
    manifest = load_or_start(storage, data_config(folder))
    for name, data in shards.items():
        kind = name.partition("-")[0]
        storage.write_atomic(name, data)
        record = ShardRecord.of(name, name, kind, entries * PER_ENTRY[kind], entries, data)
        manifest.add([{**record.__dict__, "written": {"photos": record.samples}, "skipped": {}, "repaired": {}}])
    manifest.save(storage)
    return str(folder)


def shard_with(kind: str, **bad_fields: bytes) -> bytes:
    """A shard of one good sample and one, `bad`, whose fields are replaced."""
    return tar_bytes([SAMPLE[kind]("good"), SAMPLE[kind]("bad", **bad_fields)])


def settings(stream: str, micro_batch: int, **overrides) -> StreamSettings:
    values = dict(stream=stream, micro_batch=micro_batch, seed=0, image_size=IMAGE_SIZE, grid=GRID,
                  mask_id=TEXT_VOCAB - 1, text_vocab_size=TEXT_VOCAB, codebook_size=CODEBOOK, max_text_len=30,
                  read_attempts=1)
    return StreamSettings(**{**values, **overrides})


def first_batch(dataset: str, stream: str, workers: int = 0, **overrides) -> dict:
    """The first micro-batch of the stream, one holding every sample of the dataset: each one is decoded."""
    shards = index_datasets([dataset]).shards[stream]
    micro_batch = sum(ref.samples for ref in shards)
    stream_of_batches = MicroBatchStream(shards, settings(stream, micro_batch, **overrides), rank=0, world_size=1)
    batches = iter(build_loader(stream_of_batches, workers=workers, prefetch_batches=1))
    try:
        return next(batches)
    except ShardDataError as error:
        # The frames in the traceback hold the loader: freed later by the garbage collector, it would wait 5 s
        # for each worker to stop (its queues already finalised), so it goes now, with the frames' locals.
        del batches
        traceback.clear_frames(error.__traceback__)
        raise


def refusal(dataset: str, stream: str, **overrides) -> str:
    """The one line a user sees for the dataset's first batch."""
    with pytest.raises(ShardDataError) as error:
        first_batch(dataset, stream, **overrides)
    message = error_message(error.value)
    assert "\n" not in message
    return message


def view(**changed) -> bytes:
    return json_bytes([{**VIEWS[0], **changed}, VIEWS[1]])


BOX = "is not a box of positive size inside the 40x24 stored image"
CROP = "is not a crop box (integers top, left, height, width) with a flip (a bool) and colour jitter"
PNG = jpeg(fmt="PNG")
FIELD_VIOLATIONS = {
    # crop boxes and flips
    "negative-box": ("image", {"views.json": view(top=-3)}, "views.json view 0 {'flip': False, 'height': 24, "
                     f"'jitter': [], 'left': 0, 'top': -3, 'width': 24}} {BOX}"),
    "huge-box": ("image", {"views.json": view(width=10**12)}, "view 0 {'flip': False, 'height': 24, 'jitter': [], 'left': 0, "
                 f"'top': 0, 'width': 1000000000000}} {BOX}"),
    "box-outside-the-image": ("image", {"views.json": view(left=30)}, BOX),
    "empty-box": ("image", {"views.json": view(height=0)}, BOX),
    "flip-not-a-bool": ("image", {"views.json": view(flip=1)}, CROP),
    "fractional-box": ("image", {"views.json": view(top=0.5)}, CROP),
    "unknown-view-field": ("image", {"views.json": view(brightness=float("inf"))}, CROP),
    "jitter-not-a-list": ("image", {"views.json": view(jitter={"contrast": 1.2})}, "jitter is not a list"),
    "jitter-unknown-operation": ("image", {"views.json": view(jitter=[["hue", 0.1]])}, "must be distinct ones of"),
    "jitter-repeated-operation": ("image", {"views.json": view(jitter=[["contrast", 1.1], ["contrast", 1.2]])},
                                  "must be distinct ones of"),
    "jitter-factor-huge": ("image", {"views.json": view(jitter=[["contrast", 1e300]])}, "factors must be numbers"),
    "jitter-factor-negative": ("image", {"views.json": view(jitter=[["brightness", -1]])},
                               "factors must be numbers"),
    "jitter-factor-not-a-number": ("image", {"views.json": view(jitter=[["brightness", "1.2"]])},
                                   "factors must be numbers"),
    "views-not-as-many-as-recorded": ("image", {"views.json": json_bytes(VIEWS + VIEWS[:1])},
                                      "views.json is not a list of 2 views (views_per_image)"),
    "views-not-json": ("image", {"views.json": b'[{"top": '}, "views.json is not JSON (Expecting value"),
    "views-nested-past-the-limit": ("image", {"views.json": b"[" * 100_000 + b"]" * 100_000},
                                    "views.json is not JSON (maximum recursion depth exceeded"),
    # visual codes
    "code-beyond-the-codebook": ("image", {"codes.npy": npy_bytes(np.full_like(CODES, 5000))},
                                 "codes.npy holds code 5000 but the model's visual vocabulary has 1024 codes"),
    "codes-for-another-grid": ("image", {"codes.npy": npy_bytes(np.zeros((2, 3, 3), np.uint16))},
                               "stored codes are a 3x3 grid but the model has 2x2 patches"),
    "codes-of-another-view-count": ("image", {"codes.npy": npy_bytes(np.zeros((3, 2, 2), np.uint16))},
                                    "codes.npy holds codes of 3 views, views.json 2"),
    "codes-of-wrong-shape": ("image", {"codes.npy": npy_bytes(np.zeros((2, 4), np.uint16))},
                             "codes.npy has shape (2, 4), not [views, rows, cols]"),
    "codes-of-wrong-dtype": ("image", {"codes.npy": npy_bytes(CODES.astype(np.int64))},
                             "codes.npy holds int64 values, not uint16 in C order"),
    "codes-big-endian": ("image", {"codes.npy": npy_bytes(CODES.astype(">u2"))},
                         "codes.npy holds >u2 values, not uint16 in C order"),
    "codes-in-fortran-order": ("image", {"codes.npy": npy(np.asfortranarray(CODES))},
                               "codes.npy holds uint16 values in Fortran order, not uint16 in C order"),
    "npy-bomb": ("image", {"codes.npy": npy_claiming(BOMB_SHAPE)}, "codes.npy declares a 2x40000x37581 uint16 array "
                 "(6,012,960,000 bytes) but holds 10 bytes"),
    "negative-npy-shape": ("image", {"codes.npy": npy_claiming((2, -2, 2), bytes(8))},
                           "codes.npy has shape (2, -2, 2), not [views, rows, cols]"),
    "not-an-npy": ("image", {"codes.npy": b"garbage"}, "codes.npy is not a .npy array (EOF: reading magic string"),
    # stored images
    "image-not-a-jpeg": ("image", {"jpg": PNG}, "jpg does not open as a JPEG image"),
    "image-past-the-pixel-bound": ("image", {"jpg": jpeg(200, 24)}, "jpg is a 200x24 image, beyond the stored "
                                   "images' bounds (shorter side at most 24, at most 4,096 pixels)"),
    "image-past-the-shorter-side": ("image", {"jpg": jpeg(30, 30)}, "jpg is a 30x30 image, beyond the stored"),
    "image-cut-short": ("image", {"jpg": jpeg()[:-200]}, "jpg does not decode (image file is truncated"),
    # caption ids
    "caption-id-beyond-the-vocabulary": ("pair", {"ids.npy": npy_bytes(np.array([0, 5000, 2], np.uint16))},
                                         "ids.npy holds id 5000 but the text tokenizer has 1000 ids"),
    "caption-longer-than-recorded": ("pair", {"ids.npy": npy_bytes(np.array([0, 5, 5, 5, 5, 5, 2], np.uint16))},
                                     "ids.npy holds a caption of 7 ids, not 2 (bos, eos) to 6 (caption_len)"),
    "caption-of-wrong-shape": ("pair", {"ids.npy": npy_bytes(CAPTION[None])},
                               "ids.npy has shape (1, 4), not [length]"),
    "caption-of-wrong-dtype": ("pair", {"ids.npy": npy_bytes(CAPTION.astype(np.float32))},
                               "ids.npy holds float32 values, not uint16 in C order"),
    # text ids
    "text-id-beyond-the-vocabulary": ("text", {"ids.npy": npy_bytes(np.where(TEXT_BLOCK == 9, 65535, TEXT_BLOCK))},
                                      "ids.npy holds id 65535 but the text tokenizer has 1000 ids"),
    "text-length-not-as-recorded": ("text", {"ids.npy": npy_bytes(np.zeros((3, 9), np.uint16))},
                                    "ids.npy is 3 segment(s) of 9 ids, not of 8 (text_len)"),
    "text-of-wrong-shape": ("text", {"ids.npy": npy_bytes(TEXT_BLOCK[0])},
                            "ids.npy has shape (8,), not [segments, length]"),
}


@pytest.mark.parametrize("case", FIELD_VIOLATIONS)
def test_each_field_outside_the_contract_is_one_line_naming_the_shard_and_sample(tmp_path, case):
    kind, bad_fields, problem = FIELD_VIOLATIONS[case]
    dataset = write_dataset(tmp_path, {f"{kind}-000000.tar": shard_with(kind, **bad_fields)})
    message = refusal(dataset, kind)
    sample = r"bad/[0-2]" if kind == "text" and "holds id" in problem else "bad"  # decoded: one segment
    assert re.match(rf"{re.escape(f'{tmp_path}/{kind}-000000.tar')}: sample {sample}: ", message), message
    assert problem in message, message


def test_texts_longer_than_the_model_serves_are_refused(tmp_path):
    """Segments as long as the data build recorded, but the model's position table is shorter."""
    dataset = write_dataset(tmp_path, {"text-000000.tar": shard_with("text")})
    assert re.fullmatch(re.escape(f"{tmp_path}/text-000000.tar: sample ") + r"(good|bad)/[0-2]: " + re.escape(
        "ids.npy holds 8 ids but the model's text positions serve 6 (model.text_positions)"),
        refusal(dataset, "text", max_text_len=6))


def test_well_formed_shards_pass_every_check_and_reach_the_batch(tmp_path):
    dataset = write_dataset(tmp_path, {f"{kind}-000000.tar": shard_with(kind) for kind in SAMPLE})
    recorded = {(ref.contract.text_len, ref.contract.caption_len, ref.contract.views_per_image,
                 ref.contract.shorter_side, ref.contract.max_pixels)
                for refs in index_datasets([dataset]).shards.values() for ref in refs}
    assert recorded == {(TEXT_LEN, CAPTION_LEN, len(VIEWS), HEIGHT, MAX_PIXELS)}
    image, pair, text = (first_batch(dataset, stream) for stream in ("image", "pair", "text"))
    assert image["codes"].shape == (2, GRID * GRID) and set(image["codes"].flatten().tolist()) <= set(CODES.flat)
    assert image["image"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pair["labels"].tolist() == [CAPTION.tolist()] * 2
    assert text["labels"].tolist() == TEXT_BLOCK.tolist() * 2
    assert text["keys"] and all(re.fullmatch(r"text-000000\.tar/(good|bad)/[0-2]", key) for key in text["keys"])


def test_a_manifest_written_before_the_contract_still_reads(tmp_path):
    """Older manifests record no contract: the format's own bounds and the model's still apply."""
    dataset = write_dataset(tmp_path, {"pair-000000.tar": shard_with("pair")})
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    del manifest["contract"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    (ref,) = index_datasets([dataset]).shards["pair"]
    assert ref.contract == DataContract() and not ref.contract.model_fields_set
    assert [key for key, _ in read_shard_samples(ref, verify_sha256=True)] == ["pair-000000.tar/good",
                                                                              "pair-000000.tar/bad"]
    assert first_batch(dataset, "pair")["labels"].shape == (2, len(CAPTION))


@pytest.mark.parametrize("contract, problem", [
    ([8], "the manifest's contract: Input should be an object (got [8])"),
    ({"text_len": "8"}, "the manifest's contract: text_len: Input should be a valid integer (got '8')"),
    ({"caption_len": 0}, "the manifest's contract: caption_len: Input should be greater than 0 (got 0)"),
    ({"max_pixels": True}, "the manifest's contract: max_pixels: Input should be a valid integer (got True)"),
    ({"views": {"color_jitter": 9}}, "the manifest's contract: views.color_jitter: Input should be less than or "
                                     "equal to 1 (got 9)"),
    ({"visual_tokenizer": {"kind": "vqkd"}}, "the manifest's contract: visual_tokenizer.codebook_size: Field "
                                             "required (got {'kind': 'vqkd'})"),
    ({"text_tokenizer_sha256": "../x"}, "the manifest's contract: text_tokenizer_sha256: String should match "
                                        "pattern '^[0-9a-f]{64}$' (got '../x')"),
])
def test_a_contract_with_wrong_fields_is_named(tmp_path, contract, problem):
    dataset = write_dataset(tmp_path, {"pair-000000.tar": shard_with("pair")})
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "contract": contract}))
    with pytest.raises(ShardDataError) as error:
        index_datasets([dataset])
    assert str(error.value) == f"{dataset}: {problem}"


@pytest.mark.parametrize("text, reason", [
    (b'{"shards": [\xff\xfe]}', "not valid JSON ('utf-8' codec can't decode byte 0xff"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON (maximum recursion depth exceeded"),
    (b'{"shards": ' + b"9" * 5000 + b"}", "not valid JSON (Exceeds the limit (4300 digits) for integer string"),
], ids=["invalid-utf-8", "nested-past-the-limit", "huge-number"])
def test_a_manifest_that_does_not_parse_is_one_named_line(tmp_path, text, reason):
    dataset = write_dataset(tmp_path, {"pair-000000.tar": shard_with("pair")})
    (tmp_path / MANIFEST_NAME).write_bytes(text)
    with pytest.raises(ShardDataError) as error:
        index_datasets([dataset])
    assert str(error.value).startswith(f"{dataset}/{MANIFEST_NAME}: {reason}") and "\n" not in str(error.value)


@pytest.mark.parametrize("strength", [float("inf"), float("nan"), -0.1, 1.5])
def test_colour_jitter_factors_come_only_from_a_bounded_strength(strength):
    """Fresh views draw jitter factors from [1 - s, 1 + s]: s must be a number in [0, 1]."""
    with pytest.raises(ValueError, match="color_jitter"):
        ViewSettings(color_jitter=strength)


SIZE_FIELD, TYPE_FLAG = 124, 156
"""Where a tar header keeps the member's size (12 bytes) and type."""


def with_header_bytes(data: bytes, header: int, at: int, value: bytes) -> bytes:
    """The shard with bytes at `at` of the header starting at offset `header` rewritten, and the header's
    checksum made right again (so that tar readers take it)."""
    block = bytearray(data[header : header + 512])
    block[at : at + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return data[:header] + bytes(block) + data[header + 512 :]


def patched_header(data: bytes, member: str, at: int, value: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return with_header_bytes(data, archive.getmember(member).offset, at, value)


GOOD_PAIR_SHARD = shard_with("pair")
TAR_VIOLATIONS = {
    "member-claiming-6-GB": (patched_header(GOOD_PAIR_SHARD, "bad.jpg", SIZE_FIELD, b"%011o\0" % 6_000_000_000),
                             "member 'bad.jpg' declares 6,000,000,000 bytes but"),
    "member-claiming-2**88-bytes": (patched_header(GOOD_PAIR_SHARD, "bad.jpg", SIZE_FIELD, b"\x80" + b"\xff" * 11),
                                    f"member 'bad.jpg' declares {2**88 - 1:,} bytes but"),
    "member-of-negative-size": (patched_header(GOOD_PAIR_SHARD, "bad.jpg", SIZE_FIELD, b"\xff" * 10 + b"\xfe\x00"),
                                "member 'bad.jpg' declares -512 bytes but"),
    "sparse-member": (patched_header(GOOD_PAIR_SHARD, "bad.jpg", TYPE_FLAG, tarfile.GNUTYPE_SPARSE),
                      "member 'bad.jpg' is a sparse file"),
    "symbolic-link-member": (patched_header(GOOD_PAIR_SHARD, "bad.jpg", TYPE_FLAG, tarfile.SYMTYPE),
                             "member 'bad.jpg' is not a regular file (tar type b'2')"),
}


@pytest.mark.parametrize("case", TAR_VIOLATIONS)
def test_tar_members_that_are_not_plain_files_within_the_shard_are_refused_before_reading(tmp_path, case):
    data, problem = TAR_VIOLATIONS[case]
    dataset = write_dataset(tmp_path, {"pair-000000.tar": data})
    message = refusal(dataset, "pair")
    assert message.startswith(f"{tmp_path}/pair-000000.tar: {problem}"), message


@pytest.mark.parametrize("kind, shard, problem", [
    ("image", shard_with("image", **{"codes.npy": npy_claiming(BOMB_SHAPE)}), "sample bad: codes.npy declares"),
    ("pair", shard_with("pair", **{"ids.npy": npy_bytes(np.array([0, 5000, 2], np.uint16))}),
     "sample bad: ids.npy holds id 5000"),
    ("pair", TAR_VIOLATIONS["member-claiming-6-GB"][0], "member 'bad.jpg' declares 6,000,000,000 bytes"),
], ids=["npy-bomb", "id-beyond-the-vocabulary", "member-claiming-6-GB"])
def test_a_violation_found_in_a_loader_worker_reaches_the_user_in_one_line(tmp_path, kind, shard, problem):
    dataset = write_dataset(tmp_path, {f"{kind}-000000.tar": shard})
    with pytest.raises(ShardDataError) as error:
        first_batch(dataset, kind, workers=1)
    assert "Traceback" in str(error.value), "raised in the worker process: PyTorch carries its traceback"
    message = error_message(error.value)
    assert message.startswith(f"{tmp_path}/{kind}-000000.tar: {problem}") and "\n" not in message, message


MEASURE_READ = PEAK_SOURCE + """
import sys
from beit3.pretrain.shard_streams import ShardDataError, index_datasets, read_shard_samples
(ref,) = index_datasets([sys.argv[1]]).shards["image"]
reset_peak()
before = peak_kib()
try:
    read_shard_samples(ref, verify_sha256=True)
except ShardDataError as error:
    print(error)
print(before, peak_kib())
"""


def test_an_npy_claiming_5_6_gib_is_refused_from_its_header_with_memory_bounded(tmp_path):
    """In a fresh process: the peak RSS (VmHWM, KiB) after the read is that of the imports, far
    from the 5.6 GiB the header declares."""
    dataset = write_dataset(tmp_path, {"image-000000.tar": shard_with("image",
                                                                      **{"codes.npy": npy_claiming(BOMB_SHAPE)})})
    result = subprocess.run([sys.executable, "-c", MEASURE_READ, dataset], capture_output=True, text=True,
                            timeout=300, check=True)
    message, peaks = result.stdout.splitlines()
    assert message == (f"{tmp_path}/image-000000.tar: sample bad: codes.npy declares a 2x40000x37581 uint16 array "
                       "(6,012,960,000 bytes) but holds 10 bytes")
    before, after = map(int, peaks.split())
    assert after < 2**20, f"peak RSS {after / 2**20:.2f} GiB"
    assert after - before < 64 * 2**10, f"the read grew the peak RSS by {(after - before) / 2**10:.0f} MiB"
