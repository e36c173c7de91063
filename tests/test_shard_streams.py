"""The training streams over shards the real pipeline wrote: order, resume, sharding over ranks and workers,
view replay against the stored codes, and clear errors for shards that cannot serve the run."""

import io
import logging
import random
import shutil

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from beit3.data_pipeline.views import View, ViewSettings, draw_view, view_order
from beit3.pretrain.masking import sample_seed

from beit3.pretrain.shard_streams import (
    IMAGE_MEAN,
    IMAGE_STD,
    MicroBatchStream,
    ShardDataError,
    StreamSettings,
    build_loader,
    index_datasets,
    read_shard_samples,
    shards_for_worker,
)
from beit3.tokenizers.text import TextTokenizer
from beit3.tokenizers.visual import RandomProjectionTokenizer, VisualTokenizerConfig


def settings(stream, tokenizer_mask_id, **overrides) -> StreamSettings:
    values = dict(stream=stream, micro_batch=3, seed=5, image_size=112, grid=7, mask_id=tokenizer_mask_id,
                  shuffle_window_shards=2)
    return StreamSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def mask_id(training_data):
    return TextTokenizer(training_data["spm"]).mask_id


def take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("stream", ["image", "text", "pair"])
def test_resumed_stream_continues_exactly_where_it_stopped(training_data, mask_id, stream):
    shards = index_datasets([str(training_data["shards"])]).shards[stream]
    full = take(build_loader(MicroBatchStream(shards, settings(stream, mask_id), 0, 2), workers=2,
                             prefetch_batches=1), 7)
    resumed = take(build_loader(MicroBatchStream(shards, settings(stream, mask_id), 0, 2, start_micro_batches=3),
                                workers=2, prefetch_batches=1), 4)
    for ours, theirs in zip(resumed, full[3:]):
        assert ours["keys"] == theirs["keys"]
        for name, value in ours.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, theirs[name]), name


def test_shards_are_dealt_to_ranks_and_workers_without_overlap(training_data):
    shards = index_datasets([str(training_data["shards"])]).shards["text"]
    for epoch in (0, 1):
        dealt = [shards_for_worker(shards, 5, "text", epoch, rank, 2, worker, 2) for rank in (0, 1)
                 for worker in (0, 1)]
        names = [ref.name for part in dealt for ref in part]
        assert sorted(names) == sorted(ref.name for ref in shards)
    first = [ref.name for ref in shards_for_worker(shards, 5, "text", 0, 0, 2, 0, 1)]
    second = [ref.name for ref in shards_for_worker(shards, 5, "text", 1, 0, 2, 0, 1)]
    assert first != second, "each epoch reshuffles"


def test_one_epoch_on_one_rank_sees_every_sample_once(training_data, mask_id):
    """The sample corpus's 48 pairs, less the 6 its build holds out, each seen once."""
    index = index_datasets([str(training_data["shards"])])
    shards = index.shards["pair"]
    total = sum(ref.samples for ref in shards)
    stream = MicroBatchStream(shards, settings("pair", mask_id, micro_batch=1), rank=0, world_size=1)
    keys = [batch["keys"][0] for batch in take(build_loader(stream, workers=0, prefetch_batches=1), total)]
    assert len(set(keys)) == total == 48 - sum(ref.samples for ref in index.validation["pair"]) == 42


def beit_v2_renders(jpg: bytes, view: View, sizes: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """BEiT v2's chain written out: jitter in the view's order, flip, then ONE box resized to the model's size
    (bicubic) and to the tokenizer's (Lanczos), as [0, 1] tensors."""
    pixels = Image.open(io.BytesIO(jpg)).convert("RGB")
    for operation, factor in view.jitter:
        pixels = getattr(TF, f"adjust_{operation}")(pixels, factor)
    pixels = TF.hflip(pixels) if view.flip else pixels
    return tuple(TF.pil_to_tensor(TF.resized_crop(pixels, view.top, view.left, view.height, view.width, [size, size],
                                                  mode)).float() / 255
                 for size, mode in zip(sizes, (InterpolationMode.BICUBIC, InterpolationMode.LANCZOS)))


def stored_fields(shards, key):
    shard_name = key.split("/")[0]
    (ref,) = [ref for ref in shards if ref.name == shard_name]
    return dict(read_shard_samples(ref, verify_sha256=True))[key]


def test_the_model_sees_the_jittered_view_whose_codes_were_stored(training_data, mask_id):
    """Stored codes: the loader's image is the model's render of a stored view (jitter, flip, box), and the
    tokenizer's render of that same view, cut from the same jittered pixels, gives the stored codes back."""
    shards = index_datasets([str(training_data["shards"])]).shards["image"]
    batch = take(build_loader(MicroBatchStream(shards, settings("image", mask_id), 0, 1), 0, 1), 1)[0]
    tokenizer = RandomProjectionTokenizer(VisualTokenizerConfig(kind="random", seed=0, patch_size=16,
                                                                codebook_size=1024))
    for row, key in enumerate(batch["keys"]):
        fields = stored_fields(shards, key)
        choice = view_order(len(fields["views"]), sample_seed(5, "image", key, "views"), 0)
        model_view, tokenizer_view = beit_v2_renders(fields["jpg"], fields["views"][choice], (112, 112))
        assert fields["views"][choice].jitter, "stored views carry their colour jitter"
        assert torch.equal(batch["image"][row], (model_view - IMAGE_MEAN) / IMAGE_STD)
        assert torch.equal(tokenizer.encode(tokenizer_view.unsqueeze(0)).flatten(), batch["codes"][row])
    assert batch["image_mask"].sum(1).tolist() == [round(0.4 * 49)] * 3


def test_stored_views_are_walked_without_replacement_across_epochs(training_data, mask_id):
    """The sample data stores 2 views per image: epochs 0 and 1 use both, in a seeded order."""
    shards = index_datasets([str(training_data["shards"])]).shards["image"]
    total = sum(ref.samples for ref in shards)
    stream = MicroBatchStream(shards, settings("image", mask_id, micro_batch=1), rank=0, world_size=1)
    seen: dict[str, list] = {}
    for batch in take(build_loader(stream, workers=0, prefetch_batches=1), 2 * total):
        seen.setdefault(batch["keys"][0], []).append(batch["codes"][0])
    assert len(seen) == total and all(len(codes) == 2 for codes in seen.values())
    for key, (first, second) in seen.items():
        stored = torch.from_numpy(stored_fields(shards, key)["codes"].astype("int64")).flatten(1)
        assert sorted([first.tolist(), second.tolist()]) == sorted(stored.tolist())


def test_texts_and_captions_are_masked_at_their_rates(training_data, mask_id):
    shards = index_datasets([str(training_data["shards"])]).shards["text"]
    batch = take(build_loader(MicroBatchStream(shards, settings("text", mask_id, micro_batch=64), 0, 1),
                              workers=0, prefetch_batches=1), 1)[0]
    eligible = (~batch["text_padding_mask"]) & (batch["labels"] > 3)
    rate = batch["text_prediction_mask"].sum() / eligible.sum()
    assert 0.12 < rate < 0.18
    assert (batch["text"][batch["text_prediction_mask"]] == mask_id).float().mean() > 0.6
    assert not batch["text_prediction_mask"][batch["text_padding_mask"]].any()


def test_altered_shard_is_refused(training_data, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(training_data["shards"], copy)
    (ref,) = [r for r in index_datasets([str(copy)]).shards["image"] if r.name == "image-000000.tar"]
    data = bytearray((copy / ref.name).read_bytes())
    data[1000] ^= 0xFF
    (copy / ref.name).write_bytes(bytes(data))
    with pytest.raises(ShardDataError, match="image-000000.tar: sha256 differs from the manifest"):
        read_shard_samples(ref, verify_sha256=True)


def test_codes_for_another_grid_are_a_clear_error(training_data, mask_id):
    shards = index_datasets([str(training_data["shards"])]).shards["image"]
    stream = MicroBatchStream(shards, settings("image", mask_id, grid=14, image_size=224), rank=0, world_size=1)
    with pytest.raises(ShardDataError, match="stored codes are a 7x7 grid but the model has 14x14 patches"):
        take(build_loader(stream, workers=0, prefetch_batches=1), 1)


def test_too_few_shards_for_the_workers_is_a_clear_error(training_data, mask_id):
    shards = index_datasets([str(training_data["shards"])]).shards["image"][:1]
    stream = MicroBatchStream(shards, settings("image", mask_id), rank=1, world_size=2)
    with pytest.raises(ShardDataError, match="1 shards cannot feed 2 ranks x 1 loader workers"):
        take(build_loader(stream, workers=0, prefetch_batches=1), 1)


def test_on_the_fly_each_epoch_draws_a_fresh_view_rendered_twice_from_the_same_jittered_pixels(training_data,
                                                                                             mask_id):
    """`visual_codes: on_the_fly`: a fresh view per (sample, epoch), BEiT v2's own behaviour; the model's and
    the tokenizer's renders come from the same jittered, flipped pixels, and the trainer tokenizes the latter."""
    from beit3.pretrain.trainer import to_device

    shards = index_datasets([str(training_data["shards"])]).shards["image"]
    total = sum(ref.samples for ref in shards)
    stream = MicroBatchStream(shards, settings("image", mask_id, micro_batch=1, tokenizer_view_size=128), 0, 1)
    batches = take(build_loader(stream, 0, 1), 2 * total)
    first_epoch = {batch["keys"][0]: batch for batch in batches[:total]}
    second_epoch = {batch["keys"][0]: batch for batch in batches[total:]}
    assert first_epoch.keys() == second_epoch.keys()
    assert all(not torch.equal(first_epoch[key]["image"], second_epoch[key]["image"]) for key in first_epoch)
    key, batch = next(iter(first_epoch.items()))
    fields = stored_fields(shards, key)
    width, height = Image.open(io.BytesIO(fields["jpg"])).size
    view = draw_view(width, height, random.Random(sample_seed(5, "image", key, 0, "view")), ViewSettings())
    model_view, tokenizer_view = beit_v2_renders(fields["jpg"], view, (112, 128))
    assert "codes" not in batch and view.jitter
    assert torch.equal(batch["image"][0], (model_view - IMAGE_MEAN) / IMAGE_STD)
    assert torch.equal(batch["tokenizer_image"][0], tokenizer_view)
    tokenizer = RandomProjectionTokenizer(VisualTokenizerConfig(kind="random", seed=0, patch_size=16,
                                                                codebook_size=1024))
    moved = to_device(batch, torch.device("cpu"), torch.float32, tokenizer)
    assert torch.equal(moved["codes"], tokenizer.encode(tokenizer_view.unsqueeze(0)).flatten(1))


class _RestoreOnRetry(logging.Handler):
    """Ends the outage when the loader announces its first retry: no waiting on the clock."""

    def __init__(self, moved, original):
        super().__init__()
        self.moved, self.original, self.retries = moved, original, 0

    def emit(self, record):
        self.retries += 1
        if self.moved.exists():
            self.moved.rename(self.original)


def test_reads_are_retried_through_an_outage(training_data, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(training_data["shards"], copy)
    (ref,) = [r for r in index_datasets([str(copy)]).shards["pair"] if r.name == "pair-000000.tar"]
    expected = read_shard_samples(ref, verify_sha256=True)
    away = tmp_path / "away"
    copy.rename(away)
    handler = _RestoreOnRetry(away, copy)
    logging.getLogger("beit3.pretrain.shard_streams").addHandler(handler)
    try:
        samples = read_shard_samples(ref, verify_sha256=True, attempts=3, backoff_seconds=0.01)
    finally:
        logging.getLogger("beit3.pretrain.shard_streams").removeHandler(handler)
    assert handler.retries == 1
    assert [key for key, _ in samples] == [key for key, _ in expected]


def test_a_lasting_outage_fails_loudly_naming_the_shard(training_data, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(training_data["shards"], copy)
    (ref,) = [r for r in index_datasets([str(copy)]).shards["pair"] if r.name == "pair-000000.tar"]
    (copy / ref.name).unlink()
    with pytest.raises(ShardDataError, match="pair-000000.tar: unreadable after 3 attempts"):
        read_shard_samples(ref, verify_sha256=True, attempts=3, backoff_seconds=0.01)
