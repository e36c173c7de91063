#!/usr/bin/env bash
# What one GPU says about the system, in under 8 minutes: one line per check on stdout, the figures in FIGURES.
#   1. the giant-width layer stack (4 layers), forward+backward in bf16, eager and with compiled layers:
#      ms, TFLOP/s and MFU per input kind;
#   2. the VQ-KD encoder's bf16 throughput;
#   3. the data build of the sample corpora with its visual tokenizer actor on the GPU;
#   4. `beit3 train` on one GPU (NCCL, bf16) under ZeRO-1 and ZeRO-3, 20 steps of a giant-width 2-layer model on
#      those shards, checkpointing at step 10; a second run resumed from step 10 must log the same losses.
# --cpu runs every check on the CPU at small shapes (gloo instead of NCCL; the layer stack eager only), so the script
# itself can be tested anywhere. Exit status: the number of failed checks.
#
#   benchmarks/gpu_check.sh [--cpu] [FIGURES]        (default FIGURES: gpu_check.txt)
#   PEAK_TFLOPS=989 (the GPU's dense bf16 peak, for MFU)   RESUME_TOLERANCE=1e-3 (largest loss difference)
#   LOGS=folder (each check's whole output is copied there, for reading a failure after the run)
set -uo pipefail
cd "$(dirname "$0")/.."

cpu=0
if [[ ${1:-} == --cpu ]]; then
    cpu=1
    shift
fi
figures=$(realpath -m "${1:-gpu_check.txt}")
python=${PYTHON:-.venv/bin/python}
resume_tolerance=${RESUME_TOLERANCE:-1e-3}
work=$(mktemp -d)
keep_logs() {
    if [[ -n ${LOGS:-} ]]; then
        mkdir -p "$LOGS" && cp "$work"/*.log "$LOGS"/ 2>/dev/null
    fi
    rm -rf "$work"
}
trap keep_logs EXIT
: >"$figures"
failed=0

if ((cpu)); then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
    device=cpu peak=${PEAK_TFLOPS:-1} steps=4 checkpoint_at=2
    stack=(--layers 1 --batch 1 --text-len 16 --caption-len 8 --repeats 1)  # eager only: inductor's CPU builds take minutes
    visual=(--batch 2 --visual-repeats 1)
    width="{}"
    gpus_per_actor=0
else
    device=cuda peak=${PEAK_TFLOPS:-989} steps=20 checkpoint_at=10
    stack=(--layers 4 --batch 16 --repeats 5 --compile)
    visual=(--batch 256 --visual-repeats 5)
    width='{"hidden": 1408, "ffn_hidden": 6144, "heads": 16, "layers": 2}'
    gpus_per_actor=1
fi

# check NAME COMMAND...: runs COMMAND with its output in $work/NAME.log; its last line is the check's figure.
check() {
    local name=$1
    shift
    local started=$SECONDS status result figure
    "$@" >"$work/$name.log" 2>&1
    status=$?
    if ((status == 0)); then
        result=ok
        figure=$(tail -n 1 "$work/$name.log")
    else
        result="FAIL"
        figure="exit $status: $(grep -v '^\s*$' "$work/$name.log" | tail -n 1)"
        failed=$((failed + 1))
    fi
    printf '%-4s %-12s %4ds  %s\n' "$result" "$name" $((SECONDS - started)) "$figure"
    printf '%s\t%s\t%s\n' "$name" "$result" "$figure" >>"$figures"
}

layer_stack() {
    "$python" benchmarks/model_speed.py --device "$device" --dtype bf16 --config configs/model/giant.yaml \
        --skip-torchscale --peak-tflops "$peak" "${stack[@]}" >"$work/model_speed.txt" || return
    cat "$work/model_speed.txt"
    # columns: input, eager ms, TFLOP/s, MFU, and with --compile: compiled ms, speedup over eager, TFLOP/s, MFU
    awk '$1 ~ /^(image|text|pair)$/ {
             if (NF >= 8) printf "%s%s eager/compiled %s/%s ms %s/%s TFLOP/s %s/%s MFU", sep, $1, $2, $5, $3, $7, $4, $8
             else printf "%s%s %s ms %s TFLOP/s %s MFU", sep, $1, $2, $3, $4
             sep="; "}
         END {print ""}' "$work/model_speed.txt"
}

vqkd() {
    "$python" benchmarks/tokenizer_speed.py --skip-text --device "$device" --dtype bf16 --peak-tflops "$peak" \
        "${visual[@]}"
}

data_build() {
    "$python" - "$work/data" "$gpus_per_actor" <<'EOF'
import subprocess, sys, time
from pathlib import Path

import yaml

from beit3.sample_data import sample_data_config, train_text_tokenizer, write_sample_corpora

root, gpus = Path(sys.argv[1]), float(sys.argv[2])
write_sample_corpora(root / "raw")
spm = train_text_tokenizer(sorted((root / "raw" / "text").glob("*.txt")), root / "spm", vocab_size=1000,
                           num_threads=1).model_path
config = sample_data_config(root / "raw", spm, str(root / "shards"))
config["ray"]["gpus_per_tokenizer_actor"] = gpus
(root / "data.yaml").write_text(yaml.safe_dump(config))
started = time.perf_counter()
subprocess.run([sys.executable, "-m", "beit3.cli", "data", "build", "--config", str(root / "data.yaml"), "--quiet"],
               check=True)
shards = sorted(path.name for path in (root / "shards").glob("*.tar"))
print(f"{len(shards)} shards in {time.perf_counter() - started:.0f} s, tokenizer actor on {gpus:g} GPU")
EOF
}

train_and_resume() {
    local stage=$1
    "$python" - "$work" "$stage" "$steps" "$checkpoint_at" "$width" "$resume_tolerance" <<'EOF'
import json, os, shutil, subprocess, sys
from pathlib import Path

import yaml

from beit3.pretrain.checkpoints import mark_latest, tag_for
from beit3.sample_data import tiny_recipe

work, stage, steps, checkpoint_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
width, tolerance = json.loads(sys.argv[5]), float(sys.argv[6])
data = {"shards": work / "data" / "shards", "spm": work / "data" / "spm.model"}
run_dir = work / f"zero{stage}"
recipe = tiny_recipe(run_dir / "full", data, steps=steps, log_every_steps=1, precision="bf16", zero={"stage": stage},
                     checkpoint={"every_steps": checkpoint_at, "keep_last": 2}, mlflow={"log_system_metrics": False})
recipe["model_overrides"] = {**recipe["model_overrides"], **width}
config = run_dir / "recipe.yaml"
run_dir.mkdir(parents=True)
config.write_text(yaml.safe_dump(recipe))


def train(*arguments):
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                    "-m", "beit3.cli", "train", "--config", str(config), *arguments], check=True)
    lines = [json.loads(line) for line in (Path(arguments[-1]) / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]  # training steps, not the step-0 evaluation


full = train("--run-dir", str(run_dir / "full"))
shutil.copytree(run_dir / "full", run_dir / "resumed", ignore=shutil.ignore_patterns(tag_for(steps)))
mark_latest(run_dir / "resumed" / "checkpoints", tag_for(checkpoint_at))
resumed = train("--resume", "--run-dir", str(run_dir / "resumed"))
assert [line["step"] for line in resumed] == list(range(1, steps + 1)), "the resumed run lost or repeated steps"
difference = max(abs(a["loss"] - b["loss"]) for a, b in zip(full[checkpoint_at:], resumed[checkpoint_at:]))
window = [line for line in full if "time/compute" in line][-1]
print(f"loss {full[0]['loss']:.3f} -> {full[-1]['loss']:.3f}, {window['step_seconds']:.3f} s/step "
      f"(compute {window['time/compute_fraction']:.0%}, data wait {window['time/data_wait_fraction']:.0%}), "
      f"resume from step {checkpoint_at}: largest loss difference {difference:.1e}")
if difference > tolerance:
    sys.exit(f"resumed losses differ by {difference:.1e} (> {tolerance:g})")
EOF
}

if ((cpu)); then
    echo "gpu_check on the CPU (--cpu)"
else
    echo "gpu_check on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
fi
check layer-stack layer_stack
check vqkd-encoder vqkd
check data-build data_build
check train-zero1 train_and_resume 1
check train-zero3 train_and_resume 3
echo "figures in $figures; $failed check(s) failed"
exit "$failed"
