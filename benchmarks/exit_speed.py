"""How long a process that has imported and built what `beit3 train` does takes to exit once its work is done,
and one full pass of the garbage collector in it (DeepSpeed's bf16 optimizer asks for six as it starts, and the
collector runs them on its own as objects accumulate): with the heap frozen for the collector (what the `beit3`
executable does before it exits, `beit3.cli.run`, and `beit3 train` once its imports are done,
`beit3.cli.freeze_imports`) and without, measured side by side, alternating.

    python benchmarks/exit_speed.py [--repeats 5]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import gc, sys, time

import mlflow
import deepspeed
import beit3.pretrain.trainer
from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.model_config import ModelConfig
from beit3.config import load_config

model = MultiwayTransformer(load_config(ModelConfig, "configs/model/tiny.yaml"))
objects = len(gc.get_objects())
if sys.argv[1] == "frozen":
    gc.freeze()
started = time.perf_counter()
gc.collect()
print("done", objects, time.perf_counter() - started, time.time(), flush=True)
"""


def exit_seconds(mode: str) -> tuple[float, float, int]:
    """Seconds from the child's last statement to its exit, seconds of its one full collection, and how many
    objects its collector tracked."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True, cwd=REPO)
    last = next(line for line in child.stdout if line.startswith("done "))  # imports may print before it
    _, objects, collection, finished = last.split()
    child.wait()
    return time.time() - float(finished), float(collection), int(objects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"collected": [], "frozen": []}
    passes: dict[str, list[float]] = {"collected": [], "frozen": []}
    for _ in range(args.repeats):
        for mode in seconds:
            elapsed, collection, objects = exit_seconds(mode)
            seconds[mode].append(elapsed)
            passes[mode].append(collection)
    collected, frozen = (statistics.median(seconds[mode]) for mode in seconds)
    full_pass, frozen_pass = (statistics.median(passes[mode]) for mode in passes)
    print(f"{objects:,} objects tracked by the collector; median of {args.repeats} processes each")
    print(f"one full collection: {full_pass * 1000:.0f} ms; with the heap frozen: {frozen_pass * 1000:.2f} ms")
    print(f"exit with the final collection: {collected:.2f} s; with the heap frozen: {frozen:.2f} s; "
          f"{collected / frozen:.1f}x")


if __name__ == "__main__":
    main()
