"""torchscale 0.3.0's `BEiT3` for a config, built as the unilm fine-tuning code builds it: the reference that
exports are verified against and the parity tests compare with. torchscale is an optional dependency
(`pip install --no-deps torchscale==0.3.0`; its old pins are not needed)."""

from beit3.pretrain.model_config import ModelConfig


def torchscale_encoder_args(config: ModelConfig) -> dict:
    """torchscale `EncoderConfig` arguments for a config, as unilm's `_get_base_config` sets them."""
    return dict(
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


def build_torchscale(config: ModelConfig):
    try:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3
    except ImportError:
        raise ImportError("verifying against the released architecture needs torchscale: "
                          "pip install --no-deps torchscale==0.3.0") from None
    return BEiT3(EncoderConfig(**torchscale_encoder_args(config)))
