"""Held-out evaluation: each objective's masked-prediction loss and accuracy on a fixed subset of the validation
shards, and a weighted kNN probe of the image representation (`knn_probe`).

The subset is the first `eval.samples` samples of each kind in the manifests' order, split into contiguous
blocks over the ranks; views and masks are drawn at epoch 0 of `eval.seed`, so two evaluations of the same
weights see the same inputs whatever the run's seed or step. Every rank runs the same number of forwards (a
rank out of samples repeats one without counting it), since under ZeRO-3 a forward gathers parameters from all
ranks. Sums are all-reduced in float64 and divided once, as the training loss is. The model is put in eval
mode under no_grad and the RNG states are restored afterwards, so training continues exactly as without it.

`Evaluator` serves the trainer (a DeepSpeed engine) and `evaluate_saved_weights` serves `beit3 eval` (a plain
model from a checkpoint or an export, in one process).
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from beit3.pretrain.knn_probe import knn_classify
from beit3.pretrain.objective import masked_prediction
from beit3.pretrain.shard_streams import (
    HeldOutShare,
    ShardRef,
    StreamSettings,
    centre_view,
    first_labelled_images,
    first_samples,
    held_out_batches,
    rank_block,
)
from beit3.pretrain.train_config import EvalSettings

COMPONENTS = ("image", "text", "pair_image", "pair_text")
CLI_MICRO_BATCH = 16
"""Samples per forward of `beit3 eval` when the recipe sets no `eval.micro_batch` (the training micro-batch is
a per-GPU share of thousands there, which one process cannot hold)."""


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class Evaluator:
    """Evaluates a model (anything called like `MultiwayTransformer`) on this rank's share of the held-out data,
    read on the first call and kept (as stored bytes) for the run."""

    def __init__(self, settings: EvalSettings, validation: dict[str, list[ShardRef]], bank_refs: list[ShardRef],
                 streams: dict[str, StreamSettings], loss_weights: dict[str, float], hidden: int, rank: int,
                 world_size: int, prepare: Callable[[dict], dict], say: Callable[[str], None] = print):
        self.settings = settings
        self.validation = validation
        self.bank_refs = bank_refs
        self.streams = {stream: replace(stream_settings, seed=settings.seed,
                                        micro_batch=settings.micro_batch or stream_settings.micro_batch)
                        for stream, stream_settings in streams.items()}
        self.weights = loss_weights
        self.hidden = hidden
        self.rank, self.world_size = rank, world_size
        self.prepare = prepare
        self.say = say
        self.shares: dict[str, HeldOutShare] | None = None
        self.probe: tuple[HeldOutShare, list[str], HeldOutShare, list[str]] | None = None

    @property
    def skipped(self) -> str | None:
        """Why there is nothing to evaluate, or None."""
        if not self.settings.enabled:
            return "eval.enabled is false"
        if not any(self.validation.get(stream) for stream in self.streams):
            return "the datasets' manifests list no validation_shards for the trained streams"
        return None

    def _read(self) -> None:
        s = self.settings
        image = self.streams.get("image") or next(iter(self.streams.values()))
        read = {"verify_sha256": image.verify_sha256, "attempts": image.read_attempts,
                "backoff_seconds": image.read_backoff_seconds}
        self.shares = {stream: first_samples(self.validation[stream], s.samples, self.rank, self.world_size, **read)
                       for stream in self.streams if self.validation.get(stream)}
        missing = [stream for stream in self.streams if stream not in self.shares]
        if missing:
            self.say(f"eval: no validation shards of kind {', '.join(missing)}; those objectives are not evaluated")
        if not s.probe.enabled:
            return
        queries, query_labels = first_labelled_images(self.validation.get("image", []), s.samples, self.rank,
                                                      self.world_size, **read)
        bank, bank_labels = first_labelled_images(self.bank_refs, s.probe.bank_samples, self.rank,
                                                  self.world_size, **read) if query_labels else (None, [])
        if not query_labels or not bank_labels:
            where = "held-out" if not query_labels else "training"
            self.say(f"eval: kNN probe skipped: no {where} image carries a class label (only class-folder and "
                     "per-class tar sources have one)")
            return
        self.probe = (bank, bank_labels, queries, query_labels)
        self.say(f"eval: kNN probe of {len(query_labels)} held-out labelled images against {len(bank_labels)} "
                 f"training images, {len(set(bank_labels) | set(query_labels))} classes")

    def run(self, model) -> dict[str, float]:
        """`val/loss/{component}`, `val/accuracy/{component}`, `val/loss` (weighted as in training),
        `probe/knn_top1`, `probe/knn_top5` and `val/seconds`."""
        started = time.perf_counter()
        if self.shares is None:
            self._read()
        was_training = getattr(model, "module", model).training  # DeepSpeed's engine sets its module's mode only
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                metrics = self._losses(model)
                if self.probe is not None:
                    metrics.update(self._probe(model))
        finally:
            model.train(was_training)
        metrics["val/seconds"] = time.perf_counter() - started
        return metrics

    def _rounds(self, total: int, micro_batch: int) -> int:
        """Forwards every rank runs for a subset of `total`: enough for the largest block."""
        return math.ceil(math.ceil(total / self.world_size) / micro_batch)

    def _losses(self, model) -> dict[str, float]:
        sums = torch.zeros(3, len(COMPONENTS), dtype=torch.float64)
        for stream, share in self.shares.items():
            settings = self.streams[stream]
            batches = held_out_batches(share.samples or [share.filler], settings) if share.total else []
            for index in range(self._rounds(share.total, settings.micro_batch)):
                counted = index < len(batches) and bool(share.samples)
                batch = self.prepare(batches[index] if counted else batches[0])
                for component, (summed, correct, count) in masked_prediction(model, stream, batch).items():
                    if counted:
                        row = COMPONENTS.index(component)
                        sums[:, row] += torch.tensor([float(summed), float(correct), float(count)], dtype=torch.float64)
        loss, correct, predicted = _all_reduce(sums.to(self._device(model))).cpu()
        metrics, total = {}, 0.0
        for index, component in enumerate(COMPONENTS):
            if predicted[index] > 0:
                metrics[f"val/loss/{component}"] = float(loss[index] / predicted[index])
                metrics[f"val/accuracy/{component}"] = float(correct[index] / predicted[index])
                total += self.weights[component] * metrics[f"val/loss/{component}"]
        metrics["val/loss"] = total
        return metrics

    def _features(self, model, share: HeldOutShare, micro_batch: int, image_size: int) -> torch.Tensor:
        """[subset, hidden] image features of the whole subset on every rank: each rank fills its block's rows and
        the zeros elsewhere are summed away."""
        features = torch.zeros(share.total, self.hidden, dtype=torch.float32)
        start = rank_block(share.total, self.rank, self.world_size).start
        samples = share.samples or [share.filler]
        for index in range(self._rounds(share.total, micro_batch)):
            chunk = samples[index * micro_batch : (index + 1) * micro_batch]
            counted = bool(chunk) and bool(share.samples)
            pixels = torch.stack([centre_view(fields, image_size) for _, fields in (chunk or samples[:1])])
            batch = self.prepare({"image": pixels})
            pooled = image_feature(model(image=batch["image"]).vision).float().cpu()
            if counted:
                first = start + index * micro_batch
                features[first : first + len(chunk)] = pooled
        return _all_reduce(features.to(self._device(model))).cpu()

    def _probe(self, model) -> dict[str, float]:
        bank, bank_labels, queries, query_labels = self.probe
        settings = self.streams.get("image") or next(iter(self.streams.values()))
        micro = self.settings.micro_batch or settings.micro_batch
        classes = {label: index for index, label in enumerate(sorted(set(bank_labels) | set(query_labels)))}
        result = knn_classify(self._features(model, bank, micro, settings.image_size),
                              torch.tensor([classes[label] for label in bank_labels]),
                              self._features(model, queries, micro, settings.image_size),
                              torch.tensor([classes[label] for label in query_labels]), len(classes),
                              k=self.settings.probe.k, temperature=self.settings.probe.temperature)
        return {"probe/knn_top1": result.top1, "probe/knn_top5": result.top5}

    @staticmethod
    def _device(model) -> torch.device:
        return next(model.parameters()).device


def image_feature(vision: torch.Tensor) -> torch.Tensor:
    """The probe's image feature: the mean of the final-normed patch features (CLS left out). BEiT-3 trains no
    objective on its CLS token (masked prediction scores patches only), so, as BEiT's own linear probes do,
    the patch average is the representation the pretraining shapes; DINO, whose loss is on CLS, probes CLS."""
    return vision[:, 1:].mean(dim=1)


@dataclass
class SavedEvaluation:
    metrics: dict[str, float]
    step: int
    run_dir: Path


def evaluate_saved_weights(config, weights: dict[str, torch.Tensor], step: int, say: Callable[[str], None] = print
                           ) -> SavedEvaluation:
    """Run the trainer's evaluation and probe, in this one process, on `weights` (our parameter names) of the
    model `config` (a PretrainConfig) describes, over its datasets' held-out shards."""
    from beit3.data_pipeline.storage import local_copy
    from beit3.pretrain.model import MultiwayTransformer
    from beit3.pretrain.shard_streams import index_datasets, stream_settings
    from beit3.pretrain.trainer import to_device
    from beit3.tokenizers.text import TextTokenizer
    from beit3.tokenizers.visual import build_visual_tokenizer

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    index = index_datasets(config.data.datasets)
    text_tokenizer = TextTokenizer(local_copy(config.data.text_tokenizer))
    visual_tokenizer = None
    if config.data.visual_codes == "on_the_fly":
        visual_tokenizer = build_visual_tokenizer(config.data.visual_tokenizer)[0].to(device).eval()
    micro = config.eval.micro_batch or CLI_MICRO_BATCH
    streams = {stream: stream_settings(config, stream, micro, text_tokenizer, visual_tokenizer)
               for stream in config.active_streams()}
    model = MultiwayTransformer(config.model.model_copy(update={"drop_path": 0.0}))
    model.load_state_dict(weights, strict=True)
    model.to(device)
    evaluator = Evaluator(config.eval, index.validation, index.shards["image"], streams,
                          config.loss_weights.model_dump(), config.model.hidden, 0, 1,
                          lambda batch: to_device(batch, device, torch.float32, visual_tokenizer), say)
    if evaluator.skipped:
        raise ValueError(f"nothing to evaluate: {evaluator.skipped}")
    return SavedEvaluation(evaluator.run(model), step, Path(config.run_dir))


def format_table(metrics: dict[str, float]) -> str:
    """The evaluation as a table: one row per objective, then the total and the probe."""
    lines = [f"{'objective':<12}{'loss':>10}{'accuracy':>10}"]
    for component in COMPONENTS:
        if f"val/loss/{component}" in metrics:
            lines.append(f"{component:<12}{metrics[f'val/loss/{component}']:>10.4f}"
                         f"{metrics[f'val/accuracy/{component}']:>10.4f}")
    lines.append(f"{'total':<12}{metrics['val/loss']:>10.4f}")
    if "probe/knn_top1" in metrics:
        lines.append(f"kNN probe   top-1 {metrics['probe/knn_top1']:.4f}  top-5 {metrics['probe/knn_top5']:.4f}")
    return "\n".join(lines)


def log_to_run(run_dir: Path, metrics: dict[str, float], step: int) -> str:
    """Add the metrics at `step` to the run's MLflow run (the one `beit3 train` recorded); returns its id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from beit3.config import read_config_mapping
    from beit3.pretrain.checkpoints import CheckpointError
    from beit3.pretrain.metrics_sink import RUN_ID_FILE, tracking_uri

    id_file = run_dir / RUN_ID_FILE
    if not id_file.exists():
        raise CheckpointError(f"{run_dir}: no MLflow run recorded ({RUN_ID_FILE} is missing)")
    configured = read_config_mapping(run_dir / "config.yaml").get("mlflow", {}).get("tracking_uri")
    run_id = id_file.read_text().strip()
    now = int(time.time() * 1000)
    MlflowClient(tracking_uri(configured, run_dir)).log_batch(
        run_id, metrics=[Metric(name, value, now, step) for name, value in metrics.items()])
    return run_id


def _tag_step(tag: str | None) -> int | None:
    """The step of a checkpoint tag such as step-00000060."""
    number = (tag or "").removeprefix("step-")
    return int(number) if number.isdigit() else None


def evaluate_checkpoint(run_dir: Path, tag: str | None = None, say: Callable[[str], None] = print
                        ) -> SavedEvaluation:
    """`beit3 eval --run-dir`: a run's checkpoint (default: the latest), with the recipe the run saved."""
    from beit3.pretrain.export import consolidate
    from beit3.pretrain.train_config import load_pretrain_config

    config = load_pretrain_config(run_dir / "config.yaml").model_copy(update={"run_dir": str(run_dir)})
    weights, tag = consolidate(run_dir, tag)
    return evaluate_saved_weights(config, weights, _tag_step(tag) or 0, say)


def evaluate_export(pth: Path, recipe: Path, say: Callable[[str], None] = print) -> SavedEvaluation:
    """`beit3 eval --export`: released-layout weights, on the model and data `recipe` describes; the step is
    the one the export's config.json records."""
    import json

    from beit3.pretrain.checkpoints import CheckpointError
    from beit3.pretrain.released_format import from_released, unwrap_checkpoint
    from beit3.pretrain.train_config import load_pretrain_config

    config = load_pretrain_config(recipe)
    if not pth.exists():
        raise CheckpointError(f"{pth}: no such export")
    released = unwrap_checkpoint(torch.load(pth, map_location="cpu", weights_only=True))
    weights, report = from_released({key: tensor.float() for key, tensor in released.items()}, config.model)
    if report.missing_keys:
        raise CheckpointError(f"{pth}: the export lacks {len(report.missing_keys)} parameter(s) of {recipe}'s model, "
                              f"e.g. {', '.join(report.missing_keys[:3])} (pretraining heads are needed)")
    described = pth.parent / "config.json"
    tag = json.loads(described.read_text()).get("checkpoint_tag") if described.exists() else None
    return evaluate_saved_weights(config, weights, _tag_step(tag) or 0, say)
