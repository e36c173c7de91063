"""Held-out loss and kNN top-1 of the random initialisation against the end of the demo's run, over seeds.

Builds the sample data once, trains the tiny recipe on 2 CPU ranks for each seed, and prints, per seed, the
evaluation at step 0 and at the last step, and the share of the run's step time spent evaluating.

    python benchmarks/probe_seeds.py [--seeds 0 1 2] [--steps 100]
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

PHASES = ("data_wait", "compute", "optimizer", "other", "eval")


def run_seed(root: Path, data: dict, seed: int, steps: int) -> dict:
    run = root / f"run-{seed}"
    recipe = tiny_recipe(run, data, steps=steps, seed=seed, resume="never", mlflow={"log_system_metrics": False},
                         checkpoint={"every_steps": steps, "keep_last": 1})
    config = root / f"recipe-{seed}.yaml"
    config.write_text(yaml.safe_dump(recipe))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "beit3.cli",
                    "train", "--config", str(config)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [line for line in lines if "val/loss" in line]
    windows = [line for line in lines if "time/compute" in line]
    seconds = {phase: sum(line.get(f"time/{phase}", 0.0) for line in windows) for phase in PHASES}
    return {"first": evaluations[0], "last": evaluations[-1],
            "eval_share": seconds["eval"] / max(sum(seconds.values()), 1e-9)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = build_sample_dataset(root / "data")
        results = {seed: run_seed(root, data, seed, args.steps) for seed in args.seeds}
    print(f"tiny recipe, {args.steps} steps on 2 CPU ranks, sample data")
    print(f"{'seed':>4}  {'knn top-1 step 0':>16}  {'at the end':>10}  {'val/loss step 0':>15}  {'at the end':>10}  "
          f"{'eval share':>10}")
    for seed, r in results.items():
        print(f"{seed:>4}  {r['first'].get('probe/knn_top1', float('nan')):>16.1%}  "
              f"{r['last'].get('probe/knn_top1', float('nan')):>10.1%}  {r['first']['val/loss']:>15.2f}  "
              f"{r['last']['val/loss']:>10.2f}  {r['eval_share']:>10.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
