"""What a run writes down, read back from the files and a real MLflow SQLite store: rank 0 writes the run files,
metrics.jsonl, MLflow and the console; another rank only its samples log; a resume truncates both logs to its
checkpoint and keeps the run state it started with; MLflow tells Ctrl-C from a failure."""

import json

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from beit3.config import validate_config
from beit3.pretrain.run_recorder import RUN_STATE, recorder_for
from beit3.pretrain.train_config import PretrainConfig, split_batch
from conftest import model_config

RUN_STATE_CONTENT = {"fingerprint": {"seed": 0}, "manifests": {"shards": "0" * 64}}
DS_CONFIG = {"zero_optimization": {"stage": 1}}
EVALUATION = {"val/loss": 27.5, "val/loss/image": 6.9, "val/seconds": 1.5}


@pytest.fixture(autouse=True)
def no_exported_tracking_uri(tmp_path, monkeypatch):
    """MLflow exports the sink's URI to this process's environment, where later tests' training processes would
    inherit it: set here (the recipes' own URI), so that it is undone after each test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def step_metrics(step: int) -> dict[str, float]:
    return {"lr": 1e-3, "step_seconds": 0.5, "loss": 28.0 - step}


def recipe(run_dir, **overrides) -> PretrainConfig:
    raw = {"name": "recorded", "run_dir": str(run_dir), "model": model_config("tiny").model_dump(),
           "data": {"datasets": ["shards"], "text_tokenizer": "spm.model"},
           "mlflow": {"tracking_uri": f"sqlite:///{run_dir.parent / 'mlflow.db'}", "log_system_metrics": False},
           **overrides}
    return validate_config(PretrainConfig, raw, "recipe")


def start(recorder, config, step=0, resumed_from=None, run_state=RUN_STATE_CONTENT):
    recorder.start(config, DS_CONFIG, split_batch(config.batch, 2), step, resumed_from, run_state, None)


def record_steps(recorder, steps, logged=lambda step: True):
    for step in steps:
        recorder.step(step, [f"key-{step}-a", f"key-{step}-b"], step_metrics(step), {}, logged(step))


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def files(run_dir) -> set[str]:
    return {str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file()}


def test_rank_0_writes_everything_for_people_and_another_rank_only_its_samples(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = recipe(run_dir)
    other = recorder_for(1, run_dir)
    with other.closing_with_status():
        start(other, config)
        other.initial_evaluation(EVALUATION)
        record_steps(other, [1, 2])
    assert files(run_dir) == {"samples/rank-1.jsonl"} and capsys.readouterr().out == ""
    assert [line["samples"] for line in lines(run_dir / "samples" / "rank-1.jsonl")] == [2, 2]
    assert other.run_id is None

    lead = recorder_for(0, run_dir)
    with lead.closing_with_status():
        start(lead, config)
        lead.initial_evaluation(EVALUATION)
        lead.evaluated(EVALUATION, 2)
        lead.step(1, ["a"], step_metrics(1), {}, logged=False)
        lead.step(2, ["b"], step_metrics(2), EVALUATION, logged=True)
    assert {"config.yaml", "deepspeed.json", RUN_STATE, "metrics.jsonl", "samples/rank-0.jsonl"} <= files(run_dir)
    assert json.loads((run_dir / RUN_STATE).read_text()) == RUN_STATE_CONTENT
    assert json.loads((run_dir / "deepspeed.json").read_text()) == DS_CONFIG
    logged = lines(run_dir / "metrics.jsonl")
    assert [line["step"] for line in logged] == [0, 1, 2]
    assert "loss" not in logged[0] and logged[2]["val/loss"] == EVALUATION["val/loss"]
    console = capsys.readouterr().out.splitlines()
    assert console[0] == ("train: recorded on 2 rank(s), ZeRO-1, bf16; micro-batches {'image': 1024, 'text': 1024, "
                          f"'pair': 1024}} x 1 accumulation; new run; run dir {run_dir}")
    assert [line.split()[:2] for line in console[1:]] == [["eval", "0"], ["eval", "2"], ["step", "2"]]

    client = MlflowClient(config.mlflow.tracking_uri)
    run = client.get_run(lead.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(lead.run_id, "loss")] == [2], "only logged steps"
    assert sorted(m.step for m in client.get_metric_history(lead.run_id, "val/loss")) == [0, 2]
    assert {item.path for item in client.list_artifacts(lead.run_id)} == {"config.yaml", "deepspeed.json", RUN_STATE}


def test_a_resume_truncates_the_logs_to_its_checkpoint_and_keeps_the_first_run_state(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = recipe(run_dir)
    first = recorder_for(0, run_dir)
    with pytest.raises(KeyboardInterrupt), first.closing_with_status():
        start(first, config)
        record_steps(first, range(1, 7))
        raise KeyboardInterrupt

    resumed = recorder_for(0, run_dir)
    with resumed.closing_with_status():
        start(resumed, config, step=4, resumed_from="step-00000004", run_state={"fingerprint": "changed"})
        assert [line["step"] for line in lines(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
        assert [line["step"] for line in lines(run_dir / "samples" / "rank-0.jsonl")] == [1, 2, 3, 4]
        record_steps(resumed, [5, 6])
    assert [line["step"] for line in lines(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / RUN_STATE).read_text()) == RUN_STATE_CONTENT
    assert resumed.run_id == first.run_id
    assert "resumed from step-00000004" in capsys.readouterr().out
    history = MlflowClient(config.mlflow.tracking_uri).get_metric_history(resumed.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 5, 6, 6], "steps past the checkpoint logged again"


def test_settings_changed_on_resume_are_said_and_tagged_while_the_params_keep_the_first_values(tmp_path, capsys):
    """Held-out figures measured on other samples, or steps at another learning rate, must show in the review."""
    run_dir = tmp_path / "run"
    first = recipe(run_dir)
    changed = recipe(run_dir, optimizer={"peak_lr": 5e-4}, eval={"samples": 256}, zero={"stage": 2})
    for config, step, resumed_from in ((first, 0, None), (first, 4, "step-00000004"), (changed, 8, "step-00000008")):
        recorder = recorder_for(0, run_dir)
        with recorder.closing_with_status():
            start(recorder, config, step=step, resumed_from=resumed_from)
    console = [line for line in capsys.readouterr().out.splitlines() if "settings changed" in line]
    changes = "optimizer.peak_lr: 0.001 -> 0.0005; zero.stage: 1 -> 2; eval.samples: 1024 -> 256"
    assert console == ["train: settings changed since the run last started, from step 8 on "
                       f"(MLflow tag settings_changed_at_step_8): {changes}"], "said once, for the resume that changed"
    run = MlflowClient(first.mlflow.tracking_uri).get_run(recorder.run_id)
    assert {name: value for name, value in run.data.tags.items() if name.startswith("settings_changed")} == {
        "settings_changed_at_step_8": changes}
    assert (run.data.params["optimizer.peak_lr"], run.data.params["eval.samples"]) == ("0.001", "1024")


def test_a_change_longer_than_mlflow_keeps_in_a_tag_is_cut_there_and_said_whole(tmp_path, capsys):
    """MLflow cuts a tag value to its limit when storing it; the start must not fail on a long change."""
    run_dir = tmp_path / "run"
    renamed = "r" * 9000
    for config, step, resumed_from in ((recipe(run_dir), 0, None), (recipe(run_dir, name=renamed), 4, "step-4")):
        recorder = recorder_for(0, run_dir)
        with recorder.closing_with_status():
            start(recorder, config, step=step, resumed_from=resumed_from)
    assert f"name: recorded -> {renamed}" in capsys.readouterr().out
    tag = MlflowClient(recipe(run_dir).mlflow.tracking_uri).get_run(recorder.run_id).data.tags[
        "settings_changed_at_step_4"]
    assert tag == f"name: recorded -> {renamed}"[:MAX_TAG_VAL_LENGTH]


@pytest.mark.parametrize(("error", "status"), [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_mlflow_shows_ctrl_c_as_killed_and_an_error_as_failed(tmp_path, error, status):
    run_dir = tmp_path / "run"
    config = recipe(run_dir)
    recorder = recorder_for(0, run_dir)
    with pytest.raises(error), recorder.closing_with_status():
        start(recorder, config)
        raise error()
    assert MlflowClient(config.mlflow.tracking_uri).get_run(recorder.run_id).info.status == status
