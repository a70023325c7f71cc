"""The budget's estimates, moved out of Run (issue 12): the first save's time, the teardown set aside, and
whether a save fits the grace window after SIGTERM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from hpcckpt.budget import DEFAULT_TEARDOWN, Budget, expected_teardown, first_save_guess
from hpcckpt.store.manifest import Checkpoint


def checkpoint(step: int, size: int, save_seconds: float | None) -> Checkpoint:
    return Checkpoint(
        name=f"step-{step}",
        path=Path(f"step-{step}"),
        step=step,
        epoch=0,
        metrics={},
        size=size,
        created=1.0,
        checksum="",
        files=(),
        format="torch",
        save_seconds=save_seconds,
    )


def never(*_: Any) -> Any:
    raise AssertionError("not to be asked")


def test_first_save_is_the_slowest_earlier_rate_times_the_newest_size(tmp_path: Path) -> None:
    recent = [checkpoint(1, 100, 2.0), checkpoint(2, 50, None), checkpoint(3, 400, 1.0)]
    # 2 s per 100 bytes is the slowest rate; the newest checkpoint with a time is 400 bytes.
    assert first_save_guess(recent, never, tmp_path) == pytest.approx(8.0)


def test_first_save_of_a_small_state_without_history_is_a_twentieth_of_a_second(tmp_path: Path) -> None:
    assert first_save_guess([checkpoint(1, 0, 3.0)], lambda: (1 << 20) - 1, tmp_path) == 0.05
    assert list(tmp_path.iterdir()) == [], "no bandwidth probe for a small state"


def test_first_save_of_a_large_state_is_twice_its_size_over_the_measured_bandwidth(tmp_path: Path) -> None:
    size = 64 << 20
    guess = first_save_guess([], lambda: size, tmp_path)
    # Above the small state's 0.05 s; below what a disk slower than 1 MiB/s would give (any disk is faster).
    assert 0.05 < guess < 2.0 * size / (1 << 20) + 0.05
    assert list(tmp_path.iterdir()) == [], "the bandwidth probe's file is removed"


def test_teardown_outside_a_job_is_nothing_and_reads_no_events() -> None:
    assert expected_teardown(False, never) == 0.0


def test_teardown_in_a_job_is_the_slowest_measured_else_the_default() -> None:
    assert expected_teardown(True, lambda: []) == DEFAULT_TEARDOWN
    events: Sequence[Mapping[str, Any]] = [
        {"event": "task-begin", "time": 90.0},
        {"event": "stop", "time": 100.0},
        {"event": "task-end", "time": 102.0, "exited": 101.5},
        {"event": "task-begin", "time": 200.0},
        {"event": "stop", "time": 210.0},
        {"event": "task-end", "time": 210.7},
    ]
    assert expected_teardown(True, lambda: events) == pytest.approx(1.5)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_save_fits_the_grace_window_even_after_the_deadline() -> None:
    # The time limit's SIGTERM comes at the end time; SIGKILL follows KillWait seconds later. The grace
    # window, not the passed deadline, says whether the save fits (what Run has always done).
    clock = Clock(1000.0)
    budget = Budget(999.0, clock=clock, margin_floor=0.5, save_guess=3.0)
    assert budget.save_fits_in(5.0)
    assert not budget.save_fits_in(3.4)
    # The public room_for_save keeps its meaning: the deadline and the window both limit.
    assert not budget.room_for_save(within=5.0), "the deadline has passed"
    assert not budget.room_for_save(), "without a window, the deadline counts: it has passed"
    assert Budget(1010.0, clock=clock, margin_floor=0.5, save_guess=3.0).room_for_save(within=5.0)
    assert not Budget(1010.0, clock=clock, margin_floor=0.5, save_guess=3.0).room_for_save(within=3.4)
    assert Budget(None, clock=clock, save_guess=1e6).room_for_save(), "no deadline, no window: always"
