"""Behaviour of the Multiway Transformer: routing, masking, padding, text layouts, heads, init, precision,
checkpointing."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from beit3.pretrain.model import MultiwayTransformer, TextPacking, drop_path_scale, packs_text
from beit3.pretrain.model_stats import build_on_meta

from conftest import model_config


def tiny(**overrides):
    return model_config("tiny", **{"drop_path": 0.0, **overrides})


def inputs(config, batch=2, text_len=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)
    text = torch.randint(3, 1000, (batch, text_len), generator=generator)
    padding = torch.zeros(batch, text_len, dtype=torch.bool)
    padding[0, 6:] = True
    return image, text, padding


def build(config, seed=0, text_layout="auto"):
    torch.manual_seed(seed)
    return MultiwayTransformer(config, text_layout).eval()


def test_output_shapes_for_each_input_kind():
    config = tiny()
    model = build(config)
    image, text, padding = inputs(config)
    out = model.encode(image=image)
    assert out.vision.shape == (2, config.image_tokens, config.hidden) and out.text is None
    out = model.encode(text=text, text_padding_mask=padding)
    assert out.text.shape == (2, 10, config.hidden) and out.vision is None
    out = model.encode(image=image, text=text, text_padding_mask=padding)
    assert out.vision.shape == (2, config.image_tokens, config.hidden) and out.text.shape == (2, 10, config.hidden)


def test_heads_only_at_masked_positions():
    config = tiny()
    model = build(config)
    image, text, padding = inputs(config)
    image_mask = torch.zeros(2, config.num_patches, dtype=torch.bool)
    image_mask[0, :5] = True
    image_mask[1, 10:13] = True
    chosen = torch.zeros(2, 10, dtype=torch.bool)
    chosen[1, 2] = True
    out = model(image=image, text=text, text_padding_mask=padding, image_mask=image_mask, text_prediction_mask=chosen)
    assert out.mim_logits.shape == (8, config.visual_vocab_size)
    assert out.mlm_logits.shape == (1, config.vocab_size)
    expected = model.mlm_head(out.text[1, 2])
    torch.testing.assert_close(out.mlm_logits[0], expected)


def test_masked_patches_are_replaced_by_the_mask_token():
    config = tiny()
    model = build(config)
    image, _, _ = inputs(config)
    mask = torch.zeros(2, config.num_patches, dtype=torch.bool)
    mask[:, 3] = True
    embedded = model.vision_embed(image, mask)
    torch.testing.assert_close(embedded[:, 4], model.vision_embed.mask_token[0].expand(2, -1))
    other = image.clone()
    other[:, :, :16, 48:64] = 0.0
    assert torch.equal(model.vision_embed(other, mask)[:, 4], embedded[:, 4])


@pytest.mark.parametrize("text_layout", ["packed", "padded"])
def test_padding_does_not_change_real_tokens(text_layout):
    config = tiny()
    model = build(config, text_layout=text_layout)
    image, text, _ = inputs(config, batch=1, text_len=6)
    padded = torch.cat([text, torch.full((1, 4), 1)], dim=1)
    padding = torch.zeros(1, 10, dtype=torch.bool)
    padding[0, 6:] = True
    short = model.encode(image=image, text=text)
    long = model.encode(image=image, text=padded, text_padding_mask=padding)
    torch.testing.assert_close(long.text[:, :6], short.text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long.vision, short.vision, atol=1e-5, rtol=1e-5)


def test_vision_language_expert_serves_only_pairs_in_top_layers():
    config = tiny()
    model = build(config)
    image, text, padding = inputs(config)
    before_pair = model.encode(image=image, text=text, text_padding_mask=padding)
    before_image = model.encode(image=image)
    before_text = model.encode(text=text, text_padding_mask=padding)
    top = model.layers[-1]
    assert "vl" in top.ffn and all("vl" not in layer.ffn for layer in model.layers[:-1])
    with torch.no_grad():
        top.ffn["vl"].fc2.bias.add_(1.0)
    assert not torch.allclose(model.encode(image=image, text=text, text_padding_mask=padding).text, before_pair.text)
    assert torch.equal(model.encode(image=image).vision, before_image.vision)
    assert torch.equal(model.encode(text=text, text_padding_mask=padding).text, before_text.text)


def test_decoupled_attention_routes_each_modality_to_its_own_weights():
    config = tiny(attention="decoupled", vl_expert_layers=0)
    model = build(config)
    image, text, padding = inputs(config)
    before_image = model.encode(image=image).vision
    with torch.no_grad():
        for layer in model.layers:
            layer.attn["text"].proj.bias.add_(1.0)
            layer.ffn["text"].fc2.bias.add_(1.0)
    assert torch.equal(model.encode(image=image).vision, before_image)
    assert sorted(model.layers[0].attn) == ["text", "vision"]


def test_shared_attention_has_one_set_of_weights():
    model = build(tiny())
    assert list(model.layers[0].attn) == ["shared"]


def test_drop_path_rates_grow_with_depth_and_keep_whole_samples():
    config = tiny(drop_path=0.3)
    model = build(config)
    assert [layer.drop_path_rate for layer in model.layers] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    torch.manual_seed(0)
    scales = drop_path_scale(10000, 0.3, torch.zeros(1))
    assert sorted(set(scales.flatten().tolist())) == pytest.approx([0.0, 1 / 0.7])
    assert abs((scales == 0).float().mean().item() - 0.3) < 0.02
    assert drop_path_scale(4, 0.0, torch.zeros(1)) is None


def test_eval_mode_is_deterministic_and_training_mode_drops_paths():
    config = tiny(drop_path=0.5)
    model = build(config)
    image, _, _ = inputs(config, batch=8)
    assert torch.equal(model.encode(image=image).vision, model.encode(image=image).vision)
    model.train()
    torch.manual_seed(0)
    first = model.encode(image=image).vision
    torch.manual_seed(1)
    assert not torch.allclose(first, model.encode(image=image).vision)


def test_magneto_init_scales_the_sub_ln_projections():
    config = tiny(init="magneto")
    model = build(config)
    gamma = math.sqrt(math.log(2 * config.layers))
    d = config.hidden
    branch = model.layers[0].attn["shared"]
    bound = 1 / math.sqrt(d)  # PyTorch's default uniform init bound for fan-in d
    q_max, v_max = branch.qkv.weight[:d].abs().max().item(), branch.qkv.weight[2 * d:].abs().max().item()
    assert q_max <= bound < v_max <= bound * gamma
    assert bound < branch.proj.weight.abs().max().item() <= bound * gamma


def test_beit_init_rescales_output_projections_by_depth():
    model = build(tiny(init="beit"))
    stds = [layer.ffn["vision"].fc2.weight.std().item() for layer in model.layers]
    expected = [0.02 / math.sqrt(2 * (i + 1)) for i in range(4)]
    assert stds == pytest.approx(expected, rel=0.1)


def test_giant_builds_on_meta_without_memory():
    giant = build_on_meta(model_config("giant"))
    assert all(p.is_meta for p in giant.parameters())
    assert sum(p.numel() for p in giant.parameters()) > 1.9e9


def test_meta_model_materialises_with_init_weights():
    config = tiny()
    model = build_on_meta(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = build(config)
    torch.manual_seed(0)
    reference.init_weights()
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name


def test_bf16_autocast_forward_and_backward():
    config = tiny()
    model = build(config).train()
    image, text, padding = inputs(config)
    mask = torch.rand(2, config.num_patches) < 0.4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image=image, text=text, text_padding_mask=padding, image_mask=mask,
                    text_prediction_mask=~padding)
    assert out.mim_logits.dtype == torch.bfloat16
    loss = out.mim_logits.float().logsumexp(-1).mean() + out.mlm_logits.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(model.layers[0].attn["shared"].qkv.weight.grad).all()


def test_activation_checkpointing_gives_the_same_gradients():
    image, text, padding = inputs(tiny())
    gradients = []
    for every in (0, 1, 2):
        model = build(tiny(checkpoint_every_n_layers=every, drop_path=0.2)).train()
        torch.manual_seed(5)
        out = model.encode(image=image, text=text, text_padding_mask=padding)
        (out.vision.square().mean() + out.text.square().mean()).backward()
        gradients.append({name: p.grad for name, p in model.layers.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() == gradients[2].keys()
    torch.testing.assert_close(gradients[1], gradients[0])
    torch.testing.assert_close(gradients[2], gradients[0])


def test_bad_inputs_get_clear_errors():
    config = tiny()
    model = build(config)
    with pytest.raises(ValueError, match="needs an image batch, a text batch, or both"):
        model.encode()
    with pytest.raises(ValueError, match="configured for 112x112"):
        model.encode(image=torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match="exceeds the 1022"):
        model.encode(text=torch.zeros(1, 1023, dtype=torch.long))


def test_text_packing_round_trips_and_keeps_only_real_tokens():
    padding = torch.tensor([[False, False, True], [False, True, True]])
    packing = TextPacking.from_padding_mask(padding)
    grid = torch.arange(6.0).view(2, 3, 1)
    packed = packing.pack(grid)
    assert packed.flatten().tolist() == [0.0, 1.0, 3.0] and packing.sample.tolist() == [0, 0, 1]
    assert packing.unpack(packed).flatten().tolist() == [0.0, 1.0, 0.0, 3.0, 0.0, 0.0]


def test_pads_cost_no_per_token_work_when_packed():
    """The FFN sees only the real text tokens: pads are dropped before every per-token operation."""
    config = tiny()
    model = build(config, text_layout="packed")
    _, text, padding = inputs(config)
    seen = []
    model.layers[0].ffn["text"].fc1.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    model.encode(text=text, text_padding_mask=padding)
    assert seen == [torch.Size([int((~padding).sum()), config.hidden])]


def test_the_cpu_packs_text_and_accelerators_keep_it_padded():
    assert packs_text("auto", torch.device("cpu")) and not packs_text("auto", torch.device("cuda"))
    assert packs_text("packed", torch.device("cuda")) and not packs_text("padded", torch.device("cpu"))
    with pytest.raises(ValueError, match="text_layout 'unpadded' is not one of auto, packed, padded"):
        MultiwayTransformer(tiny(), text_layout="unpadded")


@pytest.mark.parametrize("attention", ["shared", "decoupled"])
def test_text_layouts_give_the_same_outputs_and_gradients(attention):
    """Packed and padded text: the same outputs (zeros at pads) and gradients, texts and pairs, paths dropped."""
    config = tiny(attention=attention, drop_path=0.3)
    image, text, padding = inputs(config, batch=3, text_len=12)
    padding[1, 4:] = True
    results = {}
    for layout in ("packed", "padded"):
        model = build(config, text_layout=layout).train()
        for kind, arguments in {"text": dict(text=text, text_padding_mask=padding),
                                "pair": dict(image=image, text=text, text_padding_mask=padding)}.items():
            torch.manual_seed(7)
            out = model.encode(**arguments)
            sum(x.square().mean() for x in out if x is not None).backward()
            gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            results[layout, kind] = (out, gradients)
            model.zero_grad(set_to_none=True)
    for kind in ("text", "pair"):
        (packed, packed_gradients), (padded, padded_gradients) = results["packed", kind], results["padded", kind]
        assert torch.all(padded.text[padding] == 0), kind
        torch.testing.assert_close(padded, packed, rtol=1e-5, atol=1e-6)
        assert padded_gradients.keys() == packed_gradients.keys()
        torch.testing.assert_close(padded_gradients, packed_gradients, rtol=1e-5, atol=1e-7)


class HostReads(TorchDispatchMode):
    """Counts the operators that read a tensor's values back to the host (on a GPU, each waits for it): the
    reads themselves, and indexing by a boolean mask, whose result size the host must learn."""

    READS = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default}
    INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS or (
            func in self.INDEXING and any(index is not None and index.dtype == torch.bool for index in args[1]))
        return func(*args, **(kwargs or {}))


def test_padded_text_reads_nothing_back_to_the_host():
    """Padded, an encoding step (forward and backward) never waits for the device; packed reads the token count."""
    config = tiny(drop_path=0.1)
    image, text, padding = inputs(config)
    for layout, expected in (("padded", 0), ("packed", 1)):
        model = build(config, text_layout=layout).train()
        for arguments in (dict(text=text, text_padding_mask=padding),
                          dict(image=image, text=text, text_padding_mask=padding)):
            with HostReads() as reads:
                out = model.encode(**arguments)
                sum(x.square().mean() for x in out if x is not None).backward()
            assert reads.count == expected, (layout, sorted(arguments))
