"""The VQ-KD encoder side and the random-projection tokenizer: loading, grids, determinism, no lockstep."""

import io
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.layers import resample_abs_pos_embed

from beit3.sample_data import PHOTOS
from beit3.tokenizers.text import TokenizerFileError
from beit3.tokenizers.visual import (
    VisualTokenizerConfig,
    VQKDTokenizer,
    build_visual_tokenizer,
    codebook_usage,
)

SMALL = dict(width=64, depth=2, heads=4, codebook_size=64, image_size=64)


def official_like_checkpoint(path, config, seed=0):
    """What an official `vqkd_encoder_base_decoder_*` file holds: encoder side plus everything else."""
    torch.manual_seed(seed)
    state = VQKDTokenizer(config).state_dict()
    state["quantize.embedding.weight"] = torch.nn.functional.normalize(state["quantize.embedding.weight"], dim=-1)
    extra = {
        "decoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3),
        "decode_task_layer.0.weight": torch.zeros(2, 2),
        "quantize.embedding.cluster_size": torch.zeros(config.codebook_size),
        "quantize.embedding.embed_avg": torch.zeros(config.codebook_size, config.code_dim),
        "quantize.embedding.initted": torch.tensor(True),
        "quantize.cluster_size": torch.zeros(config.codebook_size),
        "loss_fn.weight": torch.zeros(1),
        "teacher_model.proj.weight": torch.zeros(2, 2),
        "scaling_layer.shift": torch.zeros(3),
    }
    torch.save({"model": {**state, **extra}}, path)
    return state


def images(batch=3, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_official_checkpoint_loads_strictly_and_reports_what_it_ignored(tmp_path):
    config = VisualTokenizerConfig(**SMALL, checkpoint=str(tmp_path / "vqkd.pth"))
    state = official_like_checkpoint(tmp_path / "vqkd.pth", config, seed=3)
    tokenizer, report = build_visual_tokenizer(config)
    assert torch.equal(tokenizer.encoder.blocks[1].attn.q_bias, state["encoder.blocks.1.attn.q_bias"])
    assert sorted(report.ignored_keys) == sorted([
        "decoder.blocks.0.attn.qkv.weight", "decode_task_layer.0.weight", "quantize.embedding.cluster_size",
        "quantize.embedding.embed_avg", "quantize.embedding.initted", "quantize.cluster_size", "loss_fn.weight",
        "teacher_model.proj.weight", "scaling_layer.shift"])
    assert "decoder: 1" in report.summary()
    names = set(state)
    for expected in ("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight",
                     "encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.v_bias",
                     "encoder.blocks.0.attn.qkv.weight",
                     "encoder.blocks.0.attn.proj.bias", "encoder.blocks.0.mlp.fc2.weight", "encoder.fc_norm.weight",
                     "encode_task_layer.0.weight", "encode_task_layer.2.bias", "quantize.embedding.weight"):
        assert expected in names


def test_codes_follow_the_vqkd_recipe(tmp_path):
    """Codes = argmin distance of l2-normalised task-layer features to the codebook, in fp32."""
    config = VisualTokenizerConfig(**SMALL)
    tokenizer, _ = build_visual_tokenizer(config)
    batch = images()
    codes = tokenizer.encode(batch)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    with torch.no_grad():
        tokens = tokenizer.encoder(batch * 2 - 1)
        features = torch.nn.functional.normalize(tokenizer.encode_task_layer(tokens), dim=-1)
        codebook = tokenizer.quantize.embedding.weight
        expected = torch.cdist(features, codebook.expand(3, -1, -1)).argmin(-1)
    assert torch.equal(codes.flatten(1), expected)


def test_larger_views_get_larger_grids_through_interpolated_positions():
    tokenizer, _ = build_visual_tokenizer(VisualTokenizerConfig(**SMALL))
    assert tokenizer.encode(images(size=64)).shape == (3, 4, 4)
    assert tokenizer.encode(images(size=80)).shape == (3, 5, 5)
    assert tokenizer.encode(images(size=96)).shape == (3, 6, 6)
    with pytest.raises(ValueError, match="not a multiple"):
        tokenizer.encode(images(size=70))


def test_official_shape_gives_16x16_codes_at_256_pixels():
    with torch.device("meta"):
        tokenizer = VQKDTokenizer(VisualTokenizerConfig())
    assert tuple(tokenizer.encoder.trained_grid) == (14, 14)
    assert tokenizer.encoder.positions((16, 16)).shape == (1, 257, 768)
    assert tokenizer.grid(256) == 16 and tokenizer.grid(224) == 14


def beit_v2_positions(pos_embed, rows, cols):
    """BEiT v2's `interpolate_pos_encoding` (beit2/modeling_finetune.py), written out: the patch rows as a
    square image, bicubic by scale factor (grid + 0.1) / trained side, align_corners False, the CLS row kept."""
    patches = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    if patches == rows * cols and rows == cols:
        return pos_embed
    side = math.sqrt(patches)
    patch_pos_embed = F.interpolate(pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2),
                                    scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    assert patch_pos_embed.shape[-2:] == (rows, cols)
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((pos_embed[:, 0].unsqueeze(0), patch_pos_embed), dim=1)


@torch.no_grad()
def codes_with_positions(tokenizer, images, positions):
    """Codes as BEiT v2's `VQKD.get_codebook_indices` computes them, from the tokenizer's weights and the
    position table given: [-1, 1] input, encoder, fc_norm over the patches, task layer, nearest l2 code."""
    encoder = tokenizer.encoder
    x = images * 255.0 / 127.5 - 1.0
    x = encoder.patch_embed(x)
    x = torch.cat((encoder.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + positions
    for block in encoder.blocks:
        x = block(x)
    z = F.normalize(tokenizer.encode_task_layer(encoder.fc_norm(x[:, 1:])), dim=-1)
    codebook = tokenizer.quantize.embedding.weight
    distances = z.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()
    return distances.argmin(-1).view(images.shape[0], images.shape[-2] // 16, images.shape[-1] // 16)


def photographs(size):
    """The photographs matplotlib ships, centre-cropped square at `size` pixels, in [0, 1]."""
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    views = [ImageOps.fit(Image.open(folder / name).convert("RGB"), (size, size), Image.Resampling.BICUBIC)
             for name in PHOTOS]
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() / 255


def tokenizer_with_a_position_table(seed=3):
    """A seeded random tokenizer trained at 224 pixels; random init leaves positions at zero, so a seeded table
    is written in for the resampling to matter."""
    tokenizer, _ = build_visual_tokenizer(VisualTokenizerConfig(**{**SMALL, "image_size": 224}, seed=seed))
    table = torch.randn(tokenizer.encoder.pos_embed.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tokenizer.encoder.pos_embed.copy_(table)
    return tokenizer


def test_position_table_is_resampled_as_beit_v2_does_and_codes_match_at_224_and_256_pixels():
    tokenizer = tokenizer_with_a_position_table()
    pos_embed = tokenizer.encoder.pos_embed
    assert tokenizer.encoder.positions((14, 14)) is pos_embed
    for rows, cols in [(16, 16), (12, 12), (16, 18)]:
        assert torch.equal(tokenizer.encoder.positions((rows, cols)), beit_v2_positions(pos_embed, rows, cols))
    for size, grid in [(224, 14), (256, 16)]:
        views = photographs(size)
        codes = tokenizer.encode(views)
        assert codes.shape == (len(PHOTOS), grid, grid)
        assert torch.equal(codes, codes_with_positions(tokenizer, views, beit_v2_positions(pos_embed, grid, grid)))


def test_antialiased_resampling_to_a_fixed_size_would_change_codes_at_256_pixels():
    """The resampling used before (timm's `resample_abs_pos_embed`: antialiased, to a fixed size) samples the
    table elsewhere, so the comparison above can fail."""
    tokenizer = tokenizer_with_a_position_table()
    views = photographs(256)
    antialiased = resample_abs_pos_embed(tokenizer.encoder.pos_embed, [16, 16], [14, 14], num_prefix_tokens=1)
    assert not torch.allclose(antialiased, beit_v2_positions(tokenizer.encoder.pos_embed, 16, 16), atol=1e-3)
    changed = tokenizer.encode(views) != codes_with_positions(tokenizer, views, antialiased)
    assert 0 < changed.sum() < changed.numel() / 4


def test_random_tokenizers_are_deterministic_given_seed_and_input():
    first, _ = build_visual_tokenizer(VisualTokenizerConfig(kind="random", seed=5, codebook_size=512))
    again, _ = build_visual_tokenizer(VisualTokenizerConfig(kind="random", seed=5, codebook_size=512))
    other, _ = build_visual_tokenizer(VisualTokenizerConfig(kind="random", seed=6, codebook_size=512))
    batch = images(size=64)
    assert torch.equal(first.encode(batch), again.encode(batch))
    assert not torch.equal(first.encode(batch), other.encode(batch))
    vqkd_a, _ = build_visual_tokenizer(VisualTokenizerConfig(**SMALL, seed=1))
    vqkd_b, _ = build_visual_tokenizer(VisualTokenizerConfig(**SMALL, seed=1))
    assert torch.equal(vqkd_a.encode(batch), vqkd_b.encode(batch))


def test_random_projection_codes_respect_similarity():
    tokenizer, _ = build_visual_tokenizer(VisualTokenizerConfig(kind="random", seed=0, codebook_size=256))
    base = images(batch=1, size=64)
    assert torch.equal(tokenizer.encode(base), tokenizer.encode((base + 1e-4).clamp(0, 1)))
    usage = codebook_usage(tokenizer.encode(images(batch=16, size=64)), 256)
    assert usage["distinct"] > 20


def _encode_in_process_group(rank, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    tokenizer, _ = build_visual_tokenizer(VisualTokenizerConfig(**SMALL, seed=2))
    calls = 3 if rank == 0 else 1  # ranks tokenize different numbers of batches: no lockstep may be needed
    codes = [tokenizer.encode(images(seed=rank * 10 + i)) for i in range(calls)]
    torch.save(codes, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_works_inside_torch_distributed_without_lockstep(tmp_path):
    mp.start_processes(_encode_in_process_group, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    tokenizer, _ = build_visual_tokenizer(VisualTokenizerConfig(**SMALL, seed=2))
    rank0 = torch.load(tmp_path / "rank0.pt")
    assert len(rank0) == 3 and len(torch.load(tmp_path / "rank1.pt")) == 1
    assert torch.equal(rank0[2], tokenizer.encode(images(seed=2)))


class CarriesCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"", "is empty"),
        (b"PK\x03\x04 truncated zip", "cannot read as a PyTorch checkpoint"),
        (b'{"json": "not a checkpoint"}', "cannot read as a PyTorch checkpoint"),
        ("pickle-with-code", "weights-only loading refuses"),
        ("wrong-shapes", "not a VQ-KD encoder checkpoint"),
    ],
    ids=["missing", "empty", "truncated", "wrong-type", "pickle-with-code", "wrong-model"],
)
def test_bad_checkpoints_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "vqkd.pth"
    if content == "pickle-with-code":
        path.write_bytes(pickle.dumps({"model": CarriesCode()}))
    elif content == "wrong-shapes":
        torch.save({"model": {"encoder.cls_token": torch.zeros(1, 1, 8)}}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerFileError, match=message) as error:
        build_visual_tokenizer(VisualTokenizerConfig(**SMALL, checkpoint=str(path)))
    assert "vqkd.pth" in str(error.value)


def test_truncated_real_checkpoint_is_refused(tmp_path):
    config = VisualTokenizerConfig(**SMALL, checkpoint=str(tmp_path / "vqkd.pth"))
    official_like_checkpoint(tmp_path / "vqkd.pth", config)
    data = (tmp_path / "vqkd.pth").read_bytes()
    (tmp_path / "vqkd.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerFileError, match="cannot read as a PyTorch checkpoint"):
        build_visual_tokenizer(config)


def test_tokenizer_info_command_over_a_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "n01440764").mkdir(parents=True)
    for index, mode in enumerate(["RGB", "L", "RGBA", "CMYK", "P"]):
        image = Image.new("RGB", (300, 260), (index * 40, 255 - index * 40, 90)).convert(mode)
        image.save(folder / "n01440764" / f"img{index}.{'jpg' if mode in ('RGB', 'L', 'CMYK') else 'png'}")
    (folder / "n01440764" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (folder / "empty.png").write_bytes(b"")
    beit3 = Path(sys.executable).parent / "beit3"
    result = subprocess.run([str(beit3), "tokenizer", "info", "--random-seed", "1", "--images", str(folder)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "codebook size 8192, patch 16, grid 14x14 at 224 pixels" in result.stdout
    assert "980 codes" in result.stdout and "skipped: empty 1, not_an_image 1" in result.stdout


def test_image_bytes_round_trip_for_info(tmp_path):
    buffer = io.BytesIO()
    Image.new("I;16", (32, 32)).save(buffer, format="PNG")
    (tmp_path / "deep.png").write_bytes(buffer.getvalue())
    from beit3.tokenizers.inspect_codes import image_tensor

    tensor = image_tensor(tmp_path / "deep.png", 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
