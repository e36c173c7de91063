"""benchmarks/gpu_check.sh with --cpu: every check the script makes on a GPU runs here at small shapes, so the
script is known to work before a GPU is lent to it."""

import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # end to end: a Ray data build and four training runs

CHECKS = ["layer-stack", "vqkd-encoder", "data-build", "train-zero1", "train-zero3"]


def test_every_check_runs_on_the_cpu_with_one_line_and_its_figures(tmp_path):
    figures = tmp_path / "figures.txt"
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", str(figures)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert [line.split()[:2] for line in result.stdout.splitlines()[1:-1]] == [["ok", name] for name in CHECKS]
    rows = {name: (status, figure) for name, status, figure in
            (line.split("\t") for line in figures.read_text().splitlines())}
    assert list(rows) == CHECKS and {status for status, _ in rows.values()} == {"ok"}
    assert all(f"{kind} " in rows["layer-stack"][1] for kind in ("image", "text", "pair"))
    assert rows["layer-stack"][1].count("TFLOP/s") == 3 and rows["layer-stack"][1].count("MFU") == 3
    assert "images/s" in rows["vqkd-encoder"][1]
    assert "tokenizer actor on 0 GPU" in rows["data-build"][1]
    for stage in ("train-zero1", "train-zero3"):
        assert "resume from step 2: largest loss difference 0.0e+00" in rows[stage][1]
