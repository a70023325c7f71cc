"""Budget arithmetic with an injected clock, deadline sources, and the Slurm output parsers behind them."""

from __future__ import annotations

import time

import pytest

from hpcckpt import UsageError, read_slurm_env
from hpcckpt.budget import Budget, find_deadline
from hpcckpt.slurm.commands import parse_end_time, parse_scontrol_fields


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def simulate(deadline_in: float, step: float, save: float, floor: float = 0.5) -> tuple[int, float]:
    """Steps trained before the budget stops, and the seconds left at the stop (the save then runs)."""
    clock = Clock()
    budget = Budget(clock.now + deadline_in, clock=clock, margin_floor=floor, save_guess=save)
    steps = 0
    while budget.room_for_step():
        clock.now += step
        budget.observe_step(step)
        steps += 1
    left = budget.remaining()
    assert left is not None
    return steps, left


def test_ten_seconds_with_millisecond_saves_trains_for_most_of_them() -> None:
    steps, left = simulate(deadline_in=10.0, step=0.1, save=0.005)
    assert steps >= 93  # 9.3 s of 10 s trained
    assert left >= 0.005 + 0.5  # and the save still fits, with the margin floor


def test_a_save_of_minutes_stops_minutes_early() -> None:
    steps, left = simulate(deadline_in=3600.0, step=1.0, save=120.0)
    assert 120.0 + 60.0 <= left <= 120.0 + 60.0 + 1.0  # save + margin (half the save), within one step
    assert steps == 3600 - 180  # the last step starts with 181 s left: 1 + 120 + 60


def test_ranks_that_agree_a_step_late_look_a_step_further_ahead() -> None:
    clock = Clock()
    budget = Budget(clock.now + 10.0, clock=clock, margin_floor=0.5, save_guess=1.0)
    budget.observe_step(2.0)
    assert budget.room_for_step(1) and budget.room_for_step(4)  # 8 + 1 + 0.5 <= 10
    assert not budget.room_for_step(5), "five steps of 2 s and a save do not fit in 10 s"


def test_margin_follows_the_observed_save_time_with_a_floor() -> None:
    clock = Clock()
    budget = Budget(clock.now + 100, clock=clock, margin_floor=0.5, save_guess=0.01)
    assert budget.margin == 0.5
    budget.observe_save(30.0)
    assert budget.predicted_save == 30.0
    assert budget.margin == 15.0
    budget.observe_save(10.0)  # the slowest save is kept: the safe side
    assert budget.predicted_save == 30.0


def test_the_slowest_recent_step_is_predicted() -> None:
    clock = Clock()
    budget = Budget(clock.now + 10, clock=clock, window=3)
    for seconds in (0.1, 2.0, 0.1, 0.1):
        budget.observe_step(seconds)
    assert budget.predicted_step == 2.0
    budget.observe_step(0.1)  # the 2 s step leaves the window of 3
    assert budget.predicted_step == 0.1


def test_no_deadline_means_no_budget_stop() -> None:
    budget = Budget(None, clock=Clock())
    budget.observe_step(1e6)
    assert budget.room_for_step()
    assert budget.remaining() is None


def test_room_for_save_respects_a_grace_window() -> None:
    clock = Clock()
    budget = Budget(clock.now + 1000, clock=clock, margin_floor=0.5, save_guess=3.0)
    assert budget.room_for_save(within=5.0)
    assert not budget.room_for_save(within=3.2)


def test_bad_margins_are_refused() -> None:
    with pytest.raises(UsageError, match=r"Invalid margin: floor=-1.*expected numbers >= 0"):
        Budget(None, margin_floor=-1)


def test_deadline_sources_in_order() -> None:
    asked: list[str] = []

    def query(job: str) -> float | None:
        asked.append(job)
        return 2000.0

    env = {"SLURM_JOB_END_TIME": "1000", "SLURM_JOB_ID": "7", "HPCCKPT_DEADLINE": "3000"}
    assert find_deadline(env, read_slurm_env(env), query).at == 1000.0
    assert asked == []
    env = {"SLURM_JOB_ID": "7", "HPCCKPT_DEADLINE": "3000"}
    found = find_deadline(env, read_slurm_env(env), query)
    assert (found.at, asked) == (2000.0, ["7"])
    assert "squeue" in found.source
    env = {"SLURM_JOB_ID": "7", "HPCCKPT_DEADLINE": "3000"}
    assert find_deadline(env, read_slurm_env(env), lambda job: None).at == 3000.0
    assert find_deadline({}, read_slurm_env({})).at is None


def test_bad_deadline_variable_is_a_clear_error() -> None:
    env = {"HPCCKPT_DEADLINE": "tomorrow"}
    with pytest.raises(UsageError, match=r"Invalid HPCCKPT_DEADLINE='tomorrow': expected Unix time in seconds"):
        find_deadline(env, read_slurm_env(env))


def test_end_time_parsers_on_captured_output() -> None:
    expected = time.mktime((2026, 11, 21, 15, 40, 0, 0, 0, -1))
    assert parse_end_time("2026-11-21T15:40:00\n") == expected
    for unknown in ("Unknown", "N/A", "", "None"):
        assert parse_end_time(unknown) is None
    line = (
        "JobId=42 JobName=chain UserId=root(0) JobState=RUNNING RunTime=00:00:05 TimeLimit=00:01:00 "
        "StartTime=2026-11-21T15:39:00 EndTime=2026-11-21T15:40:00 Partition=low NodeList=node1"
    )
    fields = parse_scontrol_fields(line)
    assert (fields["JobState"], fields["TimeLimit"]) == ("RUNNING", "00:01:00")
    assert parse_end_time(fields["EndTime"]) == expected
