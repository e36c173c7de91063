"""What a training run writes down: rank 0's record for people, and every rank's record of the samples it saw.

Rank 0's `RunRecorder` owns everything written for people: the run directory's `config.yaml`, `deepspeed.json`
and `run.json`, `metrics.jsonl`, the MLflow run (through a `MetricsSink`) and the console lines. Every other rank
gets a `RankRecorder`, which does nothing of that. Both keep their own rank's samples log
(`samples/rank-R.jsonl`, a digest of each step's sample keys, which an exact resume must reproduce), so the
trainer calls the same methods on every rank and holds no rank test for what it records.
"""

import hashlib
import json
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from beit3.pretrain.metrics_sink import DiscardingSink, MetricsSink, MlflowSink, flatten, tracking_uri
from beit3.pretrain.train_config import BatchSplit, PretrainConfig

RUN_STATE = "run.json"
"""The fingerprint and manifest digests a resume is checked against, written when the run starts."""
RUN_FILES = ("config.yaml", "deepspeed.json", RUN_STATE)
"""What the run directory keeps of how the run was set up; each is also an MLflow artifact."""
METRICS_LOG = "metrics.jsonl"


def changed_settings(saved_config: Path, config: dict) -> list[str]:
    """`name: before -> after` for each setting that differs from the config the run last started with. Settings
    the resume fingerprint holds cannot differ here, and `steps` has its own message (`check_steps_change`); the
    rest (learning rate, loss weights, precision, ZeRO stage, evaluation, logging, checkpoints) may change on a
    resume, while the MLflow params keep the run's first values."""
    if not saved_config.exists():
        return []
    before = flatten("", yaml.safe_load(saved_config.read_text()) or {})
    after = flatten("", config)
    names = list(after) + [name for name in before if name not in after]
    return [f"{name}: {before.get(name, 'unset')} -> {after.get(name, 'unset')}"
            for name in names if name != "steps" and before.get(name) != after.get(name)]


def recorder_for(rank: int, run_dir: Path) -> "RankRecorder":
    """Rank 0 records the run; every other rank only its samples."""
    return RunRecorder(run_dir, rank) if rank == 0 else RankRecorder(run_dir, rank)


def truncate_log(path: Path, after_step: int) -> None:
    """Drop lines of steps a crashed run logged past its last checkpoint; the resumed run logs them again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= after_step]
        path.write_text("".join(line + "\n" for line in lines))


class RankRecorder:
    """A rank's samples log; what is written for people is left to rank 0 (`RunRecorder`), so here every other
    method does nothing."""

    def __init__(self, run_dir: Path, rank: int):
        self.run_dir = run_dir
        self.samples_log = run_dir / "samples" / f"rank-{rank}.jsonl"
        self.sink: MetricsSink = DiscardingSink()

    @property
    def run_id(self) -> str | None:
        return self.sink.run_id

    def start(self, config: PretrainConfig, ds_config: dict, split: BatchSplit, step: int,
              resumed_from: str | None, run_state: dict, steps_change: str | None) -> None:
        """Forget the steps logged past the checkpoint this run continues from (`step`)."""
        self.samples_log.parent.mkdir(parents=True, exist_ok=True)
        truncate_log(self.samples_log, step)

    def say(self, line: str) -> None:
        """A console line."""

    def initial_evaluation(self, metrics: dict[str, float]) -> None:
        """The evaluation of the weights a new run starts from (step 0)."""

    def evaluated(self, metrics: dict[str, float], step: int) -> None:
        """An evaluation after `step`; its metrics also go into that step's `step` record."""

    def step(self, step: int, keys: list[str], metrics: dict[str, float], evaluation: dict[str, float],
             logged: bool) -> None:
        """One optimizer step: the digest of the samples this rank trained on (`keys`)."""
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        with self.samples_log.open("a") as log:
            log.write(json.dumps({"step": step, "samples": len(keys), "sha256": digest}) + "\n")

    @contextmanager
    def closing_with_status(self):
        """Close the MLflow run with how the block ended: FINISHED; KILLED on Ctrl-C, so MLflow shows the run as
        stopped by the user, not as failed; FAILED on any other error."""
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.sink.close(status)


class RunRecorder(RankRecorder):
    """Rank 0: besides its samples log, the run files, `metrics.jsonl` (every step), MLflow (every logged step
    and every evaluation) and the console."""

    def start(self, config: PretrainConfig, ds_config: dict, split: BatchSplit, step: int,
              resumed_from: str | None, run_state: dict, steps_change: str | None) -> None:
        """Write the run files (`run.json` only when the run is new: a resume is checked against it), truncate
        the logs to `step`, open (or reopen) the MLflow run and announce the run."""
        super().start(config, ds_config, split, step, resumed_from, run_state, steps_change)
        dump = config.model_dump(mode="json")
        changes = changed_settings(self.run_dir / "config.yaml", dump) if resumed_from else []
        if resumed_from is None:
            (self.run_dir / RUN_STATE).write_text(json.dumps(run_state, indent=1))
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(dump, sort_keys=False))
        (self.run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))
        truncate_log(self.run_dir / METRICS_LOG, step)
        tags = {"git_commit": _git_commit(), "world_size": str(split.world_size), "zero_stage": str(config.zero.stage),
                "precision": config.precision}
        if steps_change:
            self.say(f"train: {steps_change} (--allow-steps-change): the learning rate now follows the new schedule")
            tags["steps_change"] = steps_change  # the `steps` param keeps the run's first value
        if changes:
            tag, described = f"settings_changed_at_step_{step}", "; ".join(changes)
            self.say(f"train: settings changed since the run last started, from step {step} on (MLflow tag {tag}): "
                     + described)
            tags[tag] = described
        tracking = config.mlflow
        self.sink = MlflowSink(self.run_dir, tracking_uri(tracking.tracking_uri, self.run_dir), tracking.experiment,
                               config.name, flatten("", dump), tags,
                               tracking.system_metrics_interval_seconds if tracking.log_system_metrics else None)
        for name in RUN_FILES:
            self.sink.log_artifact(self.run_dir / name)
        self.say(f"train: {config.name} on {split.world_size} rank(s), ZeRO-{config.zero.stage}, {config.precision}; "
                 f"micro-batches {split.micro} x {split.accumulation} accumulation; "
                 + (f"resumed from {resumed_from}" if resumed_from else "new run") + f"; run dir {self.run_dir}")

    def say(self, line: str) -> None:
        print(line, flush=True)

    def initial_evaluation(self, metrics: dict[str, float]) -> None:
        """Its own `metrics.jsonl` line: no training step comes with it."""
        self._append_metrics({"step": 0, "wall_time": time.time(), **metrics})
        self.evaluated(metrics, 0)

    def evaluated(self, metrics: dict[str, float], step: int) -> None:
        self.sink.log_metrics(metrics, step)
        self.say(_evaluation_line(metrics, step))

    def step(self, step: int, keys: list[str], metrics: dict[str, float], evaluation: dict[str, float],
             logged: bool) -> None:
        """Every step a `metrics.jsonl` line (with the step's evaluation, if any); on a `logged` step (the end of
        a logging window) also MLflow and a console line."""
        super().step(step, keys, metrics, evaluation, logged)
        self._append_metrics({"step": step, "wall_time": time.time(), **metrics, **evaluation})
        if logged:
            self.sink.log_metrics(metrics, step)
            self.say(f"step {step:>7d}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                     f"{metrics['step_seconds']:.2f}s/step")

    def _append_metrics(self, line: dict) -> None:
        with (self.run_dir / METRICS_LOG).open("a") as log:
            log.write(json.dumps(line) + "\n")


def _evaluation_line(metrics: dict[str, float], step: int) -> str:
    probe = f"  kNN top-1 {metrics['probe/knn_top1']:.3f}" if "probe/knn_top1" in metrics else ""
    losses = "  ".join(f"{name.removeprefix('val/loss/')} {value:.4f}" for name, value in metrics.items()
                       if name.startswith("val/loss/"))
    return f"eval {step:>7d}  val loss {metrics['val/loss']:.4f} ({losses}){probe}  {metrics['val/seconds']:.1f}s"


def _git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent)
        return result.stdout.strip() or "unknown"
    except OSError:
        return "unknown"
