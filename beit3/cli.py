"""The `beit3` command: each subcommand is a thin layer over a function that tests call directly."""

import argparse
import sys

from beit3.config import ConfigError, load_config


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


def demo(args: argparse.Namespace) -> int:
    from beit3.demo import run_demo

    losses = run_demo(steps=args.steps)
    return 0 if losses[-1] < losses[0] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3", description="BEiT-3 pretraining system")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("model-info", help="parameter breakdown and tokens per sample of a model config")
    info.add_argument("--config", required=True, help="a model YAML, e.g. configs/model/giant.yaml")
    info.add_argument("--text-len", type=int, help="tokens per monomodal text sample (default 128)")
    info.add_argument("--caption-len", type=int, help="tokens per caption in an image-text pair (default 64)")
    info.set_defaults(handler=model_info)
    demo_command = commands.add_parser("demo", help="run what the system can do end to end on this machine")
    demo_command.add_argument("--steps", type=int, default=30)
    demo_command.set_defaults(handler=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"beit3 {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
