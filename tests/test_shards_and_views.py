"""Shard bytes are reproducible and read back with webdataset; views are seeded and replayable."""

import hashlib
import io

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from beit3.data_pipeline.shards import (
    ShardRecord,
    json_bytes,
    npy_bytes,
    part_bounds,
    sample_tar_bytes,
    shard_name,
    tar_bytes,
    tar_size,
)
from beit3.data_pipeline.views import View, choose_views, render_view, resize_shorter_side


def jpeg(size=(64, 48), colour=(200, 30, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def samples():
    return [
        {"__key__": f"sample{i:03d}", "jpg": jpeg(colour=(i * 20, 10, 10)),
         "codes.npy": npy_bytes(np.full((1, 4, 4), i, dtype=np.uint16)),
         "views.json": json_bytes([View(0, 0, 48, 48, bool(i % 2)).to_json()]),
         "ids.npy": npy_bytes(np.array([0, 5 + i, 2], dtype=np.uint16)),
         "json": json_bytes({"source": "test", "index": i, "label": "n01440764"})}
        for i in range(5)
    ]


def test_shard_bytes_are_reproducible(tmp_path):
    first, second = tar_bytes(samples()), tar_bytes(samples())
    assert first == second
    record = ShardRecord.of(shard_name("image", 3), shard_name("image", 3), "image", 5, 5, first)
    assert record.name == "image-000003.tar" and record.sha256 == hashlib.sha256(first).hexdigest()
    assert record.bytes == len(first)


def test_further_parts_keep_the_planned_name_as_prefix():
    assert shard_name("pair", 12, part=0) == "pair-000012.tar"
    assert shard_name("pair", 12, part=3) == "pair-000012-003.tar"


def test_tar_size_is_known_before_writing():
    for count in range(6):
        assert tar_size(sum(map(sample_tar_bytes, samples()[:count]))) == len(tar_bytes(samples()[:count]))


def test_parts_close_at_the_sample_or_byte_target():
    sizes = [3000, 3000, 3000, 30_000, 100, 100, 100, 100, 100]
    bounds = part_bounds(sizes, max_samples=4, max_bytes=20_480)
    assert bounds == [(0, 3), (3, 4), (4, 8), (8, 9)]  # the 30,000-byte sample alone exceeds the target
    for start, stop in bounds:
        assert stop - start <= 4 and (tar_size(sum(sizes[start:stop])) <= 20_480 or stop - start == 1)
    assert part_bounds(sizes, max_samples=None, max_bytes=2**30) == [(0, 9)]
    assert part_bounds([], max_samples=4, max_bytes=1) == []


def test_shards_read_back_with_webdataset(tmp_path):
    path = tmp_path / "image-000000.tar"
    path.write_bytes(tar_bytes(samples()))
    read = list(webdataset.WebDataset(str(path), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in read] == [f"sample{i:03d}" for i in range(5)]
    assert read[2]["jpg"].size == (64, 48)
    assert read[2]["codes.npy"].dtype == np.uint16 and read[2]["codes.npy"][0, 0, 0] == 2
    assert read[3]["views.json"] == [{"top": 0, "left": 0, "height": 48, "width": 48, "flip": True}]
    assert read[4]["ids.npy"].tolist() == [0, 9, 2] and read[4]["json"]["label"] == "n01440764"


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown shard kind"):
        shard_name("video", 0)


def test_views_are_seeded_inside_the_image_and_do_not_touch_global_rng():
    image = Image.new("RGB", (320, 240))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    views = choose_views(image, 4, seed=99)
    assert torch.equal(torch.rand(1), before), "the global RNG is left as it was"
    assert views == choose_views(image, 4, seed=99) and views != choose_views(image, 4, seed=100)
    for view in views:
        assert 0 <= view.top and view.top + view.height <= 240 and 0 <= view.left and view.left + view.width <= 320
    areas = [v.height * v.width / (320 * 240) for seed in range(200) for v in choose_views(image, 1, seed)]
    assert 0.08 <= min(areas) < 0.2 and max(areas) > 0.8
    aspects = [v.width / v.height for seed in range(200) for v in choose_views(image, 1, seed)]
    assert min(aspects) >= 0.74 and max(aspects) <= 1.34
    assert choose_views(Image.new("RGB", (1000, 10)), 1, 0, scale=(0.99, 1.0))[0].width == 13  # centre fallback
    flips = {view.flip for seed in range(40) for view in choose_views(image, 1, seed)}
    assert flips == {True, False}
    assert View.from_json(views[0].to_json()) == views[0]


def test_render_view_crops_resizes_and_flips():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, :, :30] = 255  # left half white
    left_half = render_view(image, View(0, 0, 40, 30, flip=False), 16)
    assert left_half.shape == (3, 16, 16) and left_half.min() == 255
    straddling = render_view(image, View(0, 20, 40, 20, flip=True), 8)
    assert straddling[0, 0, -1] == 255 and straddling[0, 0, 0] == 0
    assert torch.equal(TF.horizontal_flip(straddling), render_view(image, View(0, 20, 40, 20, flip=False), 8))


def test_resize_shorter_side_never_upscales():
    assert resize_shorter_side(Image.new("RGB", (1000, 500)), 256).size == (512, 256)
    assert resize_shorter_side(Image.new("RGB", (100, 50)), 256).size == (100, 50)
