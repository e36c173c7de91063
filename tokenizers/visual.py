"""Visual tokenizers: images in [0, 1] to a grid of discrete codes, the targets of masked image modeling.

`VQKDTokenizer` is the encoder side of BEiT v2's VQ-KD (a ViT-B/16 on timm's BEiT blocks, a small task head,
and a nearest-code lookup in an l2-normalised codebook), with parameter names that load the official
`vqkd_encoder_base_decoder_*` checkpoints strictly. `RandomProjectionTokenizer` is a seeded stand-in for demos
and tests: patches projected by a fixed random matrix onto a fixed random codebook.

Neither needs `torch.distributed` nor calls into it, so ranks may tokenize independently, in any order.
"""

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.beit import Block
from torch import nn

from .text import TokenizerFileError
from .visual_config import VisualTokenizerConfig

IGNORED_PREFIXES = ("decoder.", "decode_task_layer.", "loss", "teacher", "scaling")
"""Checkpoint keys the encoder side does not need: the decoder, the distillation teacher and its losses."""


@dataclass
class LoadReport:
    """What a checkpoint held beyond what the encoder side loads."""

    ignored_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        groups: dict[str, int] = {}
        for key in self.ignored_keys:
            groups[key.split(".")[0]] = groups.get(key.split(".")[0], 0) + 1
        return ", ".join(f"{name}: {count}" for name, count in sorted(groups.items())) or "nothing"


def nearest_codes(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each l2-normalised feature, in fp32 (as VQ-KD computes it)."""
    features = F.normalize(features.float(), dim=-1)
    codebook = codebook.float()
    distances = codebook.square().sum(1) - 2 * features @ codebook.t()
    return distances.argmin(dim=-1)


class VQKDEncoder(nn.Module):
    """ViT-B/16 with absolute positions, q/v biases, and `fc_norm` over the patch tokens (no CLS)."""

    def __init__(self, config: VisualTokenizerConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, 3, config.width, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, config.width))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, qkv_bias=True, norm_layer=norm) for _ in range(config.depth)
        )
        self.fc_norm = norm(config.width)
        self.trained_grid = self.patch_embed.grid_size

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a patch grid, resampled when it differs from the trained one exactly as BEiT v2
        does (`interpolate_pos_encoding`): bicubic by the scale factor (grid + 0.1) / trained grid, no
        antialiasing, the CLS row kept. The scale, not the output size, sets where each row is sampled, so
        codes at other grids match those of the official encoder."""
        if tuple(grid) == tuple(self.trained_grid):
            return self.pos_embed
        rows, cols = self.trained_grid
        patch_table = self.pos_embed[:, 1:].reshape(1, rows, cols, -1).permute(0, 3, 1, 2)
        patch_table = F.interpolate(patch_table, scale_factor=((grid[0] + 0.1) / rows, (grid[1] + 0.1) / cols),
                                    mode="bicubic", align_corners=False)
        patch_table = patch_table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat([self.pos_embed[:, :1], patch_table], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.positions(grid)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x[:, 1:])


class CodebookLookup(nn.Module):
    """The quantizer's codebook (`quantize.embedding.weight` in the official checkpoints)."""

    def __init__(self, codebook_size: int, code_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, code_dim)


class VisualTokenizer(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> codes [B, H / patch, W / patch]."""

    patch_size: int
    codebook_size: int

    def grid(self, image_size: int) -> int:
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the tokenizer's patch {self.patch_size}")
        return image_size // self.patch_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def codebook(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [batch, 3, height, width], got {tuple(images.shape)}")
        rows, cols = self.grid(images.shape[-2]), self.grid(images.shape[-1])
        codes = nearest_codes(self.features(images), self.codebook())
        return codes.view(images.shape[0], rows, cols)


class VQKDTokenizer(VisualTokenizer):
    """The encoder side of BEiT v2's VQ-KD tokenizer."""

    def __init__(self, config: VisualTokenizerConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.codebook_size = config.codebook_size
        self.encoder = VQKDEncoder(config)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(config.width, config.width), nn.Tanh(), nn.Linear(config.width, config.code_dim)
        )
        self.quantize = CodebookLookup(config.codebook_size, config.code_dim)
        self.eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(images * (255.0 / 127.5) - 1.0)
        with torch.autocast(tokens.device.type, enabled=False):
            return self.encode_task_layer(tokens.float())

    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def load_official(self, path: str | Path) -> LoadReport:
        """Load an official VQ-KD checkpoint; every encoder-side tensor must be present and fit."""
        path = Path(path)
        state = _read_checkpoint(path)
        report = LoadReport()
        wanted = {}
        for key, tensor in state.items():
            if key.startswith(IGNORED_PREFIXES) or (key.startswith("quantize.") and key != "quantize.embedding.weight"):
                report.ignored_keys.append(key)
            else:
                wanted[key] = tensor
        own = self.state_dict()
        missing = sorted(set(own) - set(wanted))
        unexpected = sorted(set(wanted) - set(own))
        if missing or unexpected:
            raise TokenizerFileError(
                f"{path}: not a VQ-KD encoder checkpoint for this config: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        for key, tensor in wanted.items():
            if tensor.shape != own[key].shape:
                raise TokenizerFileError(
                    f"{path}: {key} has shape {tuple(tensor.shape)}, the config expects {tuple(own[key].shape)}"
                )
        self.load_state_dict(wanted, strict=True)
        return report


class RandomProjectionTokenizer(VisualTokenizer):
    """Seeded stand-in: each patch projected by a fixed random matrix, then the nearest fixed random code.

    Similar patches get similar codes, so a model can learn to predict them; no weights are needed.
    """

    def __init__(self, config: VisualTokenizerConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.codebook_size = config.codebook_size
        generator = torch.Generator().manual_seed(config.seed)
        patch_dim = 3 * config.patch_size**2
        self.register_buffer("projection", torch.randn(patch_dim, config.code_dim, generator=generator))
        codebook = F.normalize(torch.randn(config.codebook_size, config.code_dim, generator=generator), dim=-1)
        self.register_buffer("codes", codebook)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(images.float() * 2 - 1, kernel_size=self.patch_size, stride=self.patch_size)
        patches = patches.transpose(1, 2)
        return (patches - patches.mean(-1, keepdim=True)) @ self.projection

    def codebook(self) -> torch.Tensor:
        return self.codes


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TokenizerFileError(f"{path}: visual tokenizer checkpoint not found")
    if path.stat().st_size == 0:
        raise TokenizerFileError(f"{path}: visual tokenizer checkpoint is empty (0 bytes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for truncated or foreign files
        raise TokenizerFileError(
            f"{path}: cannot read as a PyTorch checkpoint (truncated, not a checkpoint, or carrying code that "
            f"weights-only loading refuses): {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        ) from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise TokenizerFileError(f"{path}: expected a state dict (or {{'model': state dict}}) of tensors")
    return checkpoint


def build_visual_tokenizer(config: VisualTokenizerConfig) -> tuple[VisualTokenizer, LoadReport | None]:
    """The tokenizer a config names, with the load report when weights came from a checkpoint."""
    if config.kind == "random":
        return RandomProjectionTokenizer(config), None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        tokenizer = VQKDTokenizer(config)
    if config.checkpoint is None:
        return tokenizer, None
    return tokenizer, tokenizer.load_official(config.checkpoint)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """How much of the codebook a set of codes uses: distinct codes, their share, and the perplexity."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    probabilities = counts / counts.sum()
    entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"codes_seen": int(counts.sum()), "distinct": used, "share": used / codebook_size,
            "perplexity": math.exp(entropy)}
