"""The allocation is used, not wasted (issue 11, items 23 and 27): the time limit's warning leaves the stop to
the budget, the budget sets aside the task's teardown, and a task that saved and was then ended by the
time limit's SIGTERM is a clean stop. Real processes and the local backend; the real cluster is in
tests/test_allocation_slurm.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import TrainWorker, clean_env, events, train_command
from paths import TRAIN_WORKER

from hpcckpt.budget import DEFAULT_TEARDOWN, is_time_limit_warning, measured_teardown

END = 1_800_000_000.0  # a job's end time (Unix seconds)


# -- which warning is the time limit's ------------------------------------------------------------------
def test_a_one_minute_job_s_warning_is_the_time_limit_s_only_where_slurm_sends_it() -> None:
    start, lead = END - 60, 20  # --time 1 --signal USR1@20: Slurm sends it at the first 30-s check >= end - 50
    assert is_time_limit_warning(start + 15.6, END, lead, start)  # seen on the test cluster
    assert is_time_limit_warning(start + 29.6, END, lead, start)
    assert is_time_limit_warning(END - lead, END, lead, start)  # the local backend's, exactly at end - lead
    # A user's `scancel --signal USR1` 4 s in: Slurm's check would not send it before end - lead - 30.
    assert not is_time_limit_warning(start + 4, END, lead, start)
    assert not is_time_limit_warning(start + 4, None, lead, start), "no deadline: never the time limit's"
    assert not is_time_limit_warning(start + 30, END, 0, start), "no lead: never the time limit's"


def test_a_long_job_s_window_is_thirty_seconds_before_end_minus_lead() -> None:
    start, lead = END - 4 * 3600, 300
    assert is_time_limit_warning(END - lead - 31, END, lead, start)
    assert is_time_limit_warning(END - lead - 5, END, lead, start)
    assert not is_time_limit_warning(END - lead - 40, END, lead, start)
    # Before issue 11 anything within lead + 90 s of the end counted as the time limit's.
    assert not is_time_limit_warning(END - lead - 89, END, lead, start)
    assert not is_time_limit_warning(END - 1800, END, lead, start), "half an hour early: a preemption or a user"


def test_a_job_shorter_than_lead_plus_thirty_gets_its_warning_at_the_first_check() -> None:
    start, lead = END - 60, 50  # end - lead - 30 is before the start: the first check after it sends it
    assert is_time_limit_warning(start + 25, END, lead, start)
    assert is_time_limit_warning(start + 35, END, lead, start), "a late check: up to 10 s after start + 30"
    assert not is_time_limit_warning(start + 45, END, lead, start), "the first check would have sent it"


# -- teardown measured from the run's events ---------------------------------------------------------
def test_teardown_is_the_slowest_stop_to_task_end_of_the_last_tasks() -> None:
    def task(begin: float, stop: float | None, end: float) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = [{"event": "task-begin", "time": begin}, {"event": "start", "time": begin + 3}]
        if stop is not None:
            events.append({"event": "stop", "time": stop, "reason": "budget"})
        return [*events, {"event": "task-end", "time": end}]

    assert measured_teardown([]) is None
    assert measured_teardown(task(0, None, 60)) is None, "a crash has no stop: nothing measured"
    events = task(0, 59.0, 59.7) + task(60, 118.0, 120.9) + task(121, 180.0, 181.2)
    assert measured_teardown(events) == pytest.approx(2.9)
    eight = [e for i in range(8) for e in task(100 * i, 100 * i + 50, 100 * i + 50 + (5.0 if i == 0 else 1.0))]
    assert measured_teardown(eight) == pytest.approx(1.0), "only the last tasks count"
    assert measured_teardown([{"event": "stop", "time": "x"}, {"event": "task-end", "time": 3}]) is None
    # The chain script says when the training process exited: task-end's own start is not teardown.
    exited = [*task(0, 50.0, 52.5)[:-1], {"event": "task-end", "time": 52.5, "exited": 51.25}]
    assert measured_teardown(exited) == pytest.approx(1.25)


# -- a real training process ---------------------------------------------------------------------------
class Training(TrainWorker):
    """train_worker.py with a deadline and a --signal lead, as a chain task sees them."""

    def __init__(self, run_dir: Path, deadline: float, lead: int | None, *args: str, job: bool = False) -> None:
        env = clean_env(HPCCKPT_DEADLINE=str(deadline))
        if lead is not None:
            env["HPCCKPT_SIGNAL_LEAD"] = str(lead)
        super().__init__(run_dir, "--steps", "1000000", "--workers", "0", *args, env=env)

    def end(self) -> dict[str, Any]:
        ends = self.finish(timeout=300)
        assert self.process.returncode == 0, self.stderr
        return ends[-1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_time_limit_s_warning_trains_on_until_the_budget_says_stop(tmp_path: Path) -> None:
    lead = 10
    deadline = time.time() + 40  # the process starts within the first 30 s, even on a loaded machine
    run = Training(tmp_path / "run", deadline, lead, "--step-sleep", "0.02")
    run.wait_started()
    warn_at = deadline - lead  # where Slurm's check (and the local backend) sends it
    assert time.time() < warn_at, "the training started after the warning was due: the machine is too slow"
    time.sleep(max(0.0, warn_at - time.time()))
    run.process.send_signal(signal.SIGUSR1)
    warned_at = time.time()
    end = run.end()
    stop = events(tmp_path / "run", "stop")[0]
    assert (stop["reason"], stop["cause"], stop["signal"], stop["saved"]) == ("budget", "timeout", "SIGUSR1", True)
    assert stop["time"] - warned_at > lead - 3, "it trained on through the lead"
    assert 0 < stop["time_left"] < 1.5, "and stopped only when the budget said so"
    assert end["reason"] == "budget"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_users_warning_early_in_a_short_job_stops_at_once_as_not_the_time_limit_s(tmp_path: Path) -> None:
    deadline = time.time() + 90
    run = Training(tmp_path / "run", deadline, 20, "--step-sleep", "0.02")
    run.wait_started()
    assert deadline - time.time() > 20 + 30 + 5, "started too late to tell a user's warning from Slurm's"
    run.process.send_signal(signal.SIGUSR1)
    run.end()
    stop = events(tmp_path / "run", "stop")[0]
    assert (stop["reason"], stop["saved"]) == ("signal", True)
    assert stop["cause"] == "preemption", "not the time limit's: before issue 11 this was called a timeout"
    assert stop["time_left"] > 50, "left at once"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_warning_without_a_known_deadline_still_stops_at_once(tmp_path: Path) -> None:
    env = clean_env()
    env["HPCCKPT_SIGNAL_LEAD"] = "20"
    process = subprocess.Popen(
        train_command(tmp_path / "run", "--steps", "1000000", "--workers", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stdout is not None and '"started"' in process.stdout.readline()
    process.send_signal(signal.SIGUSR1)
    process.communicate(timeout=120)
    assert process.returncode == 0
    stop = events(tmp_path / "run", "stop")[0]
    assert (stop["reason"], stop["cause"], stop["saved"]) == ("signal", "unknown", True)


# -- the local backend: teardown counted, and a TERM after the save is a clean stop -----------------------
def slow_exit_command(run_dir: Path, exit_seconds: float, *args: str) -> list[str]:
    """train_worker.py whose interpreter takes ``exit_seconds`` to exit after Run has stopped (as DataLoader
    workers and a big interpreter do)."""
    # The script's folder first on sys.path, as `python SCRIPT` puts it: the worker imports toy.py beside it.
    code = (
        "import atexit, os, runpy, sys, time; atexit.register(time.sleep, float(sys.argv[1])); "
        "sys.argv = sys.argv[2:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [sys.executable, "-c", code, str(exit_seconds), str(TRAIN_WORKER), str(run_dir), *args]


def local_chain(run_dir: Path, tasks: int, time_spec: str, command: list[str]) -> subprocess.CompletedProcess[str]:
    # --max-tasks = --tasks: these runs are longer than their tasks on purpose; no auto-extension (item 28).
    options = ["--backend", "local", "--run-dir", str(run_dir), "--tasks", str(tasks), "--time", time_spec]
    options += ["--max-tasks", str(tasks)]
    return subprocess.run(
        ["hpcckpt", "submit", *options, "--signal", "none", "--", *command],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_budget_sets_aside_the_measured_teardown_so_the_time_limit_never_cuts_the_exit(tmp_path: Path) -> None:
    run_dir = tmp_path / "chain"
    exit_seconds = 1.0  # with task-end's start, below the first task's default: every task can keep to it
    assert exit_seconds < DEFAULT_TEARDOWN
    args = ["--steps", "1000000", "--step-sleep", "0.02", "--workers", "0"]
    result = local_chain(run_dir, 3, "0:14", slow_exit_command(run_dir, exit_seconds, *args))
    assert result.returncode == 0, result.stdout + result.stderr
    ends, stops, starts = events(run_dir, "task-end"), events(run_dir, "stop"), events(run_dir, "start")
    assert len(ends) == 3 and len(stops) == 3, result.stdout
    # The first task sets aside a default (on a loaded machine its exit may take longer); the later ones
    # set aside what the earlier ones measured, and the time limit's SIGTERM no longer finds them exiting.
    later = [line for line in result.stdout.splitlines() if "task 2/3 ended" in line or "task 3/3 ended" in line]
    assert len(later) == 2 and not any("(sent TERM)" in line for line in later), result.stdout
    assert [e["status"] for e in ends[1:]] == [0, 0], result.stdout
    assert all(e["clean"] for e in ends), "the first one too: exit 0, or saved and then ended by the TERM"
    assert all(s["reason"] == "budget" and s["saved"] for s in stops)
    assert starts[0]["teardown"] == DEFAULT_TEARDOWN
    for start, stop, end in zip(starts[1:], stops[1:], ends[1:], strict=True):
        # Later tasks set aside what the earlier ones measured, and leave no more than that unused.
        assert start["teardown"] >= exit_seconds
        assert stop["time_left"] >= start["teardown"]
        unused = start["deadline"] - end["time"]
        assert unused <= stop["save_seconds"] + start["teardown"] + 2, (start, stop, end)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_task_that_saved_and_was_then_ended_by_the_time_limit_is_a_clean_stop(tmp_path: Path) -> None:
    run_dir = tmp_path / "chain"
    # After the training has saved and exited, the user's wrapper goes on (copying logs, say) for longer than
    # anything measured so far: the time limit's TERM cuts the wrapper, which dies of it (143). Python itself
    # no longer dies of a TERM after its loop (item 11: it records and ignores it), so the wrapper is the
    # part the TERM ends, as torchrun or a shell script around the training would be.
    args = ["--steps", "1000000", "--step-sleep", "0.02", "--workers", "0"]
    training = train_command(run_dir, *args)
    result = local_chain(run_dir, 1, "0:12", ["bash", "-c", '"$@"; sleep 8', "wrapper", *training])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(sent TERM)" in result.stdout
    [end] = events(run_dir, "task-end")
    # The TERM ends the exit (143); were it ignored there, the SIGKILL after KillWait would (137).
    signal_name = {143: "SIGTERM", 137: "SIGKILL"}[end["status"]]
    assert (end["clean"], end["ended_by"], end["progress"]) == (True, signal_name, True)
    status = subprocess.run(
        ["hpcckpt", "status", str(run_dir)], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    [line] = [line for line in status.splitlines() if " budget" in line]
    assert f"{signal_name} after the save (clean)" in line and "exit 1" not in line, status
    # A task that did not save is not made clean by the same exit status.
    crash = tmp_path / "crash"
    crashing = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
    local_chain(crash, 1, "0:10", crashing)
    [end] = events(crash, "task-end")
    assert (end["status"], end["clean"], end["ended_by"]) == (143, False, None)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_exit_status_of_a_task_ended_by_the_time_limit_is_the_signal_s(tmp_path: Path) -> None:
    # The time limit's TERM reaches the batch shell and the training at once; bash 5.2 then reported -1 for
    # the child's status in about four of five tasks (measured), and task-end recorded "exit -1".
    run_dir = tmp_path / "chain"
    result = local_chain(run_dir, 3, "0:04", ["bash", "-c", "sleep 60"])
    assert "task 3/3 ended" in result.stdout, result.stdout + result.stderr
    assert [e["status"] for e in events(run_dir, "task-end")] == [143, 143, 143], result.stdout
