"""The typed schema of a Multiway Transformer's shape and knobs (see configs/model/*.yaml)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Architecture of one BEiT-3 model; the same schema covers the paper's giant and the released sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="A label for logs and exports, e.g. 'base'.")
    layers: int = Field(gt=0)
    hidden: int = Field(gt=0, description="Width of the residual stream.")
    ffn_hidden: int = Field(gt=0, description="Inner width of every FFN expert.")
    heads: int = Field(gt=0)
    attention: Literal["shared", "decoupled"] = Field(
        description="'shared': one set of attention weights for all modalities (the paper's giant); "
        "'decoupled': per-modality projections and norms (the released base/large)."
    )
    vl_expert_layers: int = Field(0, ge=0, description="How many top layers carry a vision-language FFN expert.")
    patch_size: int = Field(16, gt=0)
    image_size: int = Field(224, gt=0)
    in_chans: int = Field(3, gt=0)
    vocab_size: int = Field(64010, gt=0, description="Rows of the text embedding and of the MLM head.")
    visual_vocab_size: int = Field(8192, gt=0, description="Codebook size of the visual tokenizer (MIM head).")
    text_positions: int = Field(1024, gt=2, description="Rows of the text position table (rows 0-1 unused).")
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    layernorm_eps: float = Field(1e-5, gt=0.0)
    init: Literal["magneto", "beit"] = Field(
        "magneto", description="'magneto': sub-LN gamma scaling as torchscale; 'beit': std 0.02, 1/sqrt(2l) rescale."
    )
    checkpoint_every_n_layers: int = Field(
        0, ge=0, description="Activation checkpointing: 0 off, 1 every layer, N every N-th layer."
    )

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.vl_expert_layers > self.layers:
            raise ValueError(f"vl_expert_layers ({self.vl_expert_layers}) cannot exceed layers ({self.layers})")
        return self

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def image_tokens(self) -> int:
        """Sequence length of one image: the patches plus CLS."""
        return self.num_patches + 1

    @property
    def max_text_len(self) -> int:
        """Longest text the position table serves: its first two rows are never used."""
        return self.text_positions - 2

    def has_vl_expert(self, layer: int) -> bool:
        return layer >= self.layers - self.vl_expert_layers
