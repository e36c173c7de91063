"""Shard bytes are reproducible and read back with webdataset; views are seeded and replayable."""

import hashlib
import io

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

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
from beit3.data_pipeline.views import (
    JITTER_OPERATIONS,
    View,
    ViewSettings,
    choose_views,
    crop_resized,
    jittered_and_flipped,
    render_view,
    resize_shorter_side,
    view_order,
)


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
    assert read[3]["views.json"] == [{"top": 0, "left": 0, "height": 48, "width": 48, "flip": True, "jitter": []}]
    assert read[4]["ids.npy"].tolist() == [0, 9, 2] and read[4]["json"]["label"] == "n01440764"


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown shard kind"):
        shard_name("video", 0)


def test_views_are_seeded_inside_the_image_and_do_not_touch_global_rng():
    image, settings = Image.new("RGB", (320, 240)), ViewSettings()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    views = choose_views(image, 4, 99, settings)
    assert torch.equal(torch.rand(1), before), "the global RNG is left as it was"
    assert views == choose_views(image, 4, 99, settings) and views != choose_views(image, 4, 100, settings)
    for view in views:
        assert 0 <= view.top and view.top + view.height <= 240 and 0 <= view.left and view.left + view.width <= 320
    drawn = [v for seed in range(200) for v in choose_views(image, 1, seed, settings)]
    areas = [v.height * v.width / (320 * 240) for v in drawn]
    assert 0.08 <= min(areas) < 0.2 and max(areas) > 0.8
    aspects = [v.width / v.height for v in drawn]
    assert min(aspects) >= 0.74 and max(aspects) <= 1.34
    narrow = ViewSettings(crop_scale=(0.99, 1.0))
    assert choose_views(Image.new("RGB", (1000, 10)), 1, 0, narrow)[0].width == 13  # centre fallback
    assert {view.flip for view in drawn[:40]} == {True, False}
    assert View.from_json(views[0].to_json()) == views[0]


def test_jitter_is_colorjitter_with_a_random_order_and_factors_in_range():
    """torchvision's ColorJitter(0.4, 0.4, 0.4): brightness, contrast and saturation each once, in a random
    order, factors uniform in [0.6, 1.4]; strength 0 draws none."""
    drawn = [view.jitter for seed in range(300) for view in choose_views(Image.new("RGB", (64, 48)), 1, seed,
                                                                            ViewSettings())]
    assert all(sorted(operation for operation, _ in jitter) == sorted(JITTER_OPERATIONS) for jitter in drawn)
    assert len({tuple(operation for operation, _ in jitter) for jitter in drawn}) == 6, "all six orders occur"
    factors = [factor for jitter in drawn for _, factor in jitter]
    assert 0.6 <= min(factors) < 0.62 and 1.38 < max(factors) <= 1.4
    assert choose_views(Image.new("RGB", (64, 48)), 1, 0, ViewSettings(color_jitter=0.0))[0].jitter == ()


def test_render_view_jitters_flips_then_crops_and_resizes():
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30] = 200  # left half light
    image = Image.fromarray(pixels)
    left_half = render_view(image, View(0, 0, 40, 30, flip=False), 16, "bicubic")
    assert left_half.shape == (3, 16, 16) and left_half.min() == left_half.max() == 200
    straddling = render_view(image, View(0, 20, 40, 20, flip=True), 8, "lanczos")
    assert straddling[0, 0, 0] == 0 and straddling[0, 0, -1] == 200, "the box is cut from the flipped image"
    darker = render_view(image, View(0, 0, 40, 30, flip=False, jitter=(("brightness", 0.5),)), 16, "bicubic")
    assert darker.max() == 100
    prepared = jittered_and_flipped(image, View(0, 0, 40, 30, flip=True, jitter=(("contrast", 1.3),)))
    assert torch.equal(crop_resized(prepared, View(0, 0, 40, 30, flip=True), 16, "lanczos"),
                       render_view(image, View(0, 0, 40, 30, flip=True, jitter=(("contrast", 1.3),)), 16, "lanczos"))


def test_stored_views_are_walked_without_replacement():
    """Every run of K epochs uses each of K views once, in a new seeded order each time."""
    for count in (1, 3, 16):
        walk = [view_order(count, 1234, epoch) for epoch in range(5 * count)]
        assert all(sorted(walk[start:start + count]) == list(range(count)) for start in range(0, 5 * count, count))
        assert walk == [view_order(count, 1234, epoch) for epoch in range(5 * count)]
    orders = {tuple(view_order(16, 1234, cycle * 16 + position) for position in range(16)) for cycle in range(5)}
    assert len(orders) == 5
    assert [view_order(16, 1, epoch) for epoch in range(16)] != [view_order(16, 2, epoch) for epoch in range(16)]


def test_resize_shorter_side_never_upscales():
    assert resize_shorter_side(Image.new("RGB", (1000, 500)), 256).size == (512, 256)
    assert resize_shorter_side(Image.new("RGB", (100, 50)), 256).size == (100, 50)
