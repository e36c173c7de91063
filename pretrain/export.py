"""`beit3 export`: a run's DeepSpeed checkpoint to the files the released fine-tuning code loads.

Consolidation uses DeepSpeed's own ZeRO-to-fp32 reader, which merges the partitions of any ZeRO stage on the
CPU of one process, whatever the run's world size. The result is written in the released layout
(`{"model": {"beit3.*", "mlm_head.*", "mim_head.*"}}`, see `released_format`) as `.pth` and `.safetensors`,
with a `config.json` describing the architecture both as our model config and as torchscale's
`EncoderConfig` arguments.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file

from beit3.config import read_config_mapping
from beit3.pretrain.checkpoints import (
    CheckpointError,
    completeness_problem,
    find_resume_point,
    refuse_untrusted_pickles,
)
from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.model_config import ModelConfig
from beit3.pretrain.released_format import from_released, to_released, unwrap_checkpoint
from beit3.pretrain.torchscale_reference import build_torchscale, torchscale_encoder_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VERIFY_TOLERANCE = 1e-4
"""Both models run the same exported weights in fp32, so they agree to rounding whatever the export dtype."""


@dataclass
class ExportResult:
    tag: str
    files: list[Path]
    notes: list[str] = field(default_factory=list)


def run_model_config(run_dir: Path) -> ModelConfig:
    """The model a run trained, from the recipe it saved."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise CheckpointError(f"{run_dir}: no config.yaml (is this a `beit3 train` run directory?)")
    return ModelConfig.model_validate(read_config_mapping(saved)["model"])


def consolidate(run_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """fp32 weights of one checkpoint (default: the latest) with every ZeRO partition merged."""
    checkpoint_dir = run_dir / "checkpoints"
    tag = tag or find_resume_point(checkpoint_dir).tag
    if tag is None:
        raise CheckpointError(f"{checkpoint_dir}: no checkpoint to export")
    if not (checkpoint_dir / tag).is_dir():
        raise CheckpointError(f"{checkpoint_dir / tag}: no such checkpoint")
    problem = completeness_problem(checkpoint_dir / tag)
    if problem:
        raise CheckpointError(f"{checkpoint_dir / tag}: not a whole checkpoint ({problem})")
    refuse_untrusted_pickles(checkpoint_dir / tag)
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag), tag


def export_checkpoint(run_dir: Path, output_dir: Path, tag: str | None = None, dtype: str = "fp32") -> ExportResult:
    """Write `beit3-{tag}.pth`, `beit3-{tag}.safetensors` and `config.json` into `output_dir`."""
    config = run_model_config(run_dir)
    weights, tag = consolidate(run_dir, tag)
    released, report = to_released(weights, config)
    released = {key: tensor.to(DTYPES[dtype]).contiguous() for key, tensor in released.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    pth, safetensors_path = output_dir / f"beit3-{tag}.pth", output_dir / f"beit3-{tag}.safetensors"
    torch.save({"model": released}, pth)
    save_file(released, str(safetensors_path), metadata={"format": "pt", "layout": "beit3-released"})
    description = {"architecture": "beit3", "dtype": dtype, "checkpoint_tag": tag,
                   "model": config.model_dump(mode="json"),
                   "torchscale_encoder_config": torchscale_encoder_args(config),
                   "notes": report.notes}
    config_path = output_dir / "config.json"
    config_path.write_text(json.dumps(description, indent=1))
    unfinished = unfinished_note(run_dir, tag)
    return ExportResult(tag, [pth, safetensors_path, config_path], report.notes + ([unfinished] if unfinished else []))


def unfinished_note(run_dir: Path, tag: str) -> str | None:
    """Says so when the checkpoint is not the run's last step: a run stopped, failed or still going."""
    steps = read_config_mapping(run_dir / "config.yaml").get("steps")
    step = int(tag.rpartition("-")[2]) if tag.rpartition("-")[2].isdigit() else None
    if step is None or not isinstance(steps, int) or step >= steps:
        return None
    return (f"{tag} is step {step:,} of the run's {steps:,}: the run has not finished (it was stopped, failed, or "
            "is still running), so these are mid-training weights")


@dataclass
class Verification:
    """Largest output difference per check; every check must stay under the dtype's tolerance."""

    differences: dict[str, float]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(value <= self.tolerance for value in self.differences.values())


def _fixed_inputs(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(4, min(config.vocab_size, 64000), (2, 16), generator=generator)
    padding = torch.zeros_like(text, dtype=torch.bool)
    padding[1, 10:] = True
    image = torch.randn(2, 3, config.image_size, config.image_size, generator=generator)
    return {"image": image, "text": text, "padding": padding}


def verify_export(pth: Path, config: ModelConfig) -> Verification:
    """Reload the export into our model and into torchscale's `BEiT3` under the `beit3.` prefix (as the unilm
    fine-tuning code does) and compare outputs on fixed inputs. Images and texts are compared always; pairs
    only when the model has no vision-language experts, which the released architecture does not have."""
    released = unwrap_checkpoint(torch.load(pth, map_location="cpu", weights_only=True))
    released = {key: tensor.float() for key, tensor in released.items()}
    ours_weights, _ = from_released(released, config)
    ours = MultiwayTransformer(config.model_copy(update={"drop_path": 0.0})).eval()
    ours.load_state_dict(ours_weights, strict=True)
    reference = build_torchscale(config.model_copy(update={"drop_path": 0.0})).eval()
    backbone = {key.removeprefix("beit3."): value for key, value in released.items() if key.startswith("beit3.")}
    missing, _ = reference.load_state_dict(backbone, strict=False)
    if missing:
        raise CheckpointError(f"{pth}: the released architecture finds no weights for {', '.join(missing[:5])}")
    inputs = _fixed_inputs(config)
    cases = {"image": ({"image": inputs["image"]}, {"visual_tokens": inputs["image"]}),
             "text": ({"text": inputs["text"], "text_padding_mask": inputs["padding"]},
                      {"textual_tokens": inputs["text"], "text_padding_position": inputs["padding"]})}
    if config.vl_expert_layers == 0:
        cases["pair"] = ({**cases["image"][0], **cases["text"][0]}, {**cases["image"][1], **cases["text"][1]})
    differences = {}
    with torch.no_grad():
        for case, (our_inputs, reference_inputs) in cases.items():
            output = ours.encode(**our_inputs)
            joined = torch.cat([x for x in (output.vision, output.text) if x is not None], dim=1)
            expected = reference(**reference_inputs)["encoder_out"]
            real = torch.ones(joined.shape[:2], dtype=torch.bool)
            if "text_padding_mask" in our_inputs:
                real[:, -inputs["text"].shape[1]:] = ~inputs["padding"]
            differences[case] = (joined[real] - expected[real]).abs().max().item()
    return Verification(differences, VERIFY_TOLERANCE)


def log_export_to_mlflow(run_dir: Path, output_dir: Path) -> str:
    """Attach the exported files to the run's MLflow run (under `export/`); returns the run id."""
    from mlflow.tracking import MlflowClient

    from beit3.pretrain.metrics_sink import RUN_ID_FILE, tracking_uri

    id_file = run_dir / RUN_ID_FILE
    if not id_file.exists():
        raise CheckpointError(f"{run_dir}: no MLflow run recorded ({RUN_ID_FILE} is missing)")
    configured = read_config_mapping(run_dir / "config.yaml").get("mlflow", {}).get("tracking_uri")
    run_id = id_file.read_text().strip()
    MlflowClient(tracking_uri(configured, run_dir)).log_artifacts(run_id, str(output_dir), artifact_path="export")
    return run_id
