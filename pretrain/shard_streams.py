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

Masks, the replayed view and colour jitter depend only on the run seed, the sample and the epoch.
"""

import hashlib
import io
import json
import logging
import random
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from botocore.exceptions import BotoCoreError
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF
from webdataset.tariterators import group_by_keys, tar_file_expander

from beit3.data_pipeline.manifest import MANIFEST_NAME
from beit3.data_pipeline.shards import KINDS
from beit3.data_pipeline.storage import open_storage
from beit3.data_pipeline.views import View, render_view
from beit3.pretrain.masking import BlockMasking, TextMasking, masked_patch_count, sample_seed
from beit3.tokenizers.text import PAD

IMAGE_MEAN = IMAGE_STD = 0.5
logger = logging.getLogger(__name__)
SHARD_NAME = re.compile(rf"(?:{'|'.join(KINDS)})-[0-9]{{6,}}(?:-[0-9]{{3}})?\.tar")
"""The names `shard_name` gives; a manifest naming anything else (a path, a URL, a `pipe:` command) is refused."""
SHA256 = re.compile(r"[0-9a-f]{64}")
REQUIRED_FIELDS = {"image": {"jpg", "views.json"}, "pair": {"jpg", "views.json", "ids.npy"}, "text": {"ids.npy"}}
"""What every sample of a shard of each kind holds (see beit3.data_pipeline.shards)."""


class ShardDataError(ValueError):
    """Shards that cannot serve this run: missing, altered, or built for another model shape."""


@dataclass(frozen=True)
class ShardRef:
    dataset: str
    name: str
    samples: int
    sha256: str

    @property
    def url(self) -> str:
        return f"{self.dataset.rstrip('/')}/{self.name}"


@dataclass(frozen=True)
class StreamSettings:
    """What a stream needs to turn stored samples into model inputs."""

    stream: str
    micro_batch: int
    seed: int
    image_size: int
    grid: int
    mask_id: int
    image_ratio: float = 0.4
    mask_pair_images: bool = True
    text_rate: float = 0.15
    caption_rate: float = 0.5
    color_jitter: float = 0.4
    tokenizer_view_size: int | None = None
    shuffle_window_shards: int = 4
    verify_sha256: bool = True
    read_attempts: int = 8
    read_backoff_seconds: float = 1.0


def read_manifest(dataset: str) -> tuple[dict, str]:
    """A dataset's manifest and the sha256 of its bytes."""
    storage = open_storage(dataset)
    if not storage.exists(MANIFEST_NAME):
        raise ShardDataError(f"{storage.url(MANIFEST_NAME)}: no manifest (is this the output of `beit3 data build`?)")
    data = storage.read_bytes(MANIFEST_NAME)
    try:
        return json.loads(data), hashlib.sha256(data).hexdigest()
    except json.JSONDecodeError as error:
        raise ShardDataError(f"{storage.url(MANIFEST_NAME)}: not valid JSON ({error})") from None


@dataclass(frozen=True)
class DatasetIndex:
    shards: dict[str, list[ShardRef]]
    """Per kind (image, text, pair), every non-empty shard, checked to exist, in a fixed order."""
    manifest_digests: dict[str, str]
    """Per dataset, the sha256 of its manifest's bytes (recorded by runs to detect a changed dataset)."""


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one shard entry of a manifest, if anything."""
    if not isinstance(entry, dict):
        return f"expected a shard entry, got {type(entry).__name__} {entry!r:.60}"
    name, kind, samples, sha256 = (entry.get(field) for field in ("name", "kind", "samples", "sha256"))
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        return f"name {name!r:.80} is not a shard file name such as image-000000.tar"
    if kind not in KINDS or not name.startswith(f"{kind}-"):
        return f"{name}: kind {kind!r:.40} does not match the name (expected one of {', '.join(KINDS)})"
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        return f"{name}: samples {samples!r:.40} is not a count"
    if samples and not (isinstance(sha256, str) and SHA256.fullmatch(sha256)):
        return f"{name}: sha256 {sha256!r:.80} is not a sha256 hex digest"
    return None


def _manifest_shards(dataset: str, manifest: object) -> list[dict]:
    """The manifest's non-empty shard entries, every entry checked first: the names are plain shard file names,
    so nothing a manifest says is ever used as a path outside the dataset, a URL or a command."""
    entries = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise ShardDataError(f"{dataset}: the manifest lists no shards (is this the output of `beit3 data build`?)")
    for position, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem:
            raise ShardDataError(f"{dataset}: manifest shard entry {position}: {problem}")
    return [entry for entry in entries if entry["samples"] > 0]


def index_datasets(datasets: list[str]) -> DatasetIndex:
    """Each dataset's manifest read and checked once, and its storage listed once (one listing is many requests
    on S3)."""
    shards: dict[str, list[ShardRef]] = {kind: [] for kind in KINDS}
    digests = {}
    for dataset in datasets:
        manifest, digests[dataset] = read_manifest(dataset)
        listed = _manifest_shards(dataset, manifest)
        stored = set(open_storage(dataset).list()) if listed else set()
        missing = [entry["name"] for entry in listed if entry["name"] not in stored]
        if missing:
            raise ShardDataError(f"{dataset}: {len(missing)} shard(s) named in the manifest are missing, e.g. "
                                 f"{', '.join(missing[:3])}")
        for entry in listed:
            shards[entry["kind"]].append(ShardRef(dataset, entry["name"], entry["samples"], entry["sha256"]))
    return DatasetIndex(shards, digests)


def shards_for_worker(shards: list[ShardRef], seed: int, stream: str, epoch: int, rank: int, world_size: int,
                      worker: int, workers: int) -> list[ShardRef]:
    """This epoch's shards for one (rank, worker): a seeded shuffle dealt round-robin."""
    order = list(shards)
    random.Random(sample_seed(seed, stream, "shards", epoch)).shuffle(order)
    return order[rank::world_size][worker::workers]


def read_shard_bytes(ref: ShardRef, attempts: int = 8, backoff_seconds: float = 1.0) -> bytes:
    """The shard's bytes, retried with exponential backoff (capped at a minute) through storage outages; after
    `attempts` the run fails naming the shard, so no shard is ever skipped."""
    if not SHARD_NAME.fullmatch(ref.name):
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


def _shard_entries(ref: ShardRef, data: bytes) -> list[dict]:
    """The shard's tar entries grouped by key (as WebDataset reads them). A cut-short or damaged tar, a member
    name twice or a key in two places is a ShardDataError naming the shard: the checks that matter with
    verify_sha256 off, since tar readers stop quietly where a cut falls between members."""
    if not data.endswith(bytes(2 * tarfile.BLOCKSIZE)):
        raise ShardDataError(f"{ref.url}: truncated (it does not end with a tar's two zero blocks)")
    try:
        entries = list(group_by_keys(tar_file_expander([{"stream": io.BytesIO(data), "url": ref.url}])))
    except (tarfile.TarError, EOFError) as error:
        reason = str(error.args[0] if error.args else error).split(" @ ")[0]  # webdataset appends the stream
        raise ShardDataError(f"{ref.url}: not a whole tar, truncated or damaged ({reason})") from None
    except ValueError as error:  # webdataset's group_by_keys: a member name seen twice in a row
        reason = str(error.args[0] if error.args else error).split(" dict_keys")[0]
        raise ShardDataError(f"{ref.url}: duplicate member ({reason})") from None
    twice = sorted(key for key, count in Counter(entry["__key__"] for entry in entries).items() if count > 1)
    if twice:
        raise ShardDataError(f"{ref.url}: duplicate sample key {twice[0]!r} (members of one sample in two places)")
    return entries


def _text_block(ref: ShardRef, entry: dict) -> np.ndarray:
    """A text entry's [segments, text_len] block of ids."""
    try:
        block = np.load(io.BytesIO(entry["ids.npy"]), allow_pickle=False)
    except ValueError as error:
        raise ShardDataError(f"{ref.url}: {entry['__key__']}.ids.npy is not a readable array ({error})") from None
    if block.ndim != 2:
        raise ShardDataError(f"{ref.url}: {entry['__key__']}.ids.npy has shape {block.shape}, not [segments, length]")
    return block


def read_shard_samples(ref: ShardRef, verify_sha256: bool, attempts: int = 8,
                       backoff_seconds: float = 1.0) -> list[tuple[str, dict]]:
    """(key, fields) per training sample of one shard; a text entry's block gives one sample per segment."""
    data = read_shard_bytes(ref, attempts, backoff_seconds)
    if verify_sha256 and hashlib.sha256(data).hexdigest() != ref.sha256:
        raise ShardDataError(f"{ref.url}: sha256 differs from the manifest's (the shard was altered or truncated)")
    kind = ref.name.partition("-")[0]
    samples = []
    for entry in _shard_entries(ref, data):
        key = f"{ref.name}/{entry['__key__']}"
        missing = REQUIRED_FIELDS[kind] - entry.keys()
        if missing:
            raise ShardDataError(f"{ref.url}: sample {entry['__key__']} has no {', '.join(sorted(missing))} (the "
                                 "shard was truncated or altered)")
        if kind == "text":
            block = _text_block(ref, entry)
            samples += [(f"{key}/{row}", {"ids": block[row]}) for row in range(block.shape[0])]
        else:
            samples.append((key, entry))
    if len(samples) != ref.samples:
        raise ShardDataError(f"{ref.url}: holds {len(samples)} samples, the manifest says {ref.samples} (the shard "
                             "was truncated or altered)")
    return samples


def _jitter(pixels: torch.Tensor, strength: float, rng: random.Random) -> torch.Tensor:
    """Brightness, contrast and saturation factors drawn from [1 - s, 1 + s], applied in that order."""
    if strength == 0:
        return pixels
    low, high = max(0.0, 1 - strength), 1 + strength
    pixels = TF.adjust_brightness(pixels, rng.uniform(low, high))
    pixels = TF.adjust_contrast(pixels, rng.uniform(low, high))
    return TF.adjust_saturation(pixels, rng.uniform(low, high))


class SampleDecoder:
    """Stored fields -> model inputs for one sample: the replayed view, its codes, masks and ids."""

    def __init__(self, settings: StreamSettings):
        self.settings = settings
        self.block_masking = BlockMasking(settings.grid, masked_patch_count(settings.grid, settings.image_ratio))
        self.text_masking = TextMasking(settings.text_rate, settings.mask_id)
        self.caption_masking = TextMasking(settings.caption_rate, settings.mask_id)

    def _image(self, key: str, fields: dict, epoch: int, masked: bool) -> dict:
        s = self.settings
        rng = random.Random(sample_seed(s.seed, s.stream, key, epoch, "view"))
        views = [View.from_json(v) for v in json.loads(fields["views.json"])]
        choice = rng.randrange(len(views))
        with Image.open(io.BytesIO(fields["jpg"])) as image:
            stored = TF.pil_to_tensor(image.convert("RGB"))
        view = render_view(stored, views[choice], s.image_size)
        pixels = _jitter(view.float() / 255, s.color_jitter, rng)
        out = {"image": (pixels - IMAGE_MEAN) / IMAGE_STD}
        if s.tokenizer_view_size:
            out["tokenizer_image"] = render_view(stored, views[choice], s.tokenizer_view_size).float() / 255
        elif "codes.npy" in fields:
            codes = np.load(io.BytesIO(fields["codes.npy"]), allow_pickle=False)[choice]
            if codes.shape != (s.grid, s.grid):
                raise ShardDataError(
                    f"{key}: stored codes are a {codes.shape[0]}x{codes.shape[1]} grid but the model has "
                    f"{s.grid}x{s.grid} patches; rebuild the shards with image.tokenizer_view_size set to "
                    f"{s.grid} x the tokenizer's patch size, or use data.visual_codes: on_the_fly")
            out["codes"] = torch.from_numpy(codes.reshape(-1).astype(np.int64))
        else:
            raise ShardDataError(f"{key}: the shards hold no visual codes; set data.visual_codes: on_the_fly")
        if masked:
            out["image_mask"] = torch.from_numpy(
                self.block_masking(sample_seed(s.seed, s.stream, key, epoch, "mask")).reshape(-1))
        return out

    def __call__(self, key: str, fields: dict, epoch: int) -> dict:
        s = self.settings
        if s.stream == "text":
            return {"ids": np.asarray(fields["ids"], dtype=np.int64), "masking": self.text_masking,
                    "mask_seed": sample_seed(s.seed, s.stream, key, epoch, "text")}
        sample = self._image(key, fields, epoch, masked=s.stream == "image" or s.mask_pair_images)
        if s.stream == "pair":
            sample.update(ids=np.load(io.BytesIO(fields["ids.npy"]), allow_pickle=False).astype(np.int64),
                          masking=self.caption_masking, mask_seed=sample_seed(s.seed, s.stream, key, epoch, "text"))
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


def build_loader(dataset: MicroBatchStream, workers: int, prefetch_batches: int) -> DataLoader:
    """Worker processes prepare micro-batches; `in_order` keeps the round-robin that resume relies on, and a
    private generator keeps the loader from drawing on the rank's RNG (which drop path uses)."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, in_order=True, generator=torch.Generator(),
                      prefetch_factor=prefetch_batches if workers else None, persistent_workers=False)
