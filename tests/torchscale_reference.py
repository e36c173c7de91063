"""Builds torchscale 0.3.0's `BEiT3` (a test-only dependency) for a config, as the unilm fine-tuning code does."""

from torchscale.architecture.config import EncoderConfig
from torchscale.model.BEiT3 import BEiT3

from beit3.pretrain.model_config import ModelConfig


def build_torchscale(config: ModelConfig):
    args = EncoderConfig(
        img_size=config.image_size,
        patch_size=config.patch_size,
        vocab_size=config.vocab_size,
        multiway=True,
        layernorm_embedding=False,
        normalize_output=True,
        no_output_layer=True,
        drop_path_rate=config.drop_path,
        encoder_embed_dim=config.hidden,
        encoder_attention_heads=config.heads,
        encoder_ffn_embed_dim=config.ffn_hidden,
        encoder_layers=config.layers,
        max_source_positions=config.text_positions,
        layernorm_eps=config.layernorm_eps,
    )
    return BEiT3(args)
