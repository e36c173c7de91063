"""Seeded mutation fuzzing of the shard reader and the manifest reader, with no extra dependency: each round
draws from `random.Random` seeded with its own name, so any round can be replayed alone.

Valid shards and their manifest are written with the pipeline's writer (see test_untrusted_shard_contents),
then mutated: cut short, bytes flipped, tar size fields and type flags rewritten (their checksums made right
again, so the tar parser takes them), pax records added, members duplicated, dropped or nested, `.npy` headers
declaring other shapes, dtypes and versions, views.json and the manifest rewritten with nesting, huge numbers
and wrong types. Every outcome must be samples inside the contract, or a ShardDataError of one line naming the
shard (the dataset, for the manifest): nothing else may be raised, and the peak RSS may not grow.
"""

import io
import json
import math
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit3.data_pipeline.manifest import MANIFEST_NAME
from beit3.data_pipeline.shards import tar_bytes
from beit3.pretrain.shard_streams import SampleDecoder, ShardDataError, collate, index_datasets, read_shard_samples

from memory_probe import peak_kib, reset_peak
from test_untrusted_shard_contents import (
    CAPTION_LEN,
    CODEBOOK,
    GRID,
    HEIGHT,
    IMAGE_SIZE,
    MAX_PIXELS,
    SAMPLE,
    TEXT_LEN,
    TEXT_VOCAB,
    VIEWS,
    jpeg,
    npy,
    settings,
    with_header_bytes,
    write_dataset,
)

SHARD_ROUNDS = 1500
"""Per shard kind."""
MANIFEST_ROUNDS = 1000
PEAK_GROWTH_KIB = 128 * 2**10
NUMBERS = [0, 1, 2, -1, -512, 23, 24, 25, 40, 41, 999, 1000, 1023, 1024, 65535, 2**31, 2**63, 2**64, 10**30,
           int("9" * 200), 0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), True, False, None]
STRINGS = ["", "x" * 300, "\x00", "\ud800", "../outside.tar", "pipe:touch marker", "image-000000.tar", "8"]


def random_json(rng: random.Random, depth: int = 0) -> object:
    """Any JSON value, biased to the numbers at the contract's edges."""
    kind = rng.randrange(5 if depth < 4 else 2)
    if kind == 0:
        return rng.choice(NUMBERS)
    if kind == 1:
        return rng.choice(STRINGS)
    if kind == 2:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["top", "left", "height", "width", "flip", "name", "kind", "samples", "sha256", "text_len", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(6))}


def flipped(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        if data:
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    return bytes(data)


def raw_mutation(rng: random.Random, data: bytes) -> bytes:
    """Bytes cut short, flipped, spliced with random bytes, or replaced by nesting or a huge number."""
    choice = rng.randrange(5)
    if choice == 0:
        return data[: rng.randrange(len(data) + 1)]
    if choice == 1:
        return flipped(rng, data)
    if choice == 2:
        at = rng.randrange(len(data) + 1)
        return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]
    if choice == 3:
        depth = rng.choice([10, 1000, 100_000])
        return rng.choice([b"[", b'{"a":']) * depth + rng.choice([b"]", b"}"]) * depth
    return b"9" * rng.choice([20, 5000, 100_000])


def mutated_npy(rng: random.Random, data: bytes) -> bytes:
    """A `.npy` whose header declares another shape, dtype, order or version, or whose values leave the range."""
    array = np.load(io.BytesIO(data))
    choice = rng.randrange(4)
    if choice == 0:
        shape = tuple(rng.choice([0, 1, 2, 3, 8, -1, -2, 2**31, 2**62, 10**20]) for _ in range(rng.randrange(5)))
        descr = rng.choice(["<u2", ">u2", "<i8", "|u1", "<f4", "|O", "<U3", "|V4", "|V99999999999", "<u2x", "u2"])
        header = {"descr": descr, "fortran_order": rng.random() < 0.2, "shape": shape}
        buffer = io.BytesIO()
        writer = rng.choice([np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0])
        writer(buffer, header)
        payload, count = array.tobytes(), math.prod(shape)
        fitting = [count * size for size in (1, 2, 4, 8) if 0 <= count * size <= 4096]
        length = rng.choice([len(payload), 0, 10, *fitting])
        return buffer.getvalue() + (payload * (length // len(payload) + 1))[:length]
    if choice == 1:
        values = array.astype(np.int64)
        values.flat[rng.randrange(values.size)] = rng.choice([TEXT_VOCAB - 1, TEXT_VOCAB, CODEBOOK - 1, CODEBOOK,
                                                              65535])
        shape = rng.choice([values.shape, values.shape[::-1], (values.size,), (1, *values.shape)])
        return npy(values.astype(np.uint16).reshape(shape))
    if choice == 2:
        data = bytearray(data)
        data[6:8] = bytes(rng.choice([(1, 0), (2, 0), (3, 0), (0, 0), (255, 255)]))
        return bytes(data)
    return raw_mutation(rng, data)


def mutated_views(rng: random.Random, data: bytes) -> bytes:
    """Views with a field set to any JSON value, missing or added, boxes moved to the image's edges, views
    added or removed, or the whole document replaced."""
    views = json.loads(data)
    choice = rng.randrange(5)
    if choice == 0:
        rng.choice(views)[rng.choice(sorted(views[0]) + ["jitter"])] = random_json(rng)
    elif choice == 1:
        del rng.choice(views)[rng.choice(sorted(views[0]))]
    elif choice == 2:
        view = rng.choice(views)
        view[rng.choice(["top", "left", "height", "width"])] += rng.choice([-25, -1, 1, 16, 17, 25, 10**12])
    elif choice == 3:
        views = rng.choice([views[:1], views * 2, [], random_json(rng)])
    else:
        return raw_mutation(rng, data)
    return json.dumps(views).encode()


def mutated_jpeg(rng: random.Random, data: bytes) -> bytes:
    """A JPEG cut short or flipped, another size (or a header that only claims one), or another format."""
    choice = rng.randrange(4)
    if choice == 0:
        width, height = rng.choice([(40, 24), (24, 24), (1, 1), (24, 200), (200, 24), (30, 30), (24, 171)])
        return jpeg(width, height, rng.choice(["JPEG", "JPEG", "PNG", "GIF", "BMP"]))
    if choice == 1:
        start = data.index(b"\xff\xc0") + 5
        return data[:start] + rng.randbytes(4) + data[start + 4 :]
    return raw_mutation(rng, data)


FIELD_MUTATIONS = {"codes.npy": mutated_npy, "ids.npy": mutated_npy, "views.json": mutated_views,
                   "jpg": mutated_jpeg, "json": raw_mutation}


def field_mutation(rng: random.Random, kind: str) -> tuple[str, bytes]:
    samples = [SAMPLE[kind](f"s{index}") for index in range(2)]
    sample = rng.choice(samples)
    field = rng.choice(sorted(name for name in sample if name != "__key__"))
    sample[field] = FIELD_MUTATIONS[field](rng, sample[field])
    return f"field {field}", tar_bytes(samples)


def members_of(kind: str) -> list[tuple[str, bytes]]:
    return [(f"{sample['__key__']}.{field}", sample[field]) for sample in
            (SAMPLE[kind](f"s{index}") for index in range(2)) for field in sorted(sample) if field != "__key__"]


def tar_with(members: list[tuple[tarfile.TarInfo, bytes | None]], tar_format: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


PAX_RECORDS = [{"size": "99999999999999999999"}, {"size": "-5"}, {"size": "12abc"},
               {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s0.jpg",
                "GNU.sparse.realsize": "6000000000"},
               {"GNU.sparse.size": "6000000000", "GNU.sparse.map": "0,6000000000"},
               {"path": "s0\nsecond-line.jpg"}, {"path": "a/" * 200 + "s0.jpg"}, {"hdrcharset": "BINARY"},
               {"mtime": "nan"}, {"uid": "99999999999999999999999"}]


def structural_mutation(rng: random.Random, kind: str) -> tuple[str, bytes]:
    """Members duplicated, dropped, reordered, renamed or nested, links and folders added, pax records set;
    written by Python's tarfile."""
    members = members_of(kind)
    choice = rng.randrange(6)
    infos = []
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        infos.append((info, data))
    if choice == 0:
        infos.insert(rng.randrange(len(infos) + 1), rng.choice(infos))
    elif choice == 1:
        del infos[rng.randrange(len(infos))]
    elif choice == 2:
        rng.shuffle(infos)
    elif choice == 3:
        info = rng.choice(infos)[0]
        info.name = rng.choice(["deep/" * 30 + info.name, info.name.upper(), info.name.partition(".")[0],
                                f"__{info.name}__", f".{info.name}", info.name.replace(".", "..", 1)])
    elif choice == 4:
        special = tarfile.TarInfo(rng.choice(infos)[0].name)
        special.type = rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE])
        special.linkname = "/etc/passwd"
        infos.insert(rng.randrange(len(infos) + 1), (special, None))
    else:
        rng.choice(infos)[0].pax_headers = rng.choice(PAX_RECORDS)
        return "pax record", tar_with(infos, tarfile.PAX_FORMAT)
    return f"structure {choice}", tar_with(infos, rng.choice([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))


def header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [member.offset for member in archive]


HEADER_FIELDS = {"name": (0, 100), "mode": (100, 108), "size": (124, 136), "type": (156, 157),
                 "linkname": (157, 257), "magic": (257, 265), "prefix": (345, 500)}


def header_mutation(rng: random.Random, kind: str) -> tuple[str, bytes]:
    """One header field rewritten, the checksum made right again: sizes far beyond the shard, negative, just past
    the member's data; type flags of links, sparse files, pax and GNU long-name records."""
    data = tar_bytes([SAMPLE[kind](f"s{index}") for index in range(2)])
    start = rng.choice(header_offsets(data))
    field = rng.choice(sorted(HEADER_FIELDS))
    low, high = HEADER_FIELDS[field]
    if field == "size":
        size = int(data[start + 124 : start + 135], 8)
        value = rng.choice([b"%011o\0" % (size + rng.choice([1, 512, 1024, 10**6])), b"%011o\0" % 6_000_000_000,
                            b"\x80" + rng.randbytes(11), b"\xff" * 10 + b"\xfe\x00", b"%011o\0" % max(size - 1, 0),
                            b"garbage\0\0\0\0\0"])
    elif field == "type":
        value = rng.choice([b"1", b"2", b"3", b"5", b"6", b"7", b"S", b"L", b"K", b"x", b"g", b"D", b"\0", b"Z"])
    else:
        value = rng.randbytes(high - low)
    return f"header {field}", with_header_bytes(data, start, low, value)


def byte_mutation(rng: random.Random, kind: str) -> tuple[str, bytes]:
    """The whole shard cut short (with its end blocks put back, or not) or flipped."""
    data = tar_bytes([SAMPLE[kind](f"s{index}") for index in range(2)])
    if rng.random() < 0.5:
        cut = data[: rng.randrange(len(data))]
        return "cut", cut + bytes(1024) if rng.random() < 0.7 else cut
    return "flipped", flipped(rng, data)


SHARD_MUTATIONS = [field_mutation, field_mutation, structural_mutation, header_mutation, byte_mutation]


def assert_in_contract(kind: str, samples: list[tuple[str, dict]], batch: dict) -> None:
    """What a read that raised nothing must hand over: every field as the contract and the model say."""
    for _, fields in samples:
        if kind != "text":
            with Image.open(io.BytesIO(fields["jpg"])) as image:
                width, height = image.size
                assert image.format == "JPEG" and width * height <= MAX_PIXELS and min(width, height) <= HEIGHT
            assert len(fields["views"]) == len(VIEWS)
            for view in fields["views"]:
                assert type(view.flip) is bool and all(type(value) is int for value in (view.top, view.left,
                                                                                        view.height, view.width))
                assert 0 <= view.top < view.top + view.height <= height
                assert 0 <= view.left < view.left + view.width <= width
            codes = fields["codes"]
            assert codes.dtype == np.uint16 and codes.shape == (len(VIEWS), GRID, GRID) and codes.max() < CODEBOOK
        if kind != "image":
            ids = fields["ids"]
            assert ids.dtype == np.uint16 and ids.ndim == 1 and ids.max() < TEXT_VOCAB
            assert len(ids) == TEXT_LEN if kind == "text" else 2 <= len(ids) <= CAPTION_LEN
    if kind != "text":
        assert batch["image"].shape == (len(samples), 3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].isfinite().all()
        assert batch["codes"].shape == (len(samples), GRID * GRID) and int(batch["codes"].max()) < CODEBOOK
    if kind != "image":
        assert int(batch["labels"].max()) < TEXT_VOCAB


def read_and_decode(ref, kind: str) -> str:
    """'read' (and every sample checked to be inside the contract) or 'refused' (one line naming the shard)."""
    try:
        samples = read_shard_samples(ref, verify_sha256=False, attempts=1)
        decoder = SampleDecoder(settings(kind, micro_batch=len(samples)))
        batch = collate([decoder(key, fields, 0) for key, fields in samples], [key for key, _ in samples])
    except ShardDataError as error:
        assert str(error).startswith(f"{ref.url}: ") and "\n" not in str(error), str(error)
        return "refused"
    assert_in_contract(kind, samples, batch)
    return "read"


@pytest.mark.parametrize("kind", ["image", "pair", "text"])
def test_mutated_shards_give_samples_inside_the_contract_or_one_named_line(tmp_path, kind):
    name = f"{kind}-000000.tar"
    dataset = write_dataset(tmp_path, {name: tar_bytes([SAMPLE[kind](f"s{index}") for index in range(2)])})
    (ref,) = index_datasets([dataset]).shards[kind]
    assert read_and_decode(ref, kind) == "read"
    outcomes: Counter = Counter()
    reset_peak()
    peak = peak_kib()
    for round_ in range(SHARD_ROUNDS):
        rng = random.Random(f"{kind}-{round_}")
        mutation, data = rng.choice(SHARD_MUTATIONS)(rng, kind)
        (tmp_path / name).write_bytes(data)
        try:
            outcomes[read_and_decode(ref, kind)] += 1
        except Exception as error:
            raise AssertionError(f"round {kind}-{round_} ({mutation}): {type(error).__name__}: {error}") from error
    assert peak_kib() - peak < PEAK_GROWTH_KIB
    assert outcomes["refused"] > SHARD_ROUNDS / 3 and outcomes["read"] > SHARD_ROUNDS / 50, outcomes


def manifest_mutation(rng: random.Random, document: dict, text: bytes) -> bytes:
    """The manifest's bytes mutated, or one of its values (at any depth) replaced by any JSON value or removed."""
    if rng.random() < 0.35:
        return raw_mutation(rng, text)
    parent, key = document, rng.choice(list(document))
    while isinstance(parent[key], (dict, list)) and parent[key] and rng.random() < 0.7:
        parent = parent[key]
        key = rng.randrange(len(parent)) if isinstance(parent, list) else rng.choice(list(parent))
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[key]
    else:
        parent[key] = random_json(rng)
    return json.dumps(document).encode()


def test_mutated_manifests_index_and_read_or_give_one_named_line(tmp_path):
    dataset = write_dataset(tmp_path, {f"{kind}-000000.tar": tar_bytes([SAMPLE[kind](f"s{index}")
                                                                         for index in range(2)]) for kind in SAMPLE})
    manifest = Path(dataset) / MANIFEST_NAME
    text = manifest.read_bytes()
    outcomes: Counter = Counter()
    reset_peak()
    peak = peak_kib()
    for round_ in range(MANIFEST_ROUNDS):
        rng = random.Random(f"manifest-{round_}")
        manifest.write_bytes(manifest_mutation(rng, json.loads(text), text))
        try:
            try:
                index = index_datasets([dataset])
            except ShardDataError as error:
                assert str(error).startswith(dataset) and "\n" not in str(error), str(error)
                outcomes["refused"] += 1
                continue
            for kind, refs in index.shards.items():
                for ref in refs:
                    outcomes[read_and_decode(ref, kind)] += 1
        except Exception as error:
            raise AssertionError(f"round manifest-{round_}: {type(error).__name__}: {error}") from error
    assert peak_kib() - peak < PEAK_GROWTH_KIB
    assert outcomes["refused"] > MANIFEST_ROUNDS / 3 and outcomes["read"] > MANIFEST_ROUNDS / 50, outcomes
