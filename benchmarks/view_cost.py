"""What storing K views per image costs the data build's CPU side, K = 1 against K = 16, side by side in one run.

Per image, as the pipeline's image stage does it: decode, resize to the stored shorter side, encode the stored
JPEG, decode it back, draw K views, and render each for the visual tokenizer (jitter and flip of the whole
image, one box resized with Lanczos). The tokenizer's forward passes are GPU work, given separately by
arithmetic (see benchmarks/RESULTS.md). Medians over interleaved repeats.

    python benchmarks/view_cost.py [--images 40] [--shorter-side 384] [--view-size 256]
"""

import argparse
import io
import statistics
import time

from PIL import Image

from beit3.data_pipeline.views import ViewSettings, choose_views, render_view, resize_shorter_side
from synthetic_inputs import synthetic_jpegs


def stage(jpegs: list[bytes], views: int, shorter_side: int, view_size: int) -> float:
    """Seconds for the image stage over all `jpegs` with `views` views each."""
    settings = ViewSettings()
    started = time.perf_counter()
    for index, data in enumerate(jpegs):
        image = resize_shorter_side(Image.open(io.BytesIO(data)).convert("RGB"), shorter_side)
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG", quality=95)
        stored = Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
        for view in choose_views(stored, views, index, settings):
            render_view(stored, view, view_size, settings.tokenizer_interpolation)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--shorter-side", type=int, default=384)
    parser.add_argument("--view-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    jpegs = synthetic_jpegs(args.images)
    times: dict[int, list[float]] = {1: [], 16: []}
    for _ in range(args.repeats):
        for views in times:
            times[views].append(stage(jpegs, views, args.shorter_side, args.view_size))
    per_image = {views: statistics.median(seconds) / args.images * 1e3 for views, seconds in times.items()}
    for views, milliseconds in per_image.items():
        print(f"K = {views:>2}: {milliseconds:.1f} ms per image on one core")
    print(f"K = 16 / K = 1: {per_image[16] / per_image[1]:.2f}x; each further view "
          f"{(per_image[16] - per_image[1]) / 15:.1f} ms")


if __name__ == "__main__":
    main()
