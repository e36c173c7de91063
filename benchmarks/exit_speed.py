"""How long a process that has imported and built what `beit3 train` does takes to exit once its work is done:
with the heap frozen for the garbage collector (what the `beit3` executable does, `beit3.cli.run`) and without,
measured side by side, alternating.

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
print("done", objects, time.time(), flush=True)
"""


def exit_seconds(mode: str) -> tuple[float, int]:
    """Seconds from the child's last statement to its exit, and how many objects its collector tracked."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True, cwd=REPO)
    last = next(line for line in child.stdout if line.startswith("done "))  # imports may print before it
    _, objects, finished = last.split()
    child.wait()
    return time.time() - float(finished), int(objects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"collected": [], "frozen": []}
    for _ in range(args.repeats):
        for mode in seconds:
            elapsed, objects = exit_seconds(mode)
            seconds[mode].append(elapsed)
    collected, frozen = (statistics.median(seconds[mode]) for mode in seconds)
    print(f"{objects:,} objects tracked by the collector at exit; median of {args.repeats} exits each")
    print(f"exit with the final collection: {collected:.2f} s; with the heap frozen: {frozen:.2f} s; "
          f"{collected / frozen:.1f}x")


if __name__ == "__main__":
    main()
