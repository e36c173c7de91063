"""Listing the inputs and planning the shards: which sample goes to which shard, decided before any work.

The plan is a pure function of the input listing (sorted) and the config, so a re-run of an interrupted
job plans the same shards with the same samples, skips the finished ones, and redoes the rest identically.
Image shards hold `samples_per_shard` images in a seeded permutation of everything listed: class-folder files and
the samples of per-class tars alike, so that no shard holds one class. Pair shards do the same with table and COCO
rows and the samples of downloader tars. Input tars are indexed first (headers only, see `tar_index`) and each of
their samples is read later with one range request; a compressed tar, which ranges cannot address, stays one
planned shard of its own. A text shard holds the packed segments of one input file or file part. A planned shard
that exceeds the sample or byte target is written as several parts (see `DataConfig`).
"""

import codecs
import csv
import io
import json
import logging
import random
import sys
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow
import pyarrow.parquet

from .config import CocoPairSource, DataConfig, ImageNetSource, TablePairSource, TextSource, WebDatasetPairSource
from .shards import shard_name
from .storage import open_storage
from .tar_index import TarIndex, image_samples, index_tar, pair_samples

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst")
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
"""Byte-order marks and the encodings they announce (UTF-32's little-endian mark begins like UTF-16's)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)  # the plan holds one per sample
class ImageItem:
    """One image file at `name` under the source's root; `label` is the synset (its class folder)."""

    source: str
    root: str
    name: str
    label: str
    index: int


@dataclass(frozen=True)
class ImageTar:
    """One per-class tar (`n01440764.tar`), whose label is its name. Its samples are planned one by one; compressed,
    it is one planned shard, read whole when that shard is built."""

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


@dataclass(frozen=True, slots=True)  # the plan holds one per sample
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
    """One input WebDataset tar of pairs. Its samples are planned one by one; compressed, it is one planned shard."""

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

    @property
    def inputs(self) -> str:
        """The input files the shard is built from, for messages."""
        def where(item) -> str:
            part = f" bytes {item.start}-{item.stop}" if isinstance(item, TextFile) and item.stop is not None else ""
            return f"{item.root.rstrip('/')}/{item.name}{part}"

        first, last = self.items[0], self.items[-1]
        return where(first) if len(self.items) == 1 else f"{len(self.items)} inputs, {where(first)} to {where(last)}"


def list_imagenet(source: ImageNetSource) -> tuple[list[ImageItem], list[ImageTar]]:
    """Images in class folders (`n01440764/x.JPEG`) and per-class tars (`n01440764.tar`), in sorted order."""
    names = open_storage(source.path).list()
    files = [name for name in names if name.lower().endswith(IMAGE_SUFFIXES) and "/" in name]
    tars = [name for name in names if name.lower().endswith(".tar")]
    if not files and not tars:
        raise FileNotFoundError(f"source {source.name}: no images under {source.path}")
    return ([ImageItem(source.name, source.path, name, sys.intern(name.split("/")[0]), index)  # one label per class
             for index, name in enumerate(files)],
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
        lower = name.lower()
        splittable = lower.endswith((".txt", ".jsonl")) and (lower.endswith(".jsonl") or source.documents == "line")
        size = open_storage(root).size(name) if splittable else 0
        # Parts are found by newline bytes, which UTF-16 and UTF-32 do not have: such files are read whole.
        if size > part_bytes and text_encoding(open_storage(root).read_range(name, 0, 4)).startswith("utf-8"):
            parts += [(root, name, start, min(start + part_bytes, size)) for start in range(0, size, part_bytes)]
        else:
            parts.append((root, name, 0, None))
    return [TextFile(source.name, root, name, index, start, stop)
            for index, (root, name, start, stop) in enumerate(parts)]


def _split_url(url: str) -> tuple[str, str]:
    root, _, name = url.rstrip("/").rpartition("/")
    return root or ".", name


def text_encoding(head: bytes) -> str:
    """The encoding the byte-order mark at the start of a text file announces; UTF-8 without one."""
    return next((encoding for mark, encoding in BYTE_ORDER_MARKS if head.startswith(mark)), "utf-8")


def decoded_text(data: bytes) -> tuple[str, str]:
    """A whole text file as it arrives (UTF-8, or UTF-8, UTF-16 or UTF-32 after a byte-order mark, which is
    dropped) as text, and the repair made: `invalid_utf8_replaced` (or utf16, utf32) when bytes that are not
    valid in the encoding had to be replaced, else ""."""
    encoding = text_encoding(data)
    try:
        return data.decode(encoding), ""
    except UnicodeDecodeError:
        repair = f"invalid_{encoding.removesuffix('-sig').replace('-', '')}_replaced"
        return data.decode(encoding, errors="replace"), repair


def parse_json(text: str) -> tuple[object, str]:
    """A JSON text's value, or None and why: `bad_json` (not JSON), or `json_over_limits` (JSON that Python's
    parser refuses: an integer of more than 4300 digits, nesting deeper than the recursion limit)."""
    try:
        return json.loads(text), ""
    except json.JSONDecodeError:
        return None, "bad_json"
    except (ValueError, RecursionError):
        return None, "json_over_limits"


def _json_rows(text: str, wanted: list[str]) -> tuple[list[str], list[tuple[object, object, str]]]:
    """The columns and (image, caption, skip reason) rows of a JSON-lines table; a line that is not a JSON
    object is a row skipped as bad_json (or json_over_limits). Lines end at newlines only: JSON strings may hold
    U+2028 and the like."""
    columns, rows = set(), []
    for line in text.split("\n"):
        if not line.strip():
            continue
        record, reason = parse_json(line)
        if not isinstance(record, dict):
            rows.append((None, None, reason or "bad_json"))
            continue
        columns.update(record)
        rows.append((record.get(wanted[0]), record.get(wanted[1]), ""))
    return sorted(columns), rows


def _log_skipped_rows(source_name: str, url: str, reasons: list[str]) -> None:
    """One line naming the table and what of it will be skipped (the counts reach the manifest with the shards)."""
    if counts := Counter(filter(None, reasons)):
        log.warning("source %s: %s: rows skipped %s", source_name, url,
                    ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items())))


def _tsv_rows(text: str, wanted: list[str]) -> tuple[list[str], list[tuple[object, object, str]]]:
    """The columns and (image, caption, skip reason) rows of a tab-separated table; a row the csv reader refuses
    (a field past its 128 KiB limit) is skipped as bad_row and reading goes on at the next line."""
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    try:
        columns = reader.fieldnames or []
    except csv.Error:
        columns = []
    rows = []
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return columns, rows
        except csv.Error:
            rows.append((None, None, "bad_row"))
            continue
        rows.append((record.get(wanted[0]), record.get(wanted[1]), ""))


def _read_table(source: TablePairSource) -> list[tuple[object, object, str, str]]:
    """(image path, caption, skip reason, repair) rows; a table without the configured columns is an error
    before any work. Unparsable lines and rows, text that is not valid in its encoding and a Parquet file that
    cannot be read (one row skipped as unreadable_table, logged with the file) are counted, not fatal."""
    root, name = _split_url(source.table)
    data = open_storage(root).read_bytes(name)
    wanted = [source.image_column, source.caption_column]
    repair = ""  # Arrow strings are valid UTF-8
    if name.endswith(".parquet"):
        try:
            table = pyarrow.parquet.read_table(io.BytesIO(data))
            columns = table.column_names
            pairs = zip(*(table.column(c).to_pylist() for c in wanted)) if set(wanted) <= set(columns) else []
            rows = [(image, caption, "") for image, caption in pairs]
        except (pyarrow.ArrowException, ValueError, OSError) as error:
            log.warning("source %s: %s skipped as unreadable_table (%s: %s)", source.name, source.table,
                        type(error).__name__, error)
            return [(None, None, "unreadable_table", "")]
    elif name.endswith((".jsonl", ".tsv")):
        text, repair = decoded_text(data)
        columns, rows = (_json_rows if name.endswith(".jsonl") else _tsv_rows)(text, wanted)
    else:
        raise ValueError(f"source {source.name}: {source.table} is not a .parquet, .jsonl or .tsv table")
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise ValueError(f"source {source.name}: {source.table} has no column {', '.join(map(repr, missing))} "
                         f"(columns: {', '.join(map(str, columns))}); set image_column / caption_column")
    _log_skipped_rows(source.name, source.table, [skipped for _, _, skipped in rows])
    return [(image, caption, skipped, repair if repair and "\ufffd" in f"{image}{caption}" else "")
            for image, caption, skipped in rows]


def list_pair_table(source: TablePairSource) -> list[PairItem]:
    return [PairItem(source.name, source.images, str(image or ""), str(caption or ""), index, skipped, repaired)
            for index, (image, caption, skipped, repaired) in enumerate(_read_table(source))]


COCO_ID_TYPES = (int, str)


def _coco_caption(annotation: object) -> tuple[object, object, str] | None:
    """(id, image id, caption) of a well-formed caption annotation, else None."""
    if not isinstance(annotation, dict):
        return None
    fields = annotation.get("id"), annotation.get("image_id"), annotation.get("caption") or ""
    if type(fields[0]) not in COCO_ID_TYPES or type(fields[1]) not in COCO_ID_TYPES or not isinstance(fields[2], str):
        return None
    return fields


def list_coco(source: CocoPairSource) -> list[PairItem]:
    """Caption annotations in id order. A file the JSON parser refuses is one skip (unreadable_annotations,
    logged); an annotation without an id, image id or text caption is skipped as bad_annotation; a document
    without `images` and `annotations` lists is not COCO captions, an error before any work."""
    root, name = _split_url(source.annotations)
    document, reason = parse_json(decoded_text(open_storage(root).read_bytes(name))[0])
    if reason:
        log.warning("source %s: %s skipped as unreadable_annotations (%s)", source.name, source.annotations, reason)
        return [PairItem(source.name, source.images, "", "", 0, skipped="unreadable_annotations")]
    images, annotations = (document.get("images"), document.get("annotations")) if isinstance(document, dict) else (
        None, None)
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(f"source {source.name}: {source.annotations} is not COCO caption annotations "
                         "(expected lists of 'images' and 'annotations')")
    files = {image["id"]: image["file_name"] for image in images if isinstance(image, dict)
             and type(image.get("id")) in COCO_ID_TYPES and isinstance(image.get("file_name"), str)}
    captions = [_coco_caption(annotation) for annotation in annotations]
    # Ids are ints in COCO; string ids sort after them, among themselves.
    pairs = [(files.get(image_id, ""), caption, "") for _, image_id, caption in
             sorted(filter(None, captions), key=lambda fields: (isinstance(fields[0], str), fields[0]))]
    pairs += [("", "", "bad_annotation")] * captions.count(None)
    _log_skipped_rows(source.name, source.annotations, [skipped for _, _, skipped in pairs])
    return [PairItem(source.name, source.images, file, caption, index, skipped)
            for index, (file, caption, skipped) in enumerate(pairs)]


def list_pair_tars(source: WebDatasetPairSource) -> list[PairTar]:
    tars = [name for name in open_storage(source.path).list() if name.endswith(".tar")]
    if not tars:
        raise FileNotFoundError(f"source {source.name}: no .tar files under {source.path}")
    return [PairTar(source.name, source.path, name, index) for index, name in enumerate(tars)]


def _chunks(items: list, size: int) -> list[tuple]:
    return [tuple(items[start : start + size]) for start in range(0, len(items), size)]


INDEXING_THREADS = 16
"""Input tars indexed at once: reading headers is waiting on storage (range requests on S3), not computing."""


def _indexed(tars: list) -> Iterator[tuple[object, TarIndex]]:
    """Each tar with its index, in order. At most twice INDEXING_THREADS indexes exist at a time: one is a few
    hundred bytes per member, many times what its samples take in the plan."""
    with ThreadPoolExecutor(INDEXING_THREADS) as pool:
        pending: deque = deque()
        for tar in tars:
            pending.append((tar, pool.submit(index_tar, tar.root, tar.name)))
            if len(pending) >= 2 * INDEXING_THREADS:
                tar, future = pending.popleft()
                yield tar, future.result()
        while pending:
            tar, future = pending.popleft()
            yield tar, future.result()


def _tar_units(tars: list, samples_of) -> tuple[list, list[tuple]]:
    """The samples (and findings) of uncompressed input tars, to be planned with the rest of their kind, and a
    unit of its own for each compressed tar."""
    samples, whole = [], []
    for tar, index in _indexed(tars):
        if index.compressed:
            log.warning("source %s: %s is compressed, so it cannot be read by ranges: it is read whole into one "
                        "shard, not mixed with the rest of its source", tar.source, index.origin)
            whole.append((tar,))
        else:
            samples += samples_of(tar, index)
    return samples, whole


def plan_shards(config: DataConfig) -> list[ShardPlan]:
    """Images and pairs go to shards in a permutation of the listing seeded by `seed`, so that a shard mixes its
    whole source rather than holding one class, one input tar or one stretch of annotations (the trainer shuffles
    only within a window of shards)."""
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
    tar_images, whole_image_tars = _tar_units(image_tars, lambda tar, index: image_samples(
        tar.source, tar.root, tar.name, tar.index, tar.label, index, IMAGE_SUFFIXES))
    tar_pairs, whole_pair_tars = _tar_units(pair_tars, lambda tar, index: pair_samples(
        tar.source, tar.root, tar.name, tar.index, index))
    images += tar_images
    pairs += tar_pairs
    from .holdout import split_listed, validation_plans  # holdout builds on this module's plans

    images, held_images = split_listed(images, config, [tar for (tar,) in whole_image_tars])
    pairs, held_pairs = split_listed(pairs, config, [tar for (tar,) in whole_pair_tars])
    size = config.samples_per_shard
    random.Random(f"{config.seed}/image").shuffle(images)
    random.Random(f"{config.seed}/pair").shuffle(pairs)
    image_units = _chunks(images, size) + whole_image_tars
    plans = [ShardPlan("image", i, unit) for i, unit in enumerate(image_units)]
    plans += [ShardPlan("text", i, (text_file,)) for i, text_file in enumerate(texts)]
    pair_units = _chunks(pairs, size) + whole_pair_tars
    plans += [ShardPlan("pair", i, unit) for i, unit in enumerate(pair_units)]
    plans += validation_plans("image", held_images, len(image_units), size)
    plans += validation_plans("pair", held_pairs, len(pair_units), size)
    return plans
