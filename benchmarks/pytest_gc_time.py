"""A pytest plugin: how often the garbage collector ran during the session, and for how long, per generation.

The suite's conftest freezes the heap once the test modules are imported (`beit3.cli.freeze_imports` in its
`pytest_collection_finish`); with `--gc-unfrozen` this plugin undoes that right after, so the two can be
compared side by side:

    PYTHONPATH=benchmarks .venv/bin/pytest -q -m "not slow" -p pytest_gc_time [--gc-unfrozen]
"""

import gc
import time

import pytest

_started: list[float] = []
_collections = {generation: 0 for generation in range(3)}
_seconds = {generation: 0.0 for generation in range(3)}


def _timed(phase: str, info: dict) -> None:
    if phase == "start":
        _started[:] = [time.perf_counter()]
    elif _started:
        _collections[info["generation"]] += 1
        _seconds[info["generation"]] += time.perf_counter() - _started[0]


def pytest_addoption(parser):
    parser.addoption("--gc-unfrozen", action="store_true",
                     help="undo the conftest's freeze of the imported heap (the collector walks all of it)")


def pytest_configure(config):
    gc.callbacks.append(_timed)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    if session.config.getoption("--gc-unfrozen"):
        gc.unfreeze()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("garbage collector: " + ", ".join(
        f"generation {generation} {_collections[generation]} passes {_seconds[generation]:.1f} s"
        for generation in range(3)) + f"; {gc.get_freeze_count():,} objects frozen at the end")
