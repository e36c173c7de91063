"""`beit3 tokenizer info`: what a visual tokenizer makes of a folder of images."""

from collections import Counter
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .images import ImageDecodeError, load_image
from .visual import VisualTokenizer, codebook_usage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_tensor(path: Path, image_size: int) -> torch.Tensor:
    """Shorter side resized to `image_size`, centre-cropped square, as [3, size, size] in [0, 1]."""
    image = TF.pil_to_tensor(load_image(path))
    image = TF.resize(image, [image_size], antialias=True)
    return TF.center_crop(image, [image_size, image_size]).float() / 255.0


def survey_folder(
    tokenizer: VisualTokenizer, folder: Path, image_size: int, batch_size: int = 32
) -> tuple[dict[str, float], Counter]:
    """Codebook usage over every image under `folder`; unreadable files are counted by reason, not fatal."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    skipped: Counter = Counter()
    codes, batch = [], []
    for path in tqdm(paths, desc="tokenizing images", unit="img", disable=None):
        try:
            batch.append(image_tensor(path, image_size))
        except ImageDecodeError as error:
            skipped[error.reason] += 1
        if len(batch) == batch_size:
            codes.append(tokenizer.encode(torch.stack(batch)))
            batch = []
    if batch:
        codes.append(tokenizer.encode(torch.stack(batch)))
    if not codes:
        return {"codes_seen": 0, "distinct": 0, "share": 0.0, "perplexity": 0.0}, skipped
    return codebook_usage(torch.cat(codes), tokenizer.codebook_size), skipped
