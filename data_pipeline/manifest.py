"""The manifest: every finished shard file with its sample count, bytes and sha256, and per-source counts.

Each file names the planned shard it belongs to (`shard`): the planned shard itself, or a further part of one
that exceeded the sample or byte target. A planned shard whose every input was skipped is listed with zero
samples and has no file.

It is rewritten atomically as shards complete, and a planned shard enters it only once all its tars are fully
stored, so the manifest never names a partial shard. It also records a digest of the content-defining
config, so that a resumed job refuses to mix shards built under different settings, and the `contract`: what
every sample holds, which a reader checks the shards' untrusted bytes against.
"""

import hashlib
import json
from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from beit3.tokenizers.images import DEFAULT_MAX_PIXELS

from .config import DataConfig
from .storage import Storage, local_copy
from .views import ViewSettings

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2


class ManifestMismatch(ValueError):
    """Existing output built with a different content-defining config."""


def content_digest(config: DataConfig) -> str:
    """sha256 of every setting that changes shard contents (not where they go or how many workers run)."""
    settings = config.model_dump(mode="json", exclude={"output", "ray"})
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
    return hashlib.sha256(Path(local_copy(url)).read_bytes()).hexdigest()


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
    files_of: dict[str, list[str]] = field(default_factory=dict)
    """Planned shard name -> the names of its files."""

    def add(self, entries: list[dict]) -> None:
        """The entries of one planned shard's files, all stored."""
        for entry in entries:
            self.shards[entry["name"]] = entry
        self.files_of[entries[0]["shard"]] = [entry["name"] for entry in entries]

    def is_done(self, shard: str, storage: Storage) -> bool:
        """Listed and stored, every part; a shard all of whose inputs were skipped is listed with no samples and
        no file."""
        names = self.files_of.get(shard)
        return bool(names) and all(self.shards[name]["samples"] == 0 or storage.exists(name) for name in names)

    def totals(self) -> dict[str, dict]:
        """Per source: samples written, skipped by reason, and inputs repaired by reason."""
        written: Counter = Counter()
        skipped: dict[str, Counter] = {}
        repaired: dict[str, Counter] = {}
        for entry in self.shards.values():
            written.update(entry["written"])
            for source, reasons in entry["skipped"].items():
                skipped.setdefault(source, Counter()).update(reasons)
            for source, reasons in entry["repaired"].items():
                repaired.setdefault(source, Counter()).update(reasons)
        sources = sorted(set(written) | set(skipped) | set(repaired))
        return {source: {"written": written.get(source, 0), "skipped": dict(skipped.get(source, {})),
                         "repaired": dict(repaired.get(source, {}))} for source in sources}

    def to_json(self) -> bytes:
        shards = [self.shards[name] for name in sorted(self.shards)]
        document = {"format": FORMAT_VERSION, "name": self.name, "config_digest": self.config_digest,
                    "contract": self.contract, "shards": shards, "sources": self.totals()}
        return json.dumps(document, indent=1, sort_keys=True).encode()

    def save(self, storage: Storage) -> None:
        storage.write_atomic(MANIFEST_NAME, self.to_json())


def load_or_start(storage: Storage, config: DataConfig) -> Manifest:
    digest = content_digest(config)
    if not storage.exists(MANIFEST_NAME):
        return Manifest(config.name, digest, shard_contract(config))
    document = json.loads(storage.read_bytes(MANIFEST_NAME))
    if document.get("config_digest") != digest:
        raise ManifestMismatch(
            f"{storage.url(MANIFEST_NAME)} was built with different content settings (config digest "
            f"{document.get('config_digest', '?')[:12]}, this config {digest[:12]}); write to a new output "
            "or restore the config it was built with"
        )
    contract = shard_contract(config)
    if document.get("contract", contract) != contract:
        changed = sorted(name for name in contract if document["contract"].get(name) != contract[name])
        raise ManifestMismatch(f"{storage.url(MANIFEST_NAME)} was built with other tokenizer files or settings "
                               f"(contract fields {', '.join(changed)} differ); write to a new output or restore them")
    manifest = Manifest(document["name"], digest, contract)
    for entry in document["shards"]:
        manifest.shards[entry["name"]] = entry
        manifest.files_of.setdefault(entry["shard"], []).append(entry["name"])
    return manifest
