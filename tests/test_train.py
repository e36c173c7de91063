"""`beit3 train` end to end: 2 CPU ranks under torchrun with gloo, DeepSpeed ZeRO, shards from the real
pipeline (on disk and on the loopback S3 endpoint), an MLflow server on loopback read back with MlflowClient,
and an exact resume after SIGKILL of one rank."""

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import boto3
import psutil
import pytest
from mlflow.tracking import MlflowClient

from beit3.pretrain.checkpoints import (
    COMPLETE,
    LATEST,
    SET_ASIDE,
    CheckpointError,
    mark_complete,
    mark_latest,
    tag_for,
)
from beit3.pretrain.export import export_checkpoint, log_export_to_mlflow, run_model_config, verify_export
from beit3.pretrain.released_format import from_released
from s3_endpoint import CREDENTIALS, free_port
from beit3.sample_data import tiny_recipe
from network_faults import cuttable_endpoint
from training_fixtures import launch_training, run_training, write_recipe

pytestmark = pytest.mark.slow  # end to end: 2-rank training runs under torchrun

STEPS = 12
CHANCE_LOSS = 4 * 6.931
"""Four predictions (image, text, pair image, pair text) over 1,024-way vocabularies: 4 ln 1024 at chance."""


def logged_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metrics(run_dir) -> list[dict]:
    """The training steps' lines (the step-0 evaluation of the initial weights has a line without a loss)."""
    return [entry for entry in logged_lines(run_dir) if "loss" in entry]


def samples_seen(run_dir) -> list[str]:
    return [(run_dir / "samples" / f"rank-{rank}.jsonl").read_text() for rank in (0, 1)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, training_data, mlflow_url):
    """An uninterrupted ZeRO-2 run, logging to the MLflow server."""
    root = tmp_path_factory.mktemp("reference")
    recipe = tiny_recipe(root / "run", training_data, steps=STEPS, log_every_steps=1,
                         checkpoint={"every_steps": 4, "keep_last": 2},
                         mlflow={"tracking_uri": mlflow_url, "system_metrics_interval_seconds": 1})
    output = run_training(write_recipe(root / "recipe.yaml", recipe))
    return {"run_dir": root / "run", "recipe": recipe, "output": output}


def test_losses_fall_within_the_budget(reference_run):
    """12 steps at peak lr 2e-3 take the summed loss from chance to below 85% of it; a model that learned
    nothing stays at chance (27.7), so the margin is far outside step-to-step noise (about 0.5)."""
    history = metrics(reference_run["run_dir"])
    assert [entry["step"] for entry in history] == list(range(1, STEPS + 1))
    assert history[0]["loss"] == pytest.approx(CHANCE_LOSS, rel=0.05)
    assert sum(entry["loss"] for entry in history[-3:]) / 3 < 0.85 * CHANCE_LOSS
    for component in ("image", "text", "pair_image", "pair_text"):
        assert f"loss/{component}" in history[-1] and f"accuracy/{component}" in history[-1]


def test_every_step_consumes_the_configured_counts(reference_run):
    for rank_log in samples_seen(reference_run["run_dir"]):
        entries = [json.loads(line) for line in rank_log.splitlines()]
        assert [entry["samples"] for entry in entries] == [12] * STEPS  # 4 images + 4 texts + 4 pairs per rank
    history = metrics(reference_run["run_dir"])
    assert all(entry["samples_per_second/image"] > 0 for entry in history)


def test_mlflow_holds_params_metrics_tags_and_artifacts(reference_run, mlflow_url):
    run_id = (reference_run["run_dir"] / "mlflow_run_id").read_text().strip()
    client = MlflowClient(mlflow_url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.peak_lr"] == "0.002"
    assert run.data.params["zero.stage"] == "2"
    assert run.data.tags["world_size"] == "2" and run.data.tags["zero_stage"] == "2"
    assert len(run.data.tags["git_commit"]) >= 7
    losses = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))
    assert {m.key for m in client.get_metric_history(run_id, "grad_norm")} == {"grad_norm"}
    assert any(key.startswith("system/") for key in run.data.metrics)
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {"config.yaml", "deepspeed.json", "run.json"} <= artifacts
    saved = json.loads((reference_run["run_dir"] / "deepspeed.json").read_text())
    assert saved["zero_optimization"]["stage"] == 2 and saved["gradient_clipping"] == 3.0


def test_checkpoints_keep_the_last_k(reference_run):
    checkpoints = reference_run["run_dir"] / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-")) == [tag_for(8), tag_for(12)]
    assert (checkpoints / "latest").read_text() == tag_for(12)


def _rank_process(launcher: psutil.Process, rank: int, timeout: float = 0.0) -> psutil.Process:
    """The rank's process under torchrun, waiting up to `timeout` seconds for the launcher to start it."""
    deadline = time.monotonic() + timeout
    while True:
        for child in launcher.children(recursive=True):
            try:
                if "beit3.cli" in child.cmdline() and child.environ().get("RANK") == str(rank):
                    return child
            except psutil.NoSuchProcess:
                continue
        if time.monotonic() > deadline:
            raise AssertionError(f"rank {rank} not found under the launcher")
        time.sleep(0.05)


def test_resume_after_one_rank_is_killed_is_exact(reference_run, tmp_path):
    """Kill rank 1 with SIGKILL after step 6 (checkpoint at 4), resume: steps 5-12 match the uninterrupted
    run's losses within 1e-6 and see the same samples on every rank."""
    recipe = {**reference_run["recipe"], "run_dir": str(tmp_path / "run"), "mlflow": {}}
    config = write_recipe(tmp_path / "recipe.yaml", recipe)
    launcher = launch_training(config)
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if line.startswith("step       6 "):
            _rank_process(psutil.Process(launcher.pid), rank=1).kill()
            break
    launcher.communicate(timeout=300)
    assert launcher.returncode != 0, "".join(lines)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == tag_for(4)

    output = run_training(config, "--resume")
    assert f"resumed from {tag_for(4)}" in output
    resumed, reference = metrics(tmp_path / "run"), metrics(reference_run["run_dir"])
    assert [entry["step"] for entry in resumed] == list(range(1, STEPS + 1))
    for ours, theirs in zip(resumed, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6), ours["step"]
    assert samples_seen(tmp_path / "run") == samples_seen(reference_run["run_dir"])
    assert [entry["step"] for entry in logged_lines(tmp_path / "run") if "loss" not in entry] == [0]
    run_ids = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    assert MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}").get_run(run_ids).info.status == "FINISHED"


def _launch_and_plant_after_start(config: Path, plant) -> tuple[subprocess.Popen, list[str]]:
    """Launch training and call `plant` once the run has started and before step 1: a run starts by moving
    checkpoint folders newer than the one it continues from aside, which would take anything planted earlier."""
    process = launch_training(config)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("train: "):
            plant()
            break
    return process, lines


def _blocked_opening_a_fifo(process: psutil.Process) -> bool:
    """The kernel's own word for a process waiting in open() for the other end of a named pipe."""
    try:
        return Path(f"/proc/{process.pid}/wchan").read_text() == "wait_for_partner"
    except FileNotFoundError:
        return False


def test_a_rank_killed_while_writing_a_checkpoint_never_makes_it_latest(reference_run, tmp_path):
    """Rank 1's step-8 trainer state is made a named pipe once the run has started, so rank 1 stops inside the
    checkpoint while rank 0 has written its part. SIGKILL rank 1 there: `latest` stays at step 4 and step 8 has
    no completion marker; the resumed run moves the half-written checkpoint aside, keeping rank 0's part, and
    matches the uninterrupted run exactly."""
    run_dir = tmp_path / "run"
    recipe = {**reference_run["recipe"], "run_dir": str(run_dir), "mlflow": {}}
    config = write_recipe(tmp_path / "recipe.yaml", recipe)
    half_written = run_dir / "checkpoints" / tag_for(8)

    def plant_a_named_pipe():
        half_written.mkdir(parents=True)
        os.mkfifo(half_written / "trainer-rank-1.partial")

    launcher, _ = _launch_and_plant_after_start(config, plant_a_named_pipe)
    threading.Thread(target=launcher.stdout.read, daemon=True).start()
    rank_1 = _rank_process(psutil.Process(launcher.pid), rank=1)
    deadline = time.monotonic() + 300
    while not ((half_written / "trainer-rank-0.pt").exists() and _blocked_opening_a_fifo(rank_1)):
        assert launcher.poll() is None and time.monotonic() < deadline, "rank 1 never reached the checkpoint"
        time.sleep(0.05)
    rank_1.kill()
    launcher.wait(timeout=300)
    assert launcher.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(4)
    assert not (half_written / "trainer-rank-1.pt").exists() and not (half_written / COMPLETE).exists()

    output = run_training(config, "--resume")
    set_aside = run_dir / "checkpoints" / SET_ASIDE / tag_for(8)
    assert f"moved {half_written} aside to {set_aside}" in output
    assert (set_aside / "trainer-rank-0.pt").exists()
    assert f"resumed from {tag_for(4)}" in output
    for ours, theirs in zip(metrics(run_dir), metrics(reference_run["run_dir"]), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6), ours["step"]
    assert samples_seen(run_dir) == samples_seen(reference_run["run_dir"])


@pytest.mark.parametrize("latest", ["empty", "garbage", "missing"])
def test_an_unusable_latest_loses_no_checkpoint_and_the_resume_is_exact(reference_run, tmp_path, latest):
    """A crash that empties, garbles or loses `latest` while the step-12 save is cut short (its completion marker
    never written): the run continues from step 8, the newest checkpoint whose marker proves it whole, says why,
    keeps step 12's bytes aside, and reproduces steps 9-12 of the uninterrupted run."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run["run_dir"], run_dir)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / tag_for(12) / COMPLETE).unlink()
    cut_short = sorted(p.name for p in (checkpoints / tag_for(12)).iterdir())
    {"empty": lambda: (checkpoints / LATEST).write_text(""),
     "garbage": lambda: (checkpoints / LATEST).write_bytes(b"\x00\x17 not a tag"),
     "missing": lambda: (checkpoints / LATEST).unlink()}[latest]()
    recipe = {**reference_run["recipe"], "run_dir": str(run_dir),
              "mlflow": {"tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}"}}
    (run_dir / "mlflow_run_id").unlink()
    output = run_training(write_recipe(tmp_path / "recipe.yaml", recipe), "--resume")
    assert f"continuing from {tag_for(8)}, the newest checkpoint whose completion marker proves it whole" in output
    assert f"resumed from {tag_for(8)}" in output
    assert sorted(p.name for p in (checkpoints / SET_ASIDE / tag_for(12)).iterdir()) == cut_short
    assert (checkpoints / LATEST).read_text() == tag_for(12)
    for ours, theirs in zip(metrics(run_dir), metrics(reference_run["run_dir"]), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6), ours["step"]


def test_no_whole_checkpoint_fails_in_one_line_and_removes_nothing(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run["run_dir"], run_dir)
    checkpoints = run_dir / "checkpoints"
    for tag in (tag_for(8), tag_for(12)):
        (checkpoints / tag / COMPLETE).unlink()
    (checkpoints / LATEST).write_text("")
    before = sorted(str(p.relative_to(run_dir)) for p in checkpoints.rglob("*"))
    recipe = {**reference_run["recipe"], "run_dir": str(run_dir), "mlflow": {}}
    process = launch_training(write_recipe(tmp_path / "recipe.yaml", recipe), "--resume")
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"beit3 train: {checkpoints}: no checkpoint is proven whole ({checkpoints / LATEST} is empty" in output
    assert sorted(str(p.relative_to(run_dir)) for p in checkpoints.rglob("*")) == before


class _PlantedCode:
    """Unpickling this runs a shell command: what a hostile checkpoint file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_carrying_code_is_refused_before_deepspeed_unpickles_it(reference_run, tmp_path):
    """DeepSpeed loads its files with full pickle; a model-states file replaced by one whose pickle calls
    os.system is refused by resume and by export, naming the file and the import, and the command never runs."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run["run_dir"], run_dir)
    marker = tmp_path / "code-ran"
    planted = run_dir / "checkpoints" / tag_for(STEPS) / "mp_rank_00_model_states.pt"
    torch.save({"module": _PlantedCode(marker)}, planted)
    mark_complete(run_dir / "checkpoints", tag_for(STEPS), 2)  # whoever can plant a file can rewrite the marker
    recipe = {**reference_run["recipe"], "run_dir": str(run_dir), "steps": STEPS + 1,
              "mlflow": {"tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}"}}
    process = launch_training(write_recipe(tmp_path / "recipe.yaml", recipe), "--resume", "--allow-steps-change")
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"{planted}: refused: its pickle would import posix.system" in output
    with pytest.raises(CheckpointError, match="posix.system"):
        export_checkpoint(run_dir, tmp_path / "export")
    assert not marker.exists()


@pytest.mark.parametrize("stage", [1, 3])
def test_resume_under_another_zero_stage(reference_run, tmp_path, stage):
    """A ZeRO-2 checkpoint continues under ZeRO-1 (same layout) or ZeRO-3 (through DeepSpeed's universal
    checkpoint): the first resumed step matches the ZeRO-2 run; later ones drift only by reduction order."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run["run_dir"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / tag_for(12))
    mark_latest(run_dir / "checkpoints", tag_for(8))
    recipe = {**reference_run["recipe"], "run_dir": str(run_dir), "zero": {"stage": stage},
              "mlflow": {"tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}"}}
    (run_dir / "mlflow_run_id").unlink()
    output = run_training(write_recipe(tmp_path / "recipe.yaml", recipe), "--resume")
    assert f"zero.stage: 2 -> {stage}" in output, "a setting changed on resume is said"
    if stage == 3:
        exported = export_checkpoint(run_dir, tmp_path / "export")
        assert verify_export(exported.files[0], run_model_config(run_dir)).passed
        ours = torch.load(exported.files[0], weights_only=True)["model"]
        theirs = torch.load(export_checkpoint(reference_run["run_dir"], tmp_path / "reference").files[0],
                            weights_only=True)["model"]
        assert max((ours[key] - theirs[key]).abs().max().item() for key in ours) < 1e-2
    resumed, reference = metrics(run_dir), metrics(reference_run["run_dir"])
    assert [entry["step"] for entry in resumed] == list(range(1, STEPS + 1))
    assert resumed[8]["loss"] == pytest.approx(reference[8]["loss"], abs=1e-5)
    for ours, theirs in zip(resumed[9:], reference[9:]):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-2)


@pytest.fixture(scope="module")
def s3_shards(training_data, s3_endpoint_url) -> str:
    """The sample shards uploaded to a bucket on the loopback S3 endpoint; returns their s3:// URL."""
    bucket = "training-shards"
    client = boto3.client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1",
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=bucket)
    for path in training_data["shards"].iterdir():
        client.upload_file(str(path), bucket, f"shards/{path.name}")
    return f"s3://{bucket}/shards"


def test_shards_on_object_storage_through_an_outage(training_data, s3_shards, s3_endpoint_url, tmp_path):
    """Shards read through boto3 from the loopback S3 endpoint give the local run's losses and samples, also
    when the endpoint goes away after step 1 and comes back once readers have been refused: with one shard per
    shuffle window a rank reads a new image and pair shard every 2 steps, so reads fall in the outage."""
    steps = 10
    local = tiny_recipe(tmp_path / "local", training_data, steps=steps, log_every_steps=1)
    local["data"]["shuffle_window_shards"] = 1
    remote = {**local, "run_dir": str(tmp_path / "remote"), "data": {**local["data"], "datasets": [s3_shards]}}
    run_training(write_recipe(tmp_path / "local.yaml", local))
    with cuttable_endpoint(s3_endpoint_url, tmp_path) as endpoint:
        process = launch_training(write_recipe(tmp_path / "remote.yaml", remote),
                                  env={"AWS_ENDPOINT_URL": endpoint.url, **CREDENTIALS})
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step       1 "):
                endpoint.cut()
                refused = endpoint.wait_for_refusals(2)
                endpoint.restore()
        process.wait(timeout=600)
    assert process.returncode == 0, "".join(lines)[-6000:]
    assert refused >= 2
    assert [m["loss"] for m in metrics(tmp_path / "remote")] == [m["loss"] for m in metrics(tmp_path / "local")]
    assert len(metrics(tmp_path / "remote")) == steps
    assert samples_seen(tmp_path / "remote") == samples_seen(tmp_path / "local")


FAKE_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEY7QM2PLX4Z", "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-Jr5Wq8Zt",
                "AWS_SESSION_TOKEN": "fake-aws-session-Hn3Vb6Ks", "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-Cx9Dm1Lp"}
URL_PASSWORD = "fake-url-password-Pq4Rt7Ya"


def _leaks(text: str) -> list[str]:
    return [secret for secret in (*FAKE_SECRETS.values(), URL_PASSWORD) if secret in text]


def test_credentials_never_reach_logs_params_saved_configs_or_errors(training_data, s3_shards, s3_endpoint_url,
                                                                     mlflow_url, tmp_path):
    """Recognisable fake AWS keys and MLflow token in the environment, and a password in the tracking URI: a
    run on S3 shards logging to the MLflow server, and two failing runs (MLflow unreachable, a missing bucket);
    no secret appears in their output, any file of the run directory, or MLflow's params, tags and artifacts."""
    run_dir = tmp_path / "run"
    address = mlflow_url.removeprefix("http://")
    recipe = tiny_recipe(run_dir, training_data, steps=2, log_every_steps=1, checkpoint={"every_steps": 2},
                         mlflow={"tracking_uri": f"http://trainer:{URL_PASSWORD}@{address}"})
    recipe["data"]["datasets"] = [s3_shards]
    env = {**CREDENTIALS, **FAKE_SECRETS, "AWS_ENDPOINT_URL": s3_endpoint_url}
    output = run_training(write_recipe(tmp_path / "recipe.yaml", recipe), env=env)
    assert _leaks(output) == []
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert _leaks(path.read_bytes().decode("latin-1")) == [], path
    assert f"trainer:***@{address}" in (run_dir / "config.yaml").read_text()

    client = MlflowClient(mlflow_url)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert _leaks(json.dumps({**run.data.params, **run.data.tags})) == []
    for artifact in client.list_artifacts(run.info.run_id):
        if not artifact.is_dir:
            assert _leaks(Path(client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))).read_text(
                encoding="latin-1")) == [], artifact.path

    unreachable = {**recipe, "run_dir": str(tmp_path / "unreachable"),
                   "mlflow": {"tracking_uri": f"http://trainer:{URL_PASSWORD}@127.0.0.1:{free_port()}"}}
    missing_bucket = {**recipe, "run_dir": str(tmp_path / "missing"),
                      "data": {**recipe["data"], "datasets": ["s3://no-such-bucket/shards"]}}
    for name, failing in (("unreachable", unreachable), ("missing", missing_bucket)):
        process = launch_training(write_recipe(tmp_path / f"{name}.yaml", failing),
                                  env={**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        failure, _ = process.communicate(timeout=300)
        assert process.returncode != 0, failure[-3000:]
        assert _leaks(failure) == [], failure[-3000:]
    assert "no-such-bucket" in failure


def test_export_gives_the_released_layout_and_verifies(reference_run, tmp_path, mlflow_url):
    """ZeRO-2 partitions merged by DeepSpeed's reader equal the engine's module weights; the .pth and the
    safetensors file agree; the export reloads into torchscale's BEiT3 with our outputs; MLflow gets the files."""
    run_dir = reference_run["run_dir"]
    result = export_checkpoint(run_dir, tmp_path / "fp32")
    pth, safetensors_path, config_json = result.files
    released = torch.load(pth, weights_only=True)["model"]
    assert any(key.startswith("beit3.encoder.layers.0.self_attn.") for key in released)
    assert {"mlm_head.weight", "mim_head.weight"} <= set(released)
    assert all(torch.equal(released[key], tensor) for key, tensor in load_file(str(safetensors_path)).items())
    config = run_model_config(run_dir)
    assert json.loads(config_json.read_text())["torchscale_encoder_config"]["encoder_layers"] == config.layers
    module = torch.load(run_dir / "checkpoints" / tag_for(STEPS) / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    ours, _ = from_released(released, config)
    assert all(torch.equal(ours[name], module[name].float()) for name in ours)
    verification = verify_export(pth, config)
    assert verification.passed and set(verification.differences) == {"image", "text"}
    half = export_checkpoint(run_dir, tmp_path / "bf16", dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in torch.load(half.files[0], weights_only=True)["model"].values())
    run_id = log_export_to_mlflow(run_dir, tmp_path / "fp32")
    logged = {item.path for item in MlflowClient(mlflow_url).list_artifacts(run_id, "export")}
    assert f"export/{pth.name}" in logged and "export/config.json" in logged


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_the_previous_one_resumes(training_data, tmp_path):
    """The step-8 checkpoint's first file is written to /dev/full (the kernel's always-full device, ENOSPC):
    the run stops naming the checkpoint still usable, `latest` stays at step 4, and the run resumes from it,
    moving the failed checkpoint's folder aside."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(run_dir, training_data, steps=8, log_every_steps=1,
                         checkpoint={"every_steps": 4, "keep_last": 3})
    config = write_recipe(tmp_path / "recipe.yaml", recipe)
    blocked = run_dir / "checkpoints" / tag_for(8) / "trainer-rank-0.partial"

    def point_at_the_full_device():
        blocked.parent.mkdir(parents=True)
        blocked.symlink_to("/dev/full")

    process, lines = _launch_and_plant_after_start(config, point_at_the_full_device)
    output = "".join(lines) + process.communicate(timeout=600)[0]
    assert process.returncode != 0
    assert f"could not write checkpoint {run_dir / 'checkpoints' / tag_for(8)}" in output
    assert "No space left on device" in output
    assert f"the latest complete checkpoint is still {tag_for(4)}" in output
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(4)
    resumed = run_training(config, "--resume")
    assert f"moved {blocked.parent} aside" in resumed
    assert f"resumed from {tag_for(4)}" in resumed
    assert [entry["step"] for entry in metrics(run_dir)] == list(range(1, 9))
