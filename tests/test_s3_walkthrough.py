"""The README's guide followed end to end on a loopback S3 server: raw corpora in a bucket to a verified export."""

import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_guide_runs_from_a_bucket_of_raw_data_to_a_verified_export(tmp_path):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    done = subprocess.run([sys.executable, str(REPO / "launch" / "s3_walkthrough.py"), "--workdir", str(tmp_path),
                           "--steps", "4"], env=environment, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "verification passed" in done.stdout and "walkthrough finished" in done.stdout
    assert list((tmp_path / "run" / "export").glob("beit3-step-00000004.pth"))
