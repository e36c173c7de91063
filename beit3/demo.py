"""`beit3 demo`: what the system can run end to end today on 2 CPU cores.

For now that is the model with its targets: the tiny model learns a fixed synthetic mixed batch (images,
texts and image-text pairs) by masked prediction, with block-wise image masks, BERT-style text masks and
random-projection visual codes as targets, and its loss falls. The data pipeline, DeepSpeed trainer, MLflow
logging and export join the demo as they land.
"""

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from beit3.config import load_config
from beit3.pretrain.masking import BlockMasking, TextMasking, masked_patch_count, sample_seed
from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.model_config import ModelConfig
from beit3.tokenizers.text import BOS, EOS, RELEASED_MASK_ID
from beit3.tokenizers.visual import RandomProjectionTokenizer, VisualTokenizerConfig

TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "model" / "tiny.yaml"


def synthetic_batch(config: ModelConfig, per_kind: int, text_len: int, seed: int) -> list[dict]:
    """Smooth random images with random-projection codes and block masks; random texts with BERT-style masks."""
    generator = torch.Generator().manual_seed(seed)
    tokenizer = RandomProjectionTokenizer(VisualTokenizerConfig(kind="random", seed=seed, patch_size=config.patch_size,
                                                                codebook_size=config.visual_vocab_size))
    block_masking = BlockMasking(config.grid_size, masked_patch_count(config.grid_size))

    def images(kind: str) -> dict:
        coarse = torch.rand(per_kind, 3, 4, 4, generator=generator)
        pixels = F.interpolate(coarse, size=config.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        seeds = [sample_seed(seed, kind, i) for i in range(per_kind)]
        return {"image": pixels, "image_mask": block_masking.batch(seeds), "codes": tokenizer.encode(pixels).flatten(1)}

    def texts(kind: str, rate: float) -> dict:
        ids = torch.randint(4, 1000, (per_kind, text_len), generator=generator)
        ids[:, 0], ids[:, -1] = BOS, EOS
        padding = torch.zeros_like(ids, dtype=torch.bool)
        seeds = [sample_seed(seed, kind, i) for i in range(per_kind)]
        masked, chosen = TextMasking(rate, mask_id=RELEASED_MASK_ID).batch(ids, padding, seeds)
        return {"text": masked, "text_padding_mask": padding, "text_prediction_mask": chosen, "labels": ids}

    return [images("image"), texts("text", 0.15), {**images("pair"), **texts("caption", 0.5)}]


def masked_prediction_loss(model: MultiwayTransformer, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("codes", "labels")}
    output = model(**inputs)
    loss = torch.zeros(())
    if output.mim_logits is not None:
        loss = loss + F.cross_entropy(output.mim_logits, batch["codes"][batch["image_mask"]])
    if output.mlm_logits is not None:
        loss = loss + F.cross_entropy(output.mlm_logits, batch["labels"][batch["text_prediction_mask"]])
    return loss


def run_demo(steps: int = 30, config_path: Path = TINY_CONFIG, seed: int = 0) -> list[float]:
    """Train the tiny model on one synthetic mixed batch; returns the loss of every step."""
    torch.manual_seed(seed)
    config = load_config(ModelConfig, config_path)
    model = MultiwayTransformer(config).train()
    batch = synthetic_batch(config, per_kind=4, text_len=32, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    print(f"demo: {config.name} model, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"one synthetic batch of 4 images + 4 texts + 4 pairs (block masks, random-projection codes), "
          f"{steps} AdamW steps on CPU")
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
    print("demo: this covers the model, masking and a seeded visual tokenizer; the data pipeline, DeepSpeed "
          "trainer, MLflow logging and export are not part of the demo yet")
    return losses
