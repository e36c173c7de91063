"""The three training streams (images, texts, image-text pairs) read from the pipeline's shards.

Order is a pure function of (seed, stream, epoch, rank, worker), so a resumed run sees exactly the samples an
uninterrupted one would:
- each epoch, a stream's shards are shuffled with a seeded RNG and dealt round-robin to ranks, then to the
  rank's loader workers;
- a worker reads `shuffle_window_shards` shards at a time and yields their samples in a seeded permutation
  (the shuffle buffer), epoch after epoch without end, cut into micro-batches;
- PyTorch's loader takes micro-batches from its workers round-robin, so micro-batch b of a rank comes from
  worker b mod W as that worker's (b div W)-th. Resuming after B micro-batches gives each worker the role it
  would have had and skips only within the one window where it stopped.

Masks and the view (the next of a sample's stored views, walked without replacement, or a fresh one drawn on
the fly) depend only on the run seed, the sample and the epoch.

Shard bytes are untrusted even when their sha256 matches: the digest comes from a manifest stored beside them.
Every field is checked before use, against the shard format and the manifest's `contract` when the shard is
read (`read_shard_samples`), and against the model when a sample is decoded (`SampleDecoder`); a violation is
a ShardDataError naming the shard and the sample.
"""

import hashlib
import io
import json
import logging
import math
import random
import re
import tarfile
import time
import tokenize
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np
import torch
from botocore.exceptions import BotoCoreError
from PIL import Image
from pydantic import ValidationError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from beit3.data_pipeline.manifest import MANIFEST_NAME, DataContract
from beit3.data_pipeline.shards import KINDS
from beit3.data_pipeline.storage import open_storage
from beit3.data_pipeline.views import (
    JITTER_OPERATIONS,
    View,
    ViewSettings,
    crop_resized,
    draw_view,
    jittered_and_flipped,
    view_order,
)
from beit3.pretrain.masking import BlockMasking, TextMasking, masked_patch_count, sample_seed
from beit3.pretrain.train_config import DataSettings, MaskingSettings, PretrainConfig
from beit3.tokenizers.text import PAD, TextTokenizer

IMAGE_MEAN = IMAGE_STD = 0.5
logger = logging.getLogger(__name__)
SHARD_NAME = re.compile(rf"(?:{'|'.join(KINDS)})-[0-9]{{6,}}(?:-[0-9]{{3}})?\.tar")
"""The names `shard_name` gives; a manifest naming anything else (a path, a URL, a `pipe:` command) is refused."""
VALIDATION_PREFIX = "val-"
"""Held-out shards are named like training shards behind this prefix, and only the manifest's
`validation_shards` list may name them."""
MAX_LABEL_CHARS = 200
MAX_PROVENANCE_BYTES = 64 * 1024
"""A sample's `json` provenance is parsed only below this size: it carries a file name and a class label."""
SHA256 = re.compile(r"[0-9a-f]{64}")
REQUIRED_FIELDS = {"image": {"jpg", "views.json"}, "pair": {"jpg", "views.json", "ids.npy"}, "text": {"ids.npy"}}
"""What every sample of a shard of each kind holds (see beit3.data_pipeline.shards)."""
STORED_IDS = np.dtype("<u2")
"""The dtype of every stored `.npy` (ids and codes), as `beit3.data_pipeline.shards` writes it."""
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
NPY_HEADER_ERRORS = (ValueError, tokenize.TokenError)
"""What numpy's header readers raise on a damaged header (an unclosed bracket fails in the tokenizer that first
filters version 1 and 2 headers)."""
VIEW_FIELDS = set(View.__dataclass_fields__)
TAR_PARSE_ERRORS = (tarfile.TarError, EOFError, ValueError, IndexError, OverflowError)
"""What Python's tarfile raises on damaged headers: its own errors, and others from fields it parses unchecked."""
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises on bytes that are not a whole image."""


class ShardDataError(ValueError):
    """Shards that cannot serve this run: missing, altered, or built for another model shape."""


@dataclass(frozen=True)
class ShardRef:
    dataset: str
    name: str
    samples: int
    sha256: str
    contract: DataContract = DataContract()

    @property
    def url(self) -> str:
        return f"{self.dataset.rstrip('/')}/{self.name}"


def _recipe_default(settings: type[MaskingSettings | DataSettings], name: str):
    """The recipe schema's default of a field, so that settings made by hand (tests) match an unset recipe."""
    return settings.model_fields[name].default


READ_SETTINGS = ("shuffle_window_shards", "verify_sha256", "read_attempts", "read_backoff_seconds")
"""The recipe's `data` fields a stream reads its shards with."""


@dataclass(frozen=True)
class StreamSettings:
    """What a stream needs to turn stored samples into model inputs; a run's come from `stream_settings`."""

    stream: str
    micro_batch: int
    seed: int
    image_size: int
    grid: int
    mask_id: int
    image_ratio: float = _recipe_default(MaskingSettings, "image_ratio")
    mask_pair_images: bool = _recipe_default(MaskingSettings, "mask_pair_images")
    text_rate: float = _recipe_default(MaskingSettings, "text_rate")
    caption_rate: float = _recipe_default(MaskingSettings, "caption_rate")
    views: ViewSettings = ViewSettings()
    """How stored views are rendered, and fresh ones drawn on the fly (`augment`)."""
    tokenizer_view_size: int | None = None
    """Set when the tokenizer runs on the fly: the size of its render of each fresh view."""
    shuffle_window_shards: int = _recipe_default(DataSettings, "shuffle_window_shards")
    verify_sha256: bool = _recipe_default(DataSettings, "verify_sha256")
    read_attempts: int = _recipe_default(DataSettings, "read_attempts")
    read_backoff_seconds: float = _recipe_default(DataSettings, "read_backoff_seconds")
    text_vocab_size: int = 2**16
    """Ids must be below it: the text tokenizer's vocabulary (default: any id the stored uint16 holds)."""
    codebook_size: int = 2**16
    """Stored codes must be below it: the model's visual vocabulary."""
    max_text_len: int = 2**16
    """Longest text the model's position table serves."""


def stream_settings(config: PretrainConfig, stream: str, micro_batch: int, text_tokenizer: TextTokenizer,
                    visual_tokenizer=None) -> StreamSettings:
    """The settings of one stream of a run: every value from the recipe's own settings objects (seed, model,
    masking, augment, data) and its tokenizers, none restated here."""
    grid = config.model.grid_size
    return StreamSettings(
        stream=stream, micro_batch=micro_batch, seed=config.seed, image_size=config.model.image_size, grid=grid,
        mask_id=text_tokenizer.mask_id, **config.masking.model_dump(), views=config.augment,
        tokenizer_view_size=grid * visual_tokenizer.patch_size if visual_tokenizer else None,
        **config.data.model_dump(include=set(READ_SETTINGS)), text_vocab_size=text_tokenizer.vocab_size,
        codebook_size=config.model.visual_vocab_size, max_text_len=config.model.max_text_len)


def read_manifest(dataset: str) -> tuple[dict, str]:
    """A dataset's manifest and the sha256 of its bytes."""
    storage = open_storage(dataset)
    if not storage.exists(MANIFEST_NAME):
        raise ShardDataError(f"{storage.url(MANIFEST_NAME)}: no manifest (is this the output of `beit3 data build`?)")
    data = storage.read_bytes(MANIFEST_NAME)
    try:
        return json.loads(data), hashlib.sha256(data).hexdigest()
    except (ValueError, RecursionError) as error:  # bad UTF-8, an over-long number, nesting past the limit too
        raise ShardDataError(f"{storage.url(MANIFEST_NAME)}: not valid JSON ({_one_line(error)})") from None


@dataclass(frozen=True)
class DatasetIndex:
    shards: dict[str, list[ShardRef]]
    """Per kind (image, text, pair), every non-empty shard, checked to exist, in a fixed order."""
    manifest_digests: dict[str, str]
    """Per dataset, the sha256 of its manifest's bytes (recorded by runs to detect a changed dataset)."""
    contracts: dict[str, DataContract]
    """Per dataset, its manifest's `contract` as recorded (see beit3.pretrain.data_contract)."""
    validation: dict[str, list[ShardRef]] = dataclass_field(default_factory=lambda: {kind: [] for kind in KINDS})
    """Per kind, the held-out shards (`validation_shards`, named `val-{kind}-NNNNNN.tar`), checked like `shards`;
    empty lists when the manifests list none."""


def shard_kind(name: str) -> str:
    """The kind of a training or held-out shard from its name: image, text or pair."""
    return name.removeprefix(VALIDATION_PREFIX).partition("-")[0]


def _is_shard_name(name: str) -> bool:
    return SHARD_NAME.fullmatch(name.removeprefix(VALIDATION_PREFIX)) is not None


def _entry_problem(entry: object, prefix: str = "") -> str | None:
    """What is wrong with one shard entry of a manifest, if anything; held-out entries carry `prefix`."""
    if not isinstance(entry, dict):
        return f"expected a shard entry, got {type(entry).__name__} {entry!r:.60}"
    name, kind, samples, sha256 = (entry.get(field) for field in ("name", "kind", "samples", "sha256"))
    if not (isinstance(name, str) and name.startswith(prefix) and SHARD_NAME.fullmatch(name.removeprefix(prefix))):
        return f"name {name!r:.80} is not a shard file name such as {prefix}image-000000.tar"
    if kind not in KINDS or not name.startswith(f"{prefix}{kind}-"):
        return f"{name}: kind {kind!r:.40} does not match the name (expected one of {', '.join(KINDS)})"
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        return f"{name}: samples {samples!r:.40} is not a count"
    if samples and not (isinstance(sha256, str) and SHA256.fullmatch(sha256)):
        return f"{name}: sha256 {sha256!r:.80} is not a sha256 hex digest"
    return None


def _manifest_shards(dataset: str, manifest: object, held_out: bool = False) -> list[dict]:
    """The manifest's non-empty shard entries (`shards`, or with `held_out` the optional `validation_shards`),
    every entry checked first: the names are plain shard file names, so nothing a manifest says is ever used as
    a path outside the dataset, a URL or a command."""
    key, prefix = ("validation_shards", VALIDATION_PREFIX) if held_out else ("shards", "")
    entries = manifest.get(key) if isinstance(manifest, dict) else None
    if held_out and entries is None:
        return []
    if not isinstance(entries, list):
        raise ShardDataError(f"{dataset}: the manifest lists no {key} (is this the output of `beit3 data build`?)")
    for position, entry in enumerate(entries):
        problem = _entry_problem(entry, prefix)
        if problem:
            raise ShardDataError(f"{dataset}: manifest {key} entry {position}: {problem}")
    return [entry for entry in entries if entry["samples"] > 0]


def _manifest_contract(dataset: str, manifest: dict) -> DataContract:
    """The manifest's `contract`, each field checked against its schema (a manifest written before it was has
    none)."""
    try:
        return DataContract.model_validate_json(json.dumps(manifest.get("contract", {})))
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        field = f"{where}: " if where else ""
        raise ShardDataError(f"{dataset}: the manifest's contract: {field}{problem['msg']} (got "
                             f"{_one_line(repr(problem.get('input')))[:60]})") from None


def index_datasets(datasets: list[str]) -> DatasetIndex:
    """Each dataset's manifest read and checked once, and its storage listed once (one listing is many requests
    on S3)."""
    shards: dict[str, list[ShardRef]] = {kind: [] for kind in KINDS}
    validation: dict[str, list[ShardRef]] = {kind: [] for kind in KINDS}
    digests, contracts = {}, {}
    for dataset in datasets:
        manifest, digests[dataset] = read_manifest(dataset)
        listed = _manifest_shards(dataset, manifest)
        held_out = _manifest_shards(dataset, manifest, held_out=True)
        contract = _manifest_contract(dataset, manifest)
        stored = set(open_storage(dataset).list()) if listed or held_out else set()
        missing = [entry["name"] for entry in listed + held_out if entry["name"] not in stored]
        if missing:
            raise ShardDataError(f"{dataset}: {len(missing)} shard(s) named in the manifest are missing, e.g. "
                                 f"{', '.join(missing[:3])}")
        for entries, refs in ((listed, shards), (held_out, validation)):
            for entry in entries:
                refs[entry["kind"]].append(ShardRef(dataset, entry["name"], entry["samples"], entry["sha256"],
                                                    contract))
        contracts[dataset] = contract
    return DatasetIndex(shards, digests, contracts, validation)


def shards_for_worker(shards: list[ShardRef], seed: int, stream: str, epoch: int, rank: int, world_size: int,
                      worker: int, workers: int) -> list[ShardRef]:
    """This epoch's shards for one (rank, worker): a seeded shuffle dealt round-robin."""
    order = list(shards)
    random.Random(sample_seed(seed, stream, "shards", epoch)).shuffle(order)
    return order[rank::world_size][worker::workers]


def read_shard_bytes(ref: ShardRef, attempts: int = 8, backoff_seconds: float = 1.0) -> bytes:
    """The shard's bytes, retried with exponential backoff (capped at a minute) through storage outages; after
    `attempts` the run fails naming the shard, so no shard is ever skipped."""
    if not _is_shard_name(ref.name):
        raise ShardDataError(f"{ref.url}: {ref.name!r:.80} is not a shard file name such as image-000000.tar")
    for attempt in range(1, attempts + 1):
        try:
            return open_storage(ref.dataset).read_bytes(ref.name)
        except (OSError, BotoCoreError) as error:
            if attempt == attempts:
                raise ShardDataError(f"{ref.url}: unreadable after {attempts} attempts ({error})") from None
            wait = min(backoff_seconds * 2 ** (attempt - 1), 60.0)
            logger.warning("%s: read failed (%s); attempt %d of %d in %.0fs", ref.url, error, attempt + 1,
                           attempts, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _one_line(text: object) -> str:
    """A message on one line, cut short: messages quote untrusted bytes."""
    return " ".join(str(text).split())[:200]


def _shown(key: str) -> str:
    """A sample key as an error names it: as it is when printable, else escaped."""
    return key if key.isprintable() and len(key) <= 120 else f"{key!r:.120}"


def _member_problem(member: tarfile.TarInfo, shard_bytes: int) -> str | None:
    """What keeps a tar member from being a sample field, from its header alone: anything but a plain regular
    file (a sparse one expands to whatever size it declares), or a size beyond the bytes that follow."""
    if member.issparse():
        return "is a sparse file"
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return f"is not a regular file (tar type {member.type!r})"
    available = shard_bytes - member.offset_data
    if not 0 <= member.size <= available:
        return f"declares {member.size:,} bytes but {max(available, 0):,} follow its header"
    return None


def _tar_members(ref: ShardRef, data: bytes) -> list[dict]:
    """The shard's members as webdataset's tar expander gives them (name, bytes, url), each header checked
    before its data is touched."""
    members, problem = [], None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive:
                problem = _member_problem(member, len(data))
                if problem:
                    problem = f"member {member.name!r:.80} {problem}"
                    break
                start = member.offset_data
                members.append({"fname": member.name, "data": data[start : start + member.size], "__url__": ref.url})
    except TAR_PARSE_ERRORS as error:
        raise ShardDataError(f"{ref.url}: not a whole tar, truncated or damaged ({_one_line(error)})") from None
    if problem:
        raise ShardDataError(f"{ref.url}: {problem}")
    return members


def _shard_entries(ref: ShardRef, data: bytes) -> list[dict]:
    """The shard's tar entries grouped by key (as WebDataset groups them). A cut-short or damaged tar, a member
    that is not a plain file or declares more bytes than there are, a member name twice or a key in two places
    is a ShardDataError naming the shard: the checks that matter with verify_sha256 off, since tar readers stop
    quietly where a cut falls between members."""
    if not data.endswith(bytes(2 * tarfile.BLOCKSIZE)):
        raise ShardDataError(f"{ref.url}: truncated (it does not end with a tar's two zero blocks)")
    members = _tar_members(ref, data)
    try:
        entries = list(group_by_keys(iter(members)))
    except ValueError as error:  # webdataset's group_by_keys: a member name seen twice in a row
        reason = str(error.args[0] if error.args else error).split(" dict_keys")[0]
        raise ShardDataError(f"{ref.url}: duplicate member ({_one_line(reason)})") from None
    twice = sorted(key for key, count in Counter(entry["__key__"] for entry in entries).items() if count > 1)
    if twice:
        raise ShardDataError(f"{ref.url}: duplicate sample key {twice[0]!r:.120} (members of one sample in two "
                             "places)")
    return entries


class _OutOfContract(Exception):
    """A stored field that breaks the shard format or the manifest's contract; the reader names the sample."""


def _stored_array(field: str, data: bytes, layout: tuple[str, ...]) -> np.ndarray:
    """A `.npy` member as a read-only uint16 array laid out as `layout`. Its header is parsed with numpy's format
    helpers and checked before anything is allocated: the shape it declares must account for exactly the bytes
    that follow, so a few bytes that claim gigabytes are refused unread."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f"format version {version[0]}.{version[1]}")
        shape, fortran_order, dtype = NPY_HEADER_READERS[version](stream)
    except NPY_HEADER_ERRORS as error:
        raise _OutOfContract(f"{field} is not a .npy array ({_one_line(error)})") from None
    if dtype != STORED_IDS or fortran_order:
        raise _OutOfContract(f"{field} holds {dtype!s:.40} values{' in Fortran order' if fortran_order else ''}, "
                             "not uint16 in C order")
    if len(shape) != len(layout) or any(size < 1 for size in shape):  # every field has at least one of each
        raise _OutOfContract(f"{field} has shape {shape!s:.80}, not [{', '.join(layout)}]")
    count, held = math.prod(shape), len(data) - stream.tell()
    if count * STORED_IDS.itemsize != held:
        raise _OutOfContract(f"{field} declares a {'x'.join(map(str, shape)):.80} uint16 array "
                             f"({count * STORED_IDS.itemsize:,} bytes) but holds {held:,} bytes")
    return np.frombuffer(data, STORED_IDS, count=count, offset=stream.tell()).reshape(shape)


def _text_block(data: bytes, contract: DataContract) -> np.ndarray:
    """A text entry's [segments, text_len] block of ids."""
    block = _stored_array("ids.npy", data, ("segments", "length"))
    segments, length = block.shape
    if length < 2 or contract.text_len not in (None, length):
        raise _OutOfContract(f"ids.npy is {segments} segment(s) of {length} ids, not of "
                             f"{contract.text_len or '2 or more'} (text_len)")
    return block


def _caption(data: bytes, contract: DataContract) -> np.ndarray:
    """A pair's caption ids: bos ... eos, at most caption_len."""
    ids = _stored_array("ids.npy", data, ("length",))
    longest = contract.caption_len or math.inf
    if not 2 <= len(ids) <= longest:
        raise _OutOfContract(f"ids.npy holds a caption of {len(ids)} ids, not 2 (bos, eos) to {longest} "
                             "(caption_len)")
    return ids


def _stored_image_size(data: bytes, contract: DataContract) -> tuple[int, int]:
    """The stored JPEG's width and height, read from its header (nothing decoded), within the stored images'
    bounds: the pipeline never stores more pixels than an input may have, nor upscales past the shorter side.
    PIL's own warning about large images is silenced: the bounds below decide."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
                width, height = image.size
    except IMAGE_DECODE_ERRORS as error:
        raise _OutOfContract(f"jpg does not open as a JPEG image ({_one_line(error)})") from None
    if width * height > contract.max_pixels or min(width, height) > (contract.shorter_side or math.inf):
        raise _OutOfContract(f"jpg is a {width}x{height} image, beyond the stored images' bounds (shorter side at "
                             f"most {contract.shorter_side}, at most {contract.max_pixels:,} pixels)")
    return width, height


def _jitter_problem(jitter: object) -> str | None:
    """What is wrong with a view's jitter: a list of distinct [operation, factor] pairs, each factor finite in
    [0, 2] (ColorJitter's range for strengths up to 1)."""
    if not isinstance(jitter, list) or len(jitter) > len(JITTER_OPERATIONS):
        return "jitter is not a list of [operation, factor] pairs"
    operations = [pair[0] if isinstance(pair, list) and len(pair) == 2 else None for pair in jitter]
    if any(operation not in JITTER_OPERATIONS for operation in operations) or len(set(operations)) != len(jitter):
        return f"jitter operations must be distinct ones of {', '.join(JITTER_OPERATIONS)}"
    if not all(type(factor) in (int, float) and 0 <= factor <= 2 for _, factor in jitter):
        return "jitter factors must be numbers in [0, 2]"
    return None


def _views(data: bytes, width: int, height: int, contract: DataContract) -> list[View]:
    """The stored views: crop boxes of positive size inside the stored image, each with a flip."""
    try:
        views = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise _OutOfContract(f"views.json is not JSON ({_one_line(error)})") from None
    count = contract.views_per_image
    if not isinstance(views, list) or not views or count not in (None, len(views)):
        raise _OutOfContract(f"views.json is not a list of {count or 'one or more'} views (views_per_image)")
    for index, view in enumerate(views):
        if not (isinstance(view, dict) and view.keys() == VIEW_FIELDS and isinstance(view["flip"], bool)
                and all(type(view[name]) is int for name in ("top", "left", "height", "width"))
                and _jitter_problem(view["jitter"]) is None):
            raise _OutOfContract(f"views.json view {index} {view!r:.120} is not a crop box (integers top, left, "
                                 "height, width) with a flip (a bool) and colour jitter "
                                 f"({_jitter_problem(view.get('jitter')) if isinstance(view, dict) else 'none'})")
        if not (view["top"] >= 0 and view["left"] >= 0 and 0 < view["height"] <= height - view["top"]
                and 0 < view["width"] <= width - view["left"]):
            raise _OutOfContract(f"views.json view {index} {view!r:.120} is not a box of positive size inside the "
                                 f"{width}x{height} stored image")
    return [View.from_json(view) for view in views]


def _label(provenance: bytes | None) -> str | None:
    """The class label the pipeline records in a sample's `json` provenance (class-folder and per-class tar
    sources), or None: a label is only ever read by the representation probe, so a missing, oversized or
    malformed one leaves the sample unlabelled rather than failing training."""
    if provenance is None or len(provenance) > MAX_PROVENANCE_BYTES:
        return None
    try:
        label = json.loads(provenance).get("label")
    except (ValueError, RecursionError, AttributeError):
        return None
    if isinstance(label, str) and 0 < len(label) <= MAX_LABEL_CHARS and label.isprintable():
        return label
    return None


def _checked_fields(kind: str, entry: dict, contract: DataContract) -> dict:
    """A tar entry's fields decoded and checked against the shard format and the manifest's contract (the
    model's own limits are checked by SampleDecoder); `__url__` and `__key__` name it in later errors."""
    fields = {"__url__": entry["__url__"], "__key__": _shown(entry["__key__"])}
    if kind == "text":
        return {**fields, "ids": _text_block(entry["ids.npy"], contract)}
    width, height = _stored_image_size(entry["jpg"], contract)
    fields.update(jpg=entry["jpg"], views=_views(entry["views.json"], width, height, contract),
                  label=_label(entry.get("json")))
    if "codes.npy" in entry:
        fields["codes"] = _stored_array("codes.npy", entry["codes.npy"], ("views", "rows", "cols"))
        if len(fields["codes"]) != len(fields["views"]):
            raise _OutOfContract(f"codes.npy holds codes of {len(fields['codes'])} views, views.json "
                                 f"{len(fields['views'])}")
    if kind == "pair":
        fields["ids"] = _caption(entry["ids.npy"], contract)
    return fields


def read_shard_samples(ref: ShardRef, verify_sha256: bool, attempts: int = 8,
                       backoff_seconds: float = 1.0) -> list[tuple[str, dict]]:
    """(key, checked fields) per training sample of one shard; a text entry's block gives one sample per
    segment."""
    data = read_shard_bytes(ref, attempts, backoff_seconds)
    if verify_sha256 and hashlib.sha256(data).hexdigest() != ref.sha256:
        raise ShardDataError(f"{ref.url}: sha256 differs from the manifest's (the shard was altered or truncated)")
    kind = shard_kind(ref.name)
    samples = []
    for entry in _shard_entries(ref, data):
        key = f"{ref.name}/{entry['__key__']}"
        missing = REQUIRED_FIELDS[kind] - entry.keys()
        if missing:
            raise ShardDataError(f"{ref.url}: sample {_shown(entry['__key__'])} has no {', '.join(sorted(missing))} "
                                 "(the shard was truncated or altered)")
        try:
            fields = _checked_fields(kind, entry, ref.contract)
        except _OutOfContract as problem:
            raise ShardDataError(f"{ref.url}: sample {_shown(entry['__key__'])}: {problem}") from None
        if kind == "text":
            samples += [(f"{key}/{row}", {**fields, "__key__": f"{fields['__key__']}/{row}", "ids": ids})
                        for row, ids in enumerate(fields["ids"])]
        else:
            samples.append((key, fields))
    if len(samples) != ref.samples:
        raise ShardDataError(f"{ref.url}: holds {len(samples)} samples, the manifest says {ref.samples} (the shard "
                             "was truncated or altered)")
    return samples


def _sample_error(fields: dict, problem: str) -> ShardDataError:
    return ShardDataError(f"{fields['__url__']}: sample {fields['__key__']}: {problem}")


class SampleDecoder:
    """Checked fields (see `read_shard_samples`) -> model inputs for one sample: the replayed view, its codes,
    masks and ids, each checked against what the model takes before use."""

    def __init__(self, settings: StreamSettings):
        self.settings = settings
        self.block_masking = BlockMasking(settings.grid, masked_patch_count(settings.grid, settings.image_ratio))
        self.text_masking = TextMasking(settings.text_rate, settings.mask_id)
        self.caption_masking = TextMasking(settings.caption_rate, settings.mask_id)

    def _codes(self, fields: dict, choice: int) -> torch.Tensor:
        s, codes = self.settings, fields["codes"]
        if codes.shape[1:] != (s.grid, s.grid):
            raise _sample_error(fields, f"stored codes are a {codes.shape[1]}x{codes.shape[2]} grid but the model has "
                                f"{s.grid}x{s.grid} patches; rebuild the shards with image.tokenizer_view_size set "
                                f"to {s.grid} x the tokenizer's patch size, or use data.visual_codes: on_the_fly")
        if codes.max() >= s.codebook_size:
            raise _sample_error(fields, f"codes.npy holds code {codes.max()} but the model's visual vocabulary has "
                                f"{s.codebook_size} codes (model.visual_vocab_size)")
        return torch.from_numpy(codes[choice].reshape(-1).astype(np.int64))

    def _ids(self, fields: dict) -> np.ndarray:
        s, ids = self.settings, fields["ids"]
        if len(ids) > s.max_text_len:
            raise _sample_error(fields, f"ids.npy holds {len(ids)} ids but the model's text positions serve "
                                f"{s.max_text_len} (model.text_positions)")
        if ids.max() >= s.text_vocab_size:
            raise _sample_error(fields, f"ids.npy holds id {ids.max()} but the text tokenizer has "
                                f"{s.text_vocab_size} ids (data.text_tokenizer: the one the shards were built with?)")
        return ids.astype(np.int64)

    def _image(self, key: str, fields: dict, epoch: int, masked: bool) -> dict:
        """The model's render of this epoch's view; with stored codes, the next of the sample's stored views
        (walked without replacement) and its codes; on the fly, a fresh view whose tokenizer render is cut from
        the same jittered, flipped pixels."""
        s = self.settings
        try:
            with Image.open(io.BytesIO(fields["jpg"]), formats=["JPEG"]) as image:
                stored = image.convert("RGB")
        except IMAGE_DECODE_ERRORS as error:
            raise _sample_error(fields, f"jpg does not decode ({_one_line(error)})") from None
        if s.tokenizer_view_size:
            rng = random.Random(sample_seed(s.seed, s.stream, key, epoch, "view"))
            view = draw_view(stored.width, stored.height, rng, s.views)
            choice = None
        elif "codes" in fields:
            choice = view_order(len(fields["views"]), sample_seed(s.seed, s.stream, key, "views"), epoch)
            view = fields["views"][choice]
        else:
            raise _sample_error(fields, "the shards hold no visual codes; set data.visual_codes: on_the_fly")
        prepared = jittered_and_flipped(stored, view)
        pixels = crop_resized(prepared, view, s.image_size, s.views.model_interpolation).float() / 255
        out = {"image": (pixels - IMAGE_MEAN) / IMAGE_STD}
        if choice is None:
            out["tokenizer_image"] = crop_resized(prepared, view, s.tokenizer_view_size,
                                                  s.views.tokenizer_interpolation).float() / 255
        else:
            out["codes"] = self._codes(fields, choice)
        if masked:
            out["image_mask"] = torch.from_numpy(
                self.block_masking(sample_seed(s.seed, s.stream, key, epoch, "mask")).reshape(-1))
        return out

    def __call__(self, key: str, fields: dict, epoch: int) -> dict:
        s = self.settings
        if s.stream == "text":
            return {"ids": self._ids(fields), "masking": self.text_masking,
                    "mask_seed": sample_seed(s.seed, s.stream, key, epoch, "text")}
        sample = self._image(key, fields, epoch, masked=s.stream == "image" or s.mask_pair_images)
        if s.stream == "pair":
            sample.update(ids=self._ids(fields), masking=self.caption_masking,
                          mask_seed=sample_seed(s.seed, s.stream, key, epoch, "text"))
        return sample


def collate(samples: list[dict], keys: list[str]) -> dict:
    """Stack a micro-batch; texts are padded to the batch's longest and masked per sample."""
    batch: dict = {"keys": keys}
    for field in ("image", "tokenizer_image", "codes", "image_mask"):
        if field in samples[0]:
            batch[field] = torch.stack([sample[field] for sample in samples])
    if "ids" in samples[0]:
        length = max(len(sample["ids"]) for sample in samples)
        ids = np.full((len(samples), length), PAD, dtype=np.int64)
        for row, sample in enumerate(samples):
            ids[row, : len(sample["ids"])] = sample["ids"]
        padding = ids == PAD
        masked, chosen = zip(*(sample["masking"](ids[row], padding[row], sample["mask_seed"])
                               for row, sample in enumerate(samples)))
        batch.update(text=torch.from_numpy(np.stack(masked)), text_padding_mask=torch.from_numpy(padding),
                     text_prediction_mask=torch.from_numpy(np.stack(chosen)), labels=torch.from_numpy(ids))
    return batch


class MicroBatchStream(IterableDataset):
    """One stream's endless micro-batches for one rank, resumable at any micro-batch count."""

    def __init__(self, shards: list[ShardRef], settings: StreamSettings, rank: int, world_size: int,
                 start_micro_batches: int = 0):
        self.shards = shards
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.start_micro_batches = start_micro_batches

    def _samples(self, worker: int, workers: int, skip: int) -> Iterator[tuple[str, dict, int]]:
        """This worker's endless sample sequence, from position `skip` on, reading only what it yields."""
        s = self.settings
        epoch = 0
        while True:
            assigned = shards_for_worker(self.shards, s.seed, s.stream, epoch, self.rank, self.world_size,
                                         worker, workers)
            if not assigned:
                raise ShardDataError(
                    f"stream {s.stream}: {len(self.shards)} shards cannot feed {self.world_size} ranks x {workers} "
                    "loader workers; build smaller shards or use fewer data.workers")
            for first in range(0, len(assigned), s.shuffle_window_shards):
                window = assigned[first : first + s.shuffle_window_shards]
                size = sum(ref.samples for ref in window)
                if skip >= size:
                    skip -= size
                    continue
                samples = [item for ref in window for item in read_shard_samples(
                    ref, s.verify_sha256, s.read_attempts, s.read_backoff_seconds)]
                random.Random(sample_seed(s.seed, s.stream, "window", epoch, self.rank, worker, first)).shuffle(samples)
                for key, fields in samples[skip:]:
                    yield key, fields, epoch
                skip = 0
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_slot, workers = (info.id, info.num_workers) if info else (0, 1)
        role = (self.start_micro_batches + worker_slot) % workers
        done = (self.start_micro_batches + worker_slot) // workers
        micro = self.settings.micro_batch
        decoder = SampleDecoder(self.settings)
        pending: list[tuple[str, dict]] = []
        for key, fields, epoch in self._samples(role, workers, done * micro):
            pending.append((key, decoder(key, fields, epoch)))
            if len(pending) == micro:
                yield collate([sample for _, sample in pending], [key for key, _ in pending])
                pending = []


def rank_block(total: int, rank: int, world_size: int) -> range:
    """The contiguous share of `total` items a rank takes: every rank reads only the shards its block covers."""
    return range(total * rank // world_size, total * (rank + 1) // world_size)


@dataclass(frozen=True)
class HeldOutShare:
    """One rank's block of a fixed subset: (key, checked fields) in order, and the subset's size over all ranks.
    A rank whose block is empty holds the subset's first sample as `filler`, so that under ZeRO-3 it can join
    the other ranks' forwards without counting anything."""

    samples: list[tuple[str, dict]]
    total: int
    filler: tuple[str, dict] | None = None


def first_samples(refs: list[ShardRef], count: int, rank: int, world_size: int, verify_sha256: bool = True,
                  attempts: int = 8, backoff_seconds: float = 1.0) -> HeldOutShare:
    """This rank's block of the first `count` samples of `refs`, in the manifest's order: a fixed subset that no
    seed decides, read from only the shards the block covers."""
    total = min(count, sum(ref.samples for ref in refs))
    block = rank_block(total, rank, world_size) or range(min(total, 1))
    taken, start = [], 0
    for ref in refs:
        if start >= block.stop:
            break
        if start + ref.samples > block.start:
            samples = read_shard_samples(ref, verify_sha256, attempts, backoff_seconds)
            taken += samples[max(block.start - start, 0) : block.stop - start]
        start += ref.samples
    if not rank_block(total, rank, world_size):
        return HeldOutShare([], total, taken[0] if taken else None)
    return HeldOutShare(taken, total)


def first_labelled_images(refs: list[ShardRef], count: int, rank: int, world_size: int, verify_sha256: bool = True,
                          attempts: int = 8, backoff_seconds: float = 1.0) -> tuple[HeldOutShare, list[str]]:
    """This rank's block of the first `count` images of `refs` that carry a class label, and every label of the
    subset in order (all ranks read the same shards, once per run, since only reading tells which are
    labelled)."""
    labelled: list[tuple[str, dict]] = []
    for ref in refs:
        if len(labelled) >= count:
            break
        labelled += [(key, fields) for key, fields in read_shard_samples(ref, verify_sha256, attempts, backoff_seconds)
                     if fields.get("label") is not None]
    labelled = labelled[:count]
    block = rank_block(len(labelled), rank, world_size)
    labels = [fields["label"] for _, fields in labelled]
    if not block:
        return HeldOutShare([], len(labelled), labelled[0] if labelled else None), labels
    return HeldOutShare(labelled[block.start : block.stop], len(labelled)), labels


def centre_view(fields: dict, image_size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """The model's input for a representation probe: the stored image's centre square, unjittered and unflipped,
    resized and normalised as training inputs are (no seed involved)."""
    try:
        with Image.open(io.BytesIO(fields["jpg"]), formats=["JPEG"]) as image:
            stored = image.convert("RGB")
    except IMAGE_DECODE_ERRORS as error:
        raise _sample_error(fields, f"jpg does not decode ({_one_line(error)})") from None
    side = min(stored.width, stored.height)
    view = View((stored.height - side) // 2, (stored.width - side) // 2, side, side, False)
    pixels = crop_resized(stored, view, image_size, interpolation).float() / 255
    return (pixels - IMAGE_MEAN) / IMAGE_STD


def held_out_batches(samples: list[tuple[str, dict]], settings: StreamSettings) -> list[dict]:
    """Micro-batches of held-out samples with views and masks drawn as in training, but at epoch 0 of
    `settings.seed` (the evaluation seed): the same inputs at every evaluation, whatever the run's seed or step."""
    decoder = SampleDecoder(settings)
    decoded = [(key, decoder(key, fields, 0)) for key, fields in samples]
    micro = settings.micro_batch
    return [collate([sample for _, sample in decoded[first : first + micro]],
                    [key for key, _ in decoded[first : first + micro]]) for first in range(0, len(decoded), micro)]


def build_loader(dataset: MicroBatchStream, workers: int, prefetch_batches: int) -> DataLoader:
    """Worker processes prepare micro-batches; `in_order` keeps the round-robin that resume relies on, and a
    private generator keeps the loader from drawing on the rank's RNG (which drop path uses)."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, in_order=True, generator=torch.Generator(),
                      prefetch_factor=prefetch_batches if workers else None, persistent_workers=False)
