"""Signals that arrive after ``with Run(...)`` has ended (issue 11, item 11): Slurm's warning after the last
task's training finished, a second SIGTERM during teardown. They must not kill a process whose run is
complete or saved: it exits 0, as documented, and says what it ignored."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import clean_env, train_command


def _start(run_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = clean_env()
    return subprocess.Popen(
        train_command(run_dir, "--workers", "0", "--linger", *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _next_event(process: subprocess.Popen[str], event: str) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, process.communicate(timeout=60)[1]
    record = json.loads(line)
    assert record["event"] == event, record
    return record


def _late_signals_then_exit(process: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    """The loop has ended (the child said so): signal it, then let it go on to its end."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        process.send_signal(sig)
    out, err = process.communicate("go\n", timeout=120)
    ends = [json.loads(line) for line in out.splitlines() if '"end"' in line]
    assert process.returncode == 0, f"exit {process.returncode} after the loop had ended:\n{err}"
    assert ends, err
    return process.returncode, ends[-1], err


@pytest.mark.slow
def test_warning_and_term_after_a_completed_run_leave_exit_status_0(tmp_path: Path) -> None:
    process = _start(tmp_path / "run", "--epochs", "1")
    _next_event(process, "started")
    _next_event(process, "after")
    status, end, err = _late_signals_then_exit(process)
    assert status == 0, f"exit {status} after a complete run:\n{err}"
    assert end["completed"] and end["step"] == 12, end
    said = [line for line in err.splitlines() if "arrived after the run had stopped; ignored" in line]
    assert len(said) == 1 and "SIGUSR1" in said[0] and "SIGTERM" in said[0], err


@pytest.mark.slow
def test_a_second_term_during_teardown_after_a_signal_stop_leaves_exit_status_0(tmp_path: Path) -> None:
    process = _start(tmp_path / "run", "--steps", "100000", "--step-sleep", "0.01")
    _next_event(process, "started")
    process.send_signal(signal.SIGTERM)
    _next_event(process, "after")
    status, end, err = _late_signals_then_exit(process)
    assert status == 0, f"exit {status} after a saved signal stop:\n{err}"
    assert end["reason"] == "signal", end
    # Saved where it stopped (a TERM that came before the first step stops at step 0, with nothing to save).
    assert end["saved"] == end["step"] or (end["step"] == 0 and end["saved"] is None), end
