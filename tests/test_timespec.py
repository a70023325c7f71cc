"""Save intervals, Slurm time limits and signal names: accepted forms, and errors that name them."""

from __future__ import annotations

import re
import signal

import pytest

from hpcckpt import UsageError
from hpcckpt.signals import parse_signal, warning_signal
from hpcckpt.timespec import Interval, format_slurm_time, parse_slurm_time


@pytest.mark.parametrize(
    ("text", "unit", "value"),
    [
        ("500ba", "steps", 500),
        ("2ep", "epochs", 2),
        ("30min", "seconds", 1800),
        ("90s", "seconds", 90),
        ("2h", "seconds", 7200),
        ("1.5min", "seconds", 90),
        (" 10 steps ", "steps", 10),
    ],
)
def test_intervals(text: str, unit: str, value: float) -> None:
    assert Interval.parse(text) == Interval(unit, value)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["500", "0ba", "1.5ep", "2 fortnights", "-3ba", ""])
def test_bad_intervals_name_the_value_and_the_forms(text: str) -> None:
    with pytest.raises(UsageError, match=rf"Invalid interval {text!r}.*'500ba'.*'2ep'.*'30min'"):
        Interval.parse(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("0:20", 20),
        ("4:00:00", 14400),
        ("2-00:00:00", 172800),
        ("1-12", 129600),
        ("1-0:30", 88200),
        ("00:01:00", 60),
    ],
)
def test_slurm_times(text: str, seconds: int) -> None:
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["90x", "1:2:3:4", "", "0", "-5", "1h", "00:00:00"])
def test_bad_slurm_times_name_the_value_and_the_forms(text: str) -> None:
    with pytest.raises(UsageError, match=rf"Invalid time {text!r}.*MM, MM:SS, HH:MM:SS, D-HH"):
        parse_slurm_time(text)


def test_slurm_time_round_trip() -> None:
    for seconds in (20, 3600, 86400 + 61, 3 * 86400):
        assert parse_slurm_time(format_slurm_time(seconds)) == seconds


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("USR1", signal.SIGUSR1),
        ("sigusr2", signal.SIGUSR2),
        ("TERM", signal.SIGTERM),
        (str(int(signal.SIGUSR1)), signal.SIGUSR1),
    ],
)
def test_signal_names(name: str, expected: signal.Signals) -> None:
    assert parse_signal(name) == expected


@pytest.mark.parametrize("name", ["USR3", "KILL", "999", "stop"])
def test_bad_signal_names(name: str) -> None:
    with pytest.raises(UsageError, match=rf"Invalid signal {name!r}.*USR1, USR2"):
        parse_signal(name)


def test_warning_signal_argument_then_environment_then_usr1() -> None:
    assert warning_signal("USR2", {"HPCCKPT_SIGNAL": "HUP"}) == signal.SIGUSR2
    assert warning_signal(None, {"HPCCKPT_SIGNAL": "HUP"}) == signal.SIGHUP
    assert warning_signal(None, {}) == signal.SIGUSR1


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("1:99", "seconds must be below 60 (got 99)"),
        ("1:60:00", "minutes must be below 60 (got 60)"),
        ("1:00:60", "seconds must be below 60 (got 60)"),
        ("1-25", "hours must be below 24 (got 25)"),
        ("1-24:00", "hours must be below 24 (got 24)"),
        ("2-0:60", "minutes must be below 60 (got 60)"),
        ("366-00:00:00", "is longer than the limit of 365 days"),
        ("5000000", "is longer than the limit of 365 days"),
    ],
)
def test_slurm_time_fields_out_of_range_are_refused_naming_the_field(text: str, field: str) -> None:
    # Slurm 22.05 carries these over silently (1:99 became 3 minutes, 1-25 became 2-01:00:00): a typo
    # would size every task of a chain.
    with pytest.raises(
        UsageError,
        match=rf"Invalid time {re.escape(repr(text))}: .*{re.escape(field)}.*expected MM, MM:SS, HH:MM:SS, D-HH",
    ):
        parse_slurm_time(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90:00", 5400), ("48:00:00", 172800), ("1-23:59:59", 172799), ("365-00:00:00", 365 * 86400), ("600", 36000)],
)
def test_leading_time_fields_may_exceed_their_unit(text: str, seconds: int) -> None:
    assert parse_slurm_time(text) == seconds
