"""Conversion to and from the released checkpoint layout, for both architectures."""

import pytest
import torch

from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.released_format import (
    ReleasedFormatError,
    from_released,
    to_released,
    unwrap_checkpoint,
)

from conftest import model_config


def tiny():
    return model_config("tiny", drop_path=0.0)


def test_shared_attention_is_written_to_both_slots_and_round_trips():
    config = tiny()
    torch.manual_seed(0)
    model = MultiwayTransformer(config)
    released, report = to_released(model.state_dict(), config)
    assert any("both the A (vision) and B (language)" in note for note in report.notes)
    q_a = released["beit3.encoder.layers.0.self_attn.q_proj.A.weight"]
    assert torch.equal(q_a, released["beit3.encoder.layers.0.self_attn.q_proj.B.weight"])
    assert torch.equal(q_a, model.layers[0].attn["shared"].qkv.weight[: config.hidden])
    assert q_a.untyped_storage().data_ptr() != model.layers[0].attn["shared"].qkv.weight.untyped_storage().data_ptr()
    back, back_report = from_released(released, config)
    assert back_report.missing_keys == [] and back_report.extra_keys == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_vision_language_experts_go_under_extra_keys_and_are_reported():
    config = tiny()
    released, report = to_released(MultiwayTransformer(config).state_dict(), config)
    vl_keys = sorted(k for k in released if ".VL." in k)
    assert vl_keys and sorted(report.extra_keys) == vl_keys
    assert all(k.startswith("beit3.encoder.layers.3.") for k in vl_keys)
    assert "beit3.encoder.layers.3.ffn.VL.fc1.weight" in vl_keys
    assert "beit3.encoder.layers.3.final_layer_norm.VL.weight" in vl_keys
    assert any("'.VL.'" in note for note in report.notes)


def test_heads_ride_along():
    config = tiny()
    released, _ = to_released(MultiwayTransformer(config).state_dict(), config)
    assert released["mlm_head.weight"].shape == (64010, config.hidden)
    assert released["mim_head.weight"].shape == (8192, config.hidden)


def test_unwrap_checkpoint_containers_and_prefix():
    inner = {"beit3.text_embed.weight": torch.zeros(1)}
    assert unwrap_checkpoint({"model": inner}) is inner
    assert unwrap_checkpoint({"module": inner}) is inner
    assert unwrap_checkpoint({"model": {"encoder.beit3.x": 1, "other": 2}}, "encoder.") == {"beit3.x": 1}


def test_decoupled_checkpoint_cannot_load_into_shared_attention():
    decoupled = model_config("tiny", attention="decoupled", vl_expert_layers=0)
    released, _ = to_released(MultiwayTransformer(decoupled).state_dict(), decoupled)
    with pytest.raises(ReleasedFormatError, match="different A and B weights.*attention: decoupled"):
        from_released(released, model_config("tiny", vl_expert_layers=0))


def test_shape_mismatch_names_the_tensor():
    config = tiny()
    released, _ = to_released(MultiwayTransformer(config).state_dict(), config)
    expected = r"vision_pos_embed: checkpoint shape \(52, 128\) does not fit .*embed_positions.A.weight"
    with pytest.raises(ReleasedFormatError, match=expected):
        from_released(released, model_config("tiny", hidden=64))


def test_missing_and_unexpected_keys_are_reported_not_dropped_silently():
    config = tiny()
    released, _ = to_released(MultiwayTransformer(config).state_dict(), config)
    del released["mlm_head.weight"], released["beit3.encoder.layers.0.self_attn.k_proj.B.bias"]
    released["beit3.something_new"] = torch.zeros(1)
    converted, report = from_released(released, config)
    assert report.missing_keys == ["layers.0.attn.shared.qkv.bias", "mlm_head.weight"]
    assert "beit3.something_new" in report.extra_keys
    assert "mlm_head.weight" not in converted


def test_vl_keys_without_a_vl_slot_are_extra():
    config = tiny()
    released, _ = to_released(MultiwayTransformer(config).state_dict(), config)
    _, report = from_released(released, model_config("tiny", vl_expert_layers=0))
    assert report.extra_keys and all(".VL." in key for key in report.extra_keys)
