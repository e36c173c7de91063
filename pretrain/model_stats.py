"""Model arithmetic: parameters by part, tokens per sample, and training FLOPs, without allocating weights."""

from dataclasses import dataclass

import torch

from .model import MultiwayTransformer
from .model_config import ModelConfig

DEFAULT_TEXT_LEN = 128
"""Tokens per monomodal text segment (documents packed to full length)."""
DEFAULT_CAPTION_LEN = 64
"""Tokens per caption in an image-text pair (the fine-tuning default)."""


@dataclass(frozen=True)
class ParameterBreakdown:
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def heads(self) -> int:
        return sum(count for part, count in self.parts.items() if part.startswith("heads."))

    @property
    def backbone(self) -> int:
        """Everything but the pretraining heads: what torchscale's `BEiT3` counts."""
        return self.total - self.heads


def part_of(name: str) -> str:
    """The reporting group of a parameter name."""
    if name.startswith(("text_embed.", "vision_embed.", "vision_pos_embed", "text_pos_embed")):
        return "embeddings"
    if name.startswith("mlm_head."):
        return "heads.mlm"
    if name.startswith("mim_head."):
        return "heads.mim"
    if name.startswith("final_norm."):
        return "final_norm"
    _, _, block, key, *_ = name.split(".")
    return "attention" if block == "attn" else f"ffn.{key}"


def build_on_meta(config: ModelConfig) -> MultiwayTransformer:
    """The model with shapes but no storage: any size can be built and counted."""
    with torch.device("meta"):
        return MultiwayTransformer(config)


def count_parameters(config: ModelConfig) -> ParameterBreakdown:
    parts: dict[str, int] = {}
    for name, parameter in build_on_meta(config).named_parameters():
        part = part_of(name)
        parts[part] = parts.get(part, 0) + parameter.numel()
    return ParameterBreakdown(parts)


def tokens_per_sample(
    config: ModelConfig, text_len: int = DEFAULT_TEXT_LEN, caption_len: int = DEFAULT_CAPTION_LEN
) -> dict[str, int]:
    """Sequence length of each input kind: image (patches + CLS), text, and image-text pair."""
    return {"image": config.image_tokens, "text": text_len, "pair": config.image_tokens + caption_len}


def active_parameters_per_token(config: ModelConfig) -> int:
    """Weights one token passes through in the layer stack: one attention branch and one FFN expert per layer."""
    model = build_on_meta(config)
    total = 0
    for layer in model.layers:
        total += sum(p.numel() for p in next(iter(layer.attn.values())).parameters())
        total += sum(p.numel() for p in layer.ffn["vision"].parameters())
    return total


def training_flops_per_sample(config: ModelConfig, tokens: int, active_parameters: int) -> float:
    """Forward+backward FLOPs of the layer stack for one sequence: T * (6 N_active + 12 L d T).

    The heads and embeddings are left out, as in the usual model-FLOPs accounting.
    """
    return tokens * (6.0 * active_parameters + 12.0 * config.layers * config.hidden * tokens)
