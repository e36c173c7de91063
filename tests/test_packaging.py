"""Installation layout: one `beit3` namespace that shadows nothing, and the `beit3` command."""

import gc
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import tokenizers
import yaml

from beit3 import cli
from beit3.sample_data import tiny_recipe
from conftest import REPO

PACKAGE_FOLDERS = ["beit3", "pretrain", "tokenizers", "data_pipeline", "launch"]


def run(arguments, cwd):
    return subprocess.run(arguments, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["elsewhere", "checkout root"])
def test_well_known_tokenizers_package_imports_beside_ours(tmp_path, where):
    """Also from the checkout root, where `python -c` puts our `tokenizers/` folder first on the path."""
    script = (
        "import tokenizers, beit3.tokenizers\n"
        "from tokenizers import Tokenizer, models\n"
        "Tokenizer(models.BPE())\n"
        "from transformers import XLMRobertaTokenizer\n"
        "print(tokenizers.__file__)\n"
        "print(beit3.tokenizers.__file__)\n"
    )
    result = run([sys.executable, "-c", script], cwd=tmp_path if where == "elsewhere" else REPO)
    assert result.returncode == 0, result.stderr
    theirs, ours = result.stdout.split()
    assert "site-packages" in theirs and Path(ours).parent == REPO / "tokenizers"
    assert hasattr(tokenizers, "Tokenizer")


def test_wheel_installs_only_under_the_beit3_namespace(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO / "setup.py", source)
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    result = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"beit3"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "beit3/tokenizers/__init__.py" in names and "beit3/pretrain/model.py" in names


def test_model_info_command_prints_the_breakdown(tmp_path):
    beit3 = Path(sys.executable).parent / "beit3"
    result = run([str(beit3), "model-info", "--config", str(REPO / "configs/model/base.yaml")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "220,987,392" in result.stdout
    for part in ("attention", "ffn.vision", "ffn.text", "embeddings", "heads.mlm", "heads.mim"):
        assert part in result.stdout
    assert "image                  197" in result.stdout and "pair                   261" in result.stdout


def test_model_info_rejects_a_bad_config_with_the_field_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/model/tiny.yaml").read_text().replace("heads: 4", "heads: 3"))
    beit3 = Path(sys.executable).parent / "beit3"
    result = run([str(beit3), "model-info", "--config", str(bad)], cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "hidden (128) must be divisible by heads (3)" in result.stderr
    assert "Traceback" not in result.stderr


@contextmanager
def heap_unfrozen():
    """The collector's frozen set emptied for the test, and afterwards as the session had it."""
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if frozen:
            cli.freeze_imports()


def test_the_command_freezes_the_heap_for_its_exit_and_main_leaves_it_alone(monkeypatch, capsys):
    """The executable skips the interpreter's final collection; code that calls `main` (tests among it) keeps a
    collector that still frees what it drops."""
    arguments = ["model-info", "--config", str(REPO / "configs/model/tiny.yaml")]
    monkeypatch.setattr(sys, "argv", ["beit3", *arguments])
    with heap_unfrozen():
        assert cli.main(arguments) == 0 and gc.get_freeze_count() == 0
        with pytest.raises(SystemExit) as exited:
            cli.run()
        assert exited.value.code == 0 and gc.get_freeze_count() > 0
    assert "parameters" in capsys.readouterr().out


def test_training_freezes_what_its_imports_made_before_it_starts(tmp_path, capsys):
    """`beit3 train` leaves its imported heap out of the collector's full passes before the run starts (before
    preflight, which refuses this recipe: its files are missing)."""
    recipe = tiny_recipe(tmp_path / "run", {"shards": tmp_path / "no-shards", "spm": tmp_path / "no-spm.model"})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with heap_unfrozen():
        assert cli.main(["train", "--config", str(tmp_path / "recipe.yaml")]) == 2
        assert gc.get_freeze_count() > 100_000  # torch alone makes a few hundred thousand objects
    assert "no-spm.model: not found" in capsys.readouterr().err
