"""`beit3 demo`: what the system can run end to end today on 2 CPU cores.

For now that is the model alone: the tiny model learns a fixed synthetic mixed batch (images, texts and
image-text pairs with masked positions) by masked prediction, and its loss falls. The data pipeline,
tokenizers, DeepSpeed trainer, MLflow logging and export join the demo as they land.
"""

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from beit3.config import load_config
from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.model_config import ModelConfig

TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "model" / "tiny.yaml"


def synthetic_batch(config: ModelConfig, per_kind: int, text_len: int, generator: torch.Generator) -> list[dict]:
    """Random images, texts and pairs with 40% of patches and 15% (50% in pairs) of text tokens to predict."""

    def image():
        return torch.rand(per_kind, 3, config.image_size, config.image_size, generator=generator)

    def text(rate):
        ids = torch.randint(4, 1000, (per_kind, text_len), generator=generator)
        chosen = torch.rand(per_kind, text_len, generator=generator) < rate
        chosen[:, 0] = True
        return ids, chosen

    def image_mask():
        return torch.rand(per_kind, config.num_patches, generator=generator) < 0.4

    def codes():
        return torch.randint(0, config.visual_vocab_size, (per_kind, config.num_patches), generator=generator)

    text_ids, text_chosen = text(0.15)
    caption_ids, caption_chosen = text(0.5)
    return [
        {"image": image(), "image_mask": image_mask(), "codes": codes()},
        {"text": text_ids, "text_prediction_mask": text_chosen},
        {"image": image(), "image_mask": image_mask(), "codes": codes(),
         "text": caption_ids, "text_prediction_mask": caption_chosen},
    ]


def masked_prediction_loss(model: MultiwayTransformer, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "codes"}
    output = model(**inputs)
    loss = torch.zeros(())
    if output.mim_logits is not None:
        loss = loss + F.cross_entropy(output.mim_logits, batch["codes"][batch["image_mask"]])
    if output.mlm_logits is not None:
        loss = loss + F.cross_entropy(output.mlm_logits, batch["text"][batch["text_prediction_mask"]])
    return loss


def run_demo(steps: int = 30, config_path: Path = TINY_CONFIG, seed: int = 0) -> list[float]:
    """Train the tiny model on one synthetic mixed batch; returns the loss of every step."""
    torch.manual_seed(seed)
    config = load_config(ModelConfig, config_path)
    model = MultiwayTransformer(config).train()
    batch = synthetic_batch(config, per_kind=4, text_len=32, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    print(f"demo: {config.name} model, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"one synthetic batch of 4 images + 4 texts + 4 pairs, {steps} AdamW steps on CPU")
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = sum(masked_prediction_loss(model, kind) for kind in batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            print(f"  step {step:3d}  loss {losses[-1]:.3f}")
    print(f"demo: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - start:.1f}s")
    print("demo: this covers the model only; the data pipeline, tokenizers, DeepSpeed trainer, MLflow logging "
          "and export are not part of the demo yet")
    return losses
