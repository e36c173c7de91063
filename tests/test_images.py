"""Every PIL mode converts to 8-bit RGB; bad bytes get an error with a reason, never a crash."""

import io

import numpy as np
import pytest
from PIL import Image

from beit3.tokenizers.images import ImageDecodeError, decode_image, load_image


def encoded(image, fmt="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(mode_size=(20, 10)):
    return np.tile(np.linspace(0, 1, mode_size[0]), (mode_size[1], 1))


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: Image.new("L", (20, 10), 128), "PNG"),
        (lambda: Image.new("LA", (20, 10), (128, 50)), "PNG"),
        (lambda: Image.new("RGB", (20, 10), (10, 200, 30)).convert("P"), "PNG"),
        (lambda: Image.new("RGBA", (20, 10), (10, 200, 30, 0)), "PNG"),
        (lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG"),
        (lambda: Image.new("1", (20, 10), 1), "PNG"),
        (lambda: Image.fromarray((gradient() * 65535).astype(np.uint16)), "PNG"),
        (lambda: Image.fromarray((gradient() * 65535).astype(np.int32), mode="I"), "TIFF"),
        (lambda: Image.fromarray(gradient().astype(np.float32), mode="F"), "TIFF"),
        (lambda: Image.new("RGB", (20, 10), (10, 200, 30)).convert("YCbCr"), "JPEG"),
        (lambda: Image.new("RGB", (20, 10), (10, 200, 30)).convert("LAB"), "TIFF"),
        (lambda: Image.new("RGB", (20, 10), (10, 200, 30)), "JPEG"),
    ],
    ids=["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "YCbCr", "LAB", "RGB"],
)
def test_every_mode_becomes_rgb(make, fmt):
    image = decode_image(encoded(make(), fmt))
    assert image.mode == "RGB" and image.size == (20, 10)


def test_lab_colours_survive_conversion():
    image = decode_image(encoded(Image.new("RGB", (4, 4), (200, 10, 10)).convert("LAB"), "TIFF"))
    assert np.abs(np.asarray(image)[0, 0].astype(int) - [200, 10, 10]).max() <= 6


def test_sixteen_bit_keeps_its_range():
    image = decode_image(encoded(Image.fromarray((gradient() * 65535).astype(np.uint16))))
    values = np.asarray(image)[0, :, 0]
    assert values[0] == 0 and values[-1] == 255 and np.all(np.diff(values.astype(int)) >= 0)


def test_transparency_is_composited_over_white():
    image = decode_image(encoded(Image.new("RGBA", (4, 4), (0, 0, 0, 0))))
    assert np.asarray(image).min() == 255
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(decode_image(encoded(palette))).min() == 255


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is plain text, not an image", "not_an_image"),
        (encoded(Image.new("RGB", (64, 64), 3), "JPEG")[:200], "corrupt"),
        (encoded(Image.new("RGB", (64, 64), 3), "PNG")[:-30], "corrupt"),
    ],
    ids=["zero-byte", "non-image", "truncated-jpeg", "truncated-png"],
)
def test_bad_bytes_get_a_reason(data, reason):
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data, "sample.bin")
    assert error.value.reason == reason and "sample.bin" in str(error.value)


def test_pixel_cap_refuses_decompression_bombs_before_decoding():
    bomb = encoded(Image.new("L", (4000, 4000), 0))
    with pytest.raises(ImageDecodeError) as error:
        decode_image(bomb, "bomb.png", max_pixels=1_000_000)
    assert error.value.reason == "too_many_pixels" and "4000x4000" in str(error.value)


def test_load_image_from_disk(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encoded(Image.new("L", (5, 5), 9)))
    assert load_image(path).mode == "RGB"
