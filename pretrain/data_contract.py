"""What a run must agree with in the shards it reads, checked before any process group starts.

A data build records in each manifest's `contract` how its samples were made: text and caption lengths, the
views (how many per image and how they were drawn), the code grid, the visual tokenizer (kind, codebook,
patch size, a digest of its weights) and the SentencePiece model's sha256. A run on shards made for another
model or tokenizer trains without an error on the wrong targets, so every mismatch stops `beit3 train` with
one line naming the recipe field to change.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from beit3.config import ConfigError
from beit3.data_pipeline.manifest import DataContract
from beit3.data_pipeline.views import ViewSettings
from beit3.pretrain.shard_streams import DatasetIndex
from beit3.pretrain.train_config import PretrainConfig

IMAGE_FIELDS = ("views_per_image", "views", "tokenizer_view_size", "code_grid", "visual_tokenizer")
TEXT_FIELDS = ("text_len", "caption_len", "text_tokenizer_sha256")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _recorded(dataset: str, contract: DataContract, fields: tuple[str, ...]) -> None:
    missing = [name for name in fields if name not in contract.model_fields_set]
    if missing:
        raise ConfigError(f"data.datasets: {dataset} was built before its manifest recorded the data contract "
                          f"(no contract.{missing[0]}); rebuild it with this version's `beit3 data build`")


def _check_images(config: PretrainConfig, dataset: str, contract: DataContract) -> None:
    model, grid = config.model, config.model.grid_size
    if config.data.visual_codes == "on_the_fly":
        return
    tokenizer = contract.visual_tokenizer
    if tokenizer is None:
        raise ConfigError(f"data.visual_codes: {dataset} holds no visual codes (built without a visual tokenizer); "
                          "set data.visual_codes: on_the_fly")
    if contract.code_grid != grid:
        raise ConfigError(
            f"model.image_size: the model has a {grid}x{grid} patch grid but {dataset} holds codes on a "
            f"{contract.code_grid}x{contract.code_grid} grid (image.tokenizer_view_size "
            f"{contract.tokenizer_view_size} / patch {tokenizer.patch_size}); rebuild with "
            f"image.tokenizer_view_size {grid * tokenizer.patch_size}, or set data.visual_codes: on_the_fly")
    if tokenizer.codebook_size > model.visual_vocab_size:
        raise ConfigError(f"model.visual_vocab_size: {model.visual_vocab_size} is smaller than the codebook of "
                          f"{dataset}'s visual tokenizer ({tokenizer.codebook_size} codes)")
    for name in ViewSettings.model_fields:
        ours, theirs = getattr(config.augment, name), getattr(contract.views, name)
        if ours != theirs:
            raise ConfigError(f"augment.{name}: {dataset}'s stored views were drawn with {name} {theirs}, the "
                              f"recipe says {ours}; set it to the build's value (stored views are replayed as built)")


def _check_texts(config: PretrainConfig, dataset: str, contract: DataContract, tokenizer_sha256: str) -> None:
    if contract.text_tokenizer_sha256 != tokenizer_sha256:
        raise ConfigError(f"data.text_tokenizer: {config.data.text_tokenizer} is not the SentencePiece model "
                          f"{dataset} was tokenized with (sha256 {tokenizer_sha256[:12]}, the build's "
                          f"{str(contract.text_tokenizer_sha256)[:12]})")
    longest = max(contract.text_len, contract.caption_len)
    if longest > config.model.max_text_len:
        raise ConfigError(f"model.text_positions: the model serves texts of {config.model.max_text_len} tokens but "
                          f"{dataset} holds texts of up to {longest} (text_len / caption_len)")


def check_data_contract(config: PretrainConfig, contracts: dict[str, DataContract], kinds: dict[str, set[str]],
                        text_tokenizer: str) -> None:
    """Every dataset's contract against the recipe and model; `kinds` says which streams each dataset feeds,
    `text_tokenizer` is a local copy of the recipe's SentencePiece model."""
    if config.data.visual_codes == "on_the_fly":
        codebook = config.data.visual_tokenizer.codebook_size
        if codebook > config.model.visual_vocab_size:
            raise ConfigError(f"model.visual_vocab_size: {config.model.visual_vocab_size} is smaller than the "
                              f"codebook of data.visual_tokenizer ({codebook} codes)")
    tokenizer_sha256 = None
    for dataset, contract in contracts.items():
        fed = kinds.get(dataset, set())
        if fed & {"image", "pair"}:
            _recorded(dataset, contract, IMAGE_FIELDS)
            _check_images(config, dataset, contract)
        if fed & {"text", "pair"}:
            _recorded(dataset, contract, TEXT_FIELDS)
            tokenizer_sha256 = tokenizer_sha256 or file_sha256(text_tokenizer)
            _check_texts(config, dataset, contract, tokenizer_sha256)


@dataclass(frozen=True)
class ViewPasses:
    """How often a run sees each stored view of one stream's images."""

    stream: str
    samples: int
    views_per_image: int
    passes: float
    """Epochs over the stream's samples: steps x samples per step / samples."""

    @property
    def per_view(self) -> float:
        return self.passes / self.views_per_image


def view_passes(config: PretrainConfig, index: DatasetIndex) -> list[ViewPasses]:
    """Passes per stored view of the image and pair streams of a run over these shards (stored views only: on
    the fly every pass draws a fresh view)."""
    report = []
    for stream in ("image", "pair"):
        refs = index.shards[stream]
        per_step = config.batch.global_count(stream)
        if not refs or not per_step:
            continue
        samples = sum(ref.samples for ref in refs)
        views = min((ref.contract.views_per_image or 1) for ref in refs)
        report.append(ViewPasses(stream, samples, views, config.steps * per_step / samples))
    return report
