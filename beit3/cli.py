"""The `beit3` command: each subcommand is a thin layer over a function that tests call directly."""

import argparse
import gc
import sys

from beit3.config import load_config
from beit3.redaction import redact_urls


def _format_count(count: int) -> str:
    return f"{count:>15,d}  ({count / 1e6:9.2f}M)"


def model_info(args: argparse.Namespace) -> int:
    from beit3.pretrain.model_config import ModelConfig
    from beit3.pretrain.model_stats import (
        active_parameters_per_token,
        count_parameters,
        tokens_per_sample,
        training_flops_per_sample,
    )

    config = load_config(ModelConfig, args.config)
    breakdown = count_parameters(config)
    print(f"model {config.name}: {config.layers} layers, hidden {config.hidden}, FFN {config.ffn_hidden}, "
          f"{config.heads} heads, {config.attention} attention, VL experts in top {config.vl_expert_layers} layers, "
          f"patch {config.patch_size} at {config.image_size}")
    print("\nparameters")
    for part in sorted(breakdown.parts):
        print(f"  {part:<14}{_format_count(breakdown.parts[part])}")
    print(f"  {'backbone':<14}{_format_count(breakdown.backbone)}   (all but the heads)")
    print(f"  {'total':<14}{_format_count(breakdown.total)}")
    active = active_parameters_per_token(config)
    print(f"\nactive layer-stack parameters per token: {_format_count(active)}")
    print("\nper sample           tokens   training GFLOPs (6N+12LdT per token)")
    lengths = {k: v for k, v in (("text_len", args.text_len), ("caption_len", args.caption_len)) if v is not None}
    for kind, tokens in tokens_per_sample(config, **lengths).items():
        flops = training_flops_per_sample(config, tokens, active)
        print(f"  {kind:<18}{tokens:>8d}   {flops / 1e9:14.1f}")
    return 0


def tokenizer_train_text(args: argparse.Namespace) -> int:
    from beit3.tokenizers.text_training import train_text_tokenizer

    tokenizer = train_text_tokenizer(args.input, args.output, args.vocab_size, text_field=args.text_field,
                                     model_type=args.model_type, max_sentences=args.max_sentences)
    print(f"wrote {args.output}.model: {tokenizer.processor.GetPieceSize():,} pieces, vocabulary "
          f"{tokenizer.vocab_size:,} in the XLM-R layout (<mask> = {tokenizer.mask_id})")
    return 0


def tokenizer_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from beit3.tokenizers.inspect_codes import survey_folder
    from beit3.tokenizers.visual import VisualTokenizerConfig, build_visual_tokenizer

    if args.checkpoint:
        config = VisualTokenizerConfig(kind="vqkd", checkpoint=args.checkpoint)
    else:
        config = VisualTokenizerConfig(kind="random", seed=args.random_seed, patch_size=args.patch_size)
    tokenizer, report = build_visual_tokenizer(config)
    grid = tokenizer.grid(args.image_size)
    print(f"visual tokenizer: {config.kind}" + (f" from {config.checkpoint}" if config.checkpoint else
                                                f" (seed {config.seed})"))
    if report is not None:
        print(f"  checkpoint keys not needed by the encoder, ignored: {report.summary()}")
    print(f"  codebook size {tokenizer.codebook_size}, patch {tokenizer.patch_size}, "
          f"grid {grid}x{grid} at {args.image_size} pixels")
    if args.images:
        usage, skipped = survey_folder(tokenizer, Path(args.images), args.image_size, args.batch_size)
        print(f"  over {args.images}: {usage['codes_seen']:,} codes, {usage['distinct']:,} distinct "
              f"({usage['share']:.1%} of the codebook), perplexity {usage['perplexity']:.1f}")
        if skipped:
            print("  skipped: " + ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())))
    return 0


def data_build(args: argparse.Namespace) -> int:
    from beit3.data_pipeline.config import DataConfig
    from beit3.data_pipeline.job import build, summary_table, view_passes

    config = load_config(DataConfig, args.config)
    result = build(config, ray_address=args.ray_address, progress=not args.quiet)
    print(summary_table(result))
    for line in view_passes(result, config):
        print(line)
    print(f"manifest: {config.output.rstrip('/')}/manifest.json")
    return 0


def freeze_imports() -> None:
    """Leave what the imports made (half a million objects: PyTorch, DeepSpeed, MLflow) out of the garbage
    collector's full passes. Each pass would walk all of it: DeepSpeed's bf16 optimizer collects six times as it
    starts (2.1 s on 2 cores, 0.3 s frozen), and a full pass the collector starts on its own in the loop holds
    its rank back at the next collective. None of it is ever freed: modules live as long as the process."""
    gc.collect()
    gc.freeze()


def pretrain(args: argparse.Namespace) -> int:
    from beit3.pretrain.train_config import load_pretrain_config

    config = load_pretrain_config(args.config)
    from beit3.pretrain.trainer import train as run_training

    freeze_imports()
    if args.run_dir:
        config = config.model_copy(update={"run_dir": args.run_dir})
    try:
        result = run_training(config, require_resume=args.resume, stop_after_step=args.stop_after_step,
                              allow_steps_change=args.allow_steps_change)
    except KeyboardInterrupt:
        return _interrupted(config.run_dir)
    except ModuleNotFoundError as error:  # DeepSpeed falls back to MPI when no launcher set the rank variables
        if error.name != "mpi4py":
            raise
        raise ValueError("no launcher set RANK, WORLD_SIZE and MASTER_ADDR: start training with torchrun or "
                         "deepspeed (see configs/pretrain/tiny_cpu.yaml)") from None
    if result.mlflow_run_id:
        print(f"train: step {result.final_step} reached; run dir {result.run_dir}, MLflow run {result.mlflow_run_id}")
    return 0


def _interrupted(run_dir: str) -> int:
    """Ctrl-C: one line from rank 0 naming the checkpoint the same command continues from; status 130."""
    import os
    from pathlib import Path

    from beit3.pretrain.checkpoints import latest_whole

    if os.environ.get("RANK", "0") == "0":
        latest = latest_whole(Path(run_dir) / "checkpoints")
        where = (f"the last complete checkpoint is {Path(run_dir) / 'checkpoints' / latest}; the same command "
                 "continues from it" if latest else "no checkpoint was written yet")
        print(f"beit3 train: interrupted; {where}", file=sys.stderr, flush=True)
    return 130


def export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from beit3.pretrain.export import export_checkpoint, log_export_to_mlflow, run_model_config, verify_export

    run_dir = Path(args.run_dir)
    output = Path(args.output) if args.output else run_dir / "export"
    result = export_checkpoint(run_dir, output, tag=args.tag, dtype=args.dtype)
    print(f"exported {result.tag} ({args.dtype}):")
    for path in result.files:
        print(f"  {path}")
    for note in result.notes:
        print(f"  note: {note}")
    status = 0
    if args.verify:
        verification = verify_export(result.files[0], run_model_config(run_dir))
        for case, difference in verification.differences.items():
            print(f"  verify {case:<6} max |ours - torchscale| = {difference:.2e}")
        print("  verification " + ("passed" if verification.passed else
                                   f"FAILED (tolerance {verification.tolerance:.0e})"))
        status = 0 if verification.passed else 1
    if args.mlflow:
        print(f"  logged to MLflow run {log_export_to_mlflow(run_dir, output)} under export/")
    return status


def evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from beit3.pretrain.evaluation import evaluate_checkpoint, evaluate_export, format_table, log_to_run

    if args.export:
        if not args.config:
            raise ValueError("--export needs --config, the recipe whose model and datasets the export is evaluated on")
        result = evaluate_export(Path(args.export), Path(args.config))
    else:
        result = evaluate_checkpoint(Path(args.run_dir), args.tag)
    print(f"evaluation at step {result.step}:")
    print(format_table(result.metrics))
    if args.mlflow:
        print(f"logged to MLflow run {log_to_run(result.run_dir, result.metrics, result.step)} at step {result.step}")
    return 0


def plan(args: argparse.Namespace) -> int:
    from beit3.pretrain.planner import Cluster, format_plan, plan_run, resolve_gpu
    from beit3.pretrain.train_config import load_pretrain_config

    config = load_pretrain_config(args.config)
    gpu = resolve_gpu(args.gpu, peak_tflops=args.gpu_peak_tflops, memory_gb=args.gpu_memory_gb)
    lengths = {k: v for k, v in (("text_len", args.text_len), ("caption_len", args.caption_len)) if v is not None}
    if args.data:
        lengths = {**_manifest_lengths(config, args.max_passes_per_view), **lengths}
    print(format_plan(plan_run(config, Cluster(args.nodes, args.gpus_per_node, gpu), mfu=args.mfu,
                               micro_batch=args.micro_batch, **lengths)))
    return 0


def _manifest_lengths(config, max_passes_per_view: float) -> dict[str, int]:
    """Print how often the run would see each stored view, warning past the limit, and return the text and
    caption lengths the recipe's datasets were built with."""
    from beit3.pretrain.data_contract import view_passes
    from beit3.pretrain.shard_streams import index_datasets

    index = index_datasets(config.data.datasets)
    for passes in view_passes(config, index):
        print(f"data: {passes.stream}: {passes.samples:,} samples x {passes.views_per_image} stored views; "
              f"{config.steps:,} steps make {passes.passes:.1f} passes, {passes.per_view:.1f} per view")
        if config.data.visual_codes == "stored" and passes.per_view > max_passes_per_view:
            print(f"warning: {passes.stream}: each stored view would be seen {passes.per_view:.1f} times (more than "
                  f"{max_passes_per_view:g}): crop augmentation is in effect reduced; build more "
                  f"image.views_per_image, or use data.visual_codes: on_the_fly", file=sys.stderr)
    recorded = [contract for contract in index.contracts.values() if contract.text_len and contract.caption_len]
    if not recorded:
        return {}
    return {"text_len": max(c.text_len for c in recorded), "caption_len": max(c.caption_len for c in recorded)}


def demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from beit3.demo import run_demo

    first, last = run_demo(Path(args.workdir), steps=args.steps)
    return 0 if last < first else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3", description="BEiT-3 pretraining system")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("model-info", help="parameter breakdown and tokens per sample of a model config")
    info.add_argument("--config", required=True, help="a model YAML, e.g. configs/model/giant.yaml")
    info.add_argument("--text-len", type=int, help="tokens per monomodal text sample (default 128)")
    info.add_argument("--caption-len", type=int, help="tokens per caption in an image-text pair (default 64)")
    info.set_defaults(handler=model_info)
    data = commands.add_parser("data", help="the data pipeline")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    data_build_command = data_commands.add_parser("build", help="raw corpora to shards and a manifest, with Ray")
    data_build_command.add_argument("--config", required=True, help="a data YAML, e.g. configs/data/paper.yaml")
    data_build_command.add_argument("--ray-address", help="join this Ray cluster (default: the config's, or local)")
    data_build_command.add_argument("--quiet", action="store_true", help="no progress bars")
    data_build_command.set_defaults(handler=data_build)
    tokenizer = commands.add_parser("tokenizer", help="text and visual tokenizers")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = tokenizer_commands.add_parser("train-text", help="train a SentencePiece model in the XLM-R layout")
    train.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files, optionally .gz or .zst")
    train.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--vocab-size", type=int, required=True, help="SentencePiece pieces (released: 64000)")
    train.add_argument("--text-field", default="text", help="the text field of .jsonl records")
    train.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    train.add_argument("--max-sentences", type=int, default=10_000_000,
                       help="lines kept in memory for training (a uniform sample of a larger corpus)")
    train.set_defaults(handler=tokenizer_train_text)
    info_visual = tokenizer_commands.add_parser("info", help="codebook size, grid and usage of a visual tokenizer")
    source = info_visual.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="an official VQ-KD checkpoint")
    source.add_argument("--random-seed", type=int, default=0, help="a seeded random-projection tokenizer")
    info_visual.add_argument("--patch-size", type=int, default=16, help="patch of the random tokenizer")
    info_visual.add_argument("--images", help="a folder of images to measure codebook usage over")
    info_visual.add_argument("--image-size", type=int, default=224)
    info_visual.add_argument("--batch-size", type=int, default=32)
    info_visual.set_defaults(handler=tokenizer_info)
    train_command = commands.add_parser("train", help="pretrain with DeepSpeed (start it with torchrun or deepspeed)")
    train_command.add_argument("--config", required=True, help="a pretrain YAML, e.g. configs/pretrain/tiny_cpu.yaml")
    train_command.add_argument("--resume", action="store_true",
                               help="continue from the latest checkpoint and fail if there is none")
    train_command.add_argument("--run-dir", help="override the config's run_dir")
    train_command.add_argument("--allow-steps-change", action="store_true",
                               help="resume although `steps` changed (the cosine schedule is stretched or cut); "
                               "the change is printed and tagged on the MLflow run")
    train_command.add_argument("--stop-after-step", type=int, help="end this process after that step")
    train_command.set_defaults(handler=pretrain)
    export_command = commands.add_parser("export", help="a run's checkpoint to the released layout (.pth, "
                                         "safetensors, config.json)")
    export_command.add_argument("--run-dir", required=True, help="the run directory of `beit3 train`")
    export_command.add_argument("--tag", help="checkpoint tag, e.g. step-00010000 (default: the latest)")
    export_command.add_argument("--output", help="output folder (default: RUN_DIR/export)")
    export_command.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    export_command.add_argument("--verify", action="store_true",
                                help="reload into our model and torchscale's BEiT3 and compare outputs")
    export_command.add_argument("--mlflow", action="store_true", help="log the files to the run's MLflow run")
    export_command.set_defaults(handler=export)
    eval_command = commands.add_parser("eval", help="held-out losses and the kNN probe of a checkpoint or an export")
    eval_source = eval_command.add_mutually_exclusive_group(required=True)
    eval_source.add_argument("--run-dir", help="a `beit3 train` run directory (its saved recipe and checkpoint)")
    eval_source.add_argument("--export", help="a released-layout .pth written by `beit3 export`")
    eval_command.add_argument("--tag", help="with --run-dir: checkpoint tag, e.g. step-00010000 (default: the latest)")
    eval_command.add_argument("--config", help="with --export: the pretrain recipe (model and datasets)")
    eval_command.add_argument("--mlflow", action="store_true", help="log the metrics to the run's MLflow run")
    eval_command.set_defaults(handler=evaluate)
    plan_command = commands.add_parser("plan", help="memory per GPU under each ZeRO stage, FLOPs, time and "
                                       "GPU-days of a pretrain recipe on a cluster")
    plan_command.add_argument("--config", required=True, help="a pretrain YAML, e.g. configs/pretrain/giant_paper.yaml")
    plan_command.add_argument("--nodes", type=int, required=True)
    plan_command.add_argument("--gpus-per-node", type=int, required=True)
    plan_command.add_argument("--gpu", help="h100, h200 or a100 (or give both figures below)")
    plan_command.add_argument("--gpu-peak-tflops", type=float, help="override the GPU's dense bf16 TFLOP/s")
    plan_command.add_argument("--gpu-memory-gb", type=float, help="override the GPU's memory in GB")
    plan_command.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    plan_command.add_argument("--micro-batch", type=int, help="samples per stream per GPU micro-step "
                              "(default: the recipe's gradient accumulation decides)")
    plan_command.add_argument("--text-len", type=int, help="tokens per monomodal text sample (default 128)")
    plan_command.add_argument("--caption-len", type=int, help="tokens per caption in an image-text pair (default 64)")
    plan_command.add_argument("--data", action="store_true", help="read the recipe's datasets: text and caption "
                              "lengths from their manifests, and passes per stored view")
    plan_command.add_argument("--max-passes-per-view", type=float, default=10.0,
                              help="with --data, warn when a stored view would be seen more often (default 10)")
    plan_command.set_defaults(handler=plan)
    demo_command = commands.add_parser("demo", help="run what the system can do end to end on this machine")
    demo_command.add_argument("--steps", type=int, default=100, help="training steps")
    demo_command.add_argument("--workdir", default="runs/demo", help="where the data, run and export go")
    demo_command.set_defaults(handler=demo)
    return parser


WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"
"""How PyTorch's DataLoader marks an error raised in one of its worker processes."""


def error_message(error: BaseException) -> str:
    """The error in its own words. One raised in a data-loader worker (a damaged shard) reaches this process
    with the worker's traceback inside its message; the error's own message ends that traceback."""
    text = str(error)
    if WORKER_TRACEBACK not in text:
        return text
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    _, found, message = text.rpartition(f"\n{name}: ")
    return message.strip() if found else text


def main(argv: list[str] | None = None) -> int:
    from beit3.data_pipeline.storage import StoreUnusable

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError, StoreUnusable) as error:  # config, file, storage and input errors say what is wrong
        print(f"beit3 {args.command}: {redact_urls(error_message(error))}", file=sys.stderr)
        return 2


def run() -> None:
    """The `beit3` executable. Before exiting it freezes the heap for the garbage collector: the interpreter's
    final collection would otherwise walk every object PyTorch, DeepSpeed and MLflow made (2-3 s per process on
    2 cores) only to free memory the operating system takes back anyway. Files, runs and worker processes are
    closed before this, by their context managers and exit handlers."""
    try:
        status = main()
    finally:
        gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    run()
