"""Block-wise image masks and BERT-style text masks: counts, shapes, rates, and per-sample reproducibility."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from beit3.pretrain.masking import BlockMasking, TextMasking, masked_patch_count, sample_seed

SEEDS = [sample_seed(7, "image", i) for i in range(400)]


@pytest.mark.parametrize("grid, expected", [(14, 75), (16, 102)])
def test_exact_counts_at_forty_percent(grid, expected):
    assert masked_patch_count(grid) == expected
    masking = BlockMasking(grid=grid, num_masked=expected)
    masks = masking.batch(SEEDS)
    assert masks.shape == (len(SEEDS), grid * grid) and masks.dtype == torch.bool
    assert (masks.sum(1) == expected).all()


def test_block_shapes_spread_both_sides_of_square_and_are_at_least_min_block():
    masking = BlockMasking(grid=14, num_masked=75)
    shapes = [shape for seed in SEEDS for shape in masking.generate(seed)[1]]
    aspects = np.array([h / w for h, w in shapes])
    assert (aspects < 0.8).mean() > 0.2 and (aspects > 1.25).mean() > 0.2
    first_blocks = [masking.generate(seed)[1][0] for seed in SEEDS]
    assert min(h * w for h, w in first_blocks) >= 12  # area >= 16 before rounding of sqrt(16*r) x sqrt(16/r)
    assert np.median([h * w for h, w in first_blocks]) >= 16
    assert np.mean([len(masking.generate(seed)[1]) for seed in SEEDS]) > 1.5


def test_masks_are_blocky_not_scattered():
    """Block masks have far fewer masked/unmasked edges than random masks of the same count."""
    masking = BlockMasking(grid=14, num_masked=75)

    def edges(mask):
        return int((mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum())

    rng = np.random.default_rng(0)
    random_masks = [rng.permutation(196) < 75 for _ in range(50)]
    block_edges = np.mean([edges(masking(seed)) for seed in SEEDS[:50]])
    random_edges = np.mean([edges(m.reshape(14, 14)) for m in random_masks])
    assert block_edges < 0.6 * random_edges


def test_same_seed_same_mask_in_another_process():
    masking = BlockMasking(grid=16, num_masked=102)
    here = masking.batch(SEEDS[:20]).numpy().tobytes().hex()
    script = (
        "from beit3.pretrain.masking import BlockMasking, sample_seed\n"
        "seeds = [sample_seed(7, 'image', i) for i in range(20)]\n"
        "print(BlockMasking(grid=16, num_masked=102).batch(seeds).numpy().tobytes().hex())\n"
    )
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there
    assert not torch.equal(masking.batch(SEEDS[:20]), masking.batch(SEEDS[20:40]))


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(1, "text", 5) == sample_seed(1, "text", 5)
    assert len({sample_seed(1, "text", i) for i in range(1000)}) == 1000
    assert sample_seed(1, "text", 5) != sample_seed(2, "text", 5)


def test_invalid_block_masking_parameters():
    with pytest.raises(ValueError, match="num_masked"):
        BlockMasking(grid=14, num_masked=200)
    with pytest.raises(ValueError, match="min_aspect"):
        BlockMasking(grid=14, num_masked=75, min_aspect=2.0)


def text_batch(rows=2000, length=64, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, rows)
    ids = rng.integers(4, 1000, (rows, length))
    ids[:, 0] = 0
    padding = np.arange(length)[None, :] >= lengths[:, None]
    ids[np.arange(rows), lengths - 1] = 2
    ids[padding] = 1
    return torch.from_numpy(ids), torch.from_numpy(padding)


@pytest.mark.parametrize("rate", [0.15, 0.5])
def test_text_rates_and_replacement_shares(rate):
    ids, padding = text_batch()
    masking = TextMasking(rate=rate, mask_id=64001)
    seeds = [sample_seed(3, "text", i) for i in range(len(ids))]
    masked, chosen = masking.batch(ids, padding, seeds)
    eligible = ~padding & (ids != 0) & (ids != 2)
    assert not (chosen & ~eligible).any(), "bos, eos and pads are never chosen"
    assert torch.equal(masked[~chosen], ids[~chosen]), "nothing outside the chosen positions changes"
    assert abs(chosen.sum().item() / eligible.sum().item() - rate) < 0.01
    picked_inputs, picked_labels = masked[chosen], ids[chosen]
    share_mask = (picked_inputs == 64001).float().mean().item()
    share_same = (picked_inputs == picked_labels).float().mean().item()
    share_random = 1 - share_mask - share_same
    assert abs(share_mask - 0.8) < 0.02 and abs(share_same - 0.1) < 0.02 and abs(share_random - 0.1) < 0.02
    replaced = picked_inputs[(picked_inputs != 64001) & (picked_inputs != picked_labels)]
    assert replaced.min() >= 4 and replaced.max() < 64001
    assert (chosen.sum(1) >= 1).all()


def test_eos_can_be_opted_in_and_pads_stay_untouched():
    ids, padding = text_batch(rows=500)
    masked, chosen = TextMasking(rate=0.5, mask_id=64001, mask_eos=True).batch(
        ids, padding, [sample_seed(0, i) for i in range(500)])
    assert chosen[ids == 2].any()
    assert (masked[padding] == 1).all() and not chosen[padding].any() and not chosen[:, 0].any()


def test_text_masks_are_reproducible_per_sample():
    ids, padding = text_batch(rows=10)
    masking = TextMasking(rate=0.15, mask_id=64001)
    seeds = [sample_seed(9, i) for i in range(10)]
    first = masking.batch(ids, padding, seeds)
    again = masking.batch(ids[[3]], padding[[3]], [seeds[3]])
    assert torch.equal(first[0][3], again[0][0]) and torch.equal(first[1][3], again[1][0])
