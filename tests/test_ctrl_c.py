"""Ctrl-C in the terminal that runs `beit3 train` under torchrun: 2 CPU ranks (gloo, DeepSpeed ZeRO-2) on the
sample shards; SIGINT goes to torchrun's whole process group once a checkpoint exists, as a terminal sends it.

torchrun starts each rank in a session of its own, so the terminal's SIGINT reaches torchrun alone; torchrun
forwards it to every rank's process group and waits for them. The ranks stop cleanly: rank 0 prints one line
naming the last complete checkpoint (which the same command continues from) and no rank prints a traceback.
torchrun itself ends with its own `SignalException` traceback, which it prints for any
signal it receives (torch.distributed.elastic re-raises it from its agent); that one is allowed, and only it."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from beit3.pretrain.checkpoints import latest_whole
from beit3.sample_data import tiny_recipe
from s3_endpoint import free_port
from training_fixtures import REPO, write_recipe

pytestmark = pytest.mark.slow  # end to end: a 2-rank training run under torchrun

POLL_SECONDS = 0.05
INTERRUPTED = re.compile(r"^beit3 train: interrupted; the last complete checkpoint is (\S+); the same command "
                         r"continues from it$", re.MULTILINE)
TRACEBACK = "Traceback (most recent call last):"


def launch_in_own_session(config, output, *arguments: str) -> subprocess.Popen:
    """`beit3 train` under torchrun as the foreground job of a terminal: its own process group, which SIGINT
    reaches as a whole. Its output goes to a file, which no pipe left unread can block."""
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "beit3.cli", "train", "--config", str(config), *arguments]
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=REPO,
                            start_new_session=True)


def wait_for(condition, what: str, process: subprocess.Popen, log, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if process.poll() is not None:
            raise AssertionError(f"training ended before {what}:\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f}s")
        time.sleep(POLL_SECONDS)
    return value


def tracebacks(output: str) -> list[str]:
    """The exception line that ends each traceback in the output."""
    found = []
    for block in output.split(TRACEBACK)[1:]:
        lines = [line for line in block.splitlines() if line.strip()]
        found.append(next((line for line in lines if not line.startswith(" ")), ""))
    return found


def test_ctrl_c_stops_every_rank_cleanly_and_names_the_checkpoint(training_data, tmp_path):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(run_dir, training_data, steps=100_000, log_every_steps=1,
                         checkpoint={"every_steps": 2, "keep_last": 2}, eval={"every_steps": 100_000})
    config = write_recipe(tmp_path / "recipe.yaml", recipe)
    checkpoints = run_dir / "checkpoints"
    log = tmp_path / "output.log"
    with log.open("w") as output_file:
        launcher = launch_in_own_session(config, output_file)
    try:
        wait_for(lambda: latest_whole(checkpoints), "complete checkpoint", launcher, log)
        os.killpg(launcher.pid, signal.SIGINT)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    output = log.read_text()

    assert launcher.returncode != 0, output[-6000:]
    named = INTERRUPTED.findall(output)
    assert len(named) == 1, output[-6000:]
    assert named[0] == str(checkpoints / latest_whole(checkpoints)), output[-6000:]
    launcher_ending = f"torch.distributed.elastic.multiprocessing.api.SignalException: Process {launcher.pid} " \
                      f"got signal: {int(signal.SIGINT)}"
    assert all(ending == launcher_ending for ending in tracebacks(output)), output[-6000:]
    assert "KeyboardInterrupt" not in output, output[-6000:]

    print(f"interrupted at {latest_whole(checkpoints)}; {len(tracebacks(output))} launcher traceback(s)")
