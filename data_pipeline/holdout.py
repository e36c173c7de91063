"""Held-out samples: which samples of a source are kept out of training, and the shards they go to.

A sample is held out by a seeded hash of a stable key: its source-relative path (an image file, a table or COCO
pair's image, so every caption of an image lands on the same side), `tar:member` for a member of an input tar,
and a text document's own content (duplicates of a document all land on the same side). The choice depends only
on the build's seed, the source's name and that key, so it stays the same when other sources are added or the
listing order changes.

Where held-out samples go depends on when they are known:
- listed before any work (class-folder images, members of uncompressed input tars, table and COCO pairs): they
  are planned into shards of their own, `val-{kind}-{index:06d}.tar`, filled to `samples_per_shard` like
  training shards and numbered after the kind's training shards, so a paper-scale build gets a few full
  validation shards, not one tiny file per training shard; such a source may hold out a `count` (the keys with
  the smallest hashes) or a `fraction`;
- seen only while a planned shard is read (members of a compressed input tar, text documents): they are routed
  while it is built into its own `val-{kind}-{index:06d}.tar` (and `-{part:03d}` parts), named after the
  training shard, listed and resumed with it. Only a `fraction` applies there: how many such samples exist is
  not known before they are read. Text thus gets one small validation file per text shard; its documents are
  known only while reading, and gathering them into fewer files would make a shard's bytes depend on others.

Both keep a planned shard's bytes a function of its plan, so reruns are byte-identical and resume as before.
"""

import hashlib
from dataclasses import dataclass

from .config import DataConfig, Validation
from .shards import shard_name
from .sources import ShardPlan

VALIDATION_PREFIX = "val-"
"""Held-out shard files are named like training shards behind this prefix."""
HASH_RANGE = 2**64


def validation_name(kind: str, index: int, part: int = 0) -> str:
    return VALIDATION_PREFIX + shard_name(kind, index, part)


def is_validation_name(name: str) -> bool:
    return name.startswith(VALIDATION_PREFIX)


@dataclass(frozen=True)
class ValidationPlan(ShardPlan):
    """A planned shard of held-out samples only (listed before any work)."""

    @property
    def name(self) -> str:
        return validation_name(self.kind, self.index)


def _hasher(seed: int, source: str):
    return hashlib.blake2b(f"{seed}\0{source}\0".encode(), digest_size=8)


def key_hash(seed: int, source: str, key: str) -> int:
    """The seeded 64-bit hash a sample's held-out choice is made from."""
    hasher = _hasher(seed, source)
    hasher.update(key.encode("utf-8", "surrogatepass"))  # tar member names may hold undecodable bytes
    return int.from_bytes(hasher.digest(), "big")


def _below(fraction: float) -> int:
    return int(fraction * HASH_RANGE)


def _settings(config: DataConfig) -> dict[str, Validation]:
    return {source.name: source.validation for source in config.sources if source.validation is not None}


def listed_key(item) -> str | None:
    """The key of a sample listed before any work: `tar:member` for a sample of an input tar (an item with a
    `key`), else its file (an image, or a pair's image) under the source; None for what is no sample (a table
    row or tar stretch that will be counted as skipped)."""
    if getattr(item, "reason", "") or getattr(item, "skipped", "") or not item.name:
        return None
    member = getattr(item, "key", None)
    return item.name if member is None else f"{item.name}:{member}"


def split_listed(items: list, config: DataConfig, read_while_building: list = ()) -> tuple[list, list]:
    """(training, held out) of listed images or pairs, each in the order given. Items that carry a skip reason
    (an unparsable table row) stay in training, where they are counted. A `count` is refused for a source that
    also has samples seen only while building (`read_while_building`: compressed input tars), and must leave
    some of the source for training."""
    settings = _settings(config)
    if not settings:
        return items, []
    for item in read_while_building:
        if (validation := settings.get(item.source)) is not None and validation.count is not None:
            raise ValueError(f"source {item.source}: validation.count needs every sample listed before the build, "
                             f"but {item.name} is an input tar read only while building; use validation.fraction")
    held_keys: set[tuple[str, str]] = set()
    keys_of: dict[str, set[str]] = {}
    for item in items:
        if item.source in settings and (key := listed_key(item)) is not None:
            keys_of.setdefault(item.source, set()).add(key)
    for source, keys in sorted(keys_of.items()):
        validation = settings[source]
        hashes = sorted((key_hash(config.seed, source, key), key) for key in keys)
        if validation.count is not None:
            if validation.count >= len(hashes):
                raise ValueError(f"source {source}: validation.count {validation.count:,} leaves nothing to train "
                                 f"on ({len(hashes):,} samples listed)")
            chosen = hashes[: validation.count]
        else:
            chosen = [(value, key) for value, key in hashes if value < _below(validation.fraction)]
        held_keys.update((source, key) for _, key in chosen)
    training, held_out = [], []
    for item in items:
        (held_out if (item.source, listed_key(item)) in held_keys else training).append(item)
    return training, held_out


def validation_plans(kind: str, held_out: list, first_index: int, samples_per_shard: int) -> list[ValidationPlan]:
    """Held-out listed samples in shards of `samples_per_shard`, numbered from `first_index` (after the kind's
    training shards, whose held-out tar members take their own numbers)."""
    return [ValidationPlan(kind, first_index + number, tuple(held_out[start : start + samples_per_shard]))
            for number, start in enumerate(range(0, len(held_out), samples_per_shard))]


def held_out_while_building(plan: ShardPlan, source: str, provenance: dict, config: DataConfig) -> bool:
    """Whether a sample of a planned image or pair shard goes to validation: every sample of a
    `ValidationPlan`; a member of an input tar by the hash of `tar:member` against the source's fraction (the
    tar may be one read whole only now; a member listed before the build was split with the same hash, so the
    answer agrees); no other listed sample (they were split at planning)."""
    if isinstance(plan, ValidationPlan):
        return True
    member = provenance.get("member", provenance.get("key"))
    validation = _settings(config).get(source)
    if member is None or validation is None or validation.fraction is None:
        return False
    return key_hash(config.seed, source, f"{provenance['file']}:{member}") < _below(validation.fraction)


def document_splitter(config: DataConfig, source: str):
    """For a text source with `validation`, a function from a batch of documents to (training, held out), each
    in order, by the seeded hash of each document's text; None for a source without it."""
    validation = _settings(config).get(source)
    if validation is None:
        return None
    base, threshold = _hasher(config.seed, source), _below(validation.fraction)

    def split(documents: list[str]) -> tuple[list[str], list[str]]:
        training, held_out = [], []
        for document in documents:
            hasher = base.copy()
            hasher.update(document.encode("utf-8", "surrogatepass"))
            (held_out if int.from_bytes(hasher.digest(), "big") < threshold else training).append(document)
        return training, held_out

    return split
