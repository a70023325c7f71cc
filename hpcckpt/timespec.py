"""Time specifications: save intervals (``500ba``, ``2ep``, ``30min``) and Slurm time limits.

Pure parsing; each error names the bad value and the accepted forms.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .errors import UsageError

IntervalUnit = Literal["steps", "epochs", "seconds"]

_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")
_UNITS: dict[str, tuple[IntervalUnit, float]] = {
    "ba": ("steps", 1),
    "step": ("steps", 1),
    "steps": ("steps", 1),
    "ep": ("epochs", 1),
    "epoch": ("epochs", 1),
    "epochs": ("epochs", 1),
    "s": ("seconds", 1),
    "sec": ("seconds", 1),
    "m": ("seconds", 60),
    "min": ("seconds", 60),
    "h": ("seconds", 3600),
    "hr": ("seconds", 3600),
}
_INTERVAL_FORMS = "steps like '500ba', epochs like '2ep', or wall time like '90s', '30min', '2h'"


@dataclass(frozen=True)
class Interval:
    """Every ``value`` steps, epochs or seconds."""

    unit: IntervalUnit
    value: float

    @classmethod
    def parse(cls, text: str | Interval) -> Interval:
        if isinstance(text, Interval):
            return text
        match = _INTERVAL.match(str(text).lower()) if isinstance(text, str) else None
        if match is None or match.group(2) not in _UNITS:
            raise UsageError(f"Invalid interval {text!r}: expected {_INTERVAL_FORMS}")
        unit, scale = _UNITS[match.group(2)]
        value = float(match.group(1)) * scale
        if value <= 0 or (unit != "seconds" and value != int(value)):
            raise UsageError(
                f"Invalid interval {text!r}: expected a positive whole count of {unit}, or {_INTERVAL_FORMS}"
            )
        return cls(unit, value)

    def __str__(self) -> str:
        suffix = {"steps": "ba", "epochs": "ep", "seconds": "s"}[self.unit]
        return f"{self.value:g}{suffix}"

    def due(
        self, *, step: int | None = None, epoch: int | None = None, elapsed: Callable[[], float] | None = None
    ) -> bool:
        """Is a save due? The one place that switches on the unit: a step interval after ``step`` steps
        (a multiple of it), an epoch interval at the end of epoch count ``epoch``, a wall-time interval once
        ``elapsed()`` seconds have passed since the last save. A count of another unit is never due, and
        ``elapsed`` is called only for a wall-time interval (it reads a clock)."""
        if self.unit == "steps":
            return step is not None and step % int(self.value) == 0
        if self.unit == "epochs":
            return epoch is not None and epoch % int(self.value) == 0
        return elapsed is not None and elapsed() >= self.value


# sbatch(1) --time: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes" and "days-hours:minutes:seconds".
_SLURM_TIME = re.compile(
    r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"
)
SLURM_TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 30, 0:20, 4:00:00, 2-00:00:00)"


# The longest limit accepted. Slurm itself takes any number (measured on 22.05: `--time=5000000` became a
# limit of 3472 days), so a unit slip (seconds typed where minutes are meant) would only pend for ever
# against the partition's MaxTime; no site allows a year, and a year keeps the arithmetic far from
# Slurm's 32-bit minute counter.
MAX_TIME_SECONDS = 365 * 86400


def parse_slurm_time(text: str) -> int:
    """Seconds in a Slurm time limit such as ``4:00:00`` or ``2-12:00``; ``UsageError`` otherwise.

    Every field after the first must be in range (minutes and seconds < 60, hours < 24 after days): Slurm
    22.05 silently carries an overflow over (``1:99`` became 3 minutes, ``1-25`` two days and one hour,
    measured), which hides a typo in the limit a whole chain is sized by."""
    match = _SLURM_TIME.match(str(text).strip())
    if match is None:
        raise UsageError(f"Invalid time {text!r}: expected {SLURM_TIME_FORMS}")
    g = match.groupdict()
    if g["days"] is not None:
        _check_fields(text, (("hours", g["dh"], 24), ("minutes", g["dm"], 60), ("seconds", g["ds"], 60)))
        seconds = int(g["days"]) * 86400 + int(g["dh"]) * 3600 + int(g["dm"] or 0) * 60 + int(g["ds"] or 0)
    elif g["c"] is not None:
        _check_fields(text, (("minutes", g["b"], 60), ("seconds", g["c"], 60)))
        seconds = int(g["a"]) * 3600 + int(g["b"]) * 60 + int(g["c"])
    elif g["b"] is not None:
        _check_fields(text, (("seconds", g["b"], 60),))
        seconds = int(g["a"]) * 60 + int(g["b"])
    else:
        seconds = int(g["a"]) * 60
    if seconds <= 0:
        raise UsageError(f"Invalid time {text!r}: it must be longer than zero; expected {SLURM_TIME_FORMS}")
    if seconds > MAX_TIME_SECONDS:
        raise UsageError(
            f"Invalid time {text!r}: {format_slurm_time(seconds)} is longer than the limit of 365 days; "
            f"expected {SLURM_TIME_FORMS}"
        )
    return seconds


def _check_fields(text: str, fields: tuple[tuple[str, str | None, int], ...]) -> None:
    for name, value, limit in fields:
        if value is not None and int(value) >= limit:
            raise UsageError(
                f"Invalid time {text!r}: {name} must be below {limit} (got {int(value)}); expected {SLURM_TIME_FORMS}"
            )


def format_slurm_time(seconds: int) -> str:
    """``D-HH:MM:SS`` or ``HH:MM:SS``, the form sbatch accepts."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock
