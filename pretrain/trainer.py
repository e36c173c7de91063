"""`beit3 train`: masked data modeling on mixed image / text / image-text batches under DeepSpeed ZeRO.

Read top to bottom: `train()` checks the config and the data, builds the engine, restores a checkpoint when
there is one, and runs `Trainer.train_step` until the configured step, checkpointing on the way. The model is
a plain nn.Module; DeepSpeed wraps it here and nowhere else.
"""

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import psutil
import torch
import torch.distributed as dist
import yaml

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
from beit3.pretrain.metrics_sink import DiscardingSink, MetricsSink, MlflowSink, flatten, tracking_uri
from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.model_stats import active_parameters_per_token, training_flops_per_sample
from beit3.pretrain.objective import masked_counts, masked_prediction
from beit3.pretrain.optimization import build_optimizer, learning_rate
from beit3.pretrain.planner import KNOWN_GPUS
from beit3.pretrain.shard_streams import (
    MicroBatchStream,
    StreamSettings,
    build_loader,
    index_datasets,
)
from beit3.pretrain.train_config import BatchSplit, PretrainConfig, deepspeed_config, split_batch
from beit3.tokenizers.text import TextTokenizer
from beit3.tokenizers.visual import build_visual_tokenizer

COMPONENTS = ("image", "text", "pair_image", "pair_text")
RUN_STATE = "run.json"


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


def _git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent)
        return result.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


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
    """One optimizer step at a time over the three streams; the loop and checkpoints live in `train()`."""

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


def stream_settings(config: PretrainConfig, stream: str, micro_batch: int, text_tokenizer: TextTokenizer,
                    visual_tokenizer=None) -> StreamSettings:
    """What the loader of one stream needs from the recipe, the model and the tokenizers."""
    grid = config.model.grid_size
    return StreamSettings(
        stream=stream, micro_batch=micro_batch, seed=config.seed, image_size=config.model.image_size,
        grid=grid, mask_id=text_tokenizer.mask_id, image_ratio=config.masking.image_ratio,
        mask_pair_images=config.masking.mask_pair_images, text_rate=config.masking.text_rate,
        caption_rate=config.masking.caption_rate, views=config.augment,
        tokenizer_view_size=grid * visual_tokenizer.patch_size if visual_tokenizer else None,
        shuffle_window_shards=config.data.shuffle_window_shards, verify_sha256=config.data.verify_sha256,
        read_attempts=config.data.read_attempts, read_backoff_seconds=config.data.read_backoff_seconds,
        text_vocab_size=text_tokenizer.vocab_size, codebook_size=config.model.visual_vocab_size,
        max_text_len=config.model.max_text_len)


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


def _truncate_log(path: Path, after_step: int) -> None:
    """Drop lines of steps a crashed run logged past its last checkpoint; the resumed run logs them again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= after_step]
        path.write_text("".join(line + "\n" for line in lines))


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


def train(config: PretrainConfig, require_resume: bool = False, stop_after_step: int | None = None,
          allow_steps_change: bool = False) -> TrainResult:
    """Run (or continue) the configured pretraining; `stop_after_step` ends this process early (tests, benchmarks)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # what the launcher set for the process group to come
    # before any process group: a bad recipe fails now
    checked = preflight(config, world_size, require_resume, allow_steps_change)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group forms, so NCCL binds each rank to its own GPU
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if dist.get_world_size() != world_size:
        raise ConfigError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE said {world_size}; "
                          "start training with torchrun or deepspeed, which set it")
    split, shards, text_tokenizer = checked.split, checked.shards, checked.text_tokenizer
    tag = checked.resume_point.tag
    run_dir = Path(config.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    visual_tokenizer = None
    if config.data.visual_codes == "on_the_fly":
        visual_tokenizer, _ = build_visual_tokenizer(config.data.visual_tokenizer)
        visual_tokenizer = visual_tokenizer.to(device).eval()

    dist.barrier()  # every rank has chosen its checkpoint before rank 0 moves folders or repairs `latest`
    if rank == 0:
        _settle_checkpoints(checkpoint_dir, checked.resume_point)
    state, load_dir, ds_config = None, checkpoint_dir, deepspeed_config(config, split)
    if tag is not None:
        _scan_once_for_every_rank(checkpoint_dir / tag, rank, device)
        state = load_trainer_state(checkpoint_dir, tag, rank)
        if (state["zero_stage"] == 3) != (config.zero.stage == 3):
            if rank == 0:
                convert_to_universal(checkpoint_dir, tag)
            dist.barrier()
            load_dir = checkpoint_dir / UNIVERSAL
            ds_config["checkpoint"] = {"load_universal": True}

    torch.manual_seed(config.seed)
    model = MultiwayTransformer(config.model)
    if config.compile:
        compile_layers(model)
    optimizer = build_optimizer(model, config.optimizer)
    optimizer_groups = [{"weight_decay": group["weight_decay"]} for group in optimizer.param_groups]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, config.optimizer, config.steps) / config.optimizer.peak_lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    torch.manual_seed(sample_seed(config.seed, "rank", rank) % 2**63)

    step, positions = 0, dict.fromkeys(shards, 0)
    if state is not None:
        engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
        for loaded, configured in zip(engine.optimizer.optimizer.param_groups, optimizer_groups):
            loaded["weight_decay"] = configured["weight_decay"]
        step, positions = state["step"], state["data_positions"]
        restore_rng_states(state["rng"])
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_STATE).write_text(json.dumps({"fingerprint": checked.fingerprint,
                                                     "manifests": checked.manifests}, indent=1))
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))
        _truncate_log(run_dir / "metrics.jsonl", step)
    samples_log = run_dir / "samples" / f"rank-{rank}.jsonl"
    samples_log.parent.mkdir(parents=True, exist_ok=True)
    _truncate_log(samples_log, step)

    streams, settings = {}, {}
    for stream in shards:
        settings[stream] = stream_settings(config, stream, split.micro[stream], text_tokenizer, visual_tokenizer)
        dataset = MicroBatchStream(shards[stream], settings[stream], rank, world_size,
                                   start_micro_batches=positions[stream])
        streams[stream] = iter(build_loader(dataset, config.data.workers, config.data.prefetch_batches))

    sink: MetricsSink = DiscardingSink()
    if rank == 0:
        if checked.steps_change:
            print(f"train: {checked.steps_change} (--allow-steps-change): the learning rate now follows the new "
                  "schedule", flush=True)
        tags = {"git_commit": _git_commit(), "world_size": str(world_size), "zero_stage": str(config.zero.stage),
                "precision": config.precision}
        if checked.steps_change:
            tags["steps_change"] = checked.steps_change  # the `steps` param keeps the run's first value
        sink = MlflowSink(run_dir, tracking_uri(config.mlflow.tracking_uri, run_dir), config.mlflow.experiment,
                          config.name, flatten("", config.model_dump(mode="json")), tags,
                          config.mlflow.system_metrics_interval_seconds if config.mlflow.log_system_metrics else None)
        for artifact in ("config.yaml", "deepspeed.json", RUN_STATE):
            sink.log_artifact(run_dir / artifact)
        print(f"train: {config.name} on {world_size} rank(s), ZeRO-{config.zero.stage}, {config.precision}; "
              f"micro-batches {split.micro} x {split.accumulation} accumulation; "
              + (f"resumed from {tag}" if tag else "new run") + f"; run dir {run_dir}", flush=True)

    trainer = Trainer(config, split, engine, streams, device, visual_tokenizer)
    evaluator = Evaluator(config.eval, checked.validation, checked.probe_bank, settings,
                          config.loss_weights.model_dump(), config.model.hidden, rank, world_size,
                          lambda batch: to_device(batch, device, trainer.float_dtype, visual_tokenizer),
                          say=lambda line: print(line, flush=True) if rank == 0 else None)
    if evaluator.skipped and rank == 0:
        print(f"eval: skipped for this run: {evaluator.skipped}", flush=True)
    active = active_parameters_per_token(config.model)
    peak = _peak_flops(device)
    resumed_from, last_step = step, min(config.steps, stop_after_step or config.steps)
    status = "FAILED"
    window, window_steps, window_codes = dict.fromkeys(PHASES, 0.0), 0, None
    try:
        if step == 0 and not evaluator.skipped:
            _log_evaluation(_timed_evaluation(evaluator, engine, trainer.clock), 0, rank, run_dir, sink)
        while step < last_step:
            started = time.perf_counter()
            totals = trainer.train_step()
            step += 1
            for stream in positions:
                positions[stream] += split.accumulation
            reduced = _reduce(totals, device)
            lr = learning_rate(step - 1, config.optimizer, config.steps)
            metrics = step_metrics(reduced, time.perf_counter() - started, lr, engine.get_global_grad_norm(),
                                   config, split, active, peak)
            evaluation = {}
            if not evaluator.skipped and (step % config.eval.every_steps == 0 or step == last_step):
                evaluation = _timed_evaluation(evaluator, engine, trainer.clock)
                if rank == 0:
                    sink.log_metrics(evaluation, step)
                    print(_evaluation_line(evaluation, step), flush=True)
            for phase, seconds in trainer.clock.seconds().items():
                window[phase] += seconds
            window_steps += 1
            if totals.codes is not None:
                window_codes = totals.codes if window_codes is None else window_codes + totals.codes
            if step % config.log_every_steps == 0 or step == last_step:
                metrics.update(phase_metrics(window, window_steps))
                if window_codes is not None:
                    dist.all_reduce(window_codes)
                    metrics["codes/perplexity"] = code_perplexity(window_codes)
                window, window_steps, window_codes = dict.fromkeys(PHASES, 0.0), 0, None
            with samples_log.open("a") as log:
                digest = hashlib.sha256("\n".join(totals.keys).encode()).hexdigest()
                log.write(json.dumps({"step": step, "samples": len(totals.keys), "sha256": digest}) + "\n")
            if rank == 0:
                with (run_dir / "metrics.jsonl").open("a") as log:
                    log.write(json.dumps({"step": step, "wall_time": time.time(), **metrics, **evaluation}) + "\n")
                if step % config.log_every_steps == 0 or step == last_step:
                    sink.log_metrics(metrics, step)
                    print(f"step {step:>7d}  loss {metrics['loss']:.4f}  lr {lr:.2e}  "
                          f"{metrics['step_seconds']:.2f}s/step", flush=True)
            if step % config.checkpoint.every_steps == 0 or step == last_step:
                save_checkpoint(engine, checkpoint_dir, step, rank, positions, config.zero.stage,
                                config.checkpoint.keep_last)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"  # Ctrl-C: MLflow shows the run as stopped by the user, not as failed
        raise
    finally:
        sink.close(status)
    return TrainResult(run_dir, step, resumed_from, sink.run_id)


def _timed_evaluation(evaluator: Evaluator, engine, clock: PhaseClock) -> dict[str, float]:
    """Evaluate, timing it as the step-time breakdown's `eval` phase."""
    clock.lap("other")
    evaluation = evaluator.run(engine)
    clock.lap("eval")
    return evaluation


def _evaluation_line(metrics: dict[str, float], step: int) -> str:
    probe = f"  kNN top-1 {metrics['probe/knn_top1']:.3f}" if "probe/knn_top1" in metrics else ""
    losses = "  ".join(f"{name.removeprefix('val/loss/')} {value:.4f}" for name, value in metrics.items()
                       if name.startswith("val/loss/"))
    return f"eval {step:>7d}  val loss {metrics['val/loss']:.4f} ({losses}){probe}  {metrics['val/seconds']:.1f}s"


def _log_evaluation(metrics: dict[str, float], step: int, rank: int, run_dir: Path, sink: MetricsSink) -> None:
    """An evaluation outside a training step (the initial weights): its own metrics.jsonl line."""
    if rank == 0:
        with (run_dir / "metrics.jsonl").open("a") as log:
            log.write(json.dumps({"step": step, "wall_time": time.time(), **metrics}) + "\n")
        sink.log_metrics(metrics, step)
        print(_evaluation_line(metrics, step), flush=True)


def _settle_checkpoints(checkpoint_dir: Path, resume_point: ResumePoint) -> None:
    """Before a run saves anything: move aside the folders newer than its checkpoint (a save a crash cut short,
    or one `latest` no longer names), and point a passed-over `latest` at the checkpoint resumed from."""
    for tag, moved in zip(resume_point.newer, set_aside(checkpoint_dir, resume_point.newer)):
        print(f"train: moved {checkpoint_dir / tag} aside to {moved}: it is newer than the checkpoint this run "
              "continues from", flush=True)
    if resume_point.latest_problem:
        print(f"train: {resume_point.latest_problem}; continuing from {resume_point.tag}, the newest checkpoint "
              "whose completion marker proves it whole", flush=True)
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
