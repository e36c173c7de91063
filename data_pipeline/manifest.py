"""The manifest: every finished shard file with its sample count, bytes and sha256, and per-source counts.

Each file names the planned shard it belongs to (`shard`): the planned shard itself, or a further part of one
that exceeded the sample or byte target. A planned shard whose every input was skipped is listed with zero
samples and has no file. Held-out files (`val-*.tar`, see `holdout`) are listed apart, in `validation_shards`,
with entries of the same schema; `code_usage` gives, per source, how its visual codes spread over the codebook.

It is rewritten atomically as shards complete, and a planned shard enters it only once all its tars are fully
stored, so the manifest never names a partial shard. It also records a digest of the content-defining
config, so that a resumed job refuses to mix shards built under different settings, and the `contract`: what
every sample holds, which a reader checks the shards' untrusted bytes against.
"""

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from beit3.tokenizers.images import DEFAULT_MAX_PIXELS

from .config import DataConfig
from .holdout import is_validation_name
from .storage import Storage, local_copy
from .views import ViewSettings

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2


class ManifestMismatch(ValueError):
    """Existing output built with a different content-defining config."""


def content_digest(config: DataConfig) -> str:
    """sha256 of every setting that changes shard contents (not where they go or how many workers run)."""
    settings = config.model_dump(mode="json", exclude={"output", "ray", "planned_use"})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class VisualTokenizerRecord(BaseModel):
    """Which visual tokenizer made a build's codes: its kind, codebook, patch size and a digest of its weights
    (of the checkpoint file's bytes, or of the settings a seeded tokenizer is built from)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: str
    codebook_size: PositiveInt
    patch_size: PositiveInt
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DataContract(BaseModel):
    """What every sample of a build holds and how it was made: what a trainer must agree with (checked before
    a run starts, see beit3.pretrain.data_contract) and what each untrusted shard field is checked against
    when read. A manifest written before a field was recorded leaves it unset (`model_fields_set` tells)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    text_len: PositiveInt | None = None
    caption_len: PositiveInt | None = None
    views_per_image: PositiveInt | None = None
    shorter_side: PositiveInt | None = None
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    views: ViewSettings | None = None
    tokenizer_view_size: PositiveInt | None = None
    code_grid: PositiveInt | None = Field(None, description="Rows (= columns) of each view's codes; None: no codes.")
    visual_tokenizer: VisualTokenizerRecord | None = None
    text_tokenizer_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


def _file_sha256(url: str) -> str:
    with open(local_copy(url), "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _visual_tokenizer_record(config: DataConfig) -> VisualTokenizerRecord | None:
    tokenizer = config.visual_tokenizer
    if tokenizer is None:
        return None
    weights = (_file_sha256(tokenizer.checkpoint) if tokenizer.checkpoint else
               hashlib.sha256(tokenizer.model_dump_json().encode()).hexdigest())
    return VisualTokenizerRecord(kind=tokenizer.kind, codebook_size=tokenizer.codebook_size,
                                 patch_size=tokenizer.patch_size, weights_sha256=weights)


def shard_contract(config: DataConfig) -> dict:
    """What every sample of this build holds and how it was made (`DataContract`): text segments of `text_len`
    ids, captions of at most `caption_len`, `views_per_image` views drawn with `image.views`, stored images never
    upscaled past `shorter_side` nor larger than `max_pixels`, codes on a grid of the tokenizer view over its
    patch size, and digests of both tokenizers. Reads the tokenizer files once."""
    image, visual = config.image, _visual_tokenizer_record(config)
    contract = DataContract(
        text_len=config.text_len, caption_len=config.caption_len, views_per_image=image.views_per_image,
        shorter_side=image.shorter_side, max_pixels=image.max_pixels, views=image.views,
        tokenizer_view_size=image.tokenizer_view_size,
        code_grid=image.tokenizer_view_size // visual.patch_size if visual else None, visual_tokenizer=visual,
        text_tokenizer_sha256=_file_sha256(config.text_tokenizer) if config.text_tokenizer else None)
    return contract.model_dump(mode="json")


@dataclass
class Manifest:
    name: str
    config_digest: str
    contract: dict
    """What every sample holds (`shard_contract`)."""
    shards: dict[str, dict] = field(default_factory=dict)
    """Every file, training (`shards` in the document) and held out (`validation_shards`), by name."""
    files_of: dict[str, list[str]] = field(default_factory=dict)
    """Planned shard name -> the names of its files."""
    code_counts: dict[str, np.ndarray] = field(default_factory=dict)
    """Per source, how often each visual code was stored, over every listed planned shard."""

    def add(self, entries: list[dict]) -> None:
        """The entries of one planned shard's files, all stored. The first may carry the shard's `code_counts`
        (per source), which are added up here, not listed; a planned shard listed before (redone because a file
        went missing) has the same bytes and codes, so its counts are not added twice."""
        code_counts = entries[0].pop("code_counts", {})
        if entries[0]["shard"] not in self.files_of:
            for source, counts in code_counts.items():
                self.code_counts[source] = self.code_counts.get(source, 0) + np.asarray(counts, dtype=np.int64)
        for entry in entries:
            self.shards[entry["name"]] = entry
        self.files_of[entries[0]["shard"]] = [entry["name"] for entry in entries]

    def is_done(self, shard: str, storage: Storage) -> bool:
        """Listed and stored, every part; a shard all of whose inputs were skipped is listed with no samples and
        no file."""
        names = self.files_of.get(shard)
        return bool(names) and all(self.shards[name]["samples"] == 0 or storage.exists(name) for name in names)

    def totals(self) -> dict[str, dict]:
        """Per source: training samples written, held-out samples (`validation`, for a source with any), skipped
        by reason, and inputs repaired by reason."""
        written: Counter = Counter()
        held_out: Counter = Counter()
        skipped: dict[str, Counter] = {}
        repaired: dict[str, Counter] = {}
        for entry in self.shards.values():
            (held_out if is_validation_name(entry["name"]) else written).update(entry["written"])
            for source, reasons in entry["skipped"].items():
                skipped.setdefault(source, Counter()).update(reasons)
            for source, reasons in entry["repaired"].items():
                repaired.setdefault(source, Counter()).update(reasons)
        sources = sorted(set(written) | set(held_out) | set(skipped) | set(repaired))
        return {source: {"written": written.get(source, 0), "skipped": dict(skipped.get(source, {})),
                         "repaired": dict(repaired.get(source, {})),
                         **({"validation": held_out[source]} if held_out[source] else {})} for source in sources}

    def code_usage(self) -> dict[str, dict]:
        """Per source with visual codes: how many distinct codes its stored views use, the perplexity of their
        histogram (exp of its entropy: the number of equally used codes that would give the same entropy) and
        the share of the most used code, with the histogram itself."""
        usage = {}
        for source, counts in sorted(self.code_counts.items()):
            total = int(counts.sum())
            shares = counts[counts > 0] / max(total, 1)
            usage[source] = {"codes_used": int((counts > 0).sum()),
                             "perplexity": round(math.exp(-(shares * np.log(shares)).sum()), 3),
                             "top_code_share": round(float(counts.max()) / max(total, 1), 6),
                             "codes_seen": total, "histogram": counts.tolist()}
        return usage

    def to_json(self) -> bytes:
        names = sorted(self.shards)
        document = {"format": FORMAT_VERSION, "name": self.name, "config_digest": self.config_digest,
                    "contract": self.contract, "sources": self.totals(), "code_usage": self.code_usage(),
                    "shards": [self.shards[name] for name in names if not is_validation_name(name)],
                    "validation_shards": [self.shards[name] for name in names if is_validation_name(name)]}
        return json.dumps(document, indent=1, sort_keys=True).encode()

    def save(self, storage: Storage) -> None:
        storage.write_atomic(MANIFEST_NAME, self.to_json())


def load_or_start(storage: Storage, config: DataConfig) -> Manifest:
    digest = content_digest(config)
    if not storage.exists(MANIFEST_NAME):
        return Manifest(config.name, digest, shard_contract(config))
    document = json.loads(storage.read_bytes(MANIFEST_NAME))
    if not document.get("shards"):  # a build that failed before finishing any shard: nothing to keep consistent
        return Manifest(config.name, digest, shard_contract(config))
    start_over = (f"to start over with this config, set `output` to a new location (e.g. "
                  f"{config.output.rstrip('/')}-2); the shards there are kept")
    if document.get("config_digest") != digest:
        raise ManifestMismatch(
            f"{storage.url(MANIFEST_NAME)} was built with different content settings (config digest "
            f"{document.get('config_digest', '?')[:12]}, this config {digest[:12]}); restore the config it was "
            f"built with to finish it, or {start_over}"
        )
    contract = shard_contract(config)
    if document.get("contract", contract) != contract:
        changed = sorted(name for name in contract if document["contract"].get(name) != contract[name])
        raise ManifestMismatch(f"{storage.url(MANIFEST_NAME)} was built with other tokenizer files or settings "
                               f"(contract fields {', '.join(changed)} differ); restore them to finish it, or "
                               f"{start_over}")
    manifest = Manifest(document["name"], digest, contract)
    for entry in document["shards"] + document.get("validation_shards", []):
        manifest.shards[entry["name"]] = entry
        manifest.files_of.setdefault(entry["shard"], []).append(entry["name"])
    for source, usage in document.get("code_usage", {}).items():
        manifest.code_counts[source] = np.asarray(usage["histogram"], dtype=np.int64)
    return manifest
