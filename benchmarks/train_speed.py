"""Training-step overhead and data-loader headroom for the tiny recipe on CPU, side by side in one run.

Three measurements on the same sample shards (built first with the real pipeline), alternated for `--rounds`:
- full: `beit3 train` on 2 ranks under torchrun (DeepSpeed ZeRO-2, loader workers, masking, logging), samples/s
  from the wall clock between two logged steps (warm-up steps excluded);
- bare: the same DeepSpeed engine on the same 2 ranks stepping on micro-batches prepared in memory beforehand
  (what the step costs without data loading, masking and logging), and, for reference, the model's plain
  forward+backward on them;
- loader: one rank's three stream loaders alone (the recipe's workers), samples/s against what one rank's step
  consumes.

    python benchmarks/train_speed.py [--steps 40] [--rounds 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import yaml

from beit3.pretrain.model import MultiwayTransformer
from beit3.pretrain.objective import masked_prediction
from beit3.pretrain.optimization import build_optimizer
from beit3.pretrain.shard_streams import MicroBatchStream, StreamSettings, build_loader, index_datasets
from beit3.pretrain.train_config import PretrainConfig, deepspeed_config, load_pretrain_config, split_batch
from beit3.sample_data import build_sample_dataset, tiny_recipe
from beit3.tokenizers.text import TextTokenizer

REPO = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 5


def torchrun(*arguments: str) -> None:
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *arguments],
                   check=True, env=environment, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stream_loaders(config: PretrainConfig, rank: int, world_size: int) -> dict:
    split = split_batch(config.batch, world_size)
    mask_id = TextTokenizer(config.data.text_tokenizer).mask_id
    index = index_datasets(config.data.datasets)
    loaders = {}
    for stream in config.active_streams():
        settings = StreamSettings(stream=stream, micro_batch=split.micro[stream], seed=config.seed,
                                  image_size=config.model.image_size, grid=config.model.grid_size, mask_id=mask_id,
                                  shuffle_window_shards=config.data.shuffle_window_shards)
        dataset = MicroBatchStream(index.shards[stream], settings, rank, world_size)
        loaders[stream] = iter(build_loader(dataset, config.data.workers, config.data.prefetch_batches))
    return loaders


def measure_full(recipe: dict, folder: Path, steps: int) -> float:
    """Samples/s of `beit3 train` between the end of warm-up and the last step before the final checkpoint."""
    config_path = folder / "full.yaml"
    config_path.write_text(yaml.safe_dump(recipe))
    torchrun("-m", "beit3.cli", "train", "--config", str(config_path))
    entries = [json.loads(line) for line in (Path(recipe["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    first, last = entries[WARMUP_STEPS - 1], entries[-2]
    samples_per_step = sum(recipe["batch"][kind] for kind in ("image", "text", "pair"))
    return samples_per_step * (last["step"] - first["step"]) / (last["wall_time"] - first["wall_time"])


def bare_worker(config_path: str, steps: int, output: str) -> None:
    """One rank of the bare measurement (started by torchrun): the recipe's DeepSpeed engine stepping on
    micro-batches already in memory, and plain PyTorch forward+backward of the same model for reference."""
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = load_pretrain_config(config_path)
    loaders = stream_loaders(config, rank, world_size)
    batches = [{stream: next(loader) for stream, loader in loaders.items()} for _ in range(4)]
    del loaders
    torch.manual_seed(config.seed)
    plain = MultiwayTransformer(config.model).train()
    model = MultiwayTransformer(config.model).train()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, config.optimizer),
                                           config=deepspeed_config(config, split_batch(config.batch, world_size)))
    samples = sum(config.batch.global_count(stream) for stream in batches[0]) * (steps - WARMUP_STEPS)

    def timed(step) -> float:
        for index in range(steps):
            if index == WARMUP_STEPS:
                dist.barrier()
                started = time.perf_counter()
            step(batches[index % len(batches)])
        dist.barrier()
        return samples / (time.perf_counter() - started)

    def engine_step(micro: dict) -> None:
        engine.backward(sum(part[0] for stream, batch in micro.items()
                            for part in masked_prediction(engine, stream, batch).values()))
        engine.step()

    def forward_backward(micro: dict) -> None:
        plain.zero_grad(set_to_none=True)
        sum(part[0] for stream, batch in micro.items()
            for part in masked_prediction(plain, stream, batch).values()).backward()

    timings = {"engine_step": timed(engine_step), "forward_backward": timed(forward_backward)}
    if rank == 0:
        Path(output).write_text(json.dumps(timings))
    dist.destroy_process_group()


def measure_bare(recipe: dict, folder: Path, steps: int) -> dict:
    config_path, output = folder / "bare.yaml", folder / "bare.json"
    config_path.write_text(yaml.safe_dump(recipe))
    torchrun(str(Path(__file__).resolve()), "--bare-worker", str(config_path), "--steps", str(steps),
             "--output", str(output))
    return json.loads(output.read_text())


def measure_loader(recipe: dict, folder: Path, micro_steps: int) -> float:
    """One rank's samples/s from its three stream loaders alone, workers as configured."""
    config_path = folder / "loader.yaml"
    config_path.write_text(yaml.safe_dump(recipe))
    config = load_pretrain_config(config_path)
    loaders = stream_loaders(config, rank=0, world_size=2)
    for _ in range(WARMUP_STEPS):
        for loader in loaders.values():
            next(loader)
    started, samples = time.perf_counter(), 0
    for _ in range(micro_steps):
        for loader in loaders.values():
            samples += len(next(loader)["keys"])
    return samples / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_worker:
        return bare_worker(args.bare_worker, args.steps, args.output)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        print("building the sample shards with the pipeline ...", flush=True)
        data = build_sample_dataset(folder / "data")
        print(f"{'round':>5} {'full samples/s':>15} {'bare step':>10} {'plain f+b':>10} {'overhead':>9} "
              f"{'loader/rank':>12} {'headroom':>9}")
        for round_index in range(args.rounds):
            recipe = tiny_recipe(folder / f"run-{round_index}", data, steps=args.steps, log_every_steps=args.steps,
                                 resume="never", checkpoint={"every_steps": args.steps, "keep_last": 1},
                                 mlflow={"log_system_metrics": False})
            full = measure_full(recipe, folder, args.steps)
            bare = measure_bare(recipe, folder, args.steps)
            loader = measure_loader(recipe, folder, micro_steps=args.steps)
            consumed_per_rank = full / 2
            print(f"{round_index:>5} {full:>15.1f} {bare['engine_step']:>10.1f} {bare['forward_backward']:>10.1f} "
                  f"{bare['engine_step'] / full - 1:>8.1%} {loader:>12.1f} {loader / consumed_per_rank:>8.1f}x",
                  flush=True)
        print("overhead: bare step samples/s over full samples/s, minus 1 (goal < 10%); headroom: one rank's "
              "loader alone over what one rank's step consumes (goal >= 3x)")


if __name__ == "__main__":
    main()
