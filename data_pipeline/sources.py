"""Listing the inputs and planning the shards: which sample goes to which shard, decided before any work.

The plan is a pure function of the input listing (sorted) and the config, so a re-run of an interrupted
job plans the same shards with the same samples, skips the finished ones, and redoes the rest identically.
Image shards hold `samples_per_shard` images in listing order; a text shard holds the packed segments of
one input file (split large corpora into files of the size a shard should have).
"""

import io
import tarfile
from dataclasses import dataclass

from .config import DataConfig, ImageNetSource, TextSource
from .shards import shard_name
from .storage import open_storage

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst")


@dataclass(frozen=True)
class ImageItem:
    """One image: `name` under the source's root, or `member` of the tar at `name`; `label` is the synset."""

    source: str
    root: str
    name: str
    member: str | None
    label: str
    index: int


@dataclass(frozen=True)
class TextFile:
    source: str
    root: str
    name: str
    index: int


@dataclass(frozen=True)
class ShardPlan:
    kind: str
    index: int
    items: tuple

    @property
    def name(self) -> str:
        return shard_name(self.kind, self.index)


def list_imagenet(source: ImageNetSource) -> list[ImageItem]:
    """Class folders (`n01440764/x.JPEG`) and per-class tars (`n01440764.tar`), in sorted order."""
    storage = open_storage(source.path)
    found: list[tuple[str, str | None, str]] = []
    for name in storage.list():
        lowered = name.lower()
        if lowered.endswith(IMAGE_SUFFIXES) and "/" in name:
            found.append((name, None, name.split("/")[0]))
        elif lowered.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(name))) as archive:
                members = sorted(m.name for m in archive.getmembers()
                                 if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES))
            label = name.rsplit("/", 1)[-1][: -len(".tar")]
            found.extend((name, member, label) for member in members)
    if not found:
        raise FileNotFoundError(f"source {source.name}: no images under {source.path}")
    return [ImageItem(source.name, source.path, name, member, label, index)
            for index, (name, member, label) in enumerate(sorted(found, key=lambda f: (f[0], f[1] or "")))]


def list_text(source: TextSource) -> list[TextFile]:
    """The corpus files a text source names: files directly, or every text file inside a named folder."""
    files: list[tuple[str, str]] = []
    for path in source.paths:
        root, _, name = path.rstrip("/").rpartition("/")
        storage = open_storage(root or ".")
        if name.lower().endswith(TEXT_SUFFIXES) and storage.exists(name):
            files.append((root or ".", name))
            continue
        inside = [n for n in open_storage(path).list() if n.lower().endswith(TEXT_SUFFIXES)]
        if not inside:
            raise FileNotFoundError(f"source {source.name}: no text files at {path}")
        files.extend((path, n) for n in inside)
    return [TextFile(source.name, root, name, index) for index, (root, name) in enumerate(files)]


def plan_shards(config: DataConfig) -> list[ShardPlan]:
    images = [item for s in config.sources if isinstance(s, ImageNetSource) for item in list_imagenet(s)]
    texts = [item for s in config.sources if isinstance(s, TextSource) for item in list_text(s)]
    size = config.samples_per_shard
    plans = [ShardPlan("image", i, tuple(images[start : start + size]))
             for i, start in enumerate(range(0, len(images), size))]
    plans += [ShardPlan("text", i, (text_file,)) for i, text_file in enumerate(texts)]
    return plans
