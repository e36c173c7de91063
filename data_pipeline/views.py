"""Image views: the crop box and flip a precomputed code grid belongs to, chosen once and stored with it.

BEiT v2 takes one random-resized-crop box and resizes it twice, once for the model and once for the visual
tokenizer. The pipeline chooses that box here, seeded per sample, runs the tokenizer on its tokenizer-sized
resize, and stores the box so that the trainer can replay the same view for the model.
"""

import math
import random
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class View:
    """A crop box in the stored (resized) image's pixels, and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "View":
        return cls(**{name: data[name] for name in ("top", "left", "height", "width", "flip")})


def resize_shorter_side(image: Image.Image, shorter_side: int) -> Image.Image:
    """Downscale so that the shorter side is `shorter_side` (never upscale: that would only add bytes)."""
    width, height = image.size
    if min(width, height) <= shorter_side:
        return image
    scale = shorter_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _crop_box(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampling (10 tries, then a centre crop), drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, crop_width
    if width / height < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def choose_views(
    image: Image.Image, count: int, seed: int, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_probability: float = 0.5,
) -> list[View]:
    """`count` random-resized-crop views, a pure function of the seed (a private RNG: seeding torch's global
    one costs milliseconds per image and would disturb the caller's)."""
    rng = random.Random(seed)
    views = []
    for _ in range(count):
        top, left, height, width = _crop_box(image.width, image.height, scale, ratio, rng)
        views.append(View(top, left, height, width, rng.random() < flip_probability))
    return views


def render_view(image: torch.Tensor, view: View, size: int) -> torch.Tensor:
    """The view of a [3, H, W] image resized to size x size: what the tokenizer (and later the model) sees."""
    crop = TF.resized_crop(image, view.top, view.left, view.height, view.width, [size, size], antialias=True)
    return TF.horizontal_flip(crop) if view.flip else crop
