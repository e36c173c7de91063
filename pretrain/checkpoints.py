"""Checkpoint layout and the resume state each rank keeps beside DeepSpeed's files.

`run_dir/checkpoints/step-00001000/` holds DeepSpeed's model and ZeRO files plus `trainer-rank-{r}.pt`: that
rank's data position per stream and its RNG states. `checkpoints/latest` names the newest complete checkpoint;
it is written (atomically) only after every rank has finished writing, so a checkpoint cut short by a crash is
never chosen. `checkpoints/universal/` holds DeepSpeed universal-format copies made when a run resumes across
ZeRO stage 3.

DeepSpeed reads its own files with full pickle, which runs any code a file names; `refuse_untrusted_pickles`
scans a checkpoint before that and refuses one that names anything but the plain records DeepSpeed writes.
"""

import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"
TAG_PREFIX = "step-"
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


def save_trainer_state(checkpoint_dir: Path, tag: str, rank: int, state: dict) -> None:
    path = trainer_state_path(checkpoint_dir, tag, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    partial = path.with_suffix(".partial")
    with partial.open("wb") as file:  # a plain write, so a full disk reports ENOSPC by name
        file.write(buffer.getbuffer())
    os.replace(partial, path)


def load_trainer_state(checkpoint_dir: Path, tag: str, rank: int) -> dict:
    path = trainer_state_path(checkpoint_dir, tag, rank)
    if not path.exists():
        raise CheckpointError(f"{path.parent}: no trainer state for rank {rank} (was the run on fewer ranks?)")
    return torch.load(path, weights_only=True)


def mark_latest(checkpoint_dir: Path, tag: str) -> None:
    partial = checkpoint_dir / f"{LATEST}.partial"
    partial.write_text(tag)
    os.replace(partial, checkpoint_dir / LATEST)


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint's tag, checked to exist; None when the run has none yet."""
    marker = checkpoint_dir / LATEST
    if not marker.exists():
        return None
    tag = marker.read_text().strip()
    if not (checkpoint_dir / tag).is_dir():
        raise CheckpointError(f"{marker} names {tag!r}, which does not exist")
    return tag


def _tags(checkpoint_dir: Path) -> list[str]:
    """Every checkpoint folder's tag, oldest first (tags sort by step)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))


def remove_incomplete(checkpoint_dir: Path) -> list[str]:
    """Remove checkpoint folders newer than `latest` (all of them when there is none): a crash cut them short,
    since `latest` moves only once every rank has written. A later save then starts from an empty folder."""
    current = latest_tag(checkpoint_dir)
    removed = [tag for tag in _tags(checkpoint_dir) if current is None or tag > current]
    for tag in removed:
        shutil.rmtree(checkpoint_dir / tag)
    return removed


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


def prune(checkpoint_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names); returns the removed tags."""
    current = latest_tag(checkpoint_dir)
    removed = [tag for tag in _tags(checkpoint_dir)[:-keep_last] if tag != current]
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
