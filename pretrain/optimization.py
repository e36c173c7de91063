"""AdamW parameter groups and the learning-rate schedule of the recipe (BEIT3_FACTS section 6)."""

import math

import torch
from torch import nn

from beit3.pretrain.train_config import OptimizerSettings

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")
"""Position tables and the CLS and mask tokens are not decayed; neither are biases and norms (1-d tensors)."""


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim <= 1 or any(part in name for part in NO_DECAY_NAMES)
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, settings: OptimizerSettings) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.peak_lr,
                             betas=settings.betas, eps=settings.eps)


def learning_rate(step: int, settings: OptimizerSettings, total_steps: int) -> float:
    """Linear warmup from 0 to the peak over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`."""
    if step < settings.warmup_steps:
        return settings.peak_lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return settings.min_lr + (settings.peak_lr - settings.min_lr) * cosine
