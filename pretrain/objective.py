"""Masked data modeling: one cross-entropy per kind of prediction, summed with configurable weights.

Each objective's loss is the mean over all masked tokens of the global batch (every rank, every micro-step), as
fairseq normalises it: a micro-batch contributes its summed cross-entropy, and the trainer divides by the global
count of that objective's masked tokens, which `masked_counts` gives before any forward runs.
"""

import torch
import torch.nn.functional as F

from beit3.pretrain.model import MultiwayTransformer

MODEL_INPUTS = ("image", "text", "text_padding_mask", "image_mask", "text_prediction_mask")


def _component(prediction: str, stream: str) -> str:
    """`image` (MIM on images), `text` (MLM on texts), `pair_image` and `pair_text` (both sides of pairs)."""
    return prediction if stream == prediction else f"pair_{prediction}"


def masked_counts(stream: str, batch: dict) -> dict[str, torch.Tensor]:
    """{component: masked tokens it predicts} of one micro-batch, read from its masks (no forward needed)."""
    counts = {}
    if "image_mask" in batch:
        counts[_component("image", stream)] = batch["image_mask"].sum()
    if "text_prediction_mask" in batch:
        counts[_component("text", stream)] = batch["text_prediction_mask"].sum()
    return counts


def masked_prediction(model: MultiwayTransformer, stream: str, batch: dict) -> dict[str, tuple[torch.Tensor, ...]]:
    """{component: (summed cross-entropy, correct predictions, predictions)} for one micro-batch of one stream."""
    output = model(**{name: batch[name] for name in MODEL_INPUTS if name in batch})
    results = {}
    if output.mim_logits is not None:
        results[_component("image", stream)] = _scored(output.mim_logits, batch["codes"][batch["image_mask"]])
    if output.mlm_logits is not None:
        results[_component("text", stream)] = _scored(output.mlm_logits,
                                                      batch["labels"][batch["text_prediction_mask"]])
    return results


def _scored(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    correct = (logits.detach().argmax(-1) == targets).sum()
    return loss, correct, targets.numel()
