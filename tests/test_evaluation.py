"""Held-out evaluation, the kNN probe in the trainer, code perplexity and `beit3 eval`: manifests with
validation shards, real shards from the pipeline, 2-rank DeepSpeed runs (gloo) under ZeRO-2 and ZeRO-3, a real
MLflow SQLite store, and `beit3 eval` on an export in a process of its own."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from beit3.pretrain.evaluation import COMPONENTS, Evaluator, evaluate_saved_weights
from beit3.pretrain.metrics_sink import MlflowSink
from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.shard_streams import ShardDataError, first_labelled_images, index_datasets
from beit3.pretrain.train_config import load_pretrain_config
from beit3.pretrain.trainer import code_perplexity, stream_settings, to_device
from beit3.sample_data import tiny_recipe
from beit3.tokenizers.text import TextTokenizer
from conftest import REPO
from training_fixtures import run_training, write_recipe

EVAL = {"samples": 16, "micro_batch": 4, "every_steps": 1, "probe": {"bank_samples": 32}}
"""Small enough for CPU ranks: 8 held-out samples of each kind per rank, in 2 forwards."""


def _manifest(folder: Path, shards: list[dict], validation: list[dict] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    document = {"name": "d", "shards": shards, **({"validation_shards": validation} if validation is not None else {})}
    for entry in shards + (validation or []):
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and "/" not in entry["name"]:
            (folder / entry["name"]).write_bytes(b"")
    (folder / "manifest.json").write_text(json.dumps(document))
    return folder


def _entry(name: str, kind: str, samples: int = 4) -> dict:
    return {"name": name, "kind": kind, "samples": samples, "sha256": "0" * 64}


def test_validation_shards_are_indexed_per_kind(tmp_path):
    folder = _manifest(tmp_path / "d", [_entry("image-000000.tar", "image")],
                       [_entry("val-image-000000.tar", "image"), _entry("val-text-000000.tar", "text"),
                        _entry("val-pair-000000.tar", "pair", samples=0)])
    index = index_datasets([str(folder)])
    assert [ref.name for ref in index.shards["image"]] == ["image-000000.tar"]
    assert {kind: [ref.name for ref in refs] for kind, refs in index.validation.items()} == {
        "image": ["val-image-000000.tar"], "text": ["val-text-000000.tar"], "pair": []}


def test_a_manifest_without_validation_shards_has_none(tmp_path):
    index = index_datasets([str(_manifest(tmp_path / "d", [_entry("image-000000.tar", "image")], None))])
    assert index.validation == {"image": [], "text": [], "pair": []}


@pytest.mark.parametrize("shards, validation, problem", [
    ([_entry("val-image-000000.tar", "image")], [], "manifest shards entry 1: name 'val-image-000000.tar' is not"),
    ([], [_entry("image-000001.tar", "image")], "manifest validation_shards entry 0: name 'image-000001.tar'"),
    ([], [_entry("val-text-000001.tar", "image")], "val-text-000001.tar: kind 'image' does not match"),
    ([], [_entry("val-../image-000001.tar", "image")], "is not a shard file name such as val-image-000000.tar"),
    ([], [{**_entry("val-image-000001.tar", "image"), "sha256": "x"}], "sha256 'x' is not a sha256 hex digest"),
    ([], "val-image-000001.tar", "the manifest lists no validation_shards"),
])
def test_validation_entries_are_checked_as_strictly_as_training_ones(tmp_path, shards, validation, problem):
    folder = tmp_path / "d"
    _manifest(folder, [_entry("image-000000.tar", "image")] + shards, validation if isinstance(validation, list)
              else [])
    if not isinstance(validation, list):
        document = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**document, "validation_shards": validation}))
    with pytest.raises(ShardDataError, match=problem.replace("(", r"\(").replace(".", r"\.")):
        index_datasets([str(folder)])


def test_a_missing_validation_shard_is_named(tmp_path):
    folder = _manifest(tmp_path / "d", [_entry("image-000000.tar", "image")], [_entry("val-image-000000.tar", "image")])
    (folder / "val-image-000000.tar").unlink()
    with pytest.raises(ShardDataError, match="missing, e.g. val-image-000000.tar"):
        index_datasets([str(folder)])


def test_code_perplexity_counts_the_codes_in_effective_use():
    assert code_perplexity(torch.tensor([0, 7, 0, 0])) == pytest.approx(1.0)
    assert code_perplexity(torch.tensor([5, 5, 5, 5, 0, 0])) == pytest.approx(4.0)
    assert 1.0 < code_perplexity(torch.tensor([90, 10])) < 2.0


def test_the_sink_marks_its_experiment_as_model_development(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # MLflow exports the sink's URI to child processes: undone after
    for run in ("first", "second"):  # creating the experiment, then reusing it
        (tmp_path / run).mkdir()
        MlflowSink(tmp_path / run, uri, "beit3-test", run, {}, {}, None).close()
    experiment = MlflowClient(uri).get_experiment_by_name("beit3-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def with_validation_shards(data: dict, root: Path) -> dict:
    """The sample dataset with held-out shards: the build's own when it writes them, else copies of its last
    shard of each kind under `val-` names (the same bytes, so the same digests)."""
    manifest = json.loads((Path(data["shards"]) / "manifest.json").read_text())
    if manifest.get("validation_shards"):
        return data
    shards = root / "shards"
    shutil.copytree(data["shards"], shards)
    held_out = []
    for kind in ("image", "text", "pair"):
        entries = [entry for entry in manifest["shards"] if entry["kind"] == kind and entry["samples"]]
        for entry in entries[-2:]:
            shutil.copy(shards / entry["name"], shards / f"val-{entry['name']}")
            held_out.append({**entry, "name": f"val-{entry['name']}"})
    (shards / "manifest.json").write_text(json.dumps({**manifest, "validation_shards": held_out}))
    return {**data, "shards": shards}


@pytest.fixture(scope="module")
def held_out_data(training_data, tmp_path_factory) -> dict:
    return with_validation_shards(training_data, tmp_path_factory.mktemp("held-out"))


def _config(tmp_path: Path, data: dict, **overrides):
    recipe = tiny_recipe(tmp_path / "run", data, **{"eval": EVAL, **overrides})
    return load_pretrain_config(write_recipe(tmp_path / "recipe.yaml", recipe))


def test_labels_are_read_from_the_pipelines_provenance(held_out_data):
    index = index_datasets([str(held_out_data["shards"])])
    share, labels = first_labelled_images(index.shards["image"], 1000, rank=0, world_size=1)
    assert share.total == len(labels) > 0
    class_folders = {folder.name for folder in (Path(held_out_data["spm"]).parent / "raw").glob("*/*")
                     if folder.is_dir()}
    assert set(labels) <= class_folders and len(set(labels)) >= 2
    assert [fields["label"] for _, fields in share.samples] == labels


def test_evaluation_is_a_function_of_the_weights_and_the_eval_seed_only(held_out_data, tmp_path):
    """Changing the run's seed changes nothing; changing the eval seed changes the views and masks."""
    torch.manual_seed(0)
    weights = MultiwayTransformer(_config(tmp_path, held_out_data).model).state_dict()
    first = evaluate_saved_weights(_config(tmp_path, held_out_data), weights, 0).metrics
    other_run_seed = evaluate_saved_weights(_config(tmp_path, held_out_data, seed=7), weights, 0).metrics
    other_eval_seed = evaluate_saved_weights(_config(tmp_path, held_out_data, eval={**EVAL, "seed": 1}), weights,
                                             0).metrics
    for metrics in (first, other_run_seed, other_eval_seed):
        metrics.pop("val/seconds")
    assert first == other_run_seed
    assert first["val/loss/image"] != other_eval_seed["val/loss/image"]
    assert set(first) == ({f"val/{kind}/{c}" for kind in ("loss", "accuracy") for c in COMPONENTS}
                          | {"val/loss", "probe/knn_top1", "probe/knn_top5"})
    assert first["val/loss"] == pytest.approx(4 * math.log(1024), rel=0.05)  # initial weights: chance


def test_evaluation_leaves_the_model_training_and_the_rng_untouched(held_out_data, tmp_path):
    config = _config(tmp_path, held_out_data)
    index = index_datasets(config.data.datasets)
    text_tokenizer = TextTokenizer(config.data.text_tokenizer)
    streams = {stream: stream_settings(config, stream, 4, text_tokenizer) for stream in config.active_streams()}
    model = MultiwayTransformer(config.model).train()
    evaluator = Evaluator(config.eval, index.validation, index.shards["image"], streams,
                          config.loss_weights.model_dump(), config.model.hidden, 0, 1,
                          lambda batch: to_device(batch, torch.device("cpu"), torch.float32))
    before = torch.get_rng_state()
    metrics = evaluator.run(model)
    assert model.training and torch.equal(torch.get_rng_state(), before)
    assert 0 <= metrics["probe/knn_top1"] <= metrics["probe/knn_top5"] <= 1


def _evaluations(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: {k: v for k, v in line.items() if k.startswith(("val/", "probe/")) and k != "val/seconds"}
            for line in lines if "val/loss" in line}


STEPS = 2


@pytest.fixture(scope="module")
def runs(held_out_data, tmp_path_factory) -> dict:
    """Two identical ZeRO-2 runs and one under ZeRO-3, each evaluating at steps 0, 1 and 2."""
    done = {}
    for name, stage in (("zero2", 2), ("zero2-again", 2), ("zero3", 3)):
        root = tmp_path_factory.mktemp(name)
        recipe = tiny_recipe(root / "run", held_out_data, steps=STEPS, log_every_steps=1, eval=EVAL,
                             zero={"stage": stage}, checkpoint={"every_steps": STEPS, "keep_last": 1})
        output = run_training(write_recipe(root / "recipe.yaml", recipe))
        done[name] = {"run_dir": root / "run", "recipe": root / "recipe.yaml", "output": output}
    return done


def test_evaluations_of_two_identical_runs_are_identical(runs):
    first, second = _evaluations(runs["zero2"]["run_dir"]), _evaluations(runs["zero2-again"]["run_dir"])
    assert sorted(first) == [0, 1, STEPS]
    assert first == second
    assert "eval       0  val loss" in runs["zero2"]["output"]


def test_evaluation_under_zero3_equals_zero2(runs):
    """Step 0 has the same weights under both stages: every metric within 1e-5."""
    zero2, zero3 = _evaluations(runs["zero2"]["run_dir"]), _evaluations(runs["zero3"]["run_dir"])
    assert sorted(zero3) == [0, 1, STEPS]
    assert zero2[0].keys() == zero3[0].keys()
    for name, value in zero2[0].items():
        assert zero3[0][name] == pytest.approx(value, abs=1e-5), name


def test_metrics_reach_mlflow_with_code_perplexity(runs):
    run_dir = runs["zero2"]["run_dir"]
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    for name in ("val/loss", "val/loss/image", "val/accuracy/pair_text", "probe/knn_top1", "probe/knn_top5",
                 "codes/perplexity"):
        assert name in run.data.metrics, name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [0, 1, STEPS]
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    perplexities = [line["codes/perplexity"] for line in lines if "codes/perplexity" in line]
    assert len(perplexities) == STEPS and all(1 < value <= 1024 for value in perplexities)


def test_beit3_eval_on_an_export_reproduces_the_runs_last_evaluation(runs, tmp_path):
    run = runs["zero2"]
    exported = subprocess.run([sys.executable, "-m", "beit3.cli", "export", "--run-dir", str(run["run_dir"]),
                               "--output", str(tmp_path / "export")], capture_output=True, text=True, cwd=REPO)
    assert exported.returncode == 0, exported.stderr[-3000:]
    (pth,) = (tmp_path / "export").glob("*.pth")
    result = subprocess.run([sys.executable, "-m", "beit3.cli", "eval", "--export", str(pth), "--config",
                             str(run["recipe"]), "--mlflow"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"evaluation at step {STEPS}:" in result.stdout and "logged to MLflow run" in result.stdout
    trained = _evaluations(run["run_dir"])[STEPS]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()}
    for component in COMPONENTS:
        loss, accuracy = map(float, rows[component])
        assert loss == pytest.approx(trained[f"val/loss/{component}"], abs=1e-4)
        assert accuracy == pytest.approx(trained[f"val/accuracy/{component}"], abs=1e-4)
    probe = result.stdout.rsplit("kNN probe", 1)[1].split()
    assert float(probe[1]) == pytest.approx(trained["probe/knn_top1"], abs=1e-4)
    history = MlflowClient(f"sqlite:///{run['run_dir'] / 'mlflow.db'}").get_metric_history(
        (run["run_dir"] / "mlflow_run_id").read_text().strip(), "val/loss")
    assert [m.step for m in history] == [0, 1, STEPS, STEPS]


def test_beit3_eval_without_held_out_shards_says_so_in_one_line(training_data, tmp_path):
    data = dict(training_data)
    manifest = json.loads((Path(data["shards"]) / "manifest.json").read_text())
    if manifest.get("validation_shards"):
        shards = tmp_path / "shards"
        shutil.copytree(data["shards"], shards)
        (shards / "manifest.json").write_text(json.dumps({**manifest, "validation_shards": []}))
        data["shards"] = shards
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path / "run", data))
    weights = tmp_path / "weights.pth"
    from beit3.pretrain.released_format import to_released

    config = load_pretrain_config(recipe)
    torch.save({"model": to_released(MultiwayTransformer(config.model).state_dict(), config.model)[0]}, weights)
    result = subprocess.run([sys.executable, "-m", "beit3.cli", "eval", "--export", str(weights), "--config",
                             str(recipe)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "beit3 eval: nothing to evaluate: the datasets' manifests list no validation_shards for the trained streams"]
