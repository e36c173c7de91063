"""Forward+backward speed and memory of our Multiway Transformer against torchscale's `BEiT3`.

Both models get the same config, weights, batch and inputs (images, padded texts, image-text pairs), in
training mode. Timings are interleaved (ours, theirs, ours, ...) in one process and the medians compared, so
machine noise hits both alike. Memory is measured two ways: bytes saved for backward (exact, from autograd's
saved-tensor hooks) and the peak resident-memory growth of one step (Linux VmHWM, reset just before the
step), each model and input kind in a fresh process. `--compile` adds our model with every layer compiled
(`beit3.pretrain.compilation`, what `compile: true` in a recipe does) as columns after the others; its
compilation happens in the untimed first step of each input kind.

Ours runs text in the layout its device picks (`--text-layout auto`: packed on the CPU, padded elsewhere; see
`beit3.pretrain.model.packs_text`); name one to time the other. On a machine that other jobs share, wall time
mostly measures them: `--clock process --threads 1` times the process's own CPU seconds instead (one thread,
since idle pool threads spin on the clock too). `--count-ops` adds, per model and input kind, the operators
one step dispatches (a compiled layer's generated kernels are not among them) and those that make a GPU
wait until the host has read a result (`nonzero`, `item`).

    python benchmarks/model_speed.py                       # CPU fp32, base width, 4 layers
    python benchmarks/model_speed.py --compile             # ... and compiled, against eager and torchscale
    python benchmarks/model_speed.py --compile --clock process --threads 1 --count-ops   # on a shared machine
    python benchmarks/model_speed.py --device cuda --dtype bf16 --config configs/model/giant.yaml \
        --layers 4 --batch 16 --peak-tflops 989             # GPU: adds achieved TFLOP/s and MFU (ours)
"""

import argparse
import copy
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from beit3.config import load_config
from beit3.pretrain.compilation import compile_layers
from beit3.pretrain.model import TEXT_LAYOUTS, MultiwayTransformer
from beit3.pretrain.model_config import ModelConfig
from beit3.pretrain.model_stats import active_parameters_per_token, training_flops_per_sample
from beit3.pretrain.released_format import to_released
from beit3.pretrain.torchscale_reference import build_torchscale

REPO = Path(__file__).resolve().parent.parent

KINDS = ("image", "text", "pair")
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
HOST_SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense")
"""Operators whose result the host reads: on a GPU each waits for the work queued before it."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/model/base.yaml"))
    parser.add_argument("--layers", type=int, default=4, help="override the depth (full width is kept)")
    parser.add_argument("--batch", type=int, default=4, help="samples per input kind")
    parser.add_argument("--text-len", type=int, default=128, help="slots per text; real lengths 75-100%%")
    parser.add_argument("--caption-len", type=int, default=64, help="slots per caption; real lengths 8-40")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak, for model-FLOPs utilisation")
    parser.add_argument("--skip-torchscale", action="store_true", help="time ours alone (e.g. for MFU runs)")
    parser.add_argument("--compile", action="store_true", help="also time ours with compiled layers")
    parser.add_argument("--text-layout", choices=TEXT_LAYOUTS, default="auto", help="how ours runs padded text")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (shared machines)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--count-ops", action="store_true", help="also count operators and host syncs per step")
    parser.add_argument("--memory-worker", choices=["ours", "torchscale"], help=argparse.SUPPRESS)
    parser.add_argument("--memory-kind", choices=KINDS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_benchmark_config(args) -> ModelConfig:
    config = load_config(ModelConfig, args.config)
    return config.model_copy(update={"layers": args.layers or config.layers,
                                     "vl_expert_layers": min(config.vl_expert_layers, args.layers)})


def make_models(config: ModelConfig, device: str, with_reference: bool, text_layout: str = "auto"):
    torch.manual_seed(0)
    ours = MultiwayTransformer(config, text_layout).to(device).train()
    if not with_reference:
        return ours, None
    released, _ = to_released(ours.state_dict(), config)
    reference = build_torchscale(config)
    reference.load_state_dict({k.removeprefix("beit3."): v for k, v in released.items() if k.startswith("beit3.")},
                              strict=True)
    return ours, reference.to(device).train()


def make_inputs(config: ModelConfig, args) -> dict[str, dict]:
    """Pretraining-shaped inputs: 40% of patches masked; packed texts that mostly fill their slots (a segment
    ends early at the end of a document); short captions padded to their slots, as image-text pairs have."""
    generator = torch.Generator().manual_seed(0)
    batch = args.batch

    def padded_ids(slots, shortest, longest):
        ids = torch.randint(3, 64000, (batch, slots), generator=generator)
        lengths = torch.randint(shortest, longest + 1, (batch, 1), generator=generator)
        return ids, torch.arange(slots).expand(batch, -1) >= lengths

    image = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)
    image_mask = torch.rand(batch, config.num_patches, generator=generator) < 0.4
    text, text_padding = padded_ids(args.text_len, args.text_len * 3 // 4, args.text_len)
    caption, caption_padding = padded_ids(args.caption_len, 8, min(40, args.caption_len))
    to_device = partial(torch.Tensor.to, device=args.device)
    return {
        "image": dict(image=to_device(image), image_mask=to_device(image_mask)),
        "text": dict(text=to_device(text), text_padding_mask=to_device(text_padding)),
        "pair": dict(image=to_device(image), image_mask=to_device(image_mask), text=to_device(caption),
                     text_padding_mask=to_device(caption_padding)),
    }


def step_ours(model, inputs, dtype):
    with torch.autocast(model.text_embed.weight.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model.encode(**inputs)
        loss = sum(x.float().square().mean() for x in (out.vision, out.text) if x is not None)
    loss.backward()


def step_reference(model, inputs, dtype):
    translated = {"visual_tokens": inputs.get("image"), "textual_tokens": inputs.get("text"),
                  "text_padding_position": inputs.get("text_padding_mask"),
                  "vision_masked_position": inputs.get("image_mask")}
    with torch.autocast(next(model.parameters()).device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(**translated)["encoder_out"]
        loss = out.float().square().mean()
    loss.backward()


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, model, inputs, dtype, device, clock=time.perf_counter) -> float:
    model.zero_grad(set_to_none=True)
    synchronize(device)
    start = clock()
    step(model, inputs, dtype)
    synchronize(device)
    return clock() - start


def operator_counts(step, model, inputs, dtype) -> tuple[int, int]:
    """(operators dispatched, host-sync operators) in one step, from the profiler; after a warm step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step(model, inputs, dtype)
    model.zero_grad(set_to_none=True)
    events = profile.key_averages()
    return (sum(event.count for event in events if event.key.startswith("aten::")),
            sum(event.count for event in events if event.key in HOST_SYNC_OPS))


def saved_activation_bytes(step, model, inputs, dtype) -> int:
    """Bytes autograd keeps for backward during one forward, each storage counted once."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(model, inputs, dtype)
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_resident() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def memory_worker(args):
    """Runs in a fresh process: the peak resident growth of one step of one model on one input kind."""
    config = load_benchmark_config(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ours, reference = make_models(config, args.device, with_reference=args.memory_worker == "torchscale",
                                  text_layout=args.text_layout)
    model, step = (ours, step_ours) if args.memory_worker == "ours" else (reference, step_reference)
    inputs = make_inputs(config, args)[args.memory_kind]
    del ours, reference
    reset_peak_resident()
    before = resident_bytes("VmRSS")
    step(model, inputs, dtype)
    print(resident_bytes("VmHWM") - before)


def peak_resident_growth(which: str, kind: str, argv: list[str]) -> int:
    result = subprocess.run([sys.executable, __file__, *argv, "--memory-worker", which, "--memory-kind", kind],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_worker:
        return memory_worker(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_benchmark_config(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    compare = not args.skip_torchscale
    clock = CLOCKS[args.clock]
    ours, reference = make_models(config, args.device, with_reference=compare, text_layout=args.text_layout)
    compiled = compile_layers(copy.deepcopy(ours)) if args.compile else None
    inputs = make_inputs(config, args)
    print(f"model_speed: {config.name} width ({config.hidden}/{config.ffn_hidden}/{config.heads} heads, "
          f"{config.attention} attention), {config.layers} layers, batch {args.batch} per kind, "
          f"text/caption slots {args.text_len}/{args.caption_len}, {args.device} {args.dtype}, "
          f"text layout {args.text_layout}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, median of {args.repeats}")
    active = active_parameters_per_token(config)
    lengths = {"image": config.image_tokens, "text": args.text_len, "pair": config.image_tokens + args.caption_len}
    header = f"{'input':<7}{'ours ms':>10}"
    if compare:
        header += f"{'torchscale ms':>15}{'speedup':>9}{'saved MB ours/ts':>20}{'peak RSS MB ours/ts':>22}"
    if args.peak_tflops:
        header += f"{'TFLOP/s':>9}{'MFU':>7}"
    if args.compile:
        header += f"{'compiled ms':>13}{'vs eager':>10}" + (f"{'vs ts':>8}" if compare else "")
        if args.peak_tflops:
            header += f"{'TFLOP/s':>9}{'MFU':>7}"
    print(header)

    def utilisation(kind: str, seconds: float) -> str:
        achieved = args.batch * training_flops_per_sample(config, lengths[kind], active) / seconds / 1e12
        return f"{achieved:>9.1f}{achieved / args.peak_tflops:>7.1%}"

    for kind in KINDS:
        times = {"ours": [], "torchscale": [], "compiled": []}
        timed(step_ours, ours, inputs[kind], dtype, args.device)
        if compare:
            timed(step_reference, reference, inputs[kind], dtype, args.device)
        if compiled is not None:
            timed(step_ours, compiled, inputs[kind], dtype, args.device)
        for _ in range(args.repeats):
            times["ours"].append(timed(step_ours, ours, inputs[kind], dtype, args.device, clock))
            if compare:
                times["torchscale"].append(timed(step_reference, reference, inputs[kind], dtype, args.device, clock))
            if compiled is not None:
                times["compiled"].append(timed(step_ours, compiled, inputs[kind], dtype, args.device, clock))
        ours_time = statistics.median(times["ours"])
        row = f"{kind:<7}{ours_time * 1e3:>10.1f}"
        if compare:
            theirs_time = statistics.median(times["torchscale"])
            saved = (saved_activation_bytes(step_ours, ours, inputs[kind], dtype) / 2**20,
                     saved_activation_bytes(step_reference, reference, inputs[kind], dtype) / 2**20)
            rss = f"{'n/a':>20}"
            if args.device == "cpu":
                growth = [peak_resident_growth(which, kind, argv) / 2**20 for which in ("ours", "torchscale")]
                rss = f"{growth[0]:>10.0f}/{growth[1]:<9.0f}"
            row += f"{theirs_time * 1e3:>15.1f}{theirs_time / ours_time:>8.2f}x"
            row += f"{saved[0]:>11.0f}/{saved[1]:<8.0f}{rss:>22}"
        if args.peak_tflops:
            row += utilisation(kind, ours_time)
        if compiled is not None:
            compiled_time = statistics.median(times["compiled"])
            row += f"{compiled_time * 1e3:>13.1f}{ours_time / compiled_time:>9.2f}x"
            if compare:
                row += f"{theirs_time / compiled_time:>7.2f}x"
            if args.peak_tflops:
                row += utilisation(kind, compiled_time)
        print(row)
        if args.count_ops:
            counted = {"ours": (step_ours, ours), "torchscale": (step_reference, reference),
                       "compiled": (step_ours, compiled)}
            print("  ops per step (all / host syncs): " + ", ".join(
                f"{name} {'/'.join(map(str, operator_counts(step, model, inputs[kind], dtype)))}"
                for name, (step, model) in counted.items() if model is not None))


if __name__ == "__main__":
    main()
