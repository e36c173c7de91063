"""Where a step of the tiny recipe's time goes, from the trainer's own step-time breakdown (one run, no baseline).

`beit3 train` runs on 2 CPU ranks under torchrun (DeepSpeed ZeRO-2, the recipe's loader workers, masking,
logging, checkpoints) on the sample shards, built first with the real pipeline. Each logging window's
`time/*` figures in metrics.jsonl split the step into data wait, forward+backward, optimizer step and logging plus
checkpointing; the first window (warm-up) is left out. The trainer's overhead is the non-compute share: every
phase but forward+backward. Held-out evaluation is switched off (`eval.enabled: false`): it is not part of a
training step, and its own time would land in the windows it falls in.

    python benchmarks/train_speed.py [--steps 60] [--window 10] [--workers 1]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from beit3.sample_data import build_sample_dataset, tiny_recipe

REPO = Path(__file__).resolve().parent.parent
PHASES = ("data_wait", "compute", "optimizer", "other")


def breakdown(metrics_file: Path) -> dict[str, float]:
    """Seconds per step in each phase, over every logging window but the first."""
    windows = [entry for entry in map(json.loads, metrics_file.read_text().splitlines()) if "time/compute" in entry]
    measured = windows[1:]
    if not measured:
        raise SystemExit(f"{metrics_file}: fewer than two logging windows; run more --steps")
    return {phase: sum(entry[f"time/{phase}"] for entry in measured) / len(measured) for phase in PHASES}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10, help="steps per logging window")
    parser.add_argument("--workers", type=int, default=1, help="loader workers per stream and rank")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        print("building the sample shards with the pipeline ...", flush=True)
        data = build_sample_dataset(folder / "data")
        recipe = tiny_recipe(folder / "run", data, steps=args.steps, log_every_steps=args.window, resume="never",
                             checkpoint={"every_steps": args.steps, "keep_last": 1},
                             mlflow={"log_system_metrics": False}, eval={"enabled": False})
        recipe["data"]["workers"] = args.workers
        config = folder / "recipe.yaml"
        config.write_text(yaml.safe_dump(recipe))
        environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "beit3.cli",
                        "train", "--config", str(config)], check=True, env=environment, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = breakdown(folder / "run" / "metrics.jsonl")
    step = sum(seconds.values())
    print(f"{'phase':>10} {'s/step':>8} {'share':>7}")
    for phase in PHASES:
        print(f"{phase:>10} {seconds[phase]:>8.3f} {seconds[phase] / step:>6.1%}")
    print(f"{'step':>10} {step:>8.3f}")
    print(f"overhead (every phase but forward+backward): {1 - seconds['compute'] / step:.1%} of the step; "
          f"data wait and logging+checkpointing alone: {(seconds['data_wait'] + seconds['other']) / step:.1%}")


if __name__ == "__main__":
    main()
