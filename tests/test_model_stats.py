"""Parameter counts against the released base and the paper's giant."""

import pytest

from beit3.pretrain.model_stats import (
    active_parameters_per_token,
    count_parameters,
    tokens_per_sample,
    training_flops_per_sample,
)

from conftest import model_config


def test_base_backbone_equals_torchscale_exactly():
    assert count_parameters(model_config("base")).backbone == 220_987_392


def test_large_backbone():
    assert count_parameters(model_config("large")).backbone == 672_702_464


@pytest.mark.parametrize(
    "part, paper", [("ffn.vision", 692e6), ("ffn.text", 692e6), ("ffn.vl", 52e6), ("attention", 317e6)]
)
def test_giant_parts_within_one_percent_of_the_paper(part, paper):
    count = count_parameters(model_config("giant")).parts[part]
    assert abs(count - paper) / paper < 0.01


def test_giant_total_brackets_the_papers_figure():
    """The paper's 1.9B lies between the backbone (1.848B) and the backbone with both heads (1.950B)."""
    breakdown = count_parameters(model_config("giant"))
    assert breakdown.backbone < 1.9e9 < breakdown.total
    assert round(breakdown.backbone / 1e9, 2) == 1.85 and round(breakdown.total / 1e9, 2) == 1.95


def test_giant_compute_arithmetic_matches_the_recipe():
    """Section 7: 25.23M active parameters per layer, ~9.1e15 FLOPs for a 2048/2048/2048 step."""
    giant = model_config("giant")
    active = active_parameters_per_token(giant)
    assert abs(active / giant.layers - 25.23e6) / 25.23e6 < 0.005
    tokens = tokens_per_sample(giant)
    assert tokens == {"image": 257, "text": 128, "pair": 321}
    step = sum(2048 * training_flops_per_sample(giant, t, active) for t in tokens.values())
    assert abs(step - 9.1e15) / 9.1e15 < 0.01
