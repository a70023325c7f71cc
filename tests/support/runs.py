"""Reading a run directory as the tests check it: its events, and waiting for training to start.

One reader for every test file (it was written out in nine), so a change to how the event log is read
is one edit here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hpcckpt import CheckpointStore
from hpcckpt.rundir import EVENTS


def events(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The run's events, oldest first, only those of ``kind`` when given; [] while it has no event log."""
    if not (run_dir / EVENTS).exists():
        return []
    log = CheckpointStore(run_dir, create=False).registry.events()
    return log if kind is None else [e for e in log if e["event"] == kind]


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; AssertionError naming
    ``what`` after ``timeout`` seconds (a condition, never a fixed sleep: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
    return value


def wait_started(run_dir: Path, timeout: float = 120, count: int = 1) -> list[dict[str, Any]]:
    """Wait until ``count`` tasks' Runs have started training in ``run_dir``; their start events."""

    def started() -> list[dict[str, Any]] | None:
        starts = events(run_dir, "start")
        return starts if len(starts) >= count else None

    return wait_for(started, timeout, what=f"training to start in {run_dir.name} ({count} task(s))")
