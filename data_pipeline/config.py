"""The typed schema of a data build (see configs/data/*.yaml)."""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from beit3.tokenizers.visual_config import VisualTokenizerConfig

from .storage import check_location
from .views import ViewSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


StorageUrl = Annotated[str, AfterValidator(check_location)]
"""A data location, checked while the config is read."""
MAX_DOCUMENT_BYTES = 2**20
"""Default longest text document: a megabyte is a long book chapter; lines longer are data, not text."""
MAX_DECOMPRESSED_BYTES = 2**30
"""Default bound on what one compressed input tar, read whole, may expand to."""
MAX_COMPRESSION_RATIO = 100.0
"""Default bound on how many times its size a compressed corpus file may expand: prose and JSON lines compress
3-10x with gzip or zstd; a decompression bomb, hundreds to thousands of times."""
SOURCE_NAME = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Letters, digits, - and _: it starts sample keys.")


class Validation(_Strict):
    """Samples of a source held out of training for evaluation (see `beit3.data_pipeline.holdout`), chosen by a
    seeded hash of each sample's key: a `fraction` of them, or a `count` of images or pairs (a table or COCO
    source counts images, each held out with all its captions). A count needs every sample listed before the
    build: not for text, nor for a source with compressed input tars, which are read only while building."""

    fraction: float | None = Field(None, gt=0, lt=1, description="Share of the source's samples held out.")
    count: int | None = Field(None, gt=0, description="Samples held out: those with the smallest key hashes.")

    @model_validator(mode="after")
    def _one(self) -> "Validation":
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give either fraction or count (one of them)")
        return self


def _fraction_only(validation: Validation | None) -> Validation | None:
    if validation is not None and validation.count is not None:
        raise ValueError("count needs samples listed before the build, but text documents are seen only while "
                         "reading: use fraction")
    return validation


VALIDATION = Field(None, description="Held-out samples (`fraction` or `count`); none: everything trains.")
TextValidation = Annotated[Validation | None, AfterValidator(_fraction_only)]


class ImageNetSource(_Strict):
    """ImageNet as distributed: a folder of class folders (`n01440764/*.JPEG`) or of per-class tars."""

    kind: Literal["imagenet"]
    name: str = SOURCE_NAME
    path: StorageUrl = Field(description="Local folder or s3:// prefix.")
    validation: Validation | None = VALIDATION


class TextSource(_Strict):
    """Text corpora: `.txt` (a document per line, or per blank-line-separated paragraph) and `.jsonl`."""

    kind: Literal["text"]
    name: str = SOURCE_NAME
    paths: list[StorageUrl] = Field(min_length=1, description="Files or folders, local or s3://; .gz and .zst allowed.")
    text_field: str = "text"
    documents: Literal["line", "paragraph"] = "line"
    validation: TextValidation = VALIDATION


class WebDatasetPairSource(_Strict):
    """Image-text pairs already in WebDataset tars, in the common downloader layout (`jpg` + `txt` + `json`).
    Each input tar becomes one planned shard (read once)."""

    kind: Literal["pairs_webdataset"]
    name: str = SOURCE_NAME
    path: StorageUrl = Field(description="Folder or s3:// prefix of .tar files.")
    validation: Validation | None = VALIDATION


class TablePairSource(_Strict):
    """Image-text pairs listed in a table (.parquet, .jsonl or .tsv) of image paths and captions."""

    kind: Literal["pairs_table"]
    name: str = SOURCE_NAME
    table: StorageUrl = Field(description="The table file, local or s3://.")
    images: StorageUrl = Field(description="Folder or s3:// prefix the image paths are relative to.")
    image_column: str = "image"
    caption_column: str = "caption"
    validation: Validation | None = VALIDATION


class CocoPairSource(_Strict):
    """COCO-style caption annotations (`images` with `file_name`, `annotations` with `caption`)."""

    kind: Literal["coco"]
    name: str = SOURCE_NAME
    annotations: StorageUrl = Field(description="captions_*.json, local or s3://.")
    images: StorageUrl = Field(description="The image folder or s3:// prefix.")
    validation: Validation | None = VALIDATION


PAIR_SOURCES = (WebDatasetPairSource, TablePairSource, CocoPairSource)
Source = Annotated[
    ImageNetSource | TextSource | WebDatasetPairSource | TablePairSource | CocoPairSource,
    Field(discriminator="kind"),
]


class ImageSettings(_Strict):
    shorter_side: int = Field(256, gt=0, description="Stored images are downscaled to this shorter side.")
    views_per_image: int = Field(1, gt=0, description="Views (jitter, flip, crop) with precomputed codes per image; "
                                 "the trainer walks them without replacement, one per pass.")
    tokenizer_view_size: int = Field(224, gt=0, description="224 for 16-pixel-patch models, 256 for the giant.")
    views: ViewSettings = Field(ViewSettings(), description="How views are drawn and rendered (BEiT v2's defaults).")
    jpeg_quality: int = Field(95, ge=1, le=100)
    max_pixels: int = Field(64_000_000, gt=0, description="Larger images are skipped as decompression bombs.")


class RaySettings(_Strict):
    address: str | None = Field(None, description="Join this cluster; none starts a local one.")
    tokenizer_actors: int = Field(1, gt=0, description="Actors computing visual codes.")
    gpus_per_tokenizer_actor: float | None = Field(None, ge=0, description="None: 1 when GPUs exist, else 0.")
    max_task_retries: int = Field(
        3, ge=0, description="Times a shard's task is run again after its worker died (killed, out of memory, node "
        "lost); then the build fails naming the shard. Ray's own default retries without limit. Out-of-memory kills "
        "are bounded by it only on a Ray instance the build starts (elsewhere: RAY_task_oom_retries on the cluster).")
    max_actor_restarts: int = Field(3, ge=0, description="Times a visual-tokenizer actor is restarted after dying.")
    memory_per_task: int | None = Field(
        None, gt=0, description="Bytes of memory Ray reserves for each prepare task, so that a node runs only as many "
        "at once as its memory holds; none: as many as it has CPUs.")
    object_store_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of the cluster's object store that the blocks waiting between stages (a "
        "planned shard's prepared samples and tokenizer views, then its coded samples) may fill. At the bound Ray "
        "Data starts no task whose output would go past its stage's part of it, so a slow stage (the tokenizer "
        "actors, or writes to slow storage) holds the stages before it back instead of letting their output pile up "
        "in memory or spill to disk. 0.5 is Ray Data's own default.")
    object_store_bytes: int | None = Field(
        None, gt=0, description="The same bound in bytes for the whole cluster (the smaller of the two applies), e.g. "
        "on a cluster shared with other jobs; none: the share alone.")
    tokenizer_tasks_in_flight: int = Field(
        2, gt=0, description="Planned shards handed to each visual-tokenizer actor at once: the one it codes and the "
        "next, fetched meanwhile (each holds a shard's tokenizer views). 2 is Ray Data's default; 1 holds less and "
        "leaves the actor idle while a shard arrives.")


class PlannedUse(_Strict):
    """The training a build is for, so that its summary says how often each stored view will be seen: a view seen
    many times means crop augmentation is in effect switched off (`beit3 plan --data` gives a recipe's figure)."""

    image_samples: int | None = Field(None, gt=0, description="Images the run will draw: steps x images per step.")
    pair_samples: int | None = Field(None, gt=0, description="Pairs the run will draw: steps x pairs per step.")
    max_passes_per_view: float = Field(10.0, gt=0, description="The summary warns past this many passes per view.")


class DataConfig(_Strict):
    """A data build: sources, shard sizes, image and text settings, tokenizers, Ray.

    Shard sizes: the plan fixes the samples of every planned shard `{kind}-{index:06d}.tar` before any work
    (`samples_per_shard` class-folder images or table/COCO pairs, one input tar, one text file or
    `text_shard_bytes` part of one). Output sizes are only known once a shard is built, so the byte target is
    applied when writing: a planned shard's entries fill consecutive tars, each closed at `samples_per_shard`
    images or pairs or before the next entry would take it past `shard_bytes` (an entry larger than that gets a
    tar of its own). The first tar keeps the planned name; further parts are `{kind}-{index:06d}-{part:03d}.tar`.
    Parts depend only on the planned shard's samples, so they are as deterministic as the plan, and a planned
    shard is listed in the manifest only once all its parts are stored.
    """

    name: str
    output: StorageUrl = Field(description="Local folder or s3:// prefix for the shards and the manifest.")
    seed: int = 0
    samples_per_shard: int = Field(1000, gt=0, description="Images or pairs per shard.")
    shard_bytes: int = Field(2**30, gt=0, description="Shard files are closed before they exceed this many bytes "
                             "(see the class docstring). A text shard's parts are spooled to the worker's local "
                             "disk while its file is read, so a text worker holds a batch of text and a few MB of "
                             "entries however large the file, and needs this much temporary disk (storing a part in "
                             "a local folder still reads it whole; S3 uploads stream).")
    text_shard_bytes: int = Field(
        64 * 2**20, gt=0, description="Uncompressed line-per-document corpus files are split into parts of this "
        "many input bytes, one text shard each; compressed and paragraph files give one shard per file, read as a "
        "stream and written in as many parts as `shard_bytes` asks."
    )
    max_document_bytes: int = Field(
        MAX_DOCUMENT_BYTES, gt=0, description="Text documents (a line, a paragraph, a JSON line) and captions longer "
        "than this are skipped (`document_too_long`, `caption_too_long`); a document is dropped as soon as it passes "
        "this while it is read, so no more of one is held."
    )
    max_decompressed_bytes: int = Field(
        MAX_DECOMPRESSED_BYTES, gt=0, description="A compressed input tar (gzip, bzip2, xz), which is read whole, "
        "that expands to more bytes is skipped as `decompressed_too_large`. Compressed corpus files are streamed and "
        "bounded by `max_compression_ratio` instead."
    )
    max_compression_ratio: float = Field(
        MAX_COMPRESSION_RATIO, gt=1, description="A compressed corpus file (.gz, .zst) that expands to more than this "
        "many times its own size is a decompression bomb and is skipped whole as `decompressed_too_large`; its size "
        "is counted while decompressing (a stream, nothing kept) before any of it is read."
    )
    sources: list[Source] = Field(min_length=1)
    image: ImageSettings = ImageSettings()
    visual_tokenizer: VisualTokenizerConfig | None = Field(
        VisualTokenizerConfig(kind="random"), description="None stores no codes (the trainer tokenizes on the fly)."
    )
    text_tokenizer: StorageUrl | None = Field(None, description="SentencePiece model; required by text sources.")
    text_len: int = Field(128, gt=2, description="Tokens per packed monomodal text segment.")
    text_segments_per_sample: int = Field(64, gt=0, description="Segments stored together per text tar entry.")
    caption_len: int = Field(64, gt=2, description="Longest caption in tokens; longer ones are truncated.")
    ray: RaySettings = RaySettings()
    planned_use: PlannedUse = PlannedUse()

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if any(isinstance(s, (TextSource, *PAIR_SOURCES)) for s in self.sources) and not self.text_tokenizer:
            raise ValueError("text and image-text pair sources need text_tokenizer (a SentencePiece model)")
        return self
