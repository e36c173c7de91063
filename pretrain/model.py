"""The BEiT-3 Multiway Transformer in plain PyTorch.

One implementation serves the paper's giant (shared attention, vision-language experts in the top layers)
and the released base/large (per-modality attention, no vision-language expert). Parallelism, precision and
file formats are applied from outside; this module only knows tensors and its `ModelConfig`.

The residual stream is kept as a list of contiguous per-modality segments (image tokens, then text tokens).
Each sub-block picks its weights per segment once, so no tensor is split and re-joined around every linear
layer; the only join is the q/k/v concatenation that the joint softmax over the whole sequence needs.
How padded text is carried is a per-device choice (`TEXT_LAYOUTS`, `packs_text`): on the CPU unpadded (only
real tokens, [tokens, hidden]) through every per-token operation and laid back on the padded grid only for
attention, so pads cost no projection or FFN work; on an accelerator padded, at the fixed shape of the batch.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .model_config import ModelConfig

VISION = "vision"
TEXT = "text"
SHARED = "shared"
VISION_LANGUAGE = "vl"

FIRST_POSITION = 2
"""Position tables start at row 2, a fairseq convention kept by the released checkpoints."""

TEXT_LAYOUTS = ("auto", "packed", "padded")
"""How padded text runs through the layers: `packed` drops the pads from every per-token operation, `padded`
keeps the [batch, slots] grid and only masks pads out of attention as keys; `auto` picks by device
(`packs_text`). Both give the same outputs at real tokens and the same gradients."""


def packs_text(layout: str, device: torch.device) -> bool:
    """Whether text on `device` runs packed under `layout`; `auto` packs on the CPU only.

    A CPU step is bound by its matrix products (three quarters of a base-width text step), so the pads' share
    of them is time saved, for one gather and scatter around each attention. A GPU step of short texts is
    bound by kernel launches and host work instead (an H200 takes the same time for 16 and 32 texts): there
    the pads' extra products are nearly free, while packing costs a device-to-host sync per batch (its token
    count sizes the packed tensors), index kernels around every attention, and a new packed length on every
    batch, which compiled layers must serve with shape-generic kernels; the padded grid changes shape only
    with its slots, so texts padded to fixed slots run at one shape, which CUDA graphs can also replay.
    """
    return layout == "packed" or (layout == "auto" and device.type == "cpu")


class MultiwayOutput(NamedTuple):
    """Final hidden states per modality (zeros at text pads), and head logits at the requested positions.

    A named tuple, so that wrappers which hook a module's output tensors (sharded data parallelism) see them.
    """

    vision: torch.Tensor | None
    text: torch.Tensor | None
    mim_logits: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None


@dataclass
class TextPacking:
    """Where the real tokens of a padded [batch, length] text batch sit, to drop pads from per-token work."""

    index: torch.Tensor
    sample: torch.Tensor
    batch: int
    length: int

    @classmethod
    def from_padding_mask(cls, text_padding_mask: torch.Tensor) -> "TextPacking":
        batch, length = text_padding_mask.shape
        index = (~text_padding_mask).flatten().nonzero().squeeze(1)
        return cls(index=index, sample=index // length, batch=batch, length=length)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[batch, length, features] -> [real tokens, features]."""
        return padded.flatten(0, 1).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[real tokens, features] -> [batch, length, features], zeros at pads."""
        grid = packed.new_zeros(self.batch * self.length, packed.shape[-1])
        return grid.index_copy(0, self.index, packed).view(self.batch, self.length, -1)


def drop_path_scale(batch: int, rate: float, reference: torch.Tensor) -> torch.Tensor | None:
    """Per-sample stochastic-depth factor, shape [batch, 1, 1], or None when nothing is dropped.

    One factor per sample is shared by all of that sample's segments, so an image-text pair keeps or drops
    its residual branch as a whole, as a per-sequence drop path on the joined sequence would. Drawn as
    uniform < keep rather than `bernoulli_(keep)`, whose float probability a compiler must fix per call: with
    a rate per depth, every layer would compile its own graph.
    """
    if rate == 0.0:
        return None
    keep = 1.0 - rate
    return (torch.rand(batch, 1, 1, device=reference.device) < keep).to(reference.dtype) / keep


class AttentionBranch(nn.Module):
    """One modality's attention weights (or the shared ones): pre-LN, fused q/k/v, sub-LN, output projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden
        self.norm = nn.LayerNorm(d, eps=config.layernorm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.inner_norm = nn.LayerNorm(d, eps=config.layernorm_eps)
        self.proj = nn.Linear(d, d)


class FeedForwardExpert(nn.Module):
    """One FFN expert with sub-LN: fc2(LN(GELU(fc1(LN(x)))))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden, eps=config.layernorm_eps)
        self.fc1 = nn.Linear(config.hidden, config.ffn_hidden)
        self.ffn_norm = nn.LayerNorm(config.ffn_hidden, eps=config.layernorm_eps)
        self.fc2 = nn.Linear(config.ffn_hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_norm(F.gelu(self.fc1(self.norm(x)))))


class MultiwayLayer(nn.Module):
    """Joint self-attention over all segments, then one FFN expert per segment."""

    def __init__(self, config: ModelConfig, drop_path_rate: float, has_vl_expert: bool):
        super().__init__()
        self.heads = config.heads
        self.decoupled = config.attention == "decoupled"
        self.has_vl_expert = has_vl_expert
        self.drop_path_rate = drop_path_rate
        attention_keys = [VISION, TEXT] if self.decoupled else [SHARED]
        self.attn = nn.ModuleDict({key: AttentionBranch(config) for key in attention_keys})
        expert_keys = [VISION, TEXT] + ([VISION_LANGUAGE] if has_vl_expert else [])
        self.ffn = nn.ModuleDict({key: FeedForwardExpert(config) for key in expert_keys})

    def attention_branch(self, modality: str) -> AttentionBranch:
        return self.attn[modality if self.decoupled else SHARED]

    def expert(self, modality: str, is_pair: bool) -> FeedForwardExpert:
        return self.ffn[VISION_LANGUAGE if is_pair and self.has_vl_expert else modality]

    def _attend(
        self, segments: list[torch.Tensor], modalities: list[str], key_mask: torch.Tensor | None,
        packing: TextPacking | None,
    ) -> list[torch.Tensor]:
        branches = [self.attention_branch(m) for m in modalities]
        qkv_parts = [branch.qkv(branch.norm(x)) for branch, x in zip(branches, segments)]
        if packing is not None:
            qkv_parts[-1] = packing.unpack(qkv_parts[-1])
        qkv = qkv_parts[0] if len(qkv_parts) == 1 else torch.cat(qkv_parts, dim=1)
        batch, length, _ = qkv.shape
        q, k, v = qkv.view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        parts = list(attended.transpose(1, 2).reshape(batch, length, -1).split([p.shape[1] for p in qkv_parts], 1))
        if packing is not None:
            parts[-1] = packing.pack(parts[-1])
        return [branch.proj(branch.inner_norm(part)) for branch, part in zip(branches, parts)]

    def forward(
        self, segments: list[torch.Tensor], modalities: list[str], key_mask: torch.Tensor | None,
        packing: TextPacking | None = None,
    ) -> list[torch.Tensor]:
        is_pair = len(segments) > 1
        rate = self.drop_path_rate if self.training else 0.0
        batch = packing.batch if packing is not None else segments[0].shape[0]

        def scaled(branch_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
            scale = drop_path_scale(batch, rate, segments[0])
            if scale is None:
                return branch_outputs
            per_segment = [scale] * len(segments)
            if packing is not None:
                per_segment[-1] = scale.view(batch, 1)[packing.sample]
            return [y * s for y, s in zip(branch_outputs, per_segment)]

        attended = scaled(self._attend(segments, modalities, key_mask, packing))
        segments = [x + a for x, a in zip(segments, attended)]
        transformed = scaled([self.expert(m, is_pair)(x) for x, m in zip(segments, modalities)])
        return [x + y for x, y in zip(segments, transformed)]


class VisionEmbedding(nn.Module):
    """Patchify with a strided convolution, replace masked patches by the mask token, prepend CLS."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.image_size = config.image_size
        self.proj = nn.Conv2d(config.in_chans, config.hidden, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden))

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        if image.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"image of size {tuple(image.shape[-2:])} given to a model configured for "
                f"{self.image_size}x{self.image_size} (model.image_size)"
            )
        patches = self.proj(image).flatten(2).transpose(1, 2)
        if image_mask is not None:
            patches = torch.where(image_mask.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype), patches], dim=1)


class MultiwayTransformer(nn.Module):
    """BEiT-3 with its two masked-prediction heads (MLM over text ids, MIM over visual codes).

    `text_layout` (one of `TEXT_LAYOUTS`) chooses how padded text runs; it changes speed, not results.
    """

    def __init__(self, config: ModelConfig, text_layout: str = "auto"):
        super().__init__()
        if text_layout not in TEXT_LAYOUTS:
            raise ValueError(f"text_layout {text_layout!r} is not one of {', '.join(TEXT_LAYOUTS)}")
        self.config = config
        self.text_layout = text_layout
        d = config.hidden
        self.text_embed = nn.Embedding(config.vocab_size, d)
        self.vision_embed = VisionEmbedding(config)
        self.vision_pos_embed = nn.Parameter(torch.zeros(config.image_tokens + FIRST_POSITION, d))
        self.text_pos_embed = nn.Parameter(torch.zeros(config.text_positions, d))
        depth_rates = [config.drop_path * i / max(config.layers - 1, 1) for i in range(config.layers)]
        self.layers = nn.ModuleList(
            MultiwayLayer(config, depth_rates[i], config.has_vl_expert(i)) for i in range(config.layers)
        )
        self.final_norm = nn.ModuleDict({m: nn.LayerNorm(d, eps=config.layernorm_eps) for m in (VISION, TEXT)})
        self.mlm_head = nn.Linear(d, config.vocab_size)
        self.mim_head = nn.Linear(d, config.visual_vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after `to_empty` on a model built on the meta device."""
        d = self.config.hidden
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                if self.config.init == "beit":
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
                else:
                    module.reset_parameters()
        nn.init.normal_(self.text_embed.weight, std=d**-0.5)
        for tensor in (self.vision_pos_embed, self.text_pos_embed, self.vision_embed.cls_token):
            nn.init.trunc_normal_(tensor, std=0.02)
        nn.init.trunc_normal_(self.vision_embed.mask_token, std=0.02)
        for head in (self.mlm_head, self.mim_head):
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        if self.config.init == "magneto":
            self._scale_for_magneto()
        else:
            self._rescale_for_beit()

    def _scale_for_magneto(self) -> None:
        """Sub-LN init (Magneto): multiply fc1, fc2, out and v projections by sqrt(log(2N))."""
        gamma = math.sqrt(math.log(2 * self.config.layers))
        d = self.config.hidden
        for layer in self.layers:
            for branch in layer.attn.values():
                branch.qkv.weight[2 * d :].mul_(gamma)
                branch.qkv.bias[2 * d :].mul_(gamma)
                branch.proj.weight.mul_(gamma)
                branch.proj.bias.mul_(gamma)
            for expert in layer.ffn.values():
                for linear in (expert.fc1, expert.fc2):
                    linear.weight.mul_(gamma)
                    linear.bias.mul_(gamma)

    def _rescale_for_beit(self) -> None:
        """BEiT init: each layer's output projections divided by sqrt(2 * layer number)."""
        for index, layer in enumerate(self.layers):
            factor = math.sqrt(2.0 * (index + 1))
            for branch in layer.attn.values():
                branch.proj.weight.div_(factor)
            for expert in layer.ffn.values():
                expert.fc2.weight.div_(factor)

    def _embed_text(self, text: torch.Tensor) -> torch.Tensor:
        length = text.shape[1]
        if length > self.config.max_text_len:
            raise ValueError(
                f"text of {length} tokens exceeds the {self.config.max_text_len} that model.text_positions "
                f"({self.config.text_positions}) serves"
            )
        return self.text_embed(text) + self.text_pos_embed[FIRST_POSITION : FIRST_POSITION + length]

    def encode(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> MultiwayOutput:
        """Run the encoder on an image batch, a text batch, or both as image-text pairs.

        image: [B, C, H, W] float; text: [B, T] ids; text_padding_mask: [B, T] bool, True on pads;
        image_mask: [B, num_patches] bool, True where the patch is replaced by the mask token.
        Each text needs at least one real token (tokenized texts carry bos and eos).
        """
        if image is None and text is None:
            raise ValueError("encode() needs an image batch, a text batch, or both")
        segments, modalities = [], []
        if image is not None:
            vision = self.vision_embed(image, image_mask)
            segments.append(vision + self.vision_pos_embed[FIRST_POSITION:].to(vision.dtype))
            modalities.append(VISION)
        if text is not None:
            segments.append(self._embed_text(text))
            modalities.append(TEXT)
        key_mask, packing = None, None
        if text is not None and text_padding_mask is not None:
            keep = ~text_padding_mask
            if image is not None:
                keep = torch.cat([keep.new_ones(keep.shape[0], segments[0].shape[1]), keep], dim=1)
            key_mask = keep[:, None, None, :]
            if packs_text(self.text_layout, text.device):
                packing = TextPacking.from_padding_mask(text_padding_mask)
                segments[-1] = packing.pack(segments[-1])
        every = self.config.checkpoint_every_n_layers
        for index, layer in enumerate(self.layers):
            if every and self.training and index % every == 0:
                segments = checkpoint(layer, segments, modalities, key_mask, packing, use_reentrant=False)
            else:
                segments = layer(segments, modalities, key_mask, packing)
        outputs = {m: self.final_norm[m](x) for m, x in zip(modalities, segments)}
        if packing is not None:
            outputs[TEXT] = packing.unpack(outputs[TEXT])
        elif key_mask is not None:
            outputs[TEXT] = outputs[TEXT].masked_fill(text_padding_mask.unsqueeze(-1), 0.0)
        return MultiwayOutput(vision=outputs.get(VISION), text=outputs.get(TEXT))

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        text_prediction_mask: torch.Tensor | None = None,
    ) -> MultiwayOutput:
        """Encode, then apply the heads only where predictions are asked for.

        MIM logits ([masked patches, visual vocab]) come for the patches in `image_mask`; MLM logits
        ([chosen tokens, vocab]) for the positions in `text_prediction_mask`, in row-major order.
        """
        output = self.encode(image, text, text_padding_mask, image_mask)
        if image_mask is not None:
            output = output._replace(mim_logits=self.mim_head(output.vision[:, 1:][image_mask]))
        if text_prediction_mask is not None:
            output = output._replace(mlm_logits=self.mlm_head(output.text[text_prediction_mask]))
        return output
