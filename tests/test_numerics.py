"""What a training step sums, on 2 CPU ranks (gloo) under DeepSpeed: gradients accumulated and reduced in fp32
under bf16, and each objective's loss as the mean over the masked tokens of the whole global batch; and where a
step's time goes, as every run logs it."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.objective import masked_counts, masked_prediction
from beit3.pretrain.train_config import (
    BatchSettings,
    DataSettings,
    OptimizerSettings,
    PretrainConfig,
    ZeroSettings,
    deepspeed_config,
    split_batch,
)
from beit3.pretrain.trainer import PHASES, PhaseClock, Trainer, phase_metrics
from beit3.sample_data import tiny_recipe
from conftest import model_config
from s3_endpoint import free_port
from training_fixtures import run_training, write_recipe

RANKS = 2
MASK_ID = 3


def recipe(stage: int, precision: str, batch: BatchSettings, **model_overrides) -> PretrainConfig:
    """A recipe whose DeepSpeed settings come from `deepspeed_config`; clipping far above any gradient here."""
    return PretrainConfig(
        name="numerics", run_dir="unused", model=model_config("tiny", **model_overrides),
        data=DataSettings(datasets=["unused"], text_tokenizer="unused"), batch=batch, precision=precision,
        zero=ZeroSettings(stage=stage), optimizer=OptimizerSettings(gradient_clipping=1e9, weight_decay=0.0))


def _join_group(rank: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(RANKS))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def _leave_group() -> None:
    """Both ranks done, then the group closed: a process that exits with gloo's connections still open can abort
    in their teardown."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


class Probe(torch.nn.Module):
    """loss = sum(w * x): the gradient of w is x, exactly, in any precision x is representable in."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


ACCUMULATION = 8
BIG, SMALL, TINY = 1.0, 2.0**-9, 2.0**-12
"""Rank 0 contributes BIG once and SMALL seven times, rank 1 TINY once. Each is exact in bf16, but a bf16 sum
near BIG keeps steps of 2**-7 only: the SMALL ones are rounded away as they are added, and so is rank 1's share
when the two ranks' sums meet in a bf16 reduction."""
FP32_SUM = (BIG + 7 * SMALL + TINY) / (ACCUMULATION * RANKS)  # DeepSpeed averages over micro-steps and ranks


def _contribution(rank: int, micro_step: int) -> float:
    if rank == 0:
        return BIG if micro_step == 0 else SMALL
    return TINY if micro_step == 1 else 0.0


def _accumulate_in_bf16(rank: int, port: int, results: str) -> None:
    deepspeed = _join_group(rank, port)
    from deepspeed.utils import safe_get_full_fp32_param

    batch = BatchSettings(image=ACCUMULATION * RANKS, text=0, pair=0, gradient_accumulation=ACCUMULATION)
    configs = {f"zero-{stage}": deepspeed_config(recipe(stage, "bf16", batch), split_batch(batch, RANKS))
               for stage in (1, 2, 3)}
    configs["zero-1, bf16 defaults"] = {key: value for key, value in configs["zero-1"].items()
                                        if key not in ("data_types", "communication_data_type")}
    sums = {}
    for name, config in configs.items():
        model = Probe()
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                               config=config)
        for micro_step in range(ACCUMULATION):
            x = torch.full((4,), _contribution(rank, micro_step), dtype=torch.bfloat16)
            engine.backward(engine(x))
            engine.step()
        sums[name] = (-safe_get_full_fp32_param(engine.module.w)).tolist()  # SGD at lr 1 from 0: minus the sum
    if rank == 0:
        Path(results).write_text(json.dumps(sums))
    _leave_group()


@pytest.mark.slow  # 2 DeepSpeed ranks
def test_bf16_gradients_are_accumulated_and_reduced_in_fp32(tmp_path, monkeypatch):
    """Under every ZeRO stage the derived config makes the step's gradient the exact fp32 sum of contributions
    that bf16 would round away; DeepSpeed's bf16 defaults (the control) lose them."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    results = tmp_path / "sums.json"
    mp.spawn(_accumulate_in_bf16, args=(free_port(), str(results)), nprocs=RANKS)
    sums = json.loads(results.read_text())
    for stage in (1, 2, 3):
        assert sums[f"zero-{stage}"] == [FP32_SUM] * 4, stage
    assert sums["zero-1, bf16 defaults"] == [BIG / (ACCUMULATION * RANKS)] * 4


GLOBAL_BATCH = BatchSettings(image=4, text=8, pair=8, gradient_accumulation=2)
CAPTION_LENGTHS = {(0, 0): 5, (0, 1): 30, (1, 0): 12, (1, 1): 21}
"""Longest text of each (rank, micro-step): micro-batches whose masked counts differ several-fold."""
TINY_MODEL = {"drop_path": 0.0, "vocab_size": 1024, "visual_vocab_size": 1024}


def micro_batches(rank: int, micro_step: int) -> dict[str, dict]:
    """One micro-step's batches of the three streams, built from a seed per (rank, micro-step)."""
    config = model_config("tiny", **TINY_MODEL)
    split = split_batch(GLOBAL_BATCH, RANKS)
    generator = torch.Generator().manual_seed(100 * rank + micro_step)
    batches = {}
    for stream in ("image", "text", "pair"):
        size = split.micro[stream]
        batch: dict = {"keys": [f"{stream}-{rank}-{micro_step}-{row}" for row in range(size)]}
        if stream != "text":
            batch["image"] = torch.randn(size, 3, config.image_size, config.image_size, generator=generator)
            batch["image_mask"] = torch.rand(size, config.num_patches, generator=generator) < 0.2 + 0.2 * micro_step
            batch["codes"] = torch.randint(0, config.visual_vocab_size, (size, config.num_patches),
                                           generator=generator)
        if stream != "image":
            longest = CAPTION_LENGTHS[rank, micro_step]
            lengths = torch.randint(2, longest + 1, (size,), generator=generator)
            labels = torch.randint(4, config.vocab_size, (size, longest), generator=generator)
            padding = torch.arange(longest) >= lengths[:, None]
            predicted = (torch.rand(size, longest, generator=generator) < 0.4) & ~padding
            predicted[:, 0] = True
            batch.update(text=torch.where(predicted, MASK_ID, labels), text_padding_mask=padding,
                         text_prediction_mask=predicted, labels=labels)
        batches[stream] = batch
    return batches


def _step_on_two_ranks(rank: int, port: int, results: str) -> None:
    deepspeed = _join_group(rank, port)
    from deepspeed.utils import safe_get_full_fp32_param

    gradients = {}
    for precision, stage in [(precision, stage) for precision in ("fp32", "bf16") for stage in (1, 2, 3)]:
        config = recipe(stage, precision, GLOBAL_BATCH, **TINY_MODEL)
        split = split_batch(config.batch, RANKS)
        torch.manual_seed(0)
        model = MultiwayTransformer(config.model)
        before = {name: parameter.detach().float() for name, parameter in model.named_parameters()}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                               config=deepspeed_config(config, split))
        drawn = [micro_batches(rank, micro_step) for micro_step in range(split.accumulation)]
        streams = {stream: iter([batches[stream] for batches in drawn]) for stream in drawn[0]}
        Trainer(config, split, engine, streams, torch.device("cpu")).train_step()
        gradients[f"{precision}, ZeRO-{stage}"] = {name: before[name] - safe_get_full_fp32_param(parameter)
                                                   for name, parameter in engine.module.named_parameters()}
    if rank == 0:
        torch.save(gradients, results)
    _leave_group()


def _objective_gradients(normalise_per_micro_batch: bool) -> dict[str, torch.Tensor]:
    """One process, every micro-batch of the step: the gradient of the summed objectives, each the mean over
    all its masked tokens (or, for comparison, the mean over micro-batches of each micro-batch's own mean)."""
    torch.manual_seed(0)
    model = MultiwayTransformer(model_config("tiny", **TINY_MODEL))
    every_batch = [micro_batches(rank, micro_step) for rank in range(RANKS) for micro_step in range(2)]
    sums: dict[str, list] = {}
    for batches in every_batch:
        for stream, batch in batches.items():
            for component, (summed, _, count) in masked_prediction(model, stream, batch).items():
                sums.setdefault(component, []).append((summed, count))
    if normalise_per_micro_batch:
        loss = sum(summed / count for parts in sums.values() for summed, count in parts) / len(every_batch)
    else:
        loss = sum(sum(s for s, _ in parts) / sum(c for _, c in parts) for parts in sums.values())
    loss.backward()
    return {name: parameter.grad for name, parameter in model.named_parameters()}


def _largest_difference(ours: dict, theirs: dict) -> float:
    return max((ours[name] - theirs[name]).abs().max().item() for name in theirs)


@pytest.mark.slow  # 2 DeepSpeed ranks
def test_a_step_is_the_gradient_of_each_objectives_global_mean(tmp_path, monkeypatch):
    """Uneven caption lengths and masked shares on 2 ranks x 2 micro-steps: in fp32, under ZeRO-1, 2 and 3, the
    step's gradient equals the single-process gradient of the global means within 1e-6, while averaging
    per-micro-batch means, the old normalisation, is measurably different. In bf16 every stage stays within the
    bf16 forward's rounding of it (gradients reach 0.33): none loses the gradient of parameters that only some
    of a micro-step's three forwards use, as ZeRO-1's bf16 optimizer does when it clears gradients per forward."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    results = tmp_path / "gradients.pt"
    mp.spawn(_step_on_two_ranks, args=(free_port(), str(results)), nprocs=RANKS)
    stepped = torch.load(results, weights_only=True)
    reference = _objective_gradients(normalise_per_micro_batch=False)
    for name, gradients in stepped.items():
        assert _largest_difference(gradients, reference) < (1e-6 if name.startswith("fp32") else 2e-2), name
    assert _largest_difference(_objective_gradients(normalise_per_micro_batch=True), reference) > 1e-4


def test_counts_match_what_the_objective_predicts():
    """The counts the loss is normalised by, read from the masks before any forward, are the predictions made."""
    model = MultiwayTransformer(model_config("tiny", **TINY_MODEL))
    for stream, batch in micro_batches(1, 1).items():
        predicted = {component: count for component, (_, _, count) in masked_prediction(model, stream, batch).items()}
        assert {component: int(count) for component, count in masked_counts(stream, batch).items()} == predicted
        assert all(count > 0 for count in predicted.values())



@pytest.mark.slow
def test_every_logging_window_records_the_step_time_breakdown(tmp_path, training_data):
    """`beit3 train`, 6 steps logged every 3 on 2 CPU ranks: each window's line in metrics.jsonl and the MLflow
    run carry seconds per step of data wait, forward+backward, optimizer and other, with shares summing to 1;
    on CPU they are wall-clock, so the first three make up the steps' time but for the metrics reduction. The
    held-out evaluations (of the initial weights, and at the last step) are each window's `eval` phase."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(run_dir, training_data, steps=6, log_every_steps=3, checkpoint={"every_steps": 6},
                         mlflow={"log_system_metrics": False})
    run_training(write_recipe(tmp_path / "recipe.yaml", recipe))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [line for line in lines if "time/compute" in line]
    assert [line["step"] for line in windows] == [3, 6]
    for window in windows:
        steps = [line for line in lines if window["step"] - 3 < line["step"] <= window["step"]]
        step_seconds = sum(line["step_seconds"] for line in steps) / len(steps)
        in_step = sum(window[f"time/{phase}"] for phase in ("data_wait", "compute", "optimizer"))
        assert 0.75 * step_seconds <= in_step <= step_seconds
        assert window["time/compute"] > window["time/optimizer"] > 0 and window["time/other"] > 0
        assert window["time/eval"] > 0
        assert sum(window[f"time/{phase}_fraction"] for phase in PHASES) == pytest.approx(1)
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    for phase in PHASES:
        logged = client.get_metric_history(run_id, f"time/{phase}_fraction")
        assert [(m.step, m.value) for m in logged] == [(w["step"], w[f"time/{phase}_fraction"]) for w in windows]


def test_phase_clock_adds_up_laps_per_phase():
    clock = PhaseClock(torch.device("cpu"))
    for phase in ("data_wait", "compute", "optimizer", "compute", "optimizer"):
        clock.lap(phase)
    spent = clock.seconds()
    assert set(spent) == set(PHASES) and spent["other"] == 0.0 and all(value >= 0 for value in spent.values())
    assert clock.seconds() == dict.fromkeys(PHASES, 0.0)
    metrics = phase_metrics({"data_wait": 1.0, "compute": 6.0, "optimizer": 2.0, "other": 1.0}, steps=2)
    assert metrics["time/compute"] == 3.0 and metrics["time/compute_fraction"] == 0.6
    assert metrics["time/other_fraction"] == 0.1
