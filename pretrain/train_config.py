"""The typed schema of a pretraining run (see configs/pretrain/*.yaml), and what is derived from it.

The DeepSpeed JSON is computed here from this one schema (`deepspeed_config`), never kept beside it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from beit3.config import ConfigError, read_config_mapping, validate_config
from beit3.data_pipeline.views import ViewSettings
from beit3.pretrain.model_config import ModelConfig
from beit3.redaction import redact_urls
from beit3.tokenizers.visual import VisualTokenizerConfig

STREAMS = ("image", "text", "pair")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchSettings(_Strict):
    """Samples of each kind per optimizer step, over all ranks and accumulation steps (the paper: 2048 each)."""

    image: int = Field(2048, ge=0)
    text: int = Field(2048, ge=0)
    pair: int = Field(2048, ge=0)
    gradient_accumulation: int = Field(1, gt=0, description="Micro-steps per optimizer step.")

    def global_count(self, stream: str) -> int:
        return getattr(self, stream)


class DataSettings(_Strict):
    datasets: list[str] = Field(min_length=1, description="Outputs of `beit3 data build` (folders or s3:// "
                                "prefixes holding a manifest.json); each stream reads the shards of its kind.")
    text_tokenizer: str = Field(description="The SentencePiece model the shards were tokenized with.")
    visual_codes: Literal["stored", "on_the_fly"] = Field(
        "stored", description="'stored': read the pipeline's codes; 'on_the_fly': run visual_tokenizer on the view.")
    visual_tokenizer: VisualTokenizerConfig | None = Field(None, description="Needed for visual_codes: on_the_fly.")
    workers: int = Field(1, ge=0, description="Loader worker processes per stream and rank (0: in the rank).")
    shuffle_window_shards: int = Field(4, gt=0, description="Shards read together and shuffled as one window.")
    prefetch_batches: int = Field(2, gt=0, description="Micro-batches each worker prepares ahead.")
    verify_sha256: bool = Field(True, description="Check each shard against its manifest digest as it is read.")
    read_attempts: int = Field(8, gt=0, description="Tries per shard read before the run fails (storage outages).")
    read_backoff_seconds: float = Field(1.0, gt=0, description="First wait between tries; doubles, capped at 60 s.")


class MaskingSettings(_Strict):
    image_ratio: float = Field(0.4, gt=0, lt=1, description="Block-wise share of patches masked.")
    mask_pair_images: bool = Field(True, description="Also mask the image of an image-text pair (as VL-BEiT).")
    text_rate: float = Field(0.15, gt=0, le=1)
    caption_rate: float = Field(0.5, gt=0, le=1)


class LossWeights(_Strict):
    image: float = Field(1.0, ge=0)
    text: float = Field(1.0, ge=0)
    pair_image: float = Field(1.0, ge=0)
    pair_text: float = Field(1.0, ge=0)


class OptimizerSettings(_Strict):
    peak_lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0, description="Where the cosine decay ends.")
    warmup_steps: int = Field(10_000, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    gradient_clipping: float = Field(3.0, gt=0)


class ZeroSettings(_Strict):
    stage: Literal[1, 2, 3] = 1
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory.")
    offload_parameters: bool = Field(False, description="ZeRO-3 only: keep parameters in CPU memory.")


class CheckpointSettings(_Strict):
    every_steps: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)


class MlflowSettings(_Strict):
    tracking_uri: str | None = Field(None, description="Default: MLFLOW_TRACKING_URI, else SQLite in the run dir.")
    experiment: str = "beit3-pretrain"
    log_system_metrics: bool = True
    system_metrics_interval_seconds: float = Field(10.0, gt=0, description="How often CPU/GPU/memory are sampled.")

    @field_serializer("tracking_uri", when_used="json")
    def _without_password(self, uri: str | None) -> str | None:
        """Saved configs and MLflow params are JSON dumps: they never carry a password written into the URI."""
        return redact_urls(uri) if uri else uri


class ProbeSettings(_Strict):
    """The weighted kNN probe (DINO's): held-out labelled images classified by their nearest labelled training
    images."""

    enabled: bool = True
    bank_samples: int = Field(10_000, gt=0, description="Labelled training images the held-out ones are matched "
                              "against (the first ones of the training image shards).")
    k: int = Field(20, gt=0, description="Neighbours that vote.")
    temperature: float = Field(0.07, gt=0, description="Votes weigh exp(cosine similarity / temperature).")


class EvalSettings(_Strict):
    """Held-out evaluation: each objective's masked-prediction loss and accuracy on the first `samples` of each
    kind of the datasets' validation shards, with views and masks drawn from `seed` alone."""

    enabled: bool = True
    every_steps: int = Field(5000, gt=0, description="Also evaluated at step 0 and at the last step.")
    samples: int = Field(1024, gt=0, description="Held-out samples of each kind (image, text, pair), and the "
                         "held-out labelled images the probe classifies.")
    seed: int = Field(0, description="Views and masks of the held-out samples; independent of the run's seed.")
    micro_batch: int | None = Field(None, gt=0, description="Samples per rank and forward; default: the training "
                                    "micro-batch of each stream (of images for the probe).")
    probe: ProbeSettings = ProbeSettings()


class PretrainConfig(_Strict):
    name: str
    run_dir: str = Field(description="Checkpoints, the saved configs, metrics and the default MLflow store.")
    model: ModelConfig
    data: DataSettings
    batch: BatchSettings = BatchSettings()
    masking: MaskingSettings = MaskingSettings()
    augment: ViewSettings = Field(ViewSettings(), description="How views are drawn on the fly and rendered; "
                                  "with stored codes, the data build's view settings, which preflight checks.")
    loss_weights: LossWeights = LossWeights()
    optimizer: OptimizerSettings = OptimizerSettings()
    zero: ZeroSettings = ZeroSettings()
    precision: Literal["bf16", "fp32"] = "bf16"
    compile: bool = Field(False, description="Compile each Multiway layer with torch.compile "
                          "(beit3.pretrain.compilation); the first steps then spend minutes compiling.")
    steps: int = Field(1_000_000, gt=0)
    seed: int = 0
    log_every_steps: int = Field(10, gt=0)
    checkpoint: CheckpointSettings = CheckpointSettings()
    resume: Literal["auto", "never"] = Field("auto", description="'auto': continue from the latest checkpoint.")
    mlflow: MlflowSettings = MlflowSettings()
    eval: EvalSettings = EvalSettings()

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        if not any(self.batch.global_count(stream) for stream in STREAMS):
            raise ValueError("batch: at least one of image, text and pair must be positive")
        if self.data.visual_codes == "on_the_fly" and self.data.visual_tokenizer is None:
            raise ValueError("data.visual_tokenizer is required when data.visual_codes is on_the_fly")
        if self.zero.offload_parameters and self.zero.stage != 3:
            raise ValueError("zero.offload_parameters needs zero.stage 3")
        return self

    def active_streams(self) -> list[str]:
        return [stream for stream in STREAMS if self.batch.global_count(stream)]


@dataclass(frozen=True)
class BatchSplit:
    """Per-rank micro-batch sizes: global count = micro * world size * accumulation, for every stream."""

    micro: dict[str, int]
    accumulation: int
    world_size: int


def split_batch(batch: BatchSettings, world_size: int) -> BatchSplit:
    """The per-rank micro-batches, or a ConfigError naming the count that does not divide."""
    share = world_size * batch.gradient_accumulation
    micro = {}
    for stream in STREAMS:
        count = batch.global_count(stream)
        if count % share:
            raise ConfigError(
                f"batch.{stream}: {count} samples per step do not divide over {world_size} ranks x "
                f"{batch.gradient_accumulation} accumulation steps ({share} micro-batches); use a multiple of {share}"
            )
        micro[stream] = count // share
    return BatchSplit(micro, batch.gradient_accumulation, world_size)


FP32_GRADIENTS = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
"""Under bf16 DeepSpeed (0.19) otherwise adds micro-step gradients and reduces them over ranks in bf16, where a
contribution below 1/256 of the running sum rounds away. With these two settings every ZeRO stage, with or
without optimizer offload, keeps the sums in fp32: ZeRO-1 switches to DeepSpeed's BF16 optimizer (a full fp32
gradient buffer per rank), ZeRO-2 adds each reduced gradient into an fp32 buffer of the rank's partition, ZeRO-3
into its fp32 gradient partitions; the reductions themselves are cast to fp32 first. Each micro-step's own
gradient is still computed in bf16 by autograd."""
BF16 = {"enabled": True, "immediate_grad_update": True}
"""A micro-step runs three forwards (one per stream) and one backward. DeepSpeed's BF16 optimizer (ZeRO-1) clears
the bf16 gradients as backward reaches each forward's outputs, which drops the gradients of parameters the
later-reached forwards do not use (the text embedding and MLM head behind the image forward); moving each
gradient into the fp32 buffer as soon as it is complete leaves nothing for those clears to drop."""


def deepspeed_config(config: PretrainConfig, split: BatchSplit) -> dict:
    """The DeepSpeed JSON for this run. Micro-batch size counts images: the three streams are ours to size."""
    zero: dict = {"stage": config.zero.stage}
    if config.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if config.zero.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": max(1, split.micro["image"]),
        "gradient_accumulation_steps": split.accumulation,
        "gradient_clipping": config.optimizer.gradient_clipping,
        "bf16": BF16 if config.precision == "bf16" else {"enabled": False},
        **(FP32_GRADIENTS if config.precision == "bf16" else {}),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def load_pretrain_config(path: str | Path) -> PretrainConfig:
    """Read a pretrain YAML; `model` may be inline or the path of a model YAML (relative to this file).
    Unknown top-level fields are refused before anything is copied or merged."""
    path = Path(path)
    raw = read_config_mapping(path)
    unknown = sorted(str(key) for key in set(raw) - set(PretrainConfig.model_fields) - {"model_overrides"})
    if unknown:
        raise ConfigError(f"{path}: invalid config\n" +
                          "\n".join(f"  {key}: unknown field (check its spelling)" for key in unknown))
    model_overrides = raw.pop("model_overrides", None) or {}
    if not isinstance(model_overrides, dict):
        raise ConfigError(f"{path}: model_overrides: expected a mapping of model fields")
    model = raw.get("model")
    if isinstance(model, str):
        model_path = (path.parent / model) if not Path(model).is_absolute() else Path(model)
        if not model_path.exists():
            raise ConfigError(f"{path}: model: model config {model} not found (looked at {model_path})")
        raw["model"] = {**read_config_mapping(model_path), **model_overrides}
    return validate_config(PretrainConfig, raw, str(path))
