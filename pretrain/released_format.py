"""Conversion between this project's parameter names and the released BEiT-3 checkpoint layout.

The released layout is torchscale's `BEiT3` state dict under the prefix `beit3.`, with per-modality
weights under `.A` (vision) and `.B` (language), plus the pretraining heads `mlm_head.*` and `mim_head.*`,
saved as `{"model": state_dict}`. Two things have no slot there and the conversion reports both: shared
attention is written into both A and B (lossless), and vision-language FFN experts go under the extra keys
`...final_layer_norm.VL.*` and `...ffn.VL.*`, which the unilm fine-tuning loader ignores.

One mapping drives both directions: for each of our parameters, the released keys it occupies.
"""

import re
from dataclasses import dataclass, field

import torch

from .model import SHARED, TEXT, VISION, VISION_LANGUAGE, MultiwayTransformer
from .model_config import ModelConfig

SLOTS = {VISION: ["A"], TEXT: ["B"], VISION_LANGUAGE: ["VL"], SHARED: ["A", "B"]}

_FIXED = {
    "text_embed.weight": "beit3.text_embed.weight",
    "vision_embed.proj.weight": "beit3.vision_embed.proj.weight",
    "vision_embed.proj.bias": "beit3.vision_embed.proj.bias",
    "vision_embed.cls_token": "beit3.vision_embed.cls_token",
    "vision_embed.mask_token": "beit3.vision_embed.mask_token",
    "vision_pos_embed": "beit3.encoder.embed_positions.A.weight",
    "text_pos_embed": "beit3.encoder.embed_positions.B.weight",
}
_LAYER_PARTS = {
    ("attn", "norm"): "self_attn_layer_norm.{slot}",
    ("attn", "inner_norm"): "self_attn.inner_attn_ln.{slot}",
    ("attn", "proj"): "self_attn.out_proj.{slot}",
    ("ffn", "norm"): "final_layer_norm.{slot}",
    ("ffn", "fc1"): "ffn.{slot}.fc1",
    ("ffn", "ffn_norm"): "ffn.{slot}.ffn_layernorm",
    ("ffn", "fc2"): "ffn.{slot}.fc2",
}
_LAYER_PARAMETER = re.compile(r"layers\.(\d+)\.(attn|ffn)\.(\w+)\.(\w+)\.(weight|bias)$")
_FINAL_NORM = re.compile(r"final_norm\.(\w+)\.(weight|bias)$")


class ReleasedFormatError(ValueError):
    """A state dict that does not fit the released layout or the target config."""


@dataclass
class ConversionReport:
    """What a conversion could not map one-to-one, for the caller to print or log."""

    notes: list[str] = field(default_factory=list)
    extra_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)


def released_keys(name: str) -> list[list[str]]:
    """The released keys one of our parameters occupies: one group per slot, a group being the three
    q/k/v keys for a fused q/k/v projection and a single key otherwise."""
    if name in _FIXED:
        return [[_FIXED[name]]]
    if name.startswith(("mlm_head.", "mim_head.")):
        return [[name]]
    if match := _FINAL_NORM.match(name):
        return [[f"beit3.encoder.layer_norm.{slot}.{match[2]}"] for slot in SLOTS[match[1]]]
    match = _LAYER_PARAMETER.match(name)
    if match is None:
        raise ReleasedFormatError(f"parameter {name!r} has no place in the released layout")
    layer, block, key, part, leaf = match.groups()
    stem = f"beit3.encoder.layers.{layer}."
    if part == "qkv":
        return [[f"{stem}self_attn.{p}_proj.{slot}.{leaf}" for p in "qkv"] for slot in SLOTS[key]]
    return [[f"{stem}{_LAYER_PARTS[block, part].format(slot=slot)}.{leaf}"] for slot in SLOTS[key]]


def _model_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in MultiwayTransformer(config).state_dict().items()}


def _notes(config: ModelConfig) -> list[str]:
    notes = []
    if config.attention == "shared":
        notes.append("shared attention is stored in both the A (vision) and B (language) slots")
    if config.vl_expert_layers:
        notes.append(
            f"vision-language experts of the top {config.vl_expert_layers} layers are stored under extra "
            "'.VL.' keys, which the released fine-tuning code does not load"
        )
    return notes


def to_released(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> tuple[dict, ConversionReport]:
    """Map our state dict to the released layout; returns (state_dict, report)."""
    report = ConversionReport(notes=_notes(config))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        groups = released_keys(name)
        for group in groups:
            chunks = tensor.split(config.hidden, dim=0) if len(group) == 3 else [tensor]
            for key, chunk in zip(group, chunks):
                # Slices and duplicated slots get storage of their own, as safetensors requires.
                out[key] = chunk.clone() if len(group) == 3 or len(groups) > 1 else chunk
            if ".VL." in group[0]:
                report.extra_keys.extend(group)
    return out, report


def unwrap_checkpoint(checkpoint: dict, model_prefix: str = "") -> dict[str, torch.Tensor]:
    """Take the state dict out of `{"model": ...}` or `{"module": ...}`, as the unilm loader does."""
    for container in ("model", "module"):
        if isinstance(checkpoint.get(container), dict):
            checkpoint = checkpoint[container]
            break
    if model_prefix:
        checkpoint = {k[len(model_prefix) :]: v for k, v in checkpoint.items() if k.startswith(model_prefix)}
    return checkpoint


def from_released(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> tuple[dict, ConversionReport]:
    """Map a released-layout state dict (already unwrapped) to ours; returns (state_dict, report).

    Checkpoint keys the config has no place for go to `report.extra_keys`; parameters the checkpoint lacks
    (fine-tuned checkpoints carry no pretraining heads) go to `report.missing_keys`. A shape that does not
    fit the config, or different A and B weights for a shared-attention config, is an error.
    """
    report = ConversionReport(notes=_notes(config))
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for name, shape in _model_shapes(config).items():
        groups = released_keys(name)
        if any(key not in state_dict for group in groups for key in group):
            report.missing_keys.append(name)
            continue
        candidates = [torch.cat([state_dict[key] for key in group]) if len(group) == 3 else state_dict[group[0]]
                      for group in groups]
        used.update(key for group in groups for key in group)
        if any(not torch.equal(candidates[0], other) for other in candidates[1:]):
            raise ReleasedFormatError(
                f"{name}: the checkpoint holds different A and B weights, so it cannot load into a config "
                "with attention: shared (use attention: decoupled)"
            )
        if candidates[0].shape != shape:
            raise ReleasedFormatError(
                f"{name}: checkpoint shape {tuple(candidates[0].shape)} does not fit the config's {tuple(shape)} "
                f"(from {groups[0][0]})"
            )
        out[name] = candidates[0]
    report.extra_keys.extend(sorted(set(state_dict) - used))
    return out, report
