"""The data contract between a build's manifest and a run: every mismatch is one line naming the recipe field to
change, before any process group; a contract that agrees passes."""

import hashlib

import pytest
import yaml

from beit3.cli import main
from beit3.config import ConfigError
from beit3.data_pipeline.manifest import DataContract, VisualTokenizerRecord
from beit3.data_pipeline.views import ViewSettings
from beit3.pretrain.data_contract import check_data_contract
from beit3.pretrain.shard_streams import index_datasets
from beit3.pretrain.train_config import PretrainConfig, load_pretrain_config
from beit3.sample_data import tiny_recipe
from beit3.tokenizers.visual import VisualTokenizerConfig

DATASET = "s3://shards/built"
SPM_BYTES = b"a SentencePiece model's bytes"


@pytest.fixture
def spm(tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(SPM_BYTES)
    return path


def recipe(tmp_path, spm, **overrides) -> PretrainConfig:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", {"shards": DATASET, "spm": str(spm)}, **overrides)))
    return load_pretrain_config(path)


def contract(**changes) -> DataContract:
    """What the sample build records for the tiny model: 7x7 codes of a 1,024-code tokenizer, 32-token texts."""
    fields = dict(text_len=32, caption_len=32, views_per_image=2, shorter_side=128, views=ViewSettings(),
                  tokenizer_view_size=112, code_grid=7,
                  visual_tokenizer=VisualTokenizerRecord(kind="random", codebook_size=1024, patch_size=16,
                                                         weights_sha256="0" * 64),
                  text_tokenizer_sha256=hashlib.sha256(SPM_BYTES).hexdigest())
    return DataContract(**{**fields, **changes})


ALL_STREAMS = {DATASET: {"image", "text", "pair"}}


def test_an_agreeing_contract_passes(tmp_path, spm):
    check_data_contract(recipe(tmp_path, spm), {DATASET: contract()}, ALL_STREAMS, str(spm))


@pytest.mark.parametrize("changes, recipe_changes, field, words", [
    ({"code_grid": 8, "tokenizer_view_size": 128}, {}, "model.image_size",
     "the model has a 7x7 patch grid but s3://shards/built holds codes on a 8x8 grid"),
    ({"visual_tokenizer": VisualTokenizerRecord(kind="vqkd", codebook_size=8192, patch_size=16,
                                                weights_sha256="1" * 64)}, {},
     "model.visual_vocab_size", "1024 is smaller than the codebook of s3://shards/built's visual tokenizer (8192"),
    ({"visual_tokenizer": None, "code_grid": None}, {}, "data.visual_codes", "holds no visual codes"),
    ({"views": ViewSettings(color_jitter=0.2)}, {}, "augment.color_jitter",
     "stored views were drawn with color_jitter 0.2, the recipe says 0.4"),
    ({}, {"augment": {"crop_scale": [0.4, 1.0]}}, "augment.crop_scale",
     "stored views were drawn with crop_scale (0.08, 1.0), the recipe says (0.4, 1.0)"),
    ({"text_tokenizer_sha256": "2" * 64}, {}, "data.text_tokenizer",
     "is not the SentencePiece model s3://shards/built was tokenized with"),
    ({"caption_len": 5000}, {}, "model.text_positions", "holds texts of up to 5000"),
])
def test_each_mismatch_is_one_line_naming_the_field(tmp_path, spm, changes, recipe_changes, field, words):
    with pytest.raises(ConfigError) as error:
        check_data_contract(recipe(tmp_path, spm, **recipe_changes), {DATASET: contract(**changes)}, ALL_STREAMS,
                            str(spm))
    message = str(error.value)
    assert message.startswith(f"{field}: ") and words in message and "\n" not in message, message


def test_a_manifest_from_before_the_contract_asks_for_a_rebuild(tmp_path, spm):
    old = DataContract(text_len=32, caption_len=32, views_per_image=2)
    with pytest.raises(ConfigError, match=r"built before its manifest recorded the data contract \(no "
                                          r"contract.views\); rebuild it"):
        check_data_contract(recipe(tmp_path, spm), {DATASET: old}, ALL_STREAMS, str(spm))


def test_only_what_a_dataset_feeds_is_checked(tmp_path, spm):
    """A text-only dataset records no views; the image checks do not apply to it."""
    text_only = DataContract(text_len=32, caption_len=32, text_tokenizer_sha256=hashlib.sha256(SPM_BYTES).hexdigest())
    check_data_contract(recipe(tmp_path, spm), {DATASET: text_only}, {DATASET: {"text"}}, str(spm))


def test_on_the_fly_codes_check_the_recipe_tokenizer_instead(tmp_path, spm):
    """Stored codes and views are not used on the fly: the recipe's tokenizer must fit the model instead."""
    def on_the_fly(codebook: int) -> PretrainConfig:
        config = recipe(tmp_path, spm)
        data = config.data.model_copy(update={"visual_codes": "on_the_fly", "visual_tokenizer":
                                              VisualTokenizerConfig(kind="random", codebook_size=codebook)})
        return config.model_copy(update={"data": data})

    unused = contract(code_grid=8, views=ViewSettings(color_jitter=0.0))
    with pytest.raises(ConfigError, match="model.visual_vocab_size: 1024 is smaller than the codebook of "
                                          r"data.visual_tokenizer \(4096 codes\)"):
        check_data_contract(on_the_fly(4096), {DATASET: unused}, ALL_STREAMS, str(spm))
    check_data_contract(on_the_fly(1024), {DATASET: unused}, ALL_STREAMS, str(spm))


def test_plan_reports_passes_per_stored_view_and_warns_past_the_limit(training_data, tmp_path, capsys):
    """`beit3 plan --data` on the sample shards (2 stored views per image): passes over each stream, per view,
    a warning past --max-passes-per-view, and the manifests' text and caption lengths in the plan."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", training_data, steps=60)))
    arguments = ["plan", "--config", str(path), "--nodes", "1", "--gpus-per-node", "1", "--gpu", "h100", "--data"]
    assert main(arguments + ["--max-passes-per-view", "1000"]) == 0
    out, err = capsys.readouterr()
    images = sum(ref.samples for ref in index_datasets([str(training_data["shards"])]).shards["image"])
    assert f"data: image: {images:,} samples x 2 stored views; 60 steps make {60 * 8 / images:.1f} passes, " \
           f"{60 * 8 / images / 2:.1f} per view" in out
    assert "data: pair: 42 samples x 2 stored views; 60 steps make 11.4 passes, 5.7 per view" in out
    assert "warning" not in err
    assert main(arguments + ["--max-passes-per-view", "4"]) == 0
    err = capsys.readouterr().err
    assert "warning: pair: each stored view would be seen 5.7 times (more than 4)" in err
