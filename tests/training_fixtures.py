"""Real parts for trainer tests: an MLflow server on loopback and 2-rank CPU launches of `beit3 train` under
torchrun (the shards come from `beit3.sample_data.build_sample_dataset`)."""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

from s3_endpoint import free_port

REPO = Path(__file__).resolve().parent.parent


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch_training(config: Path, *arguments: str, ranks: int = 2, env: dict | None = None,
                    stdout=subprocess.PIPE) -> subprocess.Popen:
    """`beit3 train` on `ranks` CPU processes under torchrun (gloo), as a user starts it on one machine."""
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), "-m", "beit3.cli", "train", "--config", str(config), *arguments]
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, text=True, env=environment,
                            cwd=REPO)


def run_training(config: Path, *arguments: str, env: dict | None = None, timeout: float = 600) -> str:
    process = launch_training(config, *arguments, env=env)
    output, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise AssertionError(f"training exited with {process.returncode}:\n{output[-6000:]}")
    return output


@contextmanager
def mlflow_server(root: Path, startup_timeout: float = 120.0):
    """`mlflow server` on a free loopback port with a SQLite store; yields its URL once /health answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start on {url}") from None
            try:
                process.wait(timeout=0.2)
                raise RuntimeError("mlflow server exited during startup")
            except subprocess.TimeoutExpired:
                pass
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
