"""Masking cost for one paper-recipe batch against the data loading work of the same batch, in one run.

Masks: 2048 block-wise image masks (and the 2048 of the image-text pairs) and 2048 text plus 2048 caption
masks. Data loading: decoding 2048 ImageNet-sized JPEGs (500x375) with a random resized crop to 224 and a
flip, on one core, as one data-loader worker does for the image stream alone.

    python benchmarks/masking_speed.py [--batch 2048]
"""

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from beit3.pretrain.masking import BlockMasking, TextMasking, masked_patch_count, sample_seed
from synthetic_inputs import synthetic_jpegs


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2048)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    batch = args.batch
    seeds = [sample_seed(0, "image", i) for i in range(batch)]
    rng = np.random.default_rng(0)
    text = torch.from_numpy(rng.integers(4, 64000, (batch, 128)))
    text[:, 0] = 0
    text_padding = torch.zeros(batch, 128, dtype=torch.bool)
    caption = torch.from_numpy(rng.integers(4, 64000, (batch, 64)))
    caption[:, 0] = 0
    caption_padding = torch.arange(64).expand(batch, -1) >= torch.from_numpy(rng.integers(8, 41, (batch, 1)))
    costs = {
        "block masks 14x14 (75)": timed(lambda: BlockMasking(14, masked_patch_count(14)).batch(seeds)),
        "block masks 16x16 (102)": timed(lambda: BlockMasking(16, masked_patch_count(16)).batch(seeds)),
        "text masks 128 tokens, 15%": timed(lambda: TextMasking(0.15, 64001).batch(text, text_padding, seeds)),
        "caption masks 64 slots, 50%": timed(lambda: TextMasking(0.5, 64001).batch(caption, caption_padding, seeds)),
    }
    jpegs = synthetic_jpegs(batch)
    augment = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    loading = timed(lambda: [augment(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs])
    print(f"masking_speed: batch {batch}, 1 thread")
    print(f"  {'data loading: decode + crop + flip of the images':<52}{loading * 1e3:9.1f} ms")
    for name, seconds in costs.items():
        print(f"  {name:<52}{seconds * 1e3:9.1f} ms   {seconds / loading:6.1%} of data loading")
    total = costs["block masks 14x14 (75)"] * 2 + costs["text masks 128 tokens, 15%"] + costs[
        "caption masks 64 slots, 50%"]
    print(f"  {'a whole 14x14 recipe step (2 image + text + caption)':<52}{total * 1e3:9.1f} ms   "
          f"{total / loading:6.1%} of data loading")


if __name__ == "__main__":
    main()
