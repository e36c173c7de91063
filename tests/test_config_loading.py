"""Config files are read with their size bounded and YAML aliases refused.

An alias bomb of 1 KB (each level a list of nine aliases of the level below) stands for 9**depth values: with
aliases expanded by the copy made before validation it reaches gigabytes. Here the bombs go through the command
line as a user runs it, and are refused at the memory of a config refused for an ordinary unknown field.
"""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from beit3.config import MAX_CONFIG_BYTES, ConfigError, load_config, read_config_mapping
from beit3.data_pipeline.config import DataConfig
from beit3.pretrain.model_config import ModelConfig
from beit3.pretrain.train_config import load_pretrain_config
from memory_probe import PEAK_SOURCE

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
RECIPES = {"train": CONFIGS / "pretrain" / "tiny_cpu.yaml", "data": CONFIGS / "data" / "paper.yaml"}
RUN_LIMIT_S = 180
MEMORY_MARGIN = 100 << 20
"""What a refused bomb may cost beyond a config refused for a plain unknown field; expanded, it costs gigabytes."""


def alias_bomb(depth: int) -> str:
    """Under an unknown key, nine values, then `depth` levels of nine aliases each of the level below."""
    lines = ["extras:", "  level0: &level0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, depth + 1):
        lines.append(f"  level{level}: &level{level} [{', '.join([f'*level{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def saved_run_config() -> str:
    """The config.yaml `beit3 train` saves in its run directory, which `beit3 export` reads."""
    config = load_pretrain_config(CONFIGS / "pretrain" / "tiny_cpu.yaml")
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


MEASURED_CLI = PEAK_SOURCE + """
import sys
reset_peak()
from beit3.cli import main
try:
    status = main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as report:
        report.write(str(peak_kib() * 1024))
sys.exit(status)
"""
"""`beit3 ARGUMENTS` with its peak resident memory from the start of this process written to a file (the exit
rusage of a child would carry the test runner's own peak)."""


def run_measured(arguments: list[str], folder: Path) -> tuple[int, list[str], int]:
    """Exit status, stderr lines and peak resident memory in bytes of one `beit3` run (killed past RUN_LIMIT_S)."""
    environment = {name: value for name, value in os.environ.items() if name != "WORLD_SIZE"}
    peak = folder / "peak.txt"
    with open(folder / "stderr.txt", "w+") as errors, subprocess.Popen(
            [sys.executable, "-c", MEASURED_CLI, str(peak), *arguments], cwd=folder, env=environment,
            stdout=subprocess.DEVNULL, stderr=errors) as run:
        guard = threading.Timer(RUN_LIMIT_S, run.kill)
        guard.start()
        try:
            run.wait()
        finally:
            guard.cancel()
        errors.seek(0)
        return run.returncode, errors.read().splitlines(), int(peak.read_text())


@pytest.mark.parametrize("command, arguments, config_name", [
    ("train", ["train", "--config", "recipe.yaml"], "recipe.yaml"),
    ("data", ["data", "build", "--config", "data.yaml"], "data.yaml"),
    ("export", ["export", "--run-dir", "run"], "run/config.yaml"),
], ids=["train", "data-build", "export"])
def test_alias_bombs_are_refused_by_the_command_line_in_one_line_without_expanding(tmp_path, command, arguments,
                                                                                   config_name):
    base = (saved_run_config() if command == "export" else RECIPES[command].read_text()).rstrip("\n") + "\n"
    config = tmp_path / config_name
    config.parent.mkdir(exist_ok=True)
    config.write_text(base + "extras: [x]\n")
    status, _, plain_peak = run_measured(arguments, tmp_path)
    assert status == 2
    first_alias_line = base.count("\n") + 3
    for depth in (8, 9):
        config.write_text(base + alias_bomb(depth))
        assert len(alias_bomb(depth)) < 1000
        status, errors, peak = run_measured(arguments, tmp_path)
        assert status == 2 and errors == [
            f"beit3 {command}: {config_name}: line {first_alias_line}: YAML aliases (*level0) are not allowed in "
            "configs; write the value out"]
        assert peak < plain_peak + MEMORY_MARGIN, f"depth {depth}: {peak >> 20} MiB, a plain refusal {plain_peak >> 20}"


def test_every_config_in_the_repository_loads_without_aliases():
    loaded = [load_config(ModelConfig, path) for path in sorted((CONFIGS / "model").glob("*.yaml"))]
    loaded += [load_config(DataConfig, path) for path in sorted((CONFIGS / "data").glob("*.yaml"))]
    loaded += [load_pretrain_config(path) for path in sorted((CONFIGS / "pretrain").glob("*.yaml"))]
    assert len(loaded) == len(list(CONFIGS.rglob("*.yaml")))


def test_an_alias_in_the_model_file_a_recipe_names_is_refused_with_that_file_named(tmp_path):
    model = (CONFIGS / "model" / "tiny.yaml").read_text().rstrip("\n") + "\n"
    (tmp_path / "model.yaml").write_text(model + "notes: &note [x]\nmore_notes: *note\n")
    recipe = read_config_mapping(CONFIGS / "pretrain" / "tiny_cpu.yaml")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "model": "model.yaml"}))
    line = model.count("\n") + 2
    with pytest.raises(ConfigError, match=rf"model\.yaml: line {line}: YAML aliases \(\*note\) are not allowed"):
        load_pretrain_config(tmp_path / "recipe.yaml")


def test_unknown_recipe_fields_are_refused_before_the_model_file_is_looked_for(tmp_path):
    recipe = read_config_mapping(CONFIGS / "pretrain" / "tiny_cpu.yaml")
    recipe.update(model="absent.yaml", extras=list(range(3)), stepz=10)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError) as error:
        load_pretrain_config(tmp_path / "recipe.yaml")
    assert str(error.value).splitlines() == [f"{tmp_path / 'recipe.yaml'}: invalid config",
                                             "  extras: unknown field (check its spelling)",
                                             "  stepz: unknown field (check its spelling)"]


def test_config_files_over_the_size_bound_are_refused_before_parsing(tmp_path):
    model = (CONFIGS / "model" / "tiny.yaml").read_text().rstrip("\n") + "\n"
    padded = model + "#" * (MAX_CONFIG_BYTES - len(model.encode()) - 1) + "\n"
    (tmp_path / "at_bound.yaml").write_text(padded)
    tiny = load_config(ModelConfig, CONFIGS / "model" / "tiny.yaml")
    assert load_config(ModelConfig, tmp_path / "at_bound.yaml") == tiny
    (tmp_path / "over_bound.yaml").write_text(padded + "\n")
    with pytest.raises(ConfigError, match=r"over_bound\.yaml: config file is larger than 1,048,576 bytes"):
        load_config(ModelConfig, tmp_path / "over_bound.yaml")
