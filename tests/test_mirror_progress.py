"""A training job's batch log shows its mirror transfers (issue 14, "Progress"): the background upload of
each checkpoint and the download of a purged run directory's checkpoint, as 10 % lines on stderr.

HPCCKPT_PROGRESS=1 shows even transfers shorter than two seconds, so these small checkpoints show their
lines however fast the machine is.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from harness import clean_env

JOB = textwrap.dedent(
    """
    import sys, torch
    from hpcckpt import CheckpointStore, TrainState
    store = CheckpointStore(sys.argv[1], mirror=sys.argv[2])
    torch.manual_seed(int(sys.argv[3] == "save"))
    state = TrainState(model=torch.nn.Linear(2000, 2000))  # 16 MB: two copy chunks
    if sys.argv[3] == "save":
        state.step = 7
        store.save(state)
        assert store.uploads.wait(300) == []
        print(7, float(state.model.weight.sum()))
    else:
        print(store.restore(state).step, float(state.model.weight.sum()))
    """
)


def job(run_dir: Path, mirror: Path, what: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", JOB, str(run_dir), str(mirror), what],
        capture_output=True,  # a pipe, not a terminal: lines, not a bar
        text=True,
        timeout=300,
        check=False,
        env=clean_env(HPCCKPT_PROGRESS="1"),
    )


def test_a_batch_log_shows_the_upload_and_the_download_of_a_checkpoint(tmp_path: Path) -> None:
    mirror = tmp_path / "project" / "run"
    saved = job(tmp_path / "scratch", mirror, "save")
    assert saved.returncode == 0, saved.stderr
    uploads = re.findall(rf"^hpcckpt: upload step_000000007 to {re.escape(str(mirror))}: (\d+)% ", saved.stderr, re.M)
    assert uploads and uploads[-1] == "100" and uploads.count("100") == 1, saved.stderr

    restored = job(tmp_path / "purged", mirror, "load")  # a run directory with nothing: from the mirror
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.split() == saved.stdout.split()  # step 7 and its weights, from the mirror
    assert re.search(rf"^hpcckpt: download from {re.escape(str(mirror))}: done, ", restored.stderr, re.M), (
        restored.stderr
    )
