"""How the stored shorter side trades crop sharpness against storage bytes.

A stored image is the source of every view the trainer and the visual tokenizer see: a random-resized-crop box
(area 8-100%, aspect 3/4-4/3) of it is resized to the model's 224 px and the tokenizer's view (256 px for the
giant). Where the box is smaller than the view, that view is upsampled: it holds less detail than BEiT v2,
which crops full-resolution images, gave the same view. This prints, for each stored shorter side, the share
of crops that would be upsampled for each view size, drawn with the pipeline's own box sampler, and the JPEG
bytes a stored image takes (quality 95, the pipeline's default) with the total for ImageNet-21K.

    python benchmarks/view_resolution.py [--crops 200000] [--aspect 1.333]
"""

import argparse
import io
import random
from pathlib import Path

import matplotlib
from PIL import Image

from beit3.data_pipeline.views import ViewSettings, draw_view, resize_shorter_side

IMAGENET_21K_IMAGES = 14_197_122
SHORTER_SIDES = (224, 256, 288, 320, 384, 448, 512)
VIEW_SIZES = (224, 256)


def upsampled_shares(shorter: int, aspect: float, crops: int, seed: int = 0) -> dict[int, float]:
    """The share of crop boxes narrower or shorter than each view size, on a stored image of that shape."""
    rng, settings = random.Random(seed), ViewSettings()
    width, height = round(shorter * aspect), shorter
    counts = dict.fromkeys(VIEW_SIZES, 0)
    for _ in range(crops):
        view = draw_view(width, height, rng, settings)
        for size in VIEW_SIZES:
            counts[size] += min(view.width, view.height) < size
    return {size: count / crops for size, count in counts.items()}


def jpeg_bytes(shorter: int) -> float:
    """JPEG bytes at quality 95 of a 4:3 image of this shorter side, at the bytes per pixel of the photograph
    matplotlib ships (Grace Hopper, 512 x 600, stored at up to 512 px)."""
    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as photo:
        stored = resize_shorter_side(photo.convert("RGB"), min(shorter, 512))
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / (stored.width * stored.height) * shorter * round(shorter * 4 / 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=200_000)
    parser.add_argument("--aspect", type=float, default=4 / 3, help="stored width / height (ImageNet: 4:3)")
    args = parser.parse_args()
    print("| stored shorter side | crops upsampled for a 224 px view | for a 256 px view | JPEG KB per image "
          "(q95, 4:3) | ImageNet-21K TB |")
    print("|---|---|---|---|---|")
    for shorter in SHORTER_SIDES:
        shares = upsampled_shares(shorter, args.aspect, args.crops)
        size = jpeg_bytes(shorter)
        print(f"| {shorter} | {shares[224]:.1%} | {shares[256]:.1%} | {size / 1e3:.0f} | "
              f"{size * IMAGENET_21K_IMAGES / 1e12:.2f} |")


if __name__ == "__main__":
    main()
