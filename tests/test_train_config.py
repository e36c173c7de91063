"""The pretrain schema, what is derived from it (batch split, DeepSpeed JSON, schedule, parameter groups), and
the checks that stop a run before it starts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from beit3.config import ConfigError, validate_config
from beit3.pretrain.checkpoints import CheckpointError, mark_complete, mark_latest, save_trainer_state
from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.optimization import learning_rate, parameter_groups
from beit3.pretrain.shard_streams import ShardDataError
from beit3.pretrain.train_config import (
    OptimizerSettings,
    PretrainConfig,
    deepspeed_config,
    load_pretrain_config,
    split_batch,
)
from beit3.pretrain.trainer import RUN_STATE, ResumeError, preflight, resume_fingerprint
from beit3.redaction import redact_urls, split_url_credentials
from beit3.sample_data import tiny_recipe
from conftest import REPO, model_config
from s3_endpoint import free_port

RECIPES = REPO / "configs" / "pretrain"


@pytest.mark.parametrize("name", ["giant_paper", "base_released", "tiny_cpu"])
def test_shipped_recipes_load(name):
    config = load_pretrain_config(RECIPES / f"{name}.yaml")
    assert config.optimizer.betas == (0.9, 0.98) and config.optimizer.gradient_clipping == 3.0


def test_paper_recipe_matches_the_paper():
    config = load_pretrain_config(RECIPES / "giant_paper.yaml")
    assert (config.batch.image, config.batch.text, config.batch.pair) == (2048, 2048, 2048)
    assert config.model.layers == 40 and config.model.hidden == 1408 and config.model.drop_path == 0.1
    assert (config.optimizer.peak_lr, config.optimizer.warmup_steps, config.steps) == (1e-3, 10_000, 1_000_000)
    assert (config.optimizer.eps, config.optimizer.weight_decay, config.augment.color_jitter) == (1e-6, 0.05, 0.4)
    split = split_batch(config.batch, world_size=64)
    assert split.micro == {"image": 16, "text": 16, "pair": 16} and split.accumulation == 2


def test_counts_that_do_not_divide_are_rejected_naming_the_stream():
    config = load_pretrain_config(RECIPES / "giant_paper.yaml")
    with pytest.raises(ConfigError, match=r"batch\.image: 2048 samples per step do not divide over 48 ranks x 2"):
        split_batch(config.batch, world_size=48)


def test_deepspeed_json_is_derived_from_the_config():
    config = load_pretrain_config(RECIPES / "giant_paper.yaml")
    config = config.model_copy(update={"zero": config.zero.model_copy(update={"stage": 3, "offload_optimizer": True})})
    derived = deepspeed_config(config, split_batch(config.batch, 64))
    assert derived["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert derived["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert derived["gradient_clipping"] == 3.0
    assert derived["gradient_accumulation_steps"] == 2 and derived["train_micro_batch_size_per_gpu"] == 16
    json.dumps(derived)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_paper_recipe_accumulates_and_reduces_gradients_in_fp32(stage):
    """bf16 under every ZeRO stage asks DeepSpeed for fp32 accumulation and fp32 reductions; fp32 runs are fp32
    throughout already and carry neither setting (tests/test_numerics.py checks the sums themselves)."""
    config = load_pretrain_config(RECIPES / "giant_paper.yaml")
    config = config.model_copy(update={"zero": config.zero.model_copy(update={"stage": stage})})
    derived = deepspeed_config(config, split_batch(config.batch, 64))
    assert derived["data_types"] == {"grad_accum_dtype": "fp32"} and derived["communication_data_type"] == "fp32"
    fp32 = deepspeed_config(config.model_copy(update={"precision": "fp32"}), split_batch(config.batch, 64))
    assert "data_types" not in fp32 and "communication_data_type" not in fp32


@pytest.mark.parametrize("change, message", [
    ({"zero": {"stage": 4}}, r"zero\.stage"),
    ({"optimizer": {"peak_lr": "fast"}}, r"optimizer\.peak_lr"),
    ({"batch": {"images": 8}}, r"batch\.images: unknown field"),
    ({"zero": {"stage": 2, "offload_parameters": True}}, r"offload_parameters needs zero\.stage 3"),
    ({"data": {"datasets": ["x"], "text_tokenizer": "y", "visual_codes": "on_the_fly"}}, r"visual_tokenizer"),
    ({"batch": {"image": 0, "text": 0, "pair": 0}}, r"at least one"),
])
def test_bad_fields_are_named(tmp_path, change, message):
    raw = yaml.safe_load((RECIPES / "tiny_cpu.yaml").read_text())
    raw["model"] = model_config("tiny").model_dump()
    del raw["model_overrides"]
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(ConfigError, match=message):
        validate_config(PretrainConfig, raw, "recipe.yaml")


def test_missing_model_file_is_named(tmp_path):
    raw = yaml.safe_load((RECIPES / "tiny_cpu.yaml").read_text())
    raw["model"] = "../model/nonexistent.yaml"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "recipe.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="model config ../model/nonexistent.yaml not found"):
        load_pretrain_config(tmp_path / "sub" / "recipe.yaml")


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    settings = OptimizerSettings(peak_lr=1e-3, min_lr=1e-5, warmup_steps=100)
    assert learning_rate(0, settings, 1000) == pytest.approx(1e-5)
    assert learning_rate(99, settings, 1000) == pytest.approx(1e-3)
    assert learning_rate(550, settings, 1000) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(1000, settings, 1000) == pytest.approx(1e-5)


def test_no_weight_decay_on_biases_norms_positions_and_special_tokens():
    model = MultiwayTransformer(model_config("tiny", vocab_size=100, visual_vocab_size=100))
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"vision_pos_embed", "text_pos_embed", "vision_embed.cls_token", "vision_embed.mask_token"} <= exempt
    assert all(n.endswith(".bias") or "norm" in n or n in exempt for n in exempt)
    assert "layers.0.ffn.vision.fc1.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def _config(run_dir, data, **overrides) -> PretrainConfig:
    path = run_dir.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(run_dir, data, **overrides)))
    return load_pretrain_config(path)


def test_preflight_passes_on_good_data(tmp_path, training_data):
    checked = preflight(_config(tmp_path / "run", training_data), world_size=2)
    assert checked.resume_point.tag is None and set(checked.shards) == {"image", "text", "pair"}


def test_missing_shards_fail_before_training(tmp_path, training_data):
    copy = tmp_path / "shards"
    shutil.copytree(training_data["shards"], copy)
    (copy / "pair-000000.tar").unlink()
    data = {**training_data, "shards": copy}
    with pytest.raises(ShardDataError, match="missing, e.g. pair-000000.tar"):
        preflight(_config(tmp_path / "run", data), world_size=2)


def test_tokenizer_larger_than_the_model_fails(tmp_path, training_data):
    with pytest.raises(ConfigError, match="model.vocab_size: 100 is smaller"):
        preflight(_config(tmp_path / "run", training_data, model_overrides={"vocab_size": 100}), world_size=2)


def _fake_checkpoint(config: PretrainConfig, world_size: int, manifests: dict) -> None:
    run_dir = Path(config.run_dir)
    checkpoints = run_dir / "checkpoints"
    for rank in range(world_size):
        save_trainer_state(checkpoints, "step-00000004", rank, {"step": 4})
    mark_complete(checkpoints, "step-00000004", world_size)
    mark_latest(checkpoints, "step-00000004")
    (run_dir / RUN_STATE).write_text(json.dumps({"fingerprint": resume_fingerprint(config, world_size),
                                                 "manifests": manifests}))


def test_resume_refuses_changed_settings_data_or_world_size(tmp_path, training_data):
    config = _config(tmp_path / "run", training_data)
    checked = preflight(config, world_size=2)
    _fake_checkpoint(config, 2, checked.manifests)
    assert preflight(config, world_size=2).resume_point.tag == "step-00000004"
    with pytest.raises(ResumeError, match="seed: was 0, now 7"):
        preflight(config.model_copy(update={"seed": 7}), world_size=2)
    with pytest.raises(ResumeError, match="world_size: was 2, now 4"):
        preflight(config, world_size=4)
    (tmp_path / "run" / RUN_STATE).write_text(json.dumps({"fingerprint": resume_fingerprint(config, 2),
                                                          "manifests": {str(training_data["shards"]): "0" * 64}}))
    with pytest.raises(ResumeError, match="manifest of .* changed since the run started"):
        preflight(config, world_size=2)


def test_resume_flag_without_a_checkpoint_is_an_error(tmp_path, training_data):
    with pytest.raises(CheckpointError, match="--resume: no checkpoint"):
        preflight(_config(tmp_path / "run", training_data), world_size=2, require_resume=True)


def test_a_password_in_the_tracking_uri_stays_out_of_saved_configs_and_messages(tmp_path, training_data):
    """JSON dumps (config.yaml, MLflow params) show it as ***; the MLflow client gets it beside the URI."""
    uri = "https://trainer:s3cr%40t-token@mlflow.example.org:5000/"
    config = _config(tmp_path / "run", training_data, mlflow={"tracking_uri": uri})
    assert config.mlflow.tracking_uri == uri
    saved = config.model_dump(mode="json")["mlflow"]["tracking_uri"]
    assert saved == "https://trainer:***@mlflow.example.org:5000/"
    assert split_url_credentials(uri) == ("https://mlflow.example.org:5000/", "trainer", "s3cr@t-token")
    assert split_url_credentials("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None, None)
    assert redact_urls(f"cannot reach {uri}: refused") == f"cannot reach {saved}: refused"


def test_a_bad_recipe_fails_before_the_process_group_forms(tmp_path):
    """Rank 0 of a 2-rank job started alone: rank 1 never comes, so a trainer that formed the process group
    first would wait for it. The batch check fails at once instead, naming the launcher's rank count."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", {"shards": tmp_path, "spm": "unused.model"},
                                                 batch={"image": 6, "gradient_accumulation": 2})))
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    finished = subprocess.run([sys.executable, "-m", "beit3.cli", "train", "--config", str(recipe)],
                              capture_output=True, text=True, env=environment, cwd=REPO, timeout=120)
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert finished.stderr.startswith("beit3 train: batch.image: 6 samples per step do not divide over 2 ranks x 2")
    assert not (tmp_path / "run").exists()
