"""The run planner against the paper's arithmetic, DeepSpeed's own memory estimators, and a measured step."""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from beit3.cli import main
from beit3.config import ConfigError
from beit3.pretrain.planner import (
    Cluster,
    format_plan,
    largest_module_parameters,
    model_state_memory,
    plan_run,
    resolve_gpu,
)
from beit3.pretrain.train_config import ZeroSettings, load_pretrain_config

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "configs" / "pretrain"
GIB = 2**30


def recipe(name: str, **updates):
    config = load_pretrain_config(RECIPES / f"{name}.yaml")
    return config.model_copy(update=updates) if updates else config


def h100s(nodes: int, gpus_per_node: int = 8) -> Cluster:
    return Cluster(nodes, gpus_per_node, resolve_gpu("h100"))


@functools.cache
def planned(name: str, nodes: int, gpus_per_node: int = 8):
    """Plans are pure functions of their inputs; each is computed once for the module."""
    return plan_run(recipe(name), h100s(nodes, gpus_per_node))


@pytest.fixture
def paper_plan():
    return planned("giant_paper", 8)


def test_paper_recipe_on_64_h100s_reproduces_the_published_arithmetic(paper_plan):
    assert paper_plan.tokens_per_step == 2048 * (257 + 128 + 321)
    assert paper_plan.tokens_per_step == pytest.approx(1.45e6, rel=0.01)
    assert paper_plan.active_parameters == pytest.approx(1.009e9, rel=0.005)
    assert paper_plan.flops_per_step == pytest.approx(9.1e15, rel=0.02)
    assert paper_plan.total_flops == pytest.approx(9.1e21, rel=0.02)
    assert paper_plan.gpu_days == pytest.approx(266, rel=0.02)
    assert paper_plan.wall_days == pytest.approx(paper_plan.gpu_days / 64)
    assert paper_plan.state_bytes.total == 16
    assert paper_plan.unpartitioned_model_states == pytest.approx(30e9, rel=0.05)
    assert paper_plan.split.micro == {"image": 16, "text": 16, "pair": 16}
    assert all(paper_plan.memory[stage].fits for stage in (1, 2, 3))


def test_zero_stages_partition_as_in_the_zero_paper(paper_plan):
    parameters, gpus = paper_plan.parameters.total, 64
    stage1, stage2, stage3 = (paper_plan.memory[stage] for stage in (1, 2, 3))
    assert stage1.parameters + stage1.fp32_gradients == pytest.approx(6 * parameters)
    assert stage1.optimizer == pytest.approx(12 * parameters / gpus)
    assert stage2.fp32_gradients + stage2.optimizer == pytest.approx(16 * parameters / gpus)
    assert stage3.parameters + stage3.fp32_gradients + stage3.optimizer == pytest.approx(18 * parameters / gpus)
    assert stage1.total > stage2.total > stage3.total


def test_fp32_gradient_accumulation_is_in_the_memory_table(paper_plan):
    """bf16 sums gradients in fp32: ZeRO-1 moves each bf16 gradient into a full fp32 buffer as it completes,
    ZeRO-2 and 3 hold the rank's partition in fp32; an fp32 run's gradients are fp32 already."""
    parameters, gpus = paper_plan.parameters.total, 64
    stage1, stage2, stage3 = (paper_plan.memory[stage] for stage in (1, 2, 3))
    assert stage1.fp32_gradients == pytest.approx(4 * parameters)
    assert stage2.fp32_gradients == stage3.fp32_gradients == pytest.approx(4 * parameters / gpus)
    assert stage1.gradients == stage2.gradients == stage3.gradients == 0
    assert stage1.model_states == pytest.approx(stage1.parameters + 4 * parameters + stage1.optimizer)
    row = next(line for line in format_plan(paper_plan).splitlines() if line.strip().startswith("fp32 gradients"))
    assert row.split()[-3:] == ["7.80", "0.12", "0.12"]
    fp32_plan = plan_run(recipe("tiny_cpu"), Cluster(1, 2, resolve_gpu("h100")))
    assert all(fp32_plan.memory[stage].fp32_gradients == 0 for stage in (1, 2, 3))


def test_the_paper_recipe_on_80_gb_needs_no_checkpointing(paper_plan):
    """Without checkpointing even the whole per-GPU batch, 32 + 32 + 32 in one micro-step (57 GB of activations),
    fits an 80 GB GPU under ZeRO-1, so checkpointing every layer would only add a recomputed forward: a third more
    time per step. The recipe takes the recommendation at half the micro-batch, as fast by the plan, leaving
    about half of the GPU free where the recommendation leaves 11 GB."""
    best = paper_plan.recommended
    assert best.checkpoint_every == 0 and best.split.micro["image"] == 32 and best.split.accumulation == 1
    assert best.memory.stage == 1 and best.memory.fits and 60e9 < best.memory.total < 72e9
    assert best.step_seconds == pytest.approx(paper_plan.step_seconds)
    assert paper_plan.model.checkpoint_every_n_layers == 0
    assert paper_plan.split.micro["image"] == 16 and paper_plan.split.accumulation == 2
    assert paper_plan.recipe_step_seconds == pytest.approx(best.step_seconds)
    assert paper_plan.memory[1].total < 0.55 * 80e9
    with_checkpointing = recipe("giant_paper").model.model_copy(update={"checkpoint_every_n_layers": 1})
    assert plan_run(recipe("giant_paper", model=with_checkpointing), h100s(8)).recipe_step_seconds == \
        pytest.approx(paper_plan.step_seconds * 4 / 3)
    assert ("fastest that fits: ZeRO-1, no checkpointing, micro-batch 32 + 32 + 32 x 1 accumulation: 69.01 GB, "
            "0.356 s per step") in format_plan(paper_plan)


@pytest.mark.parametrize("memory_gb, checkpoint_every, micro_batch", [(40, 0, 8), (24, 0, 4), (14.4, 1, 4)])
def test_smaller_gpus_get_smaller_micro_batches_then_checkpointing(memory_gb, checkpoint_every, micro_batch):
    """Splitting the batch finer costs no FLOPs and checkpointing does, so a smaller GPU first gets a smaller
    micro-batch with more accumulation, and checkpointing only once one sample per micro-step no longer fits
    without it: at 14.4 GB not even every 2 layers fits, and at every layer the largest micro-batch that fits."""
    plan = plan_run(recipe("giant_paper"), Cluster(8, 8, resolve_gpu("h100", memory_gb=memory_gb)))
    best = plan.recommended
    assert (best.checkpoint_every, best.split.micro["image"]) == (checkpoint_every, micro_batch)
    assert best.split.micro["image"] * best.split.accumulation * 64 == 2048 and best.memory.fits
    if checkpoint_every:
        model = recipe("giant_paper").model.model_copy(update={"checkpoint_every_n_layers": checkpoint_every + 1})
        assert not plan_run(recipe("giant_paper", model=model), plan.cluster, micro_batch=1).memory[1].fits
        assert best.step_seconds == pytest.approx(plan.step_seconds * 4 / 3)


def test_nothing_that_fits_is_said():
    plan = plan_run(recipe("giant_paper"), Cluster(8, 8, resolve_gpu("h100", memory_gb=13.5)))
    assert plan.recommended is None
    assert "fastest that fits: nothing fits under ZeRO-1" in format_plan(plan)


def normalised(options: str) -> str:
    """Options as DeepSpeed prints them, whatever its version's enum and padding: `offload_param=cpu,...`."""
    return re.sub(r"\s+", "", options.replace("OffloadDeviceEnum.", ""))


def deepspeed_gpu_gib(printed: str, options: str) -> float:
    """The per-GPU figure of one options row of a DeepSpeed estimator's printed table."""
    for line in printed.splitlines():
        row = re.match(r"\s*[\d.]+GB \|\s*([\d.]+)GB \| (.*)$", line)
        if row and normalised(row.group(2)) == normalised(options):
            return float(row.group(1))
    raise AssertionError(f"no row {options!r} in:\n{printed}")


CLUSTERS = [(1, 8), (8, 8)]
DEEPSPEED_PARTITIONED_BYTES = 18
"""DeepSpeed's estimators charge 18 bytes per parameter for the partitioned states without offload, where the
ZeRO paper's 2 + 2 + 12 accounting charges 14 (ZeRO-2: gradients and optimizer) or 16 (ZeRO-3: all three).
The replicated bf16 weights of ZeRO-2, the gathered largest layer of ZeRO-3 and every offload row agree
exactly."""


@pytest.mark.parametrize("model_recipe", ["giant_paper", "base_released"])
@pytest.mark.parametrize("nodes, gpus_per_node", CLUSTERS)
def test_zero2_model_states_match_deepspeeds_estimator(model_recipe, nodes, gpus_per_node, capsys):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    plan = planned(model_recipe, nodes, gpus_per_node)
    parameters, gpus = plan.parameters.total, plan.cluster.world_size
    capsys.readouterr()
    estimate_zero2_model_states_mem_needs_all_cold(parameters, num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    printed = capsys.readouterr().out

    ours = plan.memory[2]
    deepspeed = deepspeed_gpu_gib(printed, "offload_optimizer=none")
    assert deepspeed == pytest.approx((ours.parameters + DEEPSPEED_PARTITIONED_BYTES * parameters / gpus) / GIB,
                                      abs=0.006)
    offloaded = model_state_memory(parameters, 0, gpus, stage=2, precision="bf16", offload_optimizer=True)
    on_gpu = sum(offloaded.values()) - offloaded["fp32_gradients"]  # the estimator predates fp32 accumulation
    assert deepspeed_gpu_gib(printed, "offload_optimizer=cpu") == pytest.approx(on_gpu / GIB, abs=0.006)


@pytest.mark.parametrize("model_recipe", ["giant_paper", "base_released"])
@pytest.mark.parametrize("nodes, gpus_per_node", CLUSTERS)
def test_zero3_model_states_match_deepspeeds_estimator(model_recipe, nodes, gpus_per_node, capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    plan = planned(model_recipe, nodes, gpus_per_node)
    parameters, gpus = plan.parameters.total, plan.cluster.world_size
    largest = largest_module_parameters(plan.model)
    capsys.readouterr()
    estimate_zero3_model_states_mem_needs_all_cold(parameters, largest, num_gpus_per_node=gpus_per_node,
                                                   num_nodes=nodes)
    printed = capsys.readouterr().out

    ours = plan.memory[3]
    deepspeed = deepspeed_gpu_gib(printed, "offload_param=none, offload_optimizer=none, zero_init=1")
    assert deepspeed == pytest.approx((ours.gathered_layer + DEEPSPEED_PARTITIONED_BYTES * parameters / gpus) / GIB,
                                      abs=0.006)
    for offload_parameters, options in [(False, "offload_param=none, offload_optimizer=cpu, zero_init=1"),
                                        (True, "offload_param=cpu, offload_optimizer=cpu, zero_init=1")]:
        offloaded = model_state_memory(parameters, largest, gpus, stage=3, precision="bf16", offload_optimizer=True,
                                       offload_parameters=offload_parameters)
        assert deepspeed_gpu_gib(printed, options) == pytest.approx(sum(offloaded.values()) / GIB, abs=0.006)


MEASURE_TRAINING_STEP = r"""
import json, sys

import psutil
import torch
import torch.nn.functional as F

from beit3.pretrain.masking import BlockMasking, TextMasking, masked_patch_count, sample_seed
from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.model_stats import tokens_per_sample
from beit3.pretrain.objective import masked_prediction
from beit3.pretrain.train_config import load_pretrain_config, split_batch
from beit3.tokenizers.text import BOS, EOS
from beit3.tokenizers.visual import RandomProjectionTokenizer, VisualTokenizerConfig

recipe = load_pretrain_config(sys.argv[1])
model_config, masking = recipe.model.model_copy(update=json.loads(sys.argv[2])), recipe.masking
micro = split_batch(recipe.batch, world_size=1).micro
lengths = tokens_per_sample(model_config)
generator = torch.Generator().manual_seed(0)
visual = RandomProjectionTokenizer(VisualTokenizerConfig(
    kind="random", seed=0, patch_size=model_config.patch_size, codebook_size=model_config.visual_vocab_size))
block_masking = BlockMasking(model_config.grid_size, masked_patch_count(model_config.grid_size, masking.image_ratio))
mask_id = model_config.vocab_size - 1


def images(stream):
    count = micro[stream]
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    pixels = F.interpolate(coarse, size=model_config.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
    seeds = [sample_seed(0, stream, i) for i in range(count)]
    return {"image": pixels, "image_mask": block_masking.batch(seeds), "codes": visual.encode(pixels).flatten(1)}


def texts(stream, length, rate):
    count = micro[stream]
    ids = torch.randint(EOS + 2, mask_id, (count, length), generator=generator)
    ids[:, 0], ids[:, -1] = BOS, EOS
    padding = torch.zeros_like(ids, dtype=torch.bool)
    seeds = [sample_seed(0, stream, i) for i in range(count)]
    masked, chosen = TextMasking(rate, mask_id=mask_id).batch(ids, padding, seeds)
    return {"text": masked, "text_padding_mask": padding, "text_prediction_mask": chosen, "labels": ids}


batches = {
    "image": images("image"),
    "text": texts("text", lengths["text"], masking.text_rate),
    "pair": {**images("pair"), **texts("pair", lengths["pair"] - lengths["image"], masking.caption_rate)},
}


def train(config, batches, steps):
    model = MultiwayTransformer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.optimizer.peak_lr, betas=recipe.optimizer.betas,
                                  eps=recipe.optimizer.eps, weight_decay=recipe.optimizer.weight_decay)
    for _ in range(steps):
        loss = sum(part for stream, batch in batches.items()
                   for part, _, _ in masked_prediction(model, stream, batch).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)


# The runtime's one-time start-up (kernel libraries, thread pools) happens on a model too small to matter.
warm_up_config = model_config.model_copy(update={"layers": 1, "hidden": 32, "ffn_hidden": 64, "heads": 1})
train(warm_up_config, {stream: {k: v[:1] for k, v in batch.items()} for stream, batch in batches.items()}, 1)
torch.manual_seed(0)


def high_water_mark():  # the kernel's peak resident set size (VmHWM) since it was last reset
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


before_rss = psutil.Process().memory_info().rss
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # resets VmHWM to the current RSS, so start-up peaks (imports) do not hide the step's
before_peak = high_water_mark()
train(model_config, batches, 2)
after_peak = high_water_mark()
print(json.dumps({"before_rss": before_rss, "before_peak": before_peak, "after_peak": after_peak}))
"""


def estimate_and_measured_peak(model_overrides: dict) -> tuple[float, float]:
    """The planner's per-GPU total for the tiny recipe (one process) with `model_overrides`, and the measured
    peak growth of two AdamW steps of that model (fp32, its 8 + 8 + 8 micro-batch) in a fresh process; the
    second step runs with every model state allocated, as in a run's steady state (gradients kept, as
    DeepSpeed's flat buffers are). Peak growth is the peak RSS after the steps minus the RSS before the model
    exists, measured after the runtime's one-time start-up."""
    config = recipe("tiny_cpu")
    config = config.model_copy(update={"model": config.model.model_copy(update=model_overrides)})
    plan = plan_run(config, Cluster(1, 1, resolve_gpu("h100")))
    assert (config.precision, plan.state_bytes.parameters, plan.state_bytes.optimizer) == ("fp32", 4, 8)
    result = subprocess.run([sys.executable, "-c", MEASURE_TRAINING_STEP, str(RECIPES / "tiny_cpu.yaml"),
                             json.dumps(model_overrides)], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["after_peak"] > measured["before_peak"], "the step did not raise the process's peak"
    return plan.memory[config.zero.stage].total, measured["after_peak"] - measured["before_rss"]


def test_tiny_recipe_estimate_matches_the_measured_peak_of_a_training_step():
    """What remains beyond the estimate is the C allocator's overhead (freed blocks it keeps), which on GPUs the
    planner's reserve stands for."""
    estimate, growth = estimate_and_measured_peak({})
    assert estimate == pytest.approx(growth, rel=0.25), (
        f"estimated {estimate / 1e6:.1f} MB, measured {growth / 1e6:.1f} MB")


WIDER_DEEPER = {"layers": 8, "hidden": 192, "ffn_hidden": 768, "heads": 4}
"""A second shape where activations outweigh the model states, so checkpointing changes the peak severalfold."""


@pytest.mark.slow  # two training steps of an 8-layer model per case, in a fresh process
@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_estimate_matches_the_measured_peak_at_a_second_shape_with_and_without_checkpointing(checkpoint_every):
    estimate, growth = estimate_and_measured_peak({**WIDER_DEEPER, "checkpoint_every_n_layers": checkpoint_every})
    assert estimate == pytest.approx(growth, rel=0.25), (
        f"estimated {estimate / 1e6:.1f} MB, measured {growth / 1e6:.1f} MB")


def test_a_recipe_that_does_not_fit_says_so():
    model = recipe("giant_paper").model.model_copy(update={"checkpoint_every_n_layers": 0})
    plan = plan_run(recipe("giant_paper", model=model), h100s(1))
    assert plan.split.micro["image"] == 128
    assert not any(plan.memory[stage].fits for stage in (1, 2, 3))
    assert plan.activations_without_checkpointing > 80e9
    fits_row = next(line for line in format_plan(plan).splitlines() if line.strip().startswith("fits "))
    assert fits_row.split()[1:] == ["NO", "NO", "NO"]


def test_checkpointing_cuts_activations_and_the_recipe_total_uses_it(paper_plan):
    assert paper_plan.activations_with_checkpointing < paper_plan.activations_without_checkpointing / 8
    assert paper_plan.memory[1].activations == paper_plan.activations_without_checkpointing
    model = recipe("giant_paper").model.model_copy(update={"checkpoint_every_n_layers": 1})
    checkpointed = plan_run(recipe("giant_paper", model=model), h100s(8))
    assert checkpointed.memory[1].activations == paper_plan.activations_with_checkpointing


def test_recipe_offload_takes_states_off_the_gpu():
    zero = ZeroSettings(stage=3, offload_optimizer=True, offload_parameters=True)
    plan = plan_run(recipe("base_released", zero=zero), h100s(8))
    assert plan.memory[3].parameters == plan.memory[3].gradients == plan.memory[3].optimizer == 0
    assert plan.memory[3].gathered_layer > 0
    assert plan.memory[2].gradients == plan.memory[2].optimizer == 0
    assert plan.memory[1].fp32_gradients > 0 and plan.memory[3].fp32_gradients == 0  # ZeRO-3 sums on the CPU


def test_micro_batch_sets_gradient_accumulation():
    plan = plan_run(recipe("giant_paper"), h100s(8), micro_batch=8)
    assert plan.split.micro == {"image": 8, "text": 8, "pair": 8}
    assert plan.split.accumulation == 4
    with pytest.raises(ConfigError, match="micro-batch 24"):
        plan_run(recipe("giant_paper"), h100s(8), micro_batch=24)


def test_batch_that_does_not_divide_over_the_cluster_is_refused():
    with pytest.raises(ConfigError, match=r"batch.image: 2048 samples per step do not divide over 24 ranks"):
        plan_run(recipe("giant_paper"), h100s(3))


def test_unknown_gpu_is_refused_with_the_known_names():
    with pytest.raises(ConfigError, match=r"unknown GPU 'v100': known are a100, h100, h200"):
        resolve_gpu("v100")
    with pytest.raises(ConfigError, match="no GPU given"):
        resolve_gpu(None, peak_tflops=100)


def test_gpu_figures_can_be_overridden():
    gpu = resolve_gpu("h100", memory_gb=40)
    assert (gpu.peak_flops, gpu.memory_bytes) == (989e12, 40e9)
    custom = resolve_gpu(None, peak_tflops=500, memory_gb=48)
    assert (custom.peak_flops, custom.memory_bytes) == (500e12, 48e9)


def test_mfu_scales_time():
    at_half = plan_run(recipe("giant_paper"), h100s(8), mfu=0.5)
    assert at_half.gpu_days == pytest.approx(266 * 0.4 / 0.5, rel=0.02)
    with pytest.raises(ConfigError, match="MFU"):
        plan_run(recipe("giant_paper"), h100s(8), mfu=1.5)


def test_plan_command_prints_the_plan_and_refuses_bad_input(capsys):
    arguments = ["plan", "--config", str(RECIPES / "giant_paper.yaml"), "--nodes", "8", "--gpus-per-node", "8"]
    assert main([*arguments, "--gpu", "h100"]) == 0
    printed = capsys.readouterr().out
    assert "tokens per step     1,445,888" in printed
    assert "GPU-days" in printed and "ZeRO-3" in printed
    assert main([*arguments, "--gpu", "v100"]) == 2
    assert "unknown GPU 'v100'" in capsys.readouterr().err
    assert main(["plan", "--config", str(RECIPES / "giant_paper.yaml"), "--nodes", "3", "--gpus-per-node", "8",
                 "--gpu", "h100"]) == 2
    assert "do not divide" in capsys.readouterr().err
