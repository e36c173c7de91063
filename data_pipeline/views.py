"""Image views as BEiT v2 draws them, as pure functions of a seed.

BEiT v2 (`DataAugmentationForBEiT`) applies `ColorJitter(0.4, 0.4, 0.4)` and a horizontal flip to the whole
image, then takes ONE random-resized-crop box and resizes it twice: the model's view (bicubic) and the visual
tokenizer's view (Lanczos). Jitter and flip come first, so the tokenizer sees the same jittered, flipped pixels
as the model. A `View` holds every random choice of that chain (the jitter operations in the order torchvision
applies them, with their factors; the flip; the box), so that the pipeline can tokenize a view once and the
trainer can replay exactly the same pixels for the model, or draw fresh views on the fly.
"""

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

JITTER_OPERATIONS = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
}
"""torchvision's ColorJitter with hue 0, as BEiT v2 configures it: these three, on PIL images."""

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "lanczos": InterpolationMode.LANCZOS,
                  "bilinear": InterpolationMode.BILINEAR}


class ViewSettings(BaseModel):
    """How views are drawn and rendered; the defaults are those of BEiT v2's `run_beitv2_pretraining.py`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="Random-resized-crop area range.")
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.4, ge=0, le=1, description="Brightness, contrast and saturation strength.")
    model_interpolation: Literal["bicubic", "lanczos", "bilinear"] = "bicubic"
    tokenizer_interpolation: Literal["bicubic", "lanczos", "bilinear"] = "lanczos"


@dataclass(frozen=True)
class View:
    """Every random choice of one view: jitter operations in the order applied, the flip, and the crop box in
    the (flipped) stored image's pixels."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> dict:
        return {"top": self.top, "left": self.left, "height": self.height, "width": self.width, "flip": self.flip,
                "jitter": [[operation, factor] for operation, factor in self.jitter]}

    @classmethod
    def from_json(cls, data: dict) -> "View":
        jitter = tuple((operation, float(factor)) for operation, factor in data.get("jitter", ()))
        return cls(data["top"], data["left"], data["height"], data["width"], data["flip"], jitter)


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


def _jitter(strength: float, rng: random.Random) -> tuple[tuple[str, float], ...]:
    """ColorJitter's draw: the operations in a random order, each factor uniform in [1 - s, 1 + s]."""
    if strength == 0:
        return ()
    operations = rng.sample(sorted(JITTER_OPERATIONS), len(JITTER_OPERATIONS))
    return tuple((operation, rng.uniform(max(0.0, 1 - strength), 1 + strength)) for operation in operations)


def draw_view(width: int, height: int, rng: random.Random, settings: ViewSettings) -> View:
    """One view of a width x height image, drawn in BEiT v2's order: jitter, flip, crop box."""
    jitter = _jitter(settings.color_jitter, rng)
    flip = rng.random() < settings.flip_probability
    top, left, crop_height, crop_width = _crop_box(width, height, settings.crop_scale, settings.crop_ratio, rng)
    return View(top, left, crop_height, crop_width, flip, jitter)


def choose_views(image: Image.Image, count: int, seed: int, settings: ViewSettings) -> list[View]:
    """`count` views, a pure function of the seed (a private RNG: seeding torch's global one costs milliseconds
    per image and would disturb the caller's)."""
    rng = random.Random(seed)
    return [draw_view(image.width, image.height, rng, settings) for _ in range(count)]


def jittered_and_flipped(image: Image.Image, view: View) -> Image.Image:
    """The whole image after the view's jitter and flip: what both of its crops are cut from."""
    for operation, factor in view.jitter:
        image = JITTER_OPERATIONS[operation](image, factor)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view.flip else image


def crop_resized(prepared: Image.Image, view: View, size: int, interpolation: str) -> torch.Tensor:
    """The view's box of a `jittered_and_flipped` image at size x size, as a [3, size, size] uint8 tensor."""
    crop = TF.resized_crop(prepared, view.top, view.left, view.height, view.width, [size, size],
                           INTERPOLATIONS[interpolation])
    return TF.pil_to_tensor(crop)


def render_view(image: Image.Image, view: View, size: int, interpolation: str) -> torch.Tensor:
    """One render of a view of an RGB image: jitter, flip, crop and resize."""
    return crop_resized(jittered_and_flipped(image, view), view, size, interpolation)


def view_order(count: int, seed: int, epoch: int) -> int:
    """Which of a sample's `count` stored views epoch `epoch` uses: the views are walked without replacement,
    a new seeded permutation every `count` epochs, so no view repeats before all have been used."""
    cycle, position = divmod(epoch, count)
    order = list(range(count))
    random.Random(f"{seed}/{cycle}").shuffle(order)
    return order[position]

