"""Shared fixtures: repository paths and small model configs."""

from pathlib import Path

import pytest

from beit3.config import load_config
from beit3.pretrain.model_config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO / "configs" / "model"


def model_config(name: str, **overrides) -> ModelConfig:
    """A config from configs/model/, with fields overridden for a test."""
    loaded = load_config(ModelConfig, MODEL_CONFIGS / f"{name}.yaml")
    return loaded.model_copy(update=overrides) if overrides else loaded


@pytest.fixture
def small_decoupled() -> ModelConfig:
    """The released (decoupled) layout at a size that runs in milliseconds."""
    return model_config("base", layers=3, hidden=64, ffn_hidden=128, heads=4, image_size=64, drop_path=0.0)
