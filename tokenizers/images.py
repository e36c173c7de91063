"""Image decoding for tokenizers and the data pipeline: any PIL mode to 8-bit RGB, with a pixel cap.

Every mode is converted rather than rejected: palette and alpha images are composited over white,
16-bit and 32-bit integer images are scaled down to 8 bits, float images are read as [0, 1], CMYK and
the other colour spaces go through PIL's own conversion.

Only the formats image datasets hold are opened (`IMAGE_FORMATS`): PIL's other plugins include readers no
dataset needs, one of which (EPS) hands the bytes to Ghostscript.
"""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
"""PIL formats decoded (JPEG's reader also opens the multi-picture JPEGs cameras write, PIL's MPO)."""
DEFAULT_MAX_PIXELS = 64_000_000
"""Larger images are refused as likely decompression bombs (ImageNet-21K's largest are far below this)."""


class ImageDecodeError(ValueError):
    """Bytes that do not decode to a usable image; `reason` is a short tag for skip counters."""

    def __init__(self, source: str, reason: str, detail: str):
        super().__init__(f"{source}: {reason} ({detail})")
        self.reason, self.detail = reason, detail


def _scale_to_uint8(array: np.ndarray, full_scale: float) -> np.ndarray:
    """[0, full_scale] to uint8 (NaN as 0), in one float32 copy: a few hundred kilobytes of 16-bit PNG can hold
    the 64 megapixels `max_pixels` allows, and float64 temporaries cost 1.6 GB more for them. Exact for
    16-bit values."""
    scaled = np.nan_to_num(array.astype(np.float32), copy=False)
    np.clip(scaled, 0, full_scale, out=scaled)
    scaled *= 255.0 / full_scale
    return np.rint(scaled, out=scaled).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        return Image.fromarray(_scale_to_uint8(np.asarray(image), 65535.0)).convert("RGB")
    if mode == "F":
        array = np.asarray(image)
        full_scale = 1.0 if array.size and np.nanmax(array) <= 1.0 else 255.0
        return Image.fromarray(_scale_to_uint8(array, full_scale)).convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        return ImageCms.applyTransform(image, ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    return image.convert("RGB")


def decode_image(data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode and fully load image bytes as 8-bit RGB; raise ImageDecodeError with a reason otherwise."""
    if not data:
        raise ImageDecodeError(source, "empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(source, "too_many_pixels", f"{width}x{height} exceeds {max_pixels:,} pixels")
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(source, "not_an_image", "no image format recognised") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(source, "too_many_pixels", str(error)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(source, "corrupt", f"{type(error).__name__}: {error}") from None
    if width == 0 or height == 0:
        raise ImageDecodeError(source, "empty", "zero-sized image")
    try:
        return to_rgb(image)
    except (OSError, ValueError) as error:
        raise ImageDecodeError(source, "unsupported_mode", f"mode {image.mode}: {error}") from None


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    path = Path(path)
    return decode_image(path.read_bytes(), str(path), max_pixels)
