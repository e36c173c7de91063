"""Masked data modeling: one cross-entropy per kind of prediction, summed with configurable weights."""

import torch
import torch.nn.functional as F

from beit3.pretrain.model import MultiwayTransformer

MODEL_INPUTS = ("image", "text", "text_padding_mask", "image_mask", "text_prediction_mask")


def masked_prediction(model: MultiwayTransformer, stream: str, batch: dict) -> dict[str, tuple[torch.Tensor, ...]]:
    """{component: (loss, correct predictions, predictions)} for one micro-batch of one stream.

    Components: `image` (MIM on images), `text` (MLM on texts), `pair_image` and `pair_text` (both sides of
    image-text pairs).
    """
    output = model(**{name: batch[name] for name in MODEL_INPUTS if name in batch})
    results = {}
    if output.mim_logits is not None:
        targets = batch["codes"][batch["image_mask"]]
        results["image" if stream == "image" else "pair_image"] = _scored(output.mim_logits, targets)
    if output.mlm_logits is not None:
        targets = batch["labels"][batch["text_prediction_mask"]]
        results["text" if stream == "text" else "pair_text"] = _scored(output.mlm_logits, targets)
    return results


def _scored(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    loss = F.cross_entropy(logits.float(), targets)
    correct = (logits.detach().argmax(-1) == targets).sum()
    return loss, correct, targets.numel()
