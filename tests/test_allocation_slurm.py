"""The allocation on the real Slurm cluster (issue 11, items 23 and 27): 1-minute chain tasks with
``--signal USR1@20`` train on after Slurm's warning until the budget stops them, and leave no more of
their minute unused than the predicted save + the measured teardown + 2 s, every task ending cleanly.
(tests/support/measure_allocation.py prints the same numbers per task for a report.)"""

from __future__ import annotations

import pytest
from chains import SlurmChain


@pytest.mark.timeout(600, func_only=True)
def test_one_minute_tasks_train_on_after_the_warning_and_leave_only_save_teardown_and_two_seconds(
    slurm_chain: SlurmChain,
) -> None:
    args = ["--epochs", "400", "--step-sleep", "0.05", "--workers", "1"]  # more than three tasks of training
    options = ["--tasks", "3", "--time", "1", "--signal", "USR1@20"]
    options += ["--max-tasks", "3"]  # three tasks to measure, no auto-extension (item 28)
    job = slurm_chain.submit(*options, command=slurm_chain.train(*args))
    slurm_chain.cluster.wait_for(
        lambda: len(slurm_chain.events("task-end")) == 3 and not slurm_chain.cluster.squeue_ids(job),
        timeout=420,
        interval=2,
        what="the three tasks to end",
    )
    log = slurm_chain.events()
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
    history = slurm_chain.status()["history"]
    assert all(t["reason"] == "budget" and (t["exit_status"] == 0 or t["ended_by"]) for t in history), history
