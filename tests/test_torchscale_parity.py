"""Our model against torchscale 0.3.0's `BEiT3`, the package the released checkpoints were built with, in
both text layouts."""

import pytest
import torch

from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.released_format import from_released, to_released
from beit3.pretrain.torchscale_reference import build_torchscale
from conftest import model_config

TOLERANCE = 1e-5
BATCH, TEXT_LEN = 3, 12


def make_inputs(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, 3, config.image_size, config.image_size, generator=generator)
    text = torch.randint(3, 64000, (BATCH, TEXT_LEN), generator=generator)
    padding = torch.zeros(BATCH, TEXT_LEN, dtype=torch.bool)
    padding[1, 8:] = True
    padding[2, 3:] = True
    image_mask = torch.rand(BATCH, config.num_patches, generator=generator) < 0.4
    return image, text, padding, image_mask


CASES = {
    "image": lambda i, t, p, m: (dict(image=i), dict(visual_tokens=i)),
    "image_masked": lambda i, t, p, m: (dict(image=i, image_mask=m), dict(visual_tokens=i, vision_masked_position=m)),
    "text_padded": lambda i, t, p, m: (
        dict(text=t, text_padding_mask=p), dict(textual_tokens=t, text_padding_position=p)),
    "pair": lambda i, t, p, m: (
        dict(image=i, text=t, text_padding_mask=p), dict(visual_tokens=i, textual_tokens=t, text_padding_position=p)),
    "pair_masked": lambda i, t, p, m: (
        dict(image=i, text=t, text_padding_mask=p, image_mask=m),
        dict(visual_tokens=i, textual_tokens=t, text_padding_position=p, vision_masked_position=m)),
}


def assert_same_outputs(ours, reference, config):
    """Every position agrees except text pads, whose outputs no consumer reads (ours are zero there)."""
    inputs = make_inputs(config)
    with torch.no_grad():
        for case, arguments in CASES.items():
            our_kwargs, reference_kwargs = arguments(*inputs)
            output = ours.encode(**our_kwargs)
            joined = torch.cat([x for x in (output.vision, output.text) if x is not None], dim=1)
            expected = reference(**reference_kwargs)["encoder_out"]
            assert joined.shape == expected.shape, case
            real = torch.ones(joined.shape[:2], dtype=torch.bool)
            if "text_padding_mask" in our_kwargs:
                real[:, -TEXT_LEN:] = ~our_kwargs["text_padding_mask"]
                assert torch.all(joined[~real] == 0), case
            difference = (joined[real] - expected[real]).abs().max().item()
            assert difference < TOLERANCE, f"{case}: max difference {difference:.2e}"


def backbone_of(released):
    return {k.removeprefix("beit3."): v for k, v in released.items() if k.startswith("beit3.")}


@pytest.fixture(scope="module", params=["small", pytest.param("base", marks=pytest.mark.slow)])  # base: full width
def config(request):
    if request.param == "small":
        return model_config("base", layers=3, hidden=64, ffn_hidden=128, heads=4, image_size=64, drop_path=0.0)
    return model_config("base", drop_path=0.0)


@pytest.mark.parametrize("text_layout", ["packed", "padded"])
def test_our_weights_in_torchscale_give_the_same_outputs(config, text_layout):
    torch.manual_seed(1)
    ours = MultiwayTransformer(config, text_layout).eval()
    released, report = to_released(ours.state_dict(), config)
    assert report.extra_keys == [] and report.notes == []
    reference = build_torchscale(config).eval()
    reference.load_state_dict(backbone_of(released), strict=True)
    assert_same_outputs(ours, reference, config)


@pytest.mark.parametrize("text_layout", ["packed", "padded"])
def test_torchscale_weights_in_ours_give_the_same_outputs(config, text_layout):
    torch.manual_seed(2)
    reference = build_torchscale(config).eval()
    released = {f"beit3.{k}": v for k, v in reference.state_dict().items()}
    converted, report = from_released(released, config)
    assert report.extra_keys == []
    assert sorted(report.missing_keys) == ["mim_head.bias", "mim_head.weight", "mlm_head.bias", "mlm_head.weight"]
    ours = MultiwayTransformer(config, text_layout).eval()
    missing, unexpected = ours.load_state_dict(converted, strict=False)
    assert sorted(missing) == sorted(report.missing_keys) and unexpected == []
    assert_same_outputs(ours, reference, config)


def test_base_has_the_released_tensor_count():
    config = model_config("base")
    with torch.device("meta"):
        released, _ = to_released(MultiwayTransformer(config).state_dict(), config)
    assert len(backbone_of(released)) == 491
    with torch.device("meta"):
        reference_keys = set(build_torchscale(config).state_dict())
    assert set(backbone_of(released)) == reference_keys
