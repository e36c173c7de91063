"""`beit3 train`: masked data modeling on mixed image / text / image-text batches under DeepSpeed ZeRO.

`train()` reads as its phases: `start_run` (preflight, then the device and the process group), `restore`
(checkpoint folder settled, engine built, a checkpoint loaded when there is one), `build_streams`, `run_steps`
(`Trainer.train_step` until the configured step, evaluating and checkpointing on the way) and the finish, which
closes the MLflow run with how the loop ended. What the run writes for people goes through one recorder
(`run_recorder`). The model is a plain nn.Module; DeepSpeed wraps it here and nowhere else.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import psutil
import torch
import torch.distributed as dist
import yaml
from torch import nn

from beit3.config import ConfigError
from beit3.data_pipeline.storage import check_usable, local_copy
from beit3.pretrain.compilation import compile_layers
from beit3.pretrain.data_contract import check_data_contract
from beit3.pretrain.evaluation import Evaluator
from beit3.pretrain.checkpoints import (
    UNIVERSAL,
    CheckpointError,
    ResumePoint,
    convert_to_universal,
    find_resume_point,
    latest_whole,
    load_trainer_state,
    mark_complete,
    mark_latest,
    prune,
    refuse_untrusted_pickles,
    restore_rng_states,
    rng_states,
    save_trainer_state,
    set_aside,
    sync_folder,
    tag_for,
)
from beit3.pretrain.masking import sample_seed
from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.model_stats import active_parameters_per_token, training_flops_per_sample
from beit3.pretrain.objective import masked_counts, masked_prediction
from beit3.pretrain.optimization import build_optimizer, learning_rate
from beit3.pretrain.planner import KNOWN_GPUS
from beit3.pretrain.run_recorder import RUN_STATE, RankRecorder, recorder_for
from beit3.pretrain.shard_streams import (
    MicroBatchStream,
    StreamSettings,
    build_loader,
    index_datasets,
    stream_settings,
)
from beit3.pretrain.train_config import BatchSplit, PretrainConfig, deepspeed_config, split_batch
from beit3.tokenizers.text import TextTokenizer
from beit3.tokenizers.visual import build_visual_tokenizer

COMPONENTS = ("image", "text", "pair_image", "pair_text")


class ResumeError(ValueError):
    """A run that cannot continue from its checkpoint: the data or a result-defining setting changed."""


def resume_fingerprint(config: PretrainConfig, world_size: int) -> dict:
    """The settings an exact resume depends on: changing any of them changes what later steps compute."""
    dump = config.model_dump(mode="json")
    return {"model": dump["model"], "seed": config.seed, "batch": dump["batch"], "masking": dump["masking"],
            "augment": dump["augment"], "world_size": world_size,
            "data": {key: dump["data"][key]
                     for key in ("datasets", "workers", "shuffle_window_shards", "visual_codes")}}


def check_resume(saved: dict, fingerprint: dict, manifests: dict[str, str]) -> None:
    """Fail before training, naming what changed since the checkpoint was written."""
    changed = [name for name in fingerprint if saved["fingerprint"].get(name) != fingerprint[name]]
    if changed:
        details = "; ".join(f"{name}: was {saved['fingerprint'].get(name)}, now {fingerprint[name]}"
                            for name in changed)
        raise ResumeError(f"cannot resume: settings changed since the checkpoint ({details}); restore them or "
                          "start a new run_dir")
    for dataset, digest in manifests.items():
        if saved["manifests"].get(dataset) != digest:
            raise ResumeError(f"cannot resume: the manifest of {dataset} changed since the run started (sha256 "
                              f"{str(saved['manifests'].get(dataset))[:12]} -> {digest[:12]}); the shards differ")


@dataclass
class StepTotals:
    """Sums over one optimizer step on this rank, kept on the device (no host sync inside the step) and reduced
    over ranks once for logging."""

    loss: dict = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0.0))
    correct: dict = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0.0))
    predicted: dict = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0.0))
    tokens: dict = field(default_factory=lambda: dict.fromkeys(("image", "text", "pair"), 0.0))
    keys: list[str] = field(default_factory=list)
    codes: torch.Tensor | None = None
    """Histogram of the visual codes the step's masked image patches are trained to predict."""

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        values = [self.loss[c] for c in COMPONENTS] + [self.correct[c] for c in COMPONENTS]
        values += [self.predicted[c] for c in COMPONENTS]
        values += list(self.tokens.values())
        return torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device) for value in values])


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype, visual_tokenizer=None) -> dict:
    """Move a micro-batch to the device in the training precision; with `visual_codes: on_the_fly`, tokenize
    the view there (the pipeline's stored codes are skipped)."""
    moved = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and name != "tokenizer_image":
                value = value.to(float_dtype)
        moved[name] = value
    if "tokenizer_image" in moved:
        with torch.no_grad():
            moved["codes"] = visual_tokenizer.encode(moved.pop("tokenizer_image")).flatten(1)
    return moved


PHASES = ("data_wait", "compute", "optimizer", "other", "eval")


class PhaseClock:
    """Seconds spent in each phase of the steps, from laps: a lap ends the running phase and starts the next.
    On CUDA a lap records an event and the durations are read once the step's single host synchronisation (the
    metrics reduction) has passed them; on CPU a lap is the wall clock."""

    def __init__(self, device: torch.device):
        self.events = device.type == "cuda"
        self.laps: list[tuple[str, object, object]] = []
        self.last = self._now()

    def _now(self):
        if not self.events:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, phase: str) -> None:
        now = self._now()
        self.laps.append((phase, self.last, now))
        self.last = now

    def seconds(self) -> dict[str, float]:
        """The phases' seconds since the previous call (the laps it returns are forgotten)."""
        spent = dict.fromkeys(PHASES, 0.0)
        for phase, start, end in self.laps:
            spent[phase] += start.elapsed_time(end) / 1000 if self.events else end - start
        self.laps = []
        return spent


class Trainer:
    """One optimizer step at a time over the three streams; the loop and checkpoints live in `run_steps`."""

    def __init__(self, config: PretrainConfig, split: BatchSplit, engine, streams: dict, device: torch.device,
                 visual_tokenizer=None):
        self.config = config
        self.split = split
        self.engine = engine
        self.streams = streams
        self.device = device
        self.visual_tokenizer = visual_tokenizer
        self.weights = config.loss_weights.model_dump()
        self.float_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        self.clock = PhaseClock(device)

    def train_step(self) -> StepTotals:
        """Draw the step's micro-batches, count each objective's masked tokens over all ranks and micro-steps,
        then run them: a micro-batch's summed cross-entropy over that global count makes every masked token of
        the step weigh the same, whatever the lengths in its micro-batch."""
        self.clock.lap("other")
        totals = StepTotals()
        micro_steps = [{stream: next(iterator) for stream, iterator in self.streams.items()}
                       for _ in range(self.split.accumulation)]
        self.clock.lap("data_wait")
        scales = self._loss_scales(micro_steps)
        for batches in micro_steps:
            loss = torch.zeros((), device=self.device)
            for stream, batch in batches.items():
                batch = to_device(batch, self.device, self.float_dtype, self.visual_tokenizer)
                totals.keys += batch["keys"]
                if "image_mask" in batch:
                    targets = torch.bincount(batch["codes"][batch["image_mask"]],
                                             minlength=self.config.model.visual_vocab_size)
                    totals.codes = targets if totals.codes is None else totals.codes + targets
                totals.tokens[stream] += self._tokens(batch)
                for component, (summed, correct, count) in masked_prediction(self.engine, stream, batch).items():
                    loss = loss + self.weights[component] * scales[component] * summed
                    totals.loss[component] += summed.detach()
                    totals.correct[component] += correct
                    totals.predicted[component] += count
            self.engine.backward(loss)
            self.clock.lap("compute")
            self.engine.step()
            self.clock.lap("optimizer")
        return totals

    def _loss_scales(self, micro_steps: list[dict]) -> dict[str, torch.Tensor]:
        """Per objective, what a micro-batch's summed loss is multiplied by: DeepSpeed divides each micro-step's
        gradient by the accumulation and averages over ranks, so that factor is undone and the global masked
        count (one all-reduce per step, before any backward) divides instead."""
        counts = dict.fromkeys(COMPONENTS, 0)
        for batches in micro_steps:
            for stream, batch in batches.items():
                for component, count in masked_counts(stream, batch).items():
                    counts[component] += count
        total = torch.stack([torch.as_tensor(counts[c], dtype=torch.float64) for c in COMPONENTS]).to(self.device)
        dist.all_reduce(total)
        scales = (self.split.accumulation * self.split.world_size / total.clamp(min=1)).float()
        return dict(zip(COMPONENTS, scales))

    def _tokens(self, batch: dict):
        tokens = 0.0
        if "image" in batch:
            tokens += batch["image"].shape[0] * self.config.model.image_tokens
        if "text_padding_mask" in batch:
            tokens = tokens + (~batch["text_padding_mask"]).sum()
        return tokens


def code_perplexity(counts: torch.Tensor) -> float:
    """exp of the entropy of a code histogram: how many codes the targets effectively use (1 when one code is
    every target, the codebook size when all are used equally)."""
    share = counts.double() / counts.sum()
    share = share[share > 0]
    return float(torch.exp(-(share * share.log()).sum()))


def _reduce(totals: StepTotals, device: torch.device) -> torch.Tensor:
    vector = totals.as_tensor(device)
    dist.all_reduce(vector)
    return vector.cpu()


def step_metrics(reduced: torch.Tensor, seconds: float, lr: float, grad_norm: float | None, config: PretrainConfig,
                 split: BatchSplit, active: int, peak_flops: float | None) -> dict[str, float]:
    n = len(COMPONENTS)
    loss, correct, predicted = (reduced[i * n : (i + 1) * n] for i in range(3))
    tokens = dict(zip(("image", "text", "pair"), reduced[3 * n :].tolist()))
    metrics: dict[str, float] = {"lr": lr, "step_seconds": seconds}
    weights = config.loss_weights.model_dump()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    total_loss = 0.0
    for index, component in enumerate(COMPONENTS):
        if predicted[index] > 0:  # the global mean over the step's masked tokens, the loss the gradient is of
            metrics[f"loss/{component}"] = float(loss[index] / predicted[index])
            metrics[f"accuracy/{component}"] = float(correct[index] / predicted[index])
            total_loss += weights[component] * metrics[f"loss/{component}"]
    metrics["loss"] = total_loss
    flops = 0.0
    for stream, count in tokens.items():
        samples = split.micro[stream] * split.world_size * split.accumulation
        if samples:
            metrics[f"samples_per_second/{stream}"] = samples / seconds
            metrics[f"tokens_per_second/{stream}"] = count / seconds
            flops += samples * training_flops_per_sample(config.model, round(count / samples), active)
    if peak_flops:
        metrics["mfu"] = flops / seconds / (peak_flops * split.world_size)
    if torch.cuda.is_available():
        metrics["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        metrics["memory/rss_gib"] = psutil.Process().memory_info().rss / 2**30
    return metrics


def phase_metrics(spent: dict[str, float], steps: int) -> dict[str, float]:
    """A logging window's step-time breakdown: seconds per step in each phase, and each phase's share of the
    step. `other` (logging and checkpointing) of a step is counted when the next step starts; `eval` is the
    held-out evaluation."""
    total = sum(spent.values()) or 1.0
    metrics = {f"time/{phase}": seconds / steps for phase, seconds in spent.items()}
    metrics.update({f"time/{phase}_fraction": seconds / total for phase, seconds in spent.items()})
    return metrics


class LogWindow:
    """The steps since the last logged one: the seconds of each phase, and the histogram of the visual codes
    their masked image patches were trained to predict."""

    def __init__(self):
        self.spent, self.steps, self.codes = dict.fromkeys(PHASES, 0.0), 0, None

    def add(self, spent: dict[str, float], codes: torch.Tensor | None) -> None:
        for phase, seconds in spent.items():
            self.spent[phase] += seconds
        self.steps += 1
        if codes is not None:
            self.codes = codes if self.codes is None else self.codes + codes

    def metrics(self) -> dict[str, float]:
        """The window's step-time breakdown and the perplexity of its code targets over all ranks (every rank
        calls this at the same step)."""
        metrics = phase_metrics(self.spent, self.steps)
        if self.codes is not None:
            dist.all_reduce(self.codes)
            metrics["codes/perplexity"] = code_perplexity(self.codes)
        return metrics


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    resumed_from: int
    mlflow_run_id: str | None


def _peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a GPU the planner knows, for model FLOPs utilisation; other devices log no MFU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    return next((gpu.peak_flops for key, gpu in KNOWN_GPUS.items() if key.upper() in name), None)


@dataclass
class Preflight:
    """Everything checked before any process group or model exists, so a bad run fails in seconds."""

    split: BatchSplit
    shards: dict[str, list]
    manifests: dict[str, str]
    fingerprint: dict
    resume_point: ResumePoint
    text_tokenizer: TextTokenizer
    validation: dict[str, list] = field(default_factory=dict)
    """Per kind, the held-out shards evaluation reads."""
    probe_bank: list = field(default_factory=list)
    """The training image shards the kNN probe's labelled bank comes from."""
    steps_change: str | None = None
    """How `steps` changed on this resume, when --allow-steps-change let it."""

    @property
    def run_state(self) -> dict:
        """What `run.json` keeps for `check_resume`: the settings and the manifests the run started with."""
        return {"fingerprint": self.fingerprint, "manifests": self.manifests}


def preflight(config: PretrainConfig, world_size: int, require_resume: bool = False,
              allow_steps_change: bool = False) -> Preflight:
    """Batch division, shards present, the data contract, the tokenizer fits the model, and a resume that can be
    exact."""
    split = split_batch(config.batch, world_size)
    for dataset in config.data.datasets:  # in seconds, one line: no such bucket, access denied, endpoint away
        check_usable("data.datasets", dataset, "read_folder")
    check_usable("data.text_tokenizer", config.data.text_tokenizer, "read_file")
    index = index_datasets(config.data.datasets)
    manifests = index.manifest_digests
    shards = {stream: index.shards[stream] for stream in config.active_streams()}
    for stream, refs in shards.items():
        if not refs:
            raise ConfigError(f"batch.{stream}: {config.batch.global_count(stream)} samples per step asked, but "
                              f"there are no {stream} shards in {', '.join(config.data.datasets)}")
    text_tokenizer_path = local_copy(config.data.text_tokenizer)
    fed = {dataset: {stream for stream, refs in shards.items() if any(ref.dataset == dataset for ref in refs)}
           for dataset in index.contracts}
    check_data_contract(config, index.contracts, fed, text_tokenizer_path)
    run_dir = Path(config.run_dir)
    fingerprint = resume_fingerprint(config, world_size)
    found = find_resume_point(run_dir / "checkpoints")
    if found.tag and config.resume == "never" and not require_resume:
        raise CheckpointError(f"run_dir: {run_dir} already holds checkpoints (latest {found.tag}) and resume is "
                              "never; use a new run_dir, or resume: auto")
    resume_point = found if (config.resume == "auto" or require_resume) else ResumePoint(None)
    if require_resume and resume_point.tag is None:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    steps_change = None
    if resume_point.tag is not None:
        check_resume(json.loads((run_dir / RUN_STATE).read_text()), fingerprint, manifests)
        steps_change = check_steps_change(run_dir, config.steps, resume_point.tag, allow_steps_change)
    text_tokenizer = TextTokenizer(text_tokenizer_path)
    if text_tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {config.model.vocab_size} is smaller than the text tokenizer's "
                          f"vocabulary ({text_tokenizer.vocab_size})")
    return Preflight(split, shards, manifests, fingerprint, resume_point, text_tokenizer, index.validation,
                     index.shards["image"], steps_change=steps_change)


def check_steps_change(run_dir: Path, steps: int, tag: str, allowed: bool) -> str | None:
    """`steps` sets where the cosine schedule reaches `min_lr`, so changing it on resume moves the learning rate
    of every later step: refused unless allowed, and then described (printed, and tagged on the MLflow run)."""
    saved = run_dir / "config.yaml"
    before = yaml.safe_load(saved.read_text()).get("steps") if saved.exists() else None
    if before is None or before == steps:
        return None
    change = f"steps changed from {before:,} to {steps:,} when resuming from {tag}"
    if not allowed:
        raise ResumeError(f"cannot resume: steps: was {before:,}, now {steps:,}; the cosine schedule decays to "
                          f"min_lr at steps, so every later learning rate would change; restore steps: {before}, "
                          "or pass --allow-steps-change to continue with the new schedule")
    return change


@dataclass
class StartedRun:
    """A run past preflight and inside its process group: what every later phase needs of it."""

    checked: Preflight
    device: torch.device
    rank: int
    visual_tokenizer: nn.Module | None
    """The tokenizer run on each fresh view with `visual_codes: on_the_fly`; None with stored codes."""

    @property
    def world_size(self) -> int:
        return self.checked.split.world_size


@dataclass
class Restored:
    """The engine, and where training continues: the step and each stream's micro-batches served (0 when new)."""

    engine: deepspeed.DeepSpeedEngine
    ds_config: dict
    step: int
    positions: dict[str, int]


def train(config: PretrainConfig, require_resume: bool = False, stop_after_step: int | None = None,
          allow_steps_change: bool = False) -> TrainResult:
    """Run (or continue) the configured pretraining; `stop_after_step` ends this process early (tests, benchmarks)."""
    run = start_run(config, require_resume, allow_steps_change)
    recorder = recorder_for(run.rank, Path(config.run_dir))
    restored = restore(config, run, recorder)
    streams, settings = build_streams(config, run, restored.positions)
    checked = run.checked
    recorder.start(config, restored.ds_config, checked.split, restored.step, checked.resume_point.tag,
                   checked.run_state, checked.steps_change)
    trainer = Trainer(config, checked.split, restored.engine, streams, run.device, run.visual_tokenizer)
    evaluator = build_evaluator(config, run, settings, trainer.float_dtype, recorder)
    with recorder.closing_with_status():
        step = run_steps(config, trainer, evaluator, recorder, restored, stop_after_step)
    return TrainResult(Path(config.run_dir), step, restored.step, recorder.run_id)


def start_run(config: PretrainConfig, require_resume: bool, allow_steps_change: bool) -> StartedRun:
    """Preflight before any process group, so that a bad recipe or missing data fails in seconds; then the device,
    set before the group forms so that NCCL binds each rank to its own GPU; then the group, which must have the
    ranks the launcher announced. The on-the-fly visual tokenizer is built here, before the model is seeded."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # what the launcher set for the process group to come
    checked = preflight(config, world_size, require_resume, allow_steps_change)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world_size:
        raise ConfigError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE said {world_size}; "
                          "start training with torchrun or deepspeed, which set it")
    visual_tokenizer = None
    if config.data.visual_codes == "on_the_fly":
        visual_tokenizer = build_visual_tokenizer(config.data.visual_tokenizer)[0].to(device).eval()
    return StartedRun(checked, device, dist.get_rank(), visual_tokenizer)


def restore(config: PretrainConfig, run: StartedRun, recorder: RankRecorder) -> Restored:
    """Settle the checkpoint folder, build the engine and, when the run continues, load its checkpoint: weights,
    optimizer and schedule, data positions and RNG states, so that later steps compute what an uninterrupted run
    would."""
    checkpoint_dir, tag = Path(config.run_dir) / "checkpoints", run.checked.resume_point.tag
    dist.barrier()  # every rank has chosen its checkpoint before rank 0 moves folders or repairs `latest`
    if run.rank == 0:
        _settle_checkpoints(checkpoint_dir, run.checked.resume_point, recorder.say)
    state, load_dir = _trainer_state(config, run, checkpoint_dir)
    ds_config = deepspeed_config(config, run.checked.split)
    if load_dir.name == UNIVERSAL:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, weight_decays = build_engine(config, ds_config, run.rank)
    if state is None:
        return Restored(engine, ds_config, 0, dict.fromkeys(run.checked.shards, 0))
    engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
    for group, weight_decay in zip(engine.optimizer.optimizer.param_groups, weight_decays):
        group["weight_decay"] = weight_decay  # the recipe's, whatever the loaded groups carried
    restore_rng_states(state["rng"])
    return Restored(engine, ds_config, state["step"], state["data_positions"])


def _trainer_state(config: PretrainConfig, run: StartedRun, checkpoint_dir: Path) -> tuple[dict | None, Path]:
    """This rank's trainer state of the checkpoint the run continues from (None for a new run), read once rank 0's
    scan has passed its pickles, and the folder DeepSpeed loads from: across the ZeRO-3 boundary the layouts
    differ, so rank 0 converts the checkpoint once into DeepSpeed's universal form, which every rank then loads."""
    tag = run.checked.resume_point.tag
    if tag is None:
        return None, checkpoint_dir
    _scan_once_for_every_rank(checkpoint_dir / tag, run.rank, run.device)
    state = load_trainer_state(checkpoint_dir, tag, run.rank)
    if (state["zero_stage"] == 3) == (config.zero.stage == 3):
        return state, checkpoint_dir
    if run.rank == 0:
        convert_to_universal(checkpoint_dir, tag)
    dist.barrier()
    return state, checkpoint_dir / UNIVERSAL


def build_engine(config: PretrainConfig, ds_config: dict, rank: int) -> tuple[deepspeed.DeepSpeedEngine, list]:
    """The model from the run's seed (the same initial weights on every rank), its AdamW and schedule, under
    DeepSpeed; then each rank's RNG (drop path) follows a seed of its own. Also returns each parameter group's
    configured weight decay, which a loaded checkpoint must not replace."""
    torch.manual_seed(config.seed)
    model = MultiwayTransformer(config.model)
    if config.compile:
        compile_layers(model)
    optimizer = build_optimizer(model, config.optimizer)
    weight_decays = [group["weight_decay"] for group in optimizer.param_groups]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, config.optimizer, config.steps) / config.optimizer.peak_lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    torch.manual_seed(sample_seed(config.seed, "rank", rank) % 2**63)
    return engine, weight_decays


def build_streams(config: PretrainConfig, run: StartedRun, positions: dict[str, int]
                  ) -> tuple[dict, dict[str, StreamSettings]]:
    """Each stream's loader on this rank, started past the micro-batches it already served (`positions`), so that
    a resumed run reads what an uninterrupted one would; and each stream's settings, which evaluation shares."""
    streams, settings = {}, {}
    for stream, shards in run.checked.shards.items():
        settings[stream] = stream_settings(config, stream, run.checked.split.micro[stream],
                                           run.checked.text_tokenizer, run.visual_tokenizer)
        dataset = MicroBatchStream(shards, settings[stream], run.rank, run.world_size,
                                   start_micro_batches=positions[stream])
        streams[stream] = iter(build_loader(dataset, config.data.workers, config.data.prefetch_batches))
    return streams, settings


def build_evaluator(config: PretrainConfig, run: StartedRun, settings: dict[str, StreamSettings],
                    float_dtype: torch.dtype, recorder: RankRecorder) -> Evaluator:
    """Held-out evaluation on this rank's share of the validation shards, with the streams' settings (views and
    masks drawn from `eval.seed`); says so when there is nothing to evaluate."""
    evaluator = Evaluator(config.eval, run.checked.validation, run.checked.probe_bank, settings,
                          config.loss_weights.model_dump(), config.model.hidden, run.rank, run.world_size,
                          lambda batch: to_device(batch, run.device, float_dtype, run.visual_tokenizer),
                          say=recorder.say)
    if evaluator.skipped:
        recorder.say(f"eval: skipped for this run: {evaluator.skipped}")
    return evaluator


def run_steps(config: PretrainConfig, trainer: Trainer, evaluator: Evaluator, recorder: RankRecorder,
              restored: Restored, stop_after_step: int | None) -> int:
    """The loop, from the restored step to the configured one (or `stop_after_step`): each step's metrics reduced
    over the ranks, an evaluation at step 0 and every `eval.every_steps`, the step-time breakdown and code
    perplexity once per logging window, and a checkpoint every `checkpoint.every_steps` and at the last step.
    Returns the step reached."""
    last_step = min(config.steps, stop_after_step or config.steps)
    step, positions, split = restored.step, dict(restored.positions), trainer.split
    active, peak = active_parameters_per_token(config.model), _peak_flops(trainer.device)
    window = LogWindow()
    if step == 0 and not evaluator.skipped:
        recorder.initial_evaluation(_timed_evaluation(evaluator, trainer))
    while step < last_step:
        started = time.perf_counter()
        totals = trainer.train_step()
        step += 1
        for stream in positions:
            positions[stream] += split.accumulation
        metrics = step_metrics(_reduce(totals, trainer.device), time.perf_counter() - started,
                               learning_rate(step - 1, config.optimizer, config.steps),
                               trainer.engine.get_global_grad_norm(), config, split, active, peak)
        evaluation = {}
        if not evaluator.skipped and _due(step, config.eval.every_steps, last_step):
            evaluation = _timed_evaluation(evaluator, trainer)
            recorder.evaluated(evaluation, step)
        window.add(trainer.clock.seconds(), totals.codes)
        logged = _due(step, config.log_every_steps, last_step)
        if logged:
            metrics.update(window.metrics())
            window = LogWindow()
        recorder.step(step, totals.keys, metrics, evaluation, logged)
        if _due(step, config.checkpoint.every_steps, last_step):
            save_checkpoint(trainer.engine, Path(config.run_dir) / "checkpoints", step, dist.get_rank(), positions,
                            config.zero.stage, config.checkpoint.keep_last)
    return step


def _timed_evaluation(evaluator: Evaluator, trainer: Trainer) -> dict[str, float]:
    """Evaluate, timing it as the step-time breakdown's `eval` phase."""
    trainer.clock.lap("other")
    evaluation = evaluator.run(trainer.engine)
    trainer.clock.lap("eval")
    return evaluation


def _due(step: int, every: int, last_step: int) -> bool:
    """Every `every` steps, and at the last step of this process."""
    return step % every == 0 or step == last_step


def _settle_checkpoints(checkpoint_dir: Path, resume_point: ResumePoint, say) -> None:
    """Before a run saves anything: move aside the folders newer than its checkpoint (a save a crash cut short,
    or one `latest` no longer names), and point a passed-over `latest` at the checkpoint resumed from."""
    for tag, moved in zip(resume_point.newer, set_aside(checkpoint_dir, resume_point.newer)):
        say(f"train: moved {checkpoint_dir / tag} aside to {moved}: it is newer than the checkpoint this run "
            "continues from")
    if resume_point.latest_problem:
        say(f"train: {resume_point.latest_problem}; continuing from {resume_point.tag}, the newest checkpoint "
            "whose completion marker proves it whole")
        mark_latest(checkpoint_dir, resume_point.tag)


def _scan_once_for_every_rank(folder: Path, rank: int, device: torch.device) -> None:
    """Rank 0 scans the checkpoint's pickles (one pass over the files for the whole job, not one per rank) and
    hands every rank its verdict before any of them lets DeepSpeed unpickle a file."""
    refused, reason = torch.zeros(1, device=device), f"{folder}: refused by rank 0's scan (rank 0 names the file)"
    if rank == 0:
        try:
            refuse_untrusted_pickles(folder)
        except CheckpointError as error:
            refused, reason = refused + 1, str(error)
    dist.broadcast(refused, src=0)
    if refused.item():
        raise CheckpointError(reason)


def save_checkpoint(engine, checkpoint_dir: Path, step: int, rank: int, positions: dict[str, int],
                    zero_stage: int, keep_last: int) -> None:
    """Every rank writes and fsyncs its part; once all have, rank 0 marks the checkpoint complete, points
    `latest` at it and prunes old ones."""
    tag = tag_for(step)
    try:
        save_trainer_state(checkpoint_dir, tag, rank, {"step": step, "data_positions": dict(positions),
                                                       "rng": rng_states(), "zero_stage": zero_stage})
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
    except (OSError, RuntimeError) as error:  # a full disk surfaces as either, depending on the writer
        free = shutil.disk_usage(checkpoint_dir).free / 2**30
        raise CheckpointError(f"rank {rank} could not write checkpoint {checkpoint_dir / tag} ({error}; "
                              f"{free:.1f} GiB free there); the latest complete checkpoint is still "
                              f"{latest_whole(checkpoint_dir)}") from error
    sync_folder(checkpoint_dir / tag)
    dist.barrier()
    if rank == 0:
        mark_complete(checkpoint_dir, tag, dist.get_world_size())
        mark_latest(checkpoint_dir, tag)
        prune(checkpoint_dir, keep_last, current=tag)
    dist.barrier()
