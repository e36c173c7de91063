"""`beit3 demo` end to end: pipeline, 2-rank DeepSpeed training, MLflow, export with verification, loss curve."""

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # end to end: the whole demo: pipeline, 2-rank training, export


def test_demo_runs_every_stage_and_the_loss_falls(tmp_path):
    result = subprocess.run([sys.executable, "-m", "beit3.cli", "demo", "--steps", "30", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "verification passed" in result.stdout
    held_out = [line for line in result.stdout.splitlines() if ": validation loss " in line]
    assert [line.split(":")[0].split() for line in held_out] == [["step", "0"], ["step", "30"]]
    assert all("kNN top-1" in line for line in held_out)
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "data" / "shards" / "manifest.json").exists()
    assert list((tmp_path / "run" / "export").glob("*.safetensors"))
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout
