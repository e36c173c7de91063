"""Which visual tokenizer to build, apart from the tokenizer itself: the data pipeline's config and its shard
workers read it without importing timm (about 30 MiB in every Ray worker)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class VisualTokenizerConfig(BaseModel):
    """Which visual tokenizer to build; the VQ-KD defaults are the official ViT-B/16 encoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["vqkd", "random"] = "vqkd"
    checkpoint: str | None = Field(
        None, description="Official VQ-KD checkpoint (kind: vqkd): a local path; the data pipeline also takes s3://."
    )
    seed: int = Field(0, description="Weights of a random-init tokenizer (kind: random, or vqkd without checkpoint).")
    codebook_size: int = Field(8192, gt=1)
    code_dim: int = Field(32, gt=0)
    patch_size: int = Field(16, gt=0)
    image_size: int = Field(224, gt=0, description="The size the encoder's position table was trained at.")
    width: int = Field(768, gt=0)
    depth: int = Field(12, gt=0)
    heads: int = Field(12, gt=0)
