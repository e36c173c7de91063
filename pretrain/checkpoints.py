"""Checkpoint layout and the resume state each rank keeps beside DeepSpeed's files.

`run_dir/checkpoints/step-00001000/` holds DeepSpeed's model and ZeRO files plus `trainer-rank-{r}.pt`: that
rank's data position per stream and its RNG states. A checkpoint is whole only when its `complete.json` says
so: rank 0 writes that marker, listing every file and its size, once every rank has written and fsynced its
part; `checkpoints/latest` then names it. Completeness is never inferred from `latest`, which a crash can leave
empty or missing, and no checkpoint is deleted because of it: folders a resume cannot use (newer than the
checkpoint it continues from) move to `checkpoints/set-aside/`. `checkpoints/universal/` holds DeepSpeed
universal-format copies made when a run resumes across ZeRO stage 3.

DeepSpeed reads its own files with full pickle, which runs any code a file names; `refuse_untrusted_pickles`
scans a checkpoint before that and refuses one that names anything but the plain records DeepSpeed writes.
"""

import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"
TAG_PREFIX = "step-"
TAG_PATTERN = re.compile(r"step-\d{8,}")
COMPLETE = "complete.json"
SET_ASIDE = "set-aside"
UNIVERSAL = "universal"


DEEPSPEED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
"""The classes DeepSpeed's ZeRO 1-3 and universal checkpoints pickle beside tensors: an enum and two plain
records, rebuilt from their fields without calling code chosen by the file."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def trainer_state_path(checkpoint_dir: Path, tag: str, rank: int) -> Path:
    return checkpoint_dir / tag / f"trainer-rank-{rank}.pt"


def rng_states() -> dict:
    """Every RNG a rank draws from, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                        has_gauss, cached),
              "python": (version, list(python_state), gauss)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that after a crash it holds the old bytes or all the new ones: a plain write
    (a full disk reports ENOSPC by name), fsync, rename, and an fsync of the folder that holds the rename."""
    partial = path.with_suffix(".partial")
    with partial.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    _fsync(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync every regular file under `folder`, then the folders, so a checkpoint's bytes are on disk before a
    marker calls it complete. Links, pipes and devices are never opened."""
    paths = sorted(folder.rglob("*"))
    for path in paths:
        if stat.S_ISREG(path.lstat().st_mode):
            _fsync(path)
    for directory in [folder, *(path for path in paths if stat.S_ISDIR(path.lstat().st_mode))]:
        _fsync(directory)


def save_trainer_state(checkpoint_dir: Path, tag: str, rank: int, state: dict) -> None:
    path = trainer_state_path(checkpoint_dir, tag, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_durably(path, buffer.getvalue())


def load_trainer_state(checkpoint_dir: Path, tag: str, rank: int) -> dict:
    path = trainer_state_path(checkpoint_dir, tag, rank)
    if not path.exists():
        raise CheckpointError(f"{path.parent}: no trainer state for rank {rank} (was the run on fewer ranks?)")
    return torch.load(path, weights_only=True)


def mark_complete(checkpoint_dir: Path, tag: str, world_size: int) -> None:
    """Record, once every rank has written and fsynced its part, that `tag` is whole: every file with its size."""
    folder = checkpoint_dir / tag
    files = {str(path.relative_to(folder)): path.stat().st_size
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != COMPLETE}
    marker = {"tag": tag, "world_size": world_size, "files": files}
    problem = _marker_problem(folder, marker)
    if problem:
        raise CheckpointError(f"{folder}: not marked complete: {problem}")
    write_durably(folder / COMPLETE, json.dumps(marker, indent=1).encode())


def _marker_problem(folder: Path, marker: dict) -> str | None:
    files, world_size = marker.get("files"), marker.get("world_size")
    if not isinstance(files, dict) or not isinstance(world_size, int):
        return f"{COMPLETE} lacks its files or world_size"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size} bytes, {size} when saved"
    missing = [rank for rank in range(world_size) if f"trainer-rank-{rank}.pt" not in files]
    return f"no trainer state from rank(s) {missing}" if missing else None


def completeness_problem(folder: Path) -> str | None:
    """Why `folder` is not a whole checkpoint, or None when its marker and every file it lists check out."""
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except FileNotFoundError:
        return f"no {COMPLETE}, so its save never finished"
    except (OSError, ValueError) as error:
        return f"unreadable {COMPLETE} ({error})"
    return _marker_problem(folder, marker) if isinstance(marker, dict) else f"{COMPLETE} is not an object"


def mark_latest(checkpoint_dir: Path, tag: str) -> None:
    write_durably(checkpoint_dir / LATEST, tag.encode())


def _step(tag: str) -> int:
    return int(tag.removeprefix(TAG_PREFIX))


def _tags(checkpoint_dir: Path) -> list[str]:
    """Every checkpoint folder's tag, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted((p.name for p in checkpoint_dir.iterdir() if p.is_dir() and TAG_PATTERN.fullmatch(p.name)),
                  key=_step)


def _whole_tags(checkpoint_dir: Path) -> list[str]:
    return [tag for tag in _tags(checkpoint_dir) if completeness_problem(checkpoint_dir / tag) is None]


def _read_latest(checkpoint_dir: Path) -> tuple[str | None, str | None]:
    """The whole checkpoint `latest` names, or None and why it names none."""
    marker = checkpoint_dir / LATEST
    try:
        tag = marker.read_text().strip()
    except FileNotFoundError:
        return None, f"{marker} is missing"
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{marker} is unreadable ({error})"
    if not tag:
        return None, f"{marker} is empty"
    if not TAG_PATTERN.fullmatch(tag):
        return None, f"{marker} holds {tag[:40]!r}, not a checkpoint name"
    if not (checkpoint_dir / tag).is_dir():
        return None, f"{marker} names {tag}, which does not exist"
    problem = completeness_problem(checkpoint_dir / tag)
    return (tag, None) if problem is None else (None, f"{marker} names {tag}, which is not whole: {problem}")


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: the checkpoint (None: a new run), why `latest` was passed over (None: it was
    used), and the folders newer than the checkpoint, which must move aside before saves reuse their names."""

    tag: str | None
    latest_problem: str | None = None
    newer: list[str] = field(default_factory=list)


def find_resume_point(checkpoint_dir: Path) -> ResumePoint:
    """The checkpoint `latest` names when it is whole, otherwise the newest one whose marker proves it whole.
    Reads only. Fails with one line when checkpoint folders exist but none is proven whole."""
    tags = _tags(checkpoint_dir)
    tag, problem = _read_latest(checkpoint_dir)
    if tag is None:
        whole = _whole_tags(checkpoint_dir)
        if not whole and tags:
            raise CheckpointError(
                f"{checkpoint_dir}: no checkpoint is proven whole ({problem}; newest folder {tags[-1]}: "
                f"{completeness_problem(checkpoint_dir / tags[-1])}); nothing was removed: move the step-* "
                "folders elsewhere to start this run_dir afresh, or use a new run_dir")
        if not whole:
            return ResumePoint(None)
        tag = whole[-1]
    return ResumePoint(tag, problem, [newer for newer in tags if _step(newer) > _step(tag)])


def latest_whole(checkpoint_dir: Path) -> str | None:
    """The checkpoint a resume would continue from (for messages and export); None when there is none."""
    try:
        return find_resume_point(checkpoint_dir).tag
    except CheckpointError:
        return None


def set_aside(checkpoint_dir: Path, tags: list[str]) -> list[Path]:
    """Move checkpoint folders into `checkpoints/set-aside/` (numbered when the name is taken); returns where each
    went."""
    moved = []
    for tag in tags:
        destination, number = checkpoint_dir / SET_ASIDE / tag, 1
        while destination.exists():
            destination, number = checkpoint_dir / SET_ASIDE / f"{tag}.{number}", number + 1
        destination.parent.mkdir(exist_ok=True)
        os.replace(checkpoint_dir / tag, destination)
        moved.append(destination)
    if moved:
        _fsync(checkpoint_dir / SET_ASIDE)
        _fsync(checkpoint_dir)
    return moved


def refuse_untrusted_pickles(folder: Path) -> None:
    """Scan every `.pt` file under `folder` for the globals its pickle would import, without running it, and
    refuse the checkpoint if any lies outside what DeepSpeed writes: DeepSpeed loads these files with
    `weights_only=False`, so a planted file would otherwise run its code on every rank."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (RuntimeError, ValueError, OSError, EOFError) as error:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({error})") from None
        unexpected = sorted(named - DEEPSPEED_PICKLE_GLOBALS)
        if unexpected:
            raise CheckpointError(f"{path}: refused: its pickle would import {', '.join(unexpected)}, which no "
                                  "checkpoint written by beit3 train holds (a file placed there to run code?)")


def prune(checkpoint_dir: Path, keep_last: int, current: str) -> list[str]:
    """Delete all but the newest `keep_last` whole checkpoints, never `current`; a folder not proven whole is
    left alone. Returns the removed tags."""
    removed = [tag for tag in _whole_tags(checkpoint_dir)[:-keep_last] if tag != current]
    for tag in removed:
        shutil.rmtree(checkpoint_dir / tag)
    return removed


def convert_to_universal(checkpoint_dir: Path, tag: str) -> None:
    """Convert a checkpoint, once, with DeepSpeed's own tool to its universal format (which any ZeRO stage
    loads, optimizer state included), into `checkpoints/universal/{tag}`: resuming under a ZeRO stage on the
    other side of stage 3 needs it. One process runs it."""
    universal = checkpoint_dir / UNIVERSAL
    if not (universal / tag).is_dir():
        partial = universal / f"{tag}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(checkpoint_dir / tag), "--output_folder", str(partial), "--num_extract_workers", "1",
                        "--num_merge_workers", "1", "--inject_missing_state"], check=True, capture_output=True)
        _name_model_states_for_every_stage(partial)
        _add_stage3_optimizer_step(partial)
        os.replace(partial, universal / tag)


def _name_model_states_for_every_stage(folder: Path) -> None:
    """DeepSpeed looks for the model states under a ZeRO-3 name or a ZeRO-1/2 name depending on the stage it
    loads into, while the converter keeps the source stage's name: give the universal folder both."""
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    present = next(name for name in names if (folder / name).exists())
    for name in names:
        if not (folder / name).exists():
            os.link(folder / present, folder / name)


def _add_stage3_optimizer_step(folder: Path) -> None:
    """ZeRO-3 reads the Adam step count from a field the converter writes only for ZeRO-3 sources; copy it from
    a parameter's saved step so a ZeRO-1/2 checkpoint loads into ZeRO-3 too."""
    path = folder / "zero" / "optimizer_state.pt"
    global_state = torch.load(path, weights_only=False)
    if "optimizer_state_dict" not in global_state:
        step = torch.load(next((folder / "zero").glob("*/step.pt")), weights_only=False)
        global_state["optimizer_state_dict"] = {"state": {0: {"step": step}},
                                                "param_groups": global_state["param_groups"]}
        torch.save(global_state, path)
