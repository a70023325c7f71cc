"""Time specifications: save intervals (``500ba``, ``2ep``, ``30min``) and Slurm time limits.

Pure parsing; each error names the bad value and the accepted forms.
"""

from __future__ import annotations

import re
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


# sbatch(1) --time: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes" and "days-hours:minutes:seconds".
_SLURM_TIME = re.compile(
    r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"
)
SLURM_TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 30, 0:20, 4:00:00, 2-00:00:00)"


def parse_slurm_time(text: str) -> int:
    """Seconds in a Slurm time limit such as ``4:00:00`` or ``2-12:00``; ``UsageError`` otherwise."""
    match = _SLURM_TIME.match(str(text).strip())
    if match is None:
        raise UsageError(f"Invalid time {text!r}: expected {SLURM_TIME_FORMS}")
    g = match.groupdict()
    if g["days"] is not None:
        seconds = int(g["days"]) * 86400 + int(g["dh"]) * 3600 + int(g["dm"] or 0) * 60 + int(g["ds"] or 0)
    elif g["c"] is not None:
        seconds = int(g["a"]) * 3600 + int(g["b"]) * 60 + int(g["c"])
    elif g["b"] is not None:
        seconds = int(g["a"]) * 60 + int(g["b"])
    else:
        seconds = int(g["a"]) * 60
    if seconds <= 0:
        raise UsageError(f"Invalid time {text!r}: it must be longer than zero; expected {SLURM_TIME_FORMS}")
    return seconds


def format_slurm_time(seconds: int) -> str:
    """``D-HH:MM:SS`` or ``HH:MM:SS``, the form sbatch accepts."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock
