"""Which image patches and text tokens are predicted: BEiT block-wise image masks and BERT-style text masks.

Every mask is a pure function of a per-sample seed (see `sample_seed`), never of a process's RNG state, so
the same run seed gives the same masks for the same sample on any rank, in any worker, after any resume.
"""

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

BEIT_MASKED_PATCHES_14x14 = 75
"""BEiT's published count for its 14x14 grid ("40%" there means 75 of 196 patches)."""


def sample_seed(run_seed: int, *key: object) -> int:
    """A 64-bit seed for one sample from the run seed and anything identifying the sample (epoch, stream, id)."""
    digest = hashlib.blake2b(repr((run_seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def masked_patch_count(grid: int, ratio: float = 0.4) -> int:
    """Patches to mask on a square grid: BEiT's 75 for 14x14 at 40%, otherwise the rounded share."""
    if grid == 14 and ratio == 0.4:
        return BEIT_MASKED_PATCHES_14x14
    return round(ratio * grid * grid)


@dataclass(frozen=True)
class BlockMasking:
    """BEiT block-wise masking with an exact count.

    Blocks of area s ~ U(min_block, remaining budget) and log-uniform aspect ratio in [min_aspect,
    1/min_aspect] are placed at random until the budget is reached; a block is kept if it adds between 1 and
    budget new cells, with up to `max_tries` placements per block. Random cells are then unmasked or masked
    so that exactly `num_masked` cells are masked.
    """

    grid: int
    num_masked: int
    min_block: int = 16
    max_block: int | None = None
    min_aspect: float = 0.3
    max_tries: int = 10

    def __post_init__(self):
        if not 0 <= self.num_masked <= self.grid * self.grid:
            raise ValueError(f"num_masked ({self.num_masked}) must lie in [0, {self.grid * self.grid}]")
        if not 0 < self.min_aspect <= 1:
            raise ValueError(f"min_aspect ({self.min_aspect}) must lie in (0, 1]")

    def _place_block(self, mask: np.ndarray, budget: int, rng: random.Random, blocks: list) -> int:
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        for _ in range(self.max_tries):
            area = rng.uniform(self.min_block, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            height = int(round(math.sqrt(area * aspect)))
            width = int(round(math.sqrt(area / aspect)))
            if height < self.grid and width < self.grid:
                top = rng.randint(0, self.grid - height)
                left = rng.randint(0, self.grid - width)
                region = mask[top : top + height, left : left + width]
                added = height * width - int(region.sum())
                if 0 < added <= budget:
                    region[...] = True
                    blocks.append((height, width))
                    return added
        return 0

    def generate(self, seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The [grid, grid] boolean mask for one sample, and the (height, width) of each block placed."""
        rng = random.Random(seed)
        mask = np.zeros((self.grid, self.grid), dtype=bool)
        blocks: list[tuple[int, int]] = []
        count = 0
        while count < self.num_masked:
            budget = min(self.num_masked - count, self.max_block or self.num_masked)
            added = self._place_block(mask, budget, rng, blocks)
            if added == 0:
                break
            count += added
        if count != self.num_masked:
            flat = mask.reshape(-1)
            wrong_state = count > self.num_masked
            candidates = np.flatnonzero(flat == wrong_state).tolist()
            flat[rng.sample(candidates, abs(count - self.num_masked))] = not wrong_state
        return mask, blocks

    def __call__(self, seed: int) -> np.ndarray:
        return self.generate(seed)[0]

    def batch(self, seeds: list[int]) -> torch.Tensor:
        """Masks for a batch, flattened to [batch, grid * grid] as the model's `image_mask` takes them."""
        return torch.from_numpy(np.stack([self(seed).reshape(-1) for seed in seeds]))


@dataclass(frozen=True)
class TextMasking:
    """BERT-style masking: choose `rate` of the eligible tokens; of those, 80% become `<mask>`, 10% a random
    regular piece, 10% stay. bos and pads are never chosen; eos is not chosen unless `mask_eos` (predicting
    the one token that always closes a sequence teaches nothing). The count per sample is the rate times the
    eligible tokens, rounded at random (so the expectation is exact), and at least one.
    """

    rate: float
    mask_id: int
    first_regular_id: int = 4
    bos_id: int = 0
    eos_id: int = 2
    mask_eos: bool = False
    mask_share: float = 0.8
    random_share: float = 0.1

    def __post_init__(self):
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate ({self.rate}) must lie in (0, 1]")
        if self.mask_share + self.random_share > 1:
            raise ValueError("mask_share + random_share must not exceed 1")

    def __call__(self, ids: np.ndarray, padding: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One sample: (input ids with replacements, boolean mask of the positions to predict)."""
        rng = np.random.default_rng(seed)
        eligible = ~padding & (ids != self.bos_id)
        if not self.mask_eos:
            eligible &= ids != self.eos_id
        positions = np.flatnonzero(eligible)
        chosen = np.zeros(ids.shape, dtype=bool)
        masked_ids = ids.copy()
        if positions.size == 0:
            return masked_ids, chosen
        count = max(1, int(self.rate * positions.size + rng.random()))
        picked = rng.choice(positions, size=min(count, positions.size), replace=False)
        chosen[picked] = True
        action = rng.random(picked.size)
        to_mask = action < self.mask_share
        to_random = (action >= self.mask_share) & (action < self.mask_share + self.random_share)
        masked_ids[picked[to_mask]] = self.mask_id
        masked_ids[picked[to_random]] = rng.integers(self.first_regular_id, self.mask_id, int(to_random.sum()))
        return masked_ids, chosen

    def batch(
        self, ids: torch.Tensor, padding: torch.Tensor, seeds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A [batch, length] batch: (input ids, prediction mask), the labels being the original `ids`."""
        ids_np, padding_np = ids.numpy(), padding.numpy()
        results = [self(ids_np[row], padding_np[row], seed) for row, seed in enumerate(seeds)]
        return (torch.from_numpy(np.stack([r[0] for r in results])),
                torch.from_numpy(np.stack([r[1] for r in results])))
