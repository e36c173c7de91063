"""Sizing a pretraining run before paying for it: memory per GPU under each ZeRO stage, FLOPs, time and cost.

Everything here is arithmetic on the recipe and the model's shape (built on the meta device, no weights), so
the giant can be planned on a laptop. `plan_run` returns a `RunPlan`; `format_plan` prints it.
"""

import math
from dataclasses import dataclass

from beit3.config import ConfigError
from beit3.pretrain.masking import masked_patch_count
from beit3.pretrain.model_config import ModelConfig
from beit3.pretrain.model_stats import (
    DEFAULT_CAPTION_LEN,
    DEFAULT_TEXT_LEN,
    ParameterBreakdown,
    active_parameters_per_token,
    build_on_meta,
    count_parameters,
    tokens_per_sample,
    training_flops_per_sample,
)
from beit3.pretrain.train_config import STREAMS, BatchSettings, BatchSplit, PretrainConfig, split_batch

GB = 1e9
SECONDS_PER_DAY = 86_400
ZERO_STAGES = (1, 2, 3)
RUNTIME_RESERVE = 0.10
"""Share of GPU memory kept free for what the estimate leaves out: the CUDA context, NCCL and DeepSpeed
communication buckets, allocator fragmentation. A run "fits" when its estimate stays below the rest."""
LOG_PROB_BYTES = 4
"""The objective takes cross-entropy in fp32 (`logits.float()`), so the saved log-probabilities are fp32."""
FP32_GRADIENT_BYTES = 4
"""bf16 runs accumulate and reduce gradients in fp32 (train_config.FP32_GRADIENTS), in a buffer of 4 bytes per
parameter it covers."""
RECOMPUTED_SHARE = 1 / 3
"""A forward is a third of a training step's FLOPs (backward is two): what a checkpointed layer adds to its cost."""


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float
    """Dense bf16 FLOP/s: the denominator of model FLOPs utilisation."""
    memory_bytes: float


KNOWN_GPUS = {
    "h100": Gpu("H100 SXM", 989e12, 80 * GB),
    "h200": Gpu("H200", 989e12, 141 * GB),
    "a100": Gpu("A100 80GB", 312e12, 80 * GB),
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: Gpu

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model state, as the ZeRO paper counts them for mixed-precision Adam."""

    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU under one ZeRO stage: the model states, and the activations of one micro-step."""

    stage: int
    parameters: float
    gradients: float
    fp32_gradients: float
    optimizer: float
    gathered_layer: float
    activations: float
    usable_bytes: float

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.fp32_gradients + self.optimizer + self.gathered_layer

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.usable_bytes


@dataclass(frozen=True)
class Recommendation:
    """The fastest settings that fit the GPU under the recipe's ZeRO stage, and the step time they give."""

    checkpoint_every: int
    """0: no activation checkpointing."""
    split: BatchSplit
    memory: StageMemory
    step_seconds: float


@dataclass(frozen=True)
class RunPlan:
    recipe: str
    model: ModelConfig
    cluster: Cluster
    precision: str
    parameters: ParameterBreakdown
    active_parameters: int
    split: BatchSplit
    batch: BatchSettings
    tokens_per_sample: dict[str, int]
    tokens_per_step: int
    flops_per_step: float
    steps: int
    mfu: float
    state_bytes: StateBytes
    checkpoint_every: int
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    memory: dict[int, StageMemory]
    recipe_stage: int
    recommended: "Recommendation | None"

    @property
    def total_flops(self) -> float:
        return self.flops_per_step * self.steps

    @property
    def step_seconds(self) -> float:
        return self.flops_per_step / (self.cluster.world_size * self.cluster.gpu.peak_flops * self.mfu)

    @property
    def gpu_days(self) -> float:
        return self.total_flops / (self.cluster.gpu.peak_flops * self.mfu) / SECONDS_PER_DAY

    @property
    def wall_days(self) -> float:
        return self.gpu_days / self.cluster.world_size

    @property
    def unpartitioned_model_states(self) -> float:
        return self.state_bytes.total * self.parameters.total

    @property
    def recipe_step_seconds(self) -> float:
        """The step time with the recipe's own checkpointing recomputing forwards."""
        return self.step_seconds * checkpointing_cost(self.model.layers, self.model.checkpoint_every_n_layers)


def resolve_gpu(name: str | None, peak_tflops: float | None = None, memory_gb: float | None = None) -> Gpu:
    """A GPU from the table, with either figure overridden; without a name, both figures must be given."""
    if name is None:
        if peak_tflops is None or memory_gb is None:
            raise ConfigError(f"no GPU given: name one of {', '.join(sorted(KNOWN_GPUS))} (--gpu) or give both "
                              "--gpu-peak-tflops and --gpu-memory-gb")
        return Gpu("custom GPU", peak_tflops * 1e12, memory_gb * GB)
    known = KNOWN_GPUS.get(name.lower())
    if known is None:
        raise ConfigError(f"unknown GPU {name!r}: known are {', '.join(sorted(KNOWN_GPUS))} "
                          "(or give --gpu-peak-tflops and --gpu-memory-gb)")
    return Gpu(known.name,
               known.peak_flops if peak_tflops is None else peak_tflops * 1e12,
               known.memory_bytes if memory_gb is None else memory_gb * GB)


def state_bytes(precision: str) -> StateBytes:
    """bf16: bf16 weights and gradients, fp32 master weights and Adam moments (2 + 2 + 12); fp32: the
    weights are their own master copy (4 + 4 + 8). Either way 16 bytes per parameter before partitioning."""
    return StateBytes(2, 2, 12) if precision == "bf16" else StateBytes(4, 4, 8)


def activation_bytes_per_element(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def largest_module_parameters(config: ModelConfig) -> int:
    """The most parameters one module holds directly: what ZeRO-3 gathers whole at once."""
    return max(sum(p.numel() for p in module.parameters(recurse=False))
               for module in build_on_meta(config).modules())


def split_for_cluster(batch: BatchSettings, world_size: int, micro_batch: int | None = None) -> BatchSplit:
    """The recipe's split, or with `micro_batch` samples of the largest stream per GPU micro-step, the
    gradient accumulation that gives the recipe's global batch."""
    if micro_batch is None:
        return split_batch(batch, world_size)
    largest = max(batch.global_count(stream) for stream in STREAMS)
    if micro_batch <= 0 or largest % (world_size * micro_batch):
        raise ConfigError(f"micro-batch {micro_batch}: {largest} samples per step do not divide into micro-batches "
                          f"of {micro_batch} on {world_size} GPUs")
    accumulation = largest // (world_size * micro_batch)
    return split_batch(batch.model_copy(update={"gradient_accumulation": accumulation}), world_size)


def model_state_memory(parameters: int, largest_module: int, world_size: int, stage: int, precision: str,
                       offload_optimizer: bool = False, offload_parameters: bool = False) -> dict[str, float]:
    """Per-GPU bytes of each model state under a ZeRO stage (Rajbhandari et al. 2020, section 5):
    stage 1 partitions the optimizer states over the ranks, stage 2 also the gradients, stage 3 also the
    weights, and then each rank also holds the largest module's weights and gradients gathered whole while it
    runs. Offloaded states live in CPU memory and cost the GPU nothing: offloading the optimizer also moves the
    gradient partition (stages 2 and 3) to the CPU, where the optimizer consumes it.

    bf16 runs sum gradients in fp32 (DeepSpeed 0.19), and the bf16 gradients are transient: ZeRO-1 without
    offload moves each into a full fp32 buffer as soon as it is complete; ZeRO-2 and offloaded ZeRO-1 keep the
    rank's partition in fp32 on the GPU; ZeRO-3 keeps its partitions in fp32, on the CPU when the optimizer is
    offloaded."""
    per_parameter = state_bytes(precision)
    shards = {
        "parameters": world_size if stage >= 3 else 1,
        "gradients": world_size if stage >= 2 else 1,
        "optimizer": world_size,
    }
    memory = {state: getattr(per_parameter, state) * parameters / shards[state] for state in shards}
    if offload_optimizer:
        memory["optimizer"] = 0.0
        if stage >= 2:
            memory["gradients"] = 0.0
    if offload_parameters:
        memory["parameters"] = 0.0
    fp32_gradients = 0.0
    if precision == "bf16":
        if stage == 1 and not offload_optimizer:
            fp32_gradients = FP32_GRADIENT_BYTES * parameters
        elif not (stage == 3 and offload_optimizer):
            fp32_gradients = FP32_GRADIENT_BYTES * parameters / world_size
        memory["gradients"] = 0.0
    gathered = (per_parameter.parameters + per_parameter.gradients) * largest_module if stage >= 3 else 0.0
    return {**memory, "fp32_gradients": fp32_gradients, "gathered_layer": gathered}


def activation_memory(config: PretrainConfig, micro: dict[str, int], checkpoint_every: int,
                      text_len: int = DEFAULT_TEXT_LEN, caption_len: int = DEFAULT_CAPTION_LEN) -> float:
    """Bytes autograd keeps for backward over one micro-step: a micro-batch of every stream at once, since the
    trainer back-propagates their summed loss in one pass.

    Per token and layer (d = hidden, f = FFN width) the layer stack saves 9d + 3f elements:
      attention: pre-LN input d, q/k/v input d, q/k/v 3d, attention output d, sub-LN output d    = 7d
      FFN:       pre-LN input d, fc1 input d, fc1 output f, GELU output f, sub-LN output f     = 2d + 3f
    Fused attention kernels (flash or memory-efficient on GPUs, the flash kernel on CPUs) keep only a
    log-sum-exp per head and query, not the T x T scores; it and the LayerNorm statistics are under 0.2% at the
    giant's width and left out. A checkpointed layer keeps only its input (d) and is recomputed in backward,
    so two full layers are added back as the working set: the recomputed layer's saved tensors, and the
    gradients its backward makes of them, which come on top of every layer's kept input (without
    checkpointing, backward frees saved tensors about as fast as it makes gradients). Outside the stack: the
    pixels the patch embedding needs, the final LayerNorm's input (d per token), and per predicted position
    the head's input (d) and the fp32 log-probabilities over its vocabulary. Predicted positions are the
    recipe's masked patches (pair images too when masked) and rate x (length - 2) text tokens (bos and eos are
    never chosen).
    Checked against the measured peak memory of a CPU training step in tests/test_planner.py.
    """
    model, masking = config.model, config.masking
    element = activation_bytes_per_element(config.precision)
    lengths = tokens_per_sample(model, text_len, caption_len)
    tokens = sum(micro[stream] * lengths[stream] for stream in STREAMS)
    full_layer = element * (9 * model.hidden + 3 * model.ffn_hidden) * tokens
    if checkpoint_every:
        checkpointed = math.ceil(model.layers / checkpoint_every)
        stack = (model.layers - checkpointed + 2) * full_layer + checkpointed * element * model.hidden * tokens
    else:
        stack = model.layers * full_layer
    images = micro["image"] + micro["pair"]
    pixels = element * model.in_chans * model.image_size**2 * images
    final_norm = element * model.hidden * tokens
    masked_images = micro["image"] + (micro["pair"] if masking.mask_pair_images else 0)
    image_predictions = masked_images * masked_patch_count(model.grid_size, masking.image_ratio)
    text_predictions = (micro["text"] * masking.text_rate * (text_len - 2)
                        + micro["pair"] * masking.caption_rate * (caption_len - 2))
    heads = (image_predictions * (element * model.hidden + LOG_PROB_BYTES * model.visual_vocab_size)
             + text_predictions * (element * model.hidden + LOG_PROB_BYTES * model.vocab_size))
    return stack + pixels + final_norm + heads


def checkpointing_cost(layers: int, checkpoint_every: int) -> float:
    """Step time relative to no checkpointing: every checkpointed layer runs its forward again in backward."""
    if not checkpoint_every:
        return 1.0
    return 1 + RECOMPUTED_SHARE * math.ceil(layers / checkpoint_every) / layers


def recommend(config: PretrainConfig, cluster: Cluster, states: dict[str, float], step_seconds: float,
              text_len: int = DEFAULT_TEXT_LEN, caption_len: int = DEFAULT_CAPTION_LEN) -> Recommendation | None:
    """Over every micro-batch that splits the recipe's batch on the cluster and every checkpointing interval (off,
    or every N layers), the fastest that fits under the recipe's ZeRO stage; at equal speed, the fewest
    micro-steps. `step_seconds` is the step without recomputation. None when nothing fits."""
    layers, usable = config.model.layers, cluster.gpu.memory_bytes * (1 - RUNTIME_RESERVE)
    largest = max(config.batch.global_count(stream) for stream in STREAMS)
    per_gpu = largest // cluster.world_size if largest % cluster.world_size == 0 else 0
    best = None
    for micro_batch in (size for size in range(1, per_gpu + 1) if per_gpu % size == 0):
        try:
            split = split_for_cluster(config.batch, cluster.world_size, micro_batch)
        except ConfigError:
            continue
        for every in (0, *range(layers, 0, -1)):  # cheapest first: a larger interval checkpoints fewer layers
            activations = activation_memory(config, split.micro, every, text_len, caption_len)
            memory = StageMemory(stage=config.zero.stage, activations=activations, usable_bytes=usable, **states)
            if memory.fits:
                found = Recommendation(every, split, memory, step_seconds * checkpointing_cost(layers, every))
                if best is None or (found.step_seconds, split.accumulation) < (best.step_seconds,
                                                                               best.split.accumulation):
                    best = found
                break
    return best


def plan_run(config: PretrainConfig, cluster: Cluster, mfu: float = 0.4, micro_batch: int | None = None,
             text_len: int = DEFAULT_TEXT_LEN, caption_len: int = DEFAULT_CAPTION_LEN) -> RunPlan:
    """Memory per GPU for every ZeRO stage, tokens and FLOPs per step, and time at the given MFU."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"MFU must lie in (0, 1], got {mfu}")
    if cluster.nodes < 1 or cluster.gpus_per_node < 1:
        raise ConfigError(f"a cluster needs at least one node and one GPU per node, got {cluster.nodes} x "
                          f"{cluster.gpus_per_node}")
    model = config.model
    split = split_for_cluster(config.batch, cluster.world_size, micro_batch)
    parameters = count_parameters(model)
    active = active_parameters_per_token(model)
    lengths = tokens_per_sample(model, text_len, caption_len)
    tokens_per_step = sum(config.batch.global_count(stream) * lengths[stream] for stream in STREAMS)
    flops_per_step = sum(config.batch.global_count(stream) * training_flops_per_sample(model, lengths[stream], active)
                         for stream in STREAMS)
    checkpoint_every = model.checkpoint_every_n_layers or 1
    without = activation_memory(config, split.micro, 0, text_len, caption_len)
    with_checkpointing = activation_memory(config, split.micro, checkpoint_every, text_len, caption_len)
    recipe_activations = with_checkpointing if model.checkpoint_every_n_layers else without
    largest_module = largest_module_parameters(model)
    usable = cluster.gpu.memory_bytes * (1 - RUNTIME_RESERVE)
    memory, states = {}, {}
    for stage in ZERO_STAGES:
        states[stage] = model_state_memory(parameters.total, largest_module, cluster.world_size, stage,
                                           config.precision, config.zero.offload_optimizer,
                                           config.zero.offload_parameters and stage == 3)
        memory[stage] = StageMemory(stage=stage, activations=recipe_activations, usable_bytes=usable, **states[stage])
    step_seconds = flops_per_step / (cluster.world_size * cluster.gpu.peak_flops * mfu)
    return RunPlan(
        recipe=config.name, model=model, cluster=cluster, precision=config.precision, parameters=parameters,
        active_parameters=active, split=split, batch=config.batch, tokens_per_sample=lengths,
        tokens_per_step=tokens_per_step, flops_per_step=flops_per_step, steps=config.steps, mfu=mfu,
        state_bytes=state_bytes(config.precision), checkpoint_every=checkpoint_every,
        activations_without_checkpointing=without, activations_with_checkpointing=with_checkpointing,
        memory=memory, recipe_stage=config.zero.stage,
        recommended=recommend(config, cluster, states[config.zero.stage], step_seconds, text_len, caption_len),
    )


def _every(layers: int) -> str:
    return "every layer" if layers == 1 else f"every {layers} layers"


def _format_recommendation(plan: RunPlan) -> str:
    best = plan.recommended
    if best is None:
        return f"  fastest that fits: nothing fits under ZeRO-{plan.recipe_stage}, even checkpointing every layer " \
               "with one sample per micro-step"
    checkpointing = f"checkpointing {_every(best.checkpoint_every)}" if best.checkpoint_every else "no checkpointing"
    micro = best.split.micro
    return (f"  fastest that fits: ZeRO-{best.memory.stage}, {checkpointing}, micro-batch {micro['image']} + "
            f"{micro['text']} + {micro['pair']} x {best.split.accumulation} accumulation: "
            f"{best.memory.total / GB:.2f} GB, {best.step_seconds:.3f} s per step")


def format_plan(plan: RunPlan) -> str:
    cluster, gpu, model = plan.cluster, plan.cluster.gpu, plan.model
    micro, batch = plan.split.micro, plan.batch
    lines = [
        f"recipe              {plan.recipe}: {model.name}, {plan.parameters.total / 1e6:,.2f}M parameters, "
        f"{plan.precision}",
        f"cluster             {cluster.nodes} nodes x {cluster.gpus_per_node} {gpu.name} = {cluster.world_size} GPUs, "
        f"{gpu.peak_flops / 1e12:,.0f} TFLOP/s bf16 dense and {gpu.memory_bytes / GB:,.0f} GB each",
        "",
        "parameters",
    ]
    for part in sorted(plan.parameters.parts):
        lines.append(f"  {part:<14}{plan.parameters.parts[part]:>15,d}")
    lines.append(f"  {'total':<14}{plan.parameters.total:>15,d}")
    lengths = plan.tokens_per_sample
    lines += [
        "",
        f"batch per step      {batch.image} images + {batch.text} texts + {batch.pair} pairs; per GPU micro-step "
        f"{micro['image']} + {micro['text']} + {micro['pair']}, gradient accumulation {plan.split.accumulation}",
        f"tokens per sample   image {lengths['image']}, text {lengths['text']}, pair {lengths['pair']}",
        f"tokens per step     {plan.tokens_per_step:,d}",
        f"FLOPs per step      {plan.flops_per_step:.3e}  (6N + 12LdT per token, N = {plan.active_parameters:,d} "
        "active parameters)",
        f"FLOPs for the run   {plan.total_flops:.3e}  ({plan.steps:,d} steps)",
        f"at {plan.mfu:.0%} MFU          {plan.step_seconds:.3f} s per step, {plan.wall_days:,.1f} days on "
        f"{cluster.world_size} GPUs = {plan.gpu_days:,.1f} GPU-days",
        "",
        f"memory per GPU, GB  (model states {plan.state_bytes.total} bytes per parameter = "
        f"{plan.unpartitioned_model_states / GB:.2f} GB before partitioning)",
        " " * 24 + "".join(f"{f'ZeRO-{stage}':>10}" for stage in ZERO_STAGES),
    ]
    stages = [plan.memory[stage] for stage in ZERO_STAGES]
    rows = [
        (f"parameters ({plan.state_bytes.parameters} B)", "parameters"),
        (f"gradients ({plan.state_bytes.gradients} B)", "gradients"),
        (f"fp32 gradients ({FP32_GRADIENT_BYTES} B)", "fp32_gradients"),
        (f"optimizer ({plan.state_bytes.optimizer} B)", "optimizer"),
        ("gathered layer", "gathered_layer"),
        ("model states", "model_states"),
        ("activations", "activations"),
        ("total", "total"),
    ]
    for label, field in rows:
        lines.append(f"  {label:<22}" + "".join(f"{getattr(memory, field) / GB:10.2f}" for memory in stages))
    lines.append(f"  {'fits':<22}" + "".join(f"{'yes' if memory.fits else 'NO':>10}" for memory in stages))
    recipe_checkpointing = (f"checkpointing {_every(model.checkpoint_every_n_layers)}"
                            if model.checkpoint_every_n_layers else "without checkpointing")
    lines += [
        f"  activations per micro-step: {plan.activations_without_checkpointing / GB:.2f} GB without checkpointing, "
        f"{plan.activations_with_checkpointing / GB:.2f} GB checkpointing {_every(plan.checkpoint_every)}",
        f"  the recipe: ZeRO-{plan.recipe_stage}, {recipe_checkpointing}, {plan.recipe_step_seconds:.3f} s per step "
        f"at {plan.mfu:.0%} of peak (recomputed forwards included)",
        _format_recommendation(plan),
        f"  fits: total within {1 - RUNTIME_RESERVE:.0%} of {gpu.memory_bytes / GB:,.0f} GB, the rest kept for the "
        "CUDA context, communication buckets and fragmentation",
    ]
    return "\n".join(lines)
