"""Tokenizer throughput, each measured side by side with its ceiling in one run.

Text: our batch encode (XLM-R ids, bos/eos, truncation) against a bare SentencePiece `Encode` of the same
lines with the same threads, on English text found in this Python installation (documentation, readmes and
licences that ship with the standard library and installed packages), with a SentencePiece model trained on
part of it. Visual: images/s of the VQ-KD ViT-B/16 encoder (official shape, random weights) at batch 32, and
on a GPU the achieved share of its peak (about 17.6 GFLOPs per 224-pixel image).

    python benchmarks/tokenizer_speed.py
    python benchmarks/tokenizer_speed.py --device cuda --dtype bf16 --peak-tflops 989 --skip-text
"""

import argparse
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import sentencepiece
import torch

from beit3.tokenizers.text_training import train_text_tokenizer
from beit3.tokenizers.visual import VisualTokenizerConfig, build_visual_tokenizer

VQKD_GFLOPS_PER_IMAGE = 17.6


def installation_text(max_lines: int) -> list[str]:
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    lines: list[str] = []
    for root in sorted(roots):
        for path in sorted(root.rglob("*")):
            if path.suffix in {".txt", ".rst", ".md"} and path.is_file():
                lines.extend(line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip())
                if len(lines) >= max_lines:
                    return lines[:max_lines]
    return lines


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def text_benchmark(args) -> None:
    lines = installation_text(args.lines)
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.txt"
        corpus.write_text("\n".join(lines[: len(lines) // 2]), encoding="utf-8")
        tokenizer = train_text_tokenizer([corpus], Path(folder) / "bench", vocab_size=args.vocab_size)
    bare = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.processor.serialized_model_proto())
    threads = tokenizer.num_threads
    token_count = sum(len(ids) for ids in bare.Encode(lines, num_threads=threads))
    timings = {"bare": [], "ours": []}
    for _ in range(args.repeats):
        timings["bare"].append(timed(lambda: bare.Encode(lines, num_threads=threads)))
        timings["ours"].append(timed(lambda: tokenizer.encode_batch(lines, max_len=args.max_len)))
    bare_time, ours_time = statistics.median(timings["bare"]), statistics.median(timings["ours"])
    print(f"text: {len(lines):,} lines, {token_count:,} pieces, vocab {args.vocab_size}, {threads} threads, "
          f"median of {args.repeats}")
    print(f"  bare sentencepiece  {token_count / bare_time / 1e6:8.2f} M tokens/s")
    print(f"  ours (XLM-R ids)    {token_count / ours_time / 1e6:8.2f} M tokens/s   "
          f"{bare_time / ours_time:.2f}x of bare")


def visual_benchmark(args) -> None:
    tokenizer, _ = build_visual_tokenizer(VisualTokenizerConfig())
    tokenizer = tokenizer.to(args.device)
    images = torch.rand(args.batch, 3, 224, 224, device=args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def encode():
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            tokenizer.encode(images)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    encode()
    seconds = statistics.median(timed(encode) for _ in range(args.visual_repeats))
    rate = args.batch / seconds
    line = (f"visual: VQ-KD ViT-B/16 encode, batch {args.batch}, {args.device} {args.dtype}, "
            f"{torch.get_num_threads()} threads: {rate:.1f} images/s ({rate * VQKD_GFLOPS_PER_IMAGE:.0f} GFLOP/s)")
    if args.peak_tflops:
        line += f", {rate * VQKD_GFLOPS_PER_IMAGE / 1e3 / args.peak_tflops:.1%} of peak"
    print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--visual-repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--skip-visual", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_text:
        text_benchmark(args)
    if not args.skip_visual:
        visual_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
