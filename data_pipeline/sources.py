"""Listing the inputs and planning the shards: which sample goes to which shard, decided before any work.

The plan is a pure function of the input listing (sorted) and the config, so a re-run of an interrupted
job plans the same shards with the same samples, skips the finished ones, and redoes the rest identically.
Image shards hold `samples_per_shard` images of class folders in listing order, and so do pair shards from
tables and COCO annotations; an input tar (a per-class ImageNet tar, or a WebDataset tar of pairs) becomes one
planned shard, so it is read once; a text shard holds the packed segments of one input file or file part. A
planned shard that exceeds the sample or byte target is written as several parts (see `DataConfig`).
"""

import csv
import io
import json
from dataclasses import dataclass

import pyarrow.parquet

from .config import CocoPairSource, DataConfig, ImageNetSource, TablePairSource, TextSource, WebDatasetPairSource
from .shards import shard_name
from .storage import open_storage

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst")


@dataclass(frozen=True)
class ImageItem:
    """One image file at `name` under the source's root; `label` is the synset (its class folder)."""

    source: str
    root: str
    name: str
    label: str
    index: int


@dataclass(frozen=True)
class ImageTar:
    """One per-class tar (`n01440764.tar`); it becomes one planned shard, read once when that shard is built."""

    source: str
    root: str
    name: str
    label: str
    index: int


@dataclass(frozen=True)
class TextFile:
    """A corpus file, or the lines of it that begin in bytes [start, stop) (stop None: the whole file)."""

    source: str
    root: str
    name: str
    index: int
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class PairItem:
    """One image-text pair from a table or COCO annotations: the image at `name` under `root`. A table row
    that could not be parsed carries the reason it is skipped, one whose text needed repair the repair: both
    are counted when its shard is built."""

    source: str
    root: str
    name: str
    caption: str
    index: int
    skipped: str = ""
    repaired: str = ""


@dataclass(frozen=True)
class PairTar:
    """One input WebDataset tar of pairs; its samples are read when the shard is built."""

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


def list_imagenet(source: ImageNetSource) -> tuple[list[ImageItem], list[ImageTar]]:
    """Images in class folders (`n01440764/x.JPEG`) and per-class tars (`n01440764.tar`), in sorted order."""
    names = open_storage(source.path).list()
    files = [name for name in names if name.lower().endswith(IMAGE_SUFFIXES) and "/" in name]
    tars = [name for name in names if name.lower().endswith(".tar")]
    if not files and not tars:
        raise FileNotFoundError(f"source {source.name}: no images under {source.path}")
    return ([ImageItem(source.name, source.path, name, name.split("/")[0], index) for index, name in enumerate(files)],
            [ImageTar(source.name, source.path, name, name.rsplit("/", 1)[-1][: -len(".tar")], index)
             for index, name in enumerate(tars)])


def list_text(source: TextSource, part_bytes: int) -> list[TextFile]:
    """The corpus files a text source names (files directly, or every text file inside a named folder), with
    uncompressed line-per-document files cut into parts of `part_bytes`."""
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
    parts = []
    for root, name in files:
        splittable = name.endswith((".txt", ".jsonl")) and (name.endswith(".jsonl") or source.documents == "line")
        size = open_storage(root).size(name) if splittable else 0
        if size > part_bytes:
            parts += [(root, name, start, min(start + part_bytes, size)) for start in range(0, size, part_bytes)]
        else:
            parts.append((root, name, 0, None))
    return [TextFile(source.name, root, name, index, start, stop)
            for index, (root, name, start, stop) in enumerate(parts)]


def _split_url(url: str) -> tuple[str, str]:
    root, _, name = url.rstrip("/").rpartition("/")
    return root or ".", name


def _decoded(data: bytes) -> tuple[str, bool]:
    """The text, and whether invalid UTF-8 in it had to be replaced."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _json_rows(text: str, wanted: list[str]) -> tuple[list[str], list[tuple[object, object, str]]]:
    """The columns and (image, caption, skip reason) rows of a JSON-lines table; a line that is not a JSON
    object is a row skipped as bad_json. Lines end at newlines only: JSON strings may hold U+2028 and the like."""
    columns, rows = set(), []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            rows.append((None, None, "bad_json"))
            continue
        columns.update(record)
        rows.append((record.get(wanted[0]), record.get(wanted[1]), ""))
    return sorted(columns), rows


def _read_table(source: TablePairSource) -> list[tuple[object, object, str, str]]:
    """(image path, caption, skip reason, repair) rows; a table without the configured columns is an error
    before any work. Lines that are not JSON objects and text that is not UTF-8 are counted, not fatal."""
    root, name = _split_url(source.table)
    data = open_storage(root).read_bytes(name)
    wanted = [source.image_column, source.caption_column]
    if name.endswith(".parquet"):
        table = pyarrow.parquet.read_table(io.BytesIO(data))
        columns = table.column_names
        pairs = zip(*(table.column(c).to_pylist() for c in wanted)) if set(wanted) <= set(columns) else []
        rows = [(image, caption, "") for image, caption in pairs]
        replaced = False  # Arrow strings are valid UTF-8
    elif name.endswith(".jsonl"):
        text, replaced = _decoded(data)
        columns, rows = _json_rows(text, wanted)
    elif name.endswith(".tsv"):
        text, replaced = _decoded(data)
        reader = csv.DictReader(io.StringIO(text), delimiter="\t")
        columns = reader.fieldnames or []
        rows = [(record.get(wanted[0]), record.get(wanted[1]), "") for record in reader]
    else:
        raise ValueError(f"source {source.name}: {source.table} is not a .parquet, .jsonl or .tsv table")
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise ValueError(f"source {source.name}: {source.table} has no column {', '.join(map(repr, missing))} "
                         f"(columns: {', '.join(map(str, columns))}); set image_column / caption_column")
    return [(image, caption, skipped, "invalid_utf8_replaced" if replaced and "\ufffd" in f"{image}{caption}" else "")
            for image, caption, skipped in rows]


def list_pair_table(source: TablePairSource) -> list[PairItem]:
    return [PairItem(source.name, source.images, str(image or ""), str(caption or ""), index, skipped, repaired)
            for index, (image, caption, skipped, repaired) in enumerate(_read_table(source))]


def list_coco(source: CocoPairSource) -> list[PairItem]:
    root, name = _split_url(source.annotations)
    try:
        document = json.loads(open_storage(root).read_bytes(name))
        files = {image["id"]: image["file_name"] for image in document["images"]}
        annotations = sorted(document["annotations"], key=lambda a: a["id"])
        pairs = [(files.get(a["image_id"], ""), a.get("caption") or "") for a in annotations]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"source {source.name}: {source.annotations} is not COCO caption annotations "
                         f"({type(error).__name__}: {error})") from None
    return [PairItem(source.name, source.images, file, caption, index)
            for index, (file, caption) in enumerate(pairs)]


def list_pair_tars(source: WebDatasetPairSource) -> list[PairTar]:
    tars = [name for name in open_storage(source.path).list() if name.endswith(".tar")]
    if not tars:
        raise FileNotFoundError(f"source {source.name}: no .tar files under {source.path}")
    return [PairTar(source.name, source.path, name, index) for index, name in enumerate(tars)]


def _chunks(items: list, size: int) -> list[tuple]:
    return [tuple(items[start : start + size]) for start in range(0, len(items), size)]


def plan_shards(config: DataConfig) -> list[ShardPlan]:
    images, image_tars, texts, pairs, pair_tars = [], [], [], [], []
    for source in config.sources:
        if isinstance(source, ImageNetSource):
            files, tars = list_imagenet(source)
            images += files
            image_tars += tars
        elif isinstance(source, TextSource):
            texts += list_text(source, config.text_shard_bytes)
        elif isinstance(source, TablePairSource):
            pairs += list_pair_table(source)
        elif isinstance(source, CocoPairSource):
            pairs += list_coco(source)
        else:
            pair_tars += list_pair_tars(source)
    size = config.samples_per_shard
    image_units = _chunks(images, size) + [(image_tar,) for image_tar in image_tars]
    plans = [ShardPlan("image", i, unit) for i, unit in enumerate(image_units)]
    plans += [ShardPlan("text", i, (text_file,)) for i, text_file in enumerate(texts)]
    pair_units = _chunks(pairs, size) + [(pair_tar,) for pair_tar in pair_tars]
    plans += [ShardPlan("pair", i, unit) for i, unit in enumerate(pair_units)]
    return plans
