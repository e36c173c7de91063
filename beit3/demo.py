"""`beit3 demo`: the whole system end to end on the embedded sample data, on 2 CPU cores.

1. writes the sample corpora (`beit3.sample_data`), trains a small text tokenizer on them and runs the Ray
   pipeline (`beit3 data build`) to shards with precomputed visual codes;
2. trains the tiny recipe (`configs/pretrain/tiny_cpu.yaml`) with DeepSpeed ZeRO-2 on 2 CPU ranks under
   torchrun, logging to MLflow (SQLite in the run directory);
3. exports the last checkpoint to the released layout and verifies it against torchscale's BEiT3;
4. prints the held-out losses and kNN top-1 at the first and last step, draws the training and validation loss
   curves and says where everything is.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from beit3.sample_data import build_sample_dataset, tiny_recipe

REPO = Path(__file__).resolve().parent.parent


COMPONENTS = ("image", "text", "pair_image", "pair_text")


def plot_losses(metrics_file: Path, output: Path) -> tuple[float, float]:
    """The training losses (solid) and held-out losses (dashed, when the run evaluated) as a PNG; returns the
    first and last training losses."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    lines = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    history = [entry for entry in lines if "loss" in entry]
    held_out = [entry for entry in lines if "val/loss" in entry]
    figure, axis = pyplot.subplots(figsize=(7, 4))
    for prefix, entries, style in (("", history, "-"), ("val/", held_out, "--")):
        if not entries:
            continue
        steps = [entry["step"] for entry in entries]
        label = "validation " if prefix else ""
        axis.plot(steps, [entry[f"{prefix}loss"] for entry in entries], style, color="black", label=f"{label}total",
                  marker="o" if prefix else None, markersize=3)
        for colour, component in enumerate(COMPONENTS):
            axis.plot(steps, [entry[f"{prefix}loss/{component}"] for entry in entries], style, color=f"C{colour}",
                      label=f"{label}{component}", linewidth=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel("masked-prediction loss")
    axis.set_title("BEiT-3 tiny recipe on the sample data: training (solid) and held-out (dashed)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    pyplot.close(figure)
    return history[0]["loss"], history[-1]["loss"]


def evaluation_summary(metrics_file: Path) -> list[str]:
    """One line per held-out evaluation of the run at its first and last step: losses and kNN top-1."""
    held_out = [entry for entry in map(json.loads, metrics_file.read_text().splitlines()) if "val/loss" in entry]
    lines = []
    for entry in held_out[:1] + held_out[1:][-1:]:
        losses = ", ".join(f"{component} {entry[f'val/loss/{component}']:.2f}" for component in COMPONENTS
                           if f"val/loss/{component}" in entry)
        probe = f"; kNN top-1 {entry['probe/knn_top1']:.1%}" if "probe/knn_top1" in entry else ""
        lines.append(f"  step {entry['step']:>4d}: validation loss {entry['val/loss']:.2f} ({losses}){probe}")
    return lines or ["  (no held-out evaluation: the data has no validation shards)"]


def _run(command: list[str], **kwargs) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO, **kwargs)


def run_demo(workdir: Path, steps: int = 100) -> tuple[float, float]:
    """Run every stage into `workdir` (the pipeline skips shards it already built; training starts afresh);
    returns the first and last training losses."""
    started = time.perf_counter()
    workdir = workdir.resolve()
    print(f"demo 1/4: sample corpora, text tokenizer and the Ray pipeline into {workdir / 'data'}", flush=True)
    data = build_sample_dataset(workdir / "data", quiet=False)
    recipe_path = workdir / "tiny_cpu.yaml"
    recipe = tiny_recipe(workdir / "run", data, steps=steps, resume="never")
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"demo 2/4: {steps} steps of the tiny recipe, DeepSpeed ZeRO-2 on 2 CPU ranks", flush=True)
    shutil.rmtree(workdir / "run", ignore_errors=True)
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "beit3.cli", "train",
          "--config", str(recipe_path)], env=environment)
    run_dir = workdir / "run"
    print("demo 3/4: export to the released layout and verify against torchscale's BEiT3", flush=True)
    _run([sys.executable, "-m", "beit3.cli", "export", "--run-dir", str(run_dir), "--verify", "--mlflow"])
    first, last = plot_losses(run_dir / "metrics.jsonl", workdir / "loss.png")
    print("held-out evaluation (`beit3 eval --run-dir` repeats it on any checkpoint):\n"
          + "\n".join(evaluation_summary(run_dir / "metrics.jsonl")), flush=True)
    print(f"demo 4/4: done in {time.perf_counter() - started:.0f}s; loss {first:.2f} -> {last:.2f}\n"
          f"  shards and manifest:  {data['shards']}\n"
          f"  run directory:        {run_dir} (checkpoints/, metrics.jsonl, deepspeed.json)\n"
          f"  export:               {run_dir / 'export'}\n"
          f"  loss curves:          {workdir / 'loss.png'}\n"
          f"  MLflow UI:            mlflow ui --backend-store-uri sqlite:///{run_dir / 'mlflow.db'}\n"
          f"                        then open http://127.0.0.1:5000", flush=True)
    return first, last
