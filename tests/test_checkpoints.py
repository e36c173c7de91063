"""Checkpoint bookkeeping on real files: completeness is a marker checked against the files, `latest` is only a
pointer, and nothing is ever deleted because `latest` is empty, garbage or missing."""

import json
import os

import pytest
import torch

from beit3.pretrain.checkpoints import (
    COMPLETE,
    LATEST,
    SET_ASIDE,
    CheckpointError,
    completeness_problem,
    find_resume_point,
    mark_complete,
    mark_latest,
    prune,
    save_trainer_state,
    set_aside,
    sync_folder,
    tag_for,
    write_durably,
)

WORLD_SIZE = 2


def save(checkpoint_dir, step: int, complete: bool = True) -> str:
    """A checkpoint as `beit3 train` writes one: each rank's state, a model file, the fsync, then the marker."""
    tag = tag_for(step)
    for rank in range(WORLD_SIZE):
        save_trainer_state(checkpoint_dir, tag, rank, {"step": step, "rank": rank})
    torch.save({"module": {"weight": torch.full((4, 4), float(step))}}, checkpoint_dir / tag / "model_states.pt")
    sync_folder(checkpoint_dir / tag)
    if complete:
        mark_complete(checkpoint_dir, tag, WORLD_SIZE)
        mark_latest(checkpoint_dir, tag)
    return tag


def folders(checkpoint_dir) -> dict[str, list[str]]:
    """Every checkpoint folder, wherever it lies, with its files: what must survive any resume decision."""
    return {str(path.relative_to(checkpoint_dir)): sorted(p.name for p in path.iterdir())
            for path in sorted(checkpoint_dir.rglob("step-*")) if path.is_dir()}


@pytest.fixture
def checkpoints(tmp_path):
    directory = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        save(directory, step)
    return directory


def test_latest_names_a_whole_checkpoint(checkpoints):
    point = find_resume_point(checkpoints)
    assert (point.tag, point.latest_problem, point.newer) == (tag_for(12), None, [])
    assert json.loads((checkpoints / tag_for(12) / COMPLETE).read_text())["world_size"] == WORLD_SIZE


@pytest.mark.parametrize("latest, problem", [
    (b"", "is empty"),
    (b"\n  \n", "is empty"),
    (b"\x00\xff garbage", "is unreadable"),
    (b"../../etc", "not a checkpoint name"),
    (b"step-", "not a checkpoint name"),
    (tag_for(99).encode(), f"names {tag_for(99)}, which does not exist"),
    (None, "is missing"),
])
def test_an_unusable_latest_resumes_from_the_newest_whole_checkpoint_and_loses_nothing(checkpoints, latest,
                                                                                       problem):
    before = folders(checkpoints)
    if latest is None:
        (checkpoints / LATEST).unlink()
    else:
        (checkpoints / LATEST).write_bytes(latest)
    point = find_resume_point(checkpoints)
    assert point.tag == tag_for(12) and point.newer == []
    assert problem in point.latest_problem
    assert folders(checkpoints) == before


def test_a_save_cut_short_is_passed_over_and_set_aside_never_deleted(checkpoints):
    """A crash after rank 0 wrote step 16 but before the marker: `latest` emptied by the crash too. The resume
    continues from step 12; step 16 moves aside with every byte it had."""
    save(checkpoints, 16, complete=False)
    (checkpoints / LATEST).write_text("")
    before = folders(checkpoints)
    point = find_resume_point(checkpoints)
    assert (point.tag, point.newer) == (tag_for(12), [tag_for(16)])
    moved = set_aside(checkpoints, point.newer)
    assert moved == [checkpoints / SET_ASIDE / tag_for(16)]
    after = folders(checkpoints)
    assert after.pop(f"{SET_ASIDE}/{tag_for(16)}") == before.pop(tag_for(16))
    assert after == before
    save(checkpoints, 16, complete=False)
    assert set_aside(checkpoints, [tag_for(16)]) == [checkpoints / SET_ASIDE / f"{tag_for(16)}.1"]


def test_a_whole_checkpoint_newer_than_latest_is_set_aside_when_latest_was_rolled_back(checkpoints):
    """A user who points `latest` back at step 8 continues from there; step 12 is kept aside, not reused."""
    mark_latest(checkpoints, tag_for(8))
    point = find_resume_point(checkpoints)
    assert (point.tag, point.latest_problem, point.newer) == (tag_for(8), None, [tag_for(12)])


@pytest.mark.parametrize("damage, problem", [
    (lambda folder: (folder / COMPLETE).unlink(), "no complete.json"),
    (lambda folder: (folder / COMPLETE).write_text("{not json"), "unreadable complete.json"),
    (lambda folder: (folder / COMPLETE).write_text("[]"), "not an object"),
    (lambda folder: (folder / "trainer-rank-1.pt").unlink(), "trainer-rank-1.pt is missing"),
    (lambda folder: os.truncate(folder / "model_states.pt", 10), "model_states.pt holds 10 bytes"),
])
def test_completeness_is_checked_against_the_files(checkpoints, damage, problem):
    damage(checkpoints / tag_for(12))
    assert problem in completeness_problem(checkpoints / tag_for(12))
    point = find_resume_point(checkpoints)
    assert point.tag == tag_for(8) and tag_for(12) in point.latest_problem and point.newer == [tag_for(12)]


def test_a_marker_is_refused_while_a_rank_part_is_missing(tmp_path):
    tag = save(tmp_path, 4, complete=False)
    (tmp_path / tag / "trainer-rank-1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no trainer state from rank\(s\) \[1\]"):
        mark_complete(tmp_path, tag, WORLD_SIZE)
    assert not (tmp_path / tag / COMPLETE).exists()


def test_no_whole_checkpoint_is_one_line_and_removes_nothing(tmp_path):
    save(tmp_path, 4, complete=False)
    save(tmp_path, 8, complete=False)
    before = folders(tmp_path)
    with pytest.raises(CheckpointError) as error:
        find_resume_point(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "no checkpoint is proven whole" in message and "nothing was removed" in message
    assert folders(tmp_path) == before


def test_a_new_run_has_no_resume_point(tmp_path):
    assert find_resume_point(tmp_path / "checkpoints").tag is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / LATEST).write_text("")
    assert find_resume_point(tmp_path / "checkpoints").tag is None


def test_prune_removes_only_older_whole_checkpoints(checkpoints):
    save(checkpoints, 2, complete=False)
    mark_latest(checkpoints, tag_for(12))
    assert prune(checkpoints, keep_last=1, current=tag_for(12)) == [tag_for(4), tag_for(8)]
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [tag_for(2), tag_for(12)]


def test_durable_writes_leave_no_partial_file(tmp_path):
    write_durably(tmp_path / LATEST, b"step-00000004")
    write_durably(tmp_path / LATEST, b"step-00000008")
    assert [p.name for p in tmp_path.iterdir()] == [LATEST]
    assert (tmp_path / LATEST).read_text() == "step-00000008"


def test_sync_folder_never_opens_pipes_or_follows_links(tmp_path):
    """A named pipe would block an fsync's open forever, and a link could lead anywhere."""
    tag = save(tmp_path, 4, complete=False)
    os.mkfifo(tmp_path / tag / "trainer-rank-1.partial")
    (tmp_path / tag / "elsewhere").symlink_to("/dev/full")
    sync_folder(tmp_path / tag)
