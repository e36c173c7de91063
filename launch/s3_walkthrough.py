"""The README's guide "From raw data to a fine-tunable checkpoint", followed end to end on object storage.

Raw corpora go into a bucket; the text tokenizer is trained from the bucket into it; `beit3 data build` turns
the bucket's corpora into shards in the bucket; `beit3 train` runs under torchrun on 2 CPU ranks reading those
shards; `beit3 export --verify` checks the result against torchscale. Each step is the command a person runs.

    python launch/s3_walkthrough.py --workdir runs/s3-walkthrough            # a loopback S3 server (moto)
    AWS_ENDPOINT_URL=... python launch/s3_walkthrough.py --bucket my-bucket  # a store of your own

Without AWS_ENDPOINT_URL it starts `moto_server` (installed with the dev extras) on a loopback port with test
credentials. The sample corpora stand in for ImageNet-21K, the text corpora and the pairs.
"""

import argparse
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import boto3
import yaml

from beit3.sample_data import sample_data_config, tiny_recipe, write_sample_corpora


def step(title: str, command: list[str], environment: dict) -> None:
    print(f"\n== {title}\n$ {' '.join(command)}", flush=True)
    started = time.monotonic()
    subprocess.run(command, env=environment, check=True)
    print(f"({time.monotonic() - started:.0f}s)", flush=True)


@contextmanager
def loopback_store():
    """moto's S3 server on a free loopback port, with test credentials, until the walkthrough ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    settings = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield settings
    finally:
        server.terminate()
        server.wait(timeout=30)


def walkthrough(workdir: Path, bucket: str, steps: int, environment: dict) -> None:
    os.environ.update(environment)
    s3 = boto3.client("s3")
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
    cli = [sys.executable, "-m", "beit3.cli"]

    print(f"== 1. raw corpora into s3://{bucket}/raw/ (needs: a bucket you can write)", flush=True)
    raw = write_sample_corpora(workdir / "raw")
    for path in sorted(raw.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"raw/{path.relative_to(raw).as_posix()}")
    texts = [f"s3://{bucket}/raw/{p.relative_to(raw).as_posix()}" for p in sorted((raw / "text").glob("*.txt"))]

    step("2. text tokenizer, trained from the bucket into it (needs: the text corpora in the bucket)",
         cli + ["tokenizer", "train-text", "--input", *texts, "--output", f"s3://{bucket}/tokenizers/beit3",
                "--vocab-size", "1000"], environment)

    config = sample_data_config(raw, Path("TOKENIZER"), f"s3://{bucket}/shards")
    text = yaml.safe_dump(config).replace(str(raw), f"s3://{bucket}/raw")
    config = yaml.safe_load(text.replace("TOKENIZER", f"s3://{bucket}/tokenizers/beit3.model"))
    data_yaml = workdir / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    step("3. shards (needs: the corpora and the tokenizers the data config names)",
         cli + ["data", "build", "--quiet", "--config", str(data_yaml)], environment)

    recipe = tiny_recipe(workdir / "run", {"shards": f"s3://{bucket}/shards",
                                           "spm": f"s3://{bucket}/tokenizers/beit3.model"},
                         steps=steps, log_every_steps=max(1, steps // 4),
                         checkpoint={"every_steps": steps, "keep_last": 1})
    recipe_yaml = workdir / "recipe.yaml"
    recipe_yaml.write_text(yaml.safe_dump(recipe, sort_keys=False))
    step("4. plan (needs: the recipe)", cli + ["plan", "--config", str(recipe_yaml), "--nodes", "1",
                                              "--gpus-per-node", "2", "--gpu", "h100"], environment)
    step("5. train on 2 CPU ranks (needs: the shards' manifest and the text tokenizer)",
         [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "beit3.cli", "train",
          "--config", str(recipe_yaml)], {**environment, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    step("6. export and verify (needs: a whole checkpoint in the run directory)",
         cli + ["export", "--run-dir", str(workdir / "run"), "--verify"], environment)
    print(f"\nwalkthrough finished: shards in s3://{bucket}/shards, run in {workdir / 'run'}, "
          f"export in {workdir / 'run' / 'export'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/s3-walkthrough", help="local files: corpora, configs, the run")
    parser.add_argument("--bucket", default="beit3-walkthrough")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ)
    if environment.get("AWS_ENDPOINT_URL"):
        walkthrough(workdir, args.bucket, args.steps, environment)
        return 0
    with loopback_store() as settings:
        walkthrough(workdir, args.bucket, args.steps, {**environment, **settings})
    return 0


if __name__ == "__main__":
    sys.exit(main())
