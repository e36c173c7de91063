"""A stream's settings come from the recipe's own settings objects: every recipe value reaches the stream, and
settings made by hand default to what an unset recipe gives."""

import pytest
from pipeline_inputs import make_spm

from beit3.config import validate_config
from beit3.pretrain.shard_streams import StreamSettings, stream_settings
from beit3.pretrain.train_config import PretrainConfig
from beit3.tokenizers.text import TextTokenizer
from beit3.tokenizers.visual import VisualTokenizerConfig, build_visual_tokenizer
from conftest import model_config


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    return TextTokenizer(make_spm(tmp_path_factory.mktemp("spm")))


def recipe(tokenizer, **overrides) -> PretrainConfig:
    data = {"datasets": ["shards"], "text_tokenizer": str(tokenizer.model_path), **overrides.pop("data", {})}
    raw = {"name": "streams", "run_dir": "run", "model": model_config("tiny").model_dump(), "data": data, **overrides}
    return validate_config(PretrainConfig, raw, "recipe")


def test_a_recipe_left_at_its_defaults_gives_what_settings_made_by_hand_default_to(text_tokenizer):
    config = recipe(text_tokenizer)
    by_hand = StreamSettings(stream="pair", micro_batch=3, seed=0, image_size=112, grid=7,
                             mask_id=text_tokenizer.mask_id, text_vocab_size=text_tokenizer.vocab_size,
                             codebook_size=config.model.visual_vocab_size, max_text_len=config.model.max_text_len)
    assert stream_settings(config, "pair", 3, text_tokenizer) == by_hand


def test_every_recipe_setting_reaches_the_stream(text_tokenizer):
    config = recipe(text_tokenizer, seed=7,
                    masking={"image_ratio": 0.3, "mask_pair_images": False, "text_rate": 0.2, "caption_rate": 0.4},
                    augment={"flip_probability": 0.0, "color_jitter": 0.1, "model_interpolation": "bilinear"},
                    data={"shuffle_window_shards": 3, "verify_sha256": False, "read_attempts": 2,
                          "read_backoff_seconds": 0.25, "visual_codes": "on_the_fly",
                          "visual_tokenizer": {"kind": "random", "patch_size": 8, "image_size": 56}})
    visual_tokenizer, _ = build_visual_tokenizer(VisualTokenizerConfig(kind="random", patch_size=8, image_size=56))
    built = stream_settings(config, "image", 5, text_tokenizer, visual_tokenizer)
    assert (built.stream, built.micro_batch, built.seed, built.image_size, built.grid) == ("image", 5, 7, 112, 7)
    assert (built.image_ratio, built.mask_pair_images, built.text_rate, built.caption_rate) == (0.3, False, 0.2, 0.4)
    assert built.views == config.augment
    assert (built.shuffle_window_shards, built.verify_sha256, built.read_attempts,
            built.read_backoff_seconds) == (3, False, 2, 0.25)
    assert built.tokenizer_view_size == 7 * 8, "the tokenizer renders the model's grid at its own patch size"
