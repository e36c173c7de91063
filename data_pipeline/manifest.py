"""The manifest: every finished shard file with its sample count, bytes and sha256, and per-source counts.

Each file names the planned shard it belongs to (`shard`): the planned shard itself, or a further part of one
that exceeded the sample or byte target. A planned shard whose every input was skipped is listed with zero
samples and has no file.

It is rewritten atomically as shards complete, and a planned shard enters it only once all its tars are fully
stored, so the manifest never names a partial shard. It also records a digest of the content-defining
config, so that a resumed job refuses to mix shards built under different settings.
"""

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from .config import DataConfig
from .storage import Storage

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2


class ManifestMismatch(ValueError):
    """Existing output built with a different content-defining config."""


def content_digest(config: DataConfig) -> str:
    """sha256 of every setting that changes shard contents (not where they go or how many workers run)."""
    settings = config.model_dump(mode="json", exclude={"output", "ray"})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class Manifest:
    name: str
    config_digest: str
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
                    "shards": shards, "sources": self.totals()}
        return json.dumps(document, indent=1, sort_keys=True).encode()

    def save(self, storage: Storage) -> None:
        storage.write_atomic(MANIFEST_NAME, self.to_json())


def load_or_start(storage: Storage, config: DataConfig) -> Manifest:
    digest = content_digest(config)
    if not storage.exists(MANIFEST_NAME):
        return Manifest(config.name, digest)
    document = json.loads(storage.read_bytes(MANIFEST_NAME))
    if document.get("config_digest") != digest:
        raise ManifestMismatch(
            f"{storage.url(MANIFEST_NAME)} was built with different content settings (config digest "
            f"{document.get('config_digest', '?')[:12]}, this config {digest[:12]}); write to a new output "
            "or restore the config it was built with"
        )
    manifest = Manifest(document["name"], digest)
    for entry in document["shards"]:
        manifest.shards[entry["name"]] = entry
        manifest.files_of.setdefault(entry["shard"], []).append(entry["name"])
    return manifest
