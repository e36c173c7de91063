"""Changing `steps` on resume moves every later learning rate: refused unless allowed, and then described; an
export of a checkpoint short of the run's last step says the run has not finished."""

import pytest
import yaml

from beit3.pretrain.export import unfinished_note
from beit3.pretrain.trainer import ResumeError, check_steps_change


def saved_run(tmp_path, steps: int):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "run", "steps": steps}))
    return tmp_path


def test_a_changed_steps_is_refused_naming_both_values_and_the_flag(tmp_path):
    with pytest.raises(ResumeError, match=r"steps: was 100, now 200; .* restore steps: 100, or pass "
                                          r"--allow-steps-change"):
        check_steps_change(saved_run(tmp_path, 100), 200, "step-00000050", allowed=False)


def test_an_allowed_change_is_described(tmp_path):
    change = check_steps_change(saved_run(tmp_path, 100), 200, "step-00000050", allowed=True)
    assert change == "steps changed from 100 to 200 when resuming from step-00000050"


def test_the_same_steps_resume_silently(tmp_path):
    assert check_steps_change(saved_run(tmp_path, 100), 100, "step-00000050", allowed=False) is None


def test_export_of_an_unfinished_run_says_so(tmp_path):
    run = saved_run(tmp_path, 100)
    assert "step 50 of the run's 100: the run has not finished" in unfinished_note(run, "step-00000050")
    assert unfinished_note(run, "step-00000100") is None
