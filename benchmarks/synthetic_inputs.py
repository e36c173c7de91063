"""Inputs the benchmarks share: ImageNet-sized photographs stand-ins, made the same way every run."""

import io

import numpy as np
from PIL import Image


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` 500x375 JPEGs (ImageNet's typical size): smooth colour waves with noise, quality 90."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, 500), np.linspace(0, 1, 375))
    encoded = []
    for _ in range(count):
        phase = rng.random(3) * 6
        pixels = np.stack([np.sin(x * 7 + y * 3 + p) for p in phase], axis=-1) * 100 + 128
        pixels += rng.normal(0, 12, pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded
