"""The allocation on the real Slurm cluster (issue 11, items 23 and 27): 1-minute chain tasks with
``--signal USR1@20`` train on after Slurm's warning until the budget stops them, and leave no more of
their minute unused than the predicted save + the measured teardown + 2 s, every task ending cleanly.
(tests/support/measure_allocation.py prints the same numbers per task for a report.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from paths import TRAIN_WORKER
from slurm_cluster import SlurmCluster

from hpcckpt import CheckpointStore


def events(run_dir: Path) -> list[dict[str, Any]]:
    return CheckpointStore(run_dir, create=False).registry.events()


@pytest.mark.timeout(600, func_only=True)
def test_one_minute_tasks_train_on_after_the_warning_and_leave_only_save_teardown_and_two_seconds(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    run_dir = tmp_path / "chain"
    args = ["--epochs", "400", "--step-sleep", "0.05", "--workers", "1"]  # more than three tasks of training
    options = ["--backend", "slurm", "--run-dir", str(run_dir), "--tasks", "3", "--time", "1", "--signal", "USR1@20"]
    options += ["--max-tasks", "3"]  # three tasks to measure, no auto-extension (item 28)
    submitted = subprocess.run(
        ["hpcckpt", "submit", *options, "--", sys.executable, str(TRAIN_WORKER), str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=slurm_cluster.env,
        cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = submitted.stdout.split()[2].rstrip(":")
    slurm_cluster.wait_for(
        lambda: (
            (run_dir / "events.jsonl").exists()
            and sum(e["event"] == "task-end" for e in events(run_dir)) == 3
            and not slurm_cluster.squeue_ids(job)
        ),
        timeout=420,
        interval=2,
        what="the three tasks to end",
    )
    log = events(run_dir)
    starts = [e for e in log if e["event"] == "start"]
    stops = [e for e in log if e["event"] == "stop"]
    ends = [e for e in log if e["event"] == "task-end"]
    assert len(starts) == len(stops) == 3, log
    for start, stop, end in zip(starts, stops, ends, strict=True):
        # Slurm's warning came 10-40 s into the minute; the task trained on until the budget said stop.
        assert (stop["reason"], stop["cause"], stop["signal"], stop["saved"]) == ("budget", "timeout", "SIGUSR1", True)
        exited = end["exited"]
        unused = start["deadline"] - exited
        assert unused <= stop["save_seconds"] + start["teardown"] + 2, (start, stop, end)
        assert end["clean"], end  # exit 0, or saved and then ended by the time limit's SIGTERM
    status = subprocess.run(
        ["hpcckpt", "status", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=slurm_cluster.env,
    )
    history = json.loads(status.stdout)["history"]
    assert all(t["reason"] == "budget" and (t["exit_status"] == 0 or t["ended_by"]) for t in history), history
