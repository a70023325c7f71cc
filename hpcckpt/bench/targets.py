"""A target of ``hpcckpt bench``: one figure, its goal and its verdict, and the groups of rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

GROUPS = ("save", "tmpfs", "restore", "small", "async", "memory", "registry", "mirror")


@dataclass(frozen=True)
class Target:
    """One figure; ``goal`` is ``"<= X"``, ``">= X"`` or ``"info"``; ``value`` None: not measured here."""

    name: str
    value: float | None
    goal: str
    note: str = ""

    @property
    def met(self) -> bool:
        if self.goal == "info":
            return True
        if self.value is None or not math.isfinite(self.value):
            return False
        op, bound = self.goal.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)

    @property
    def verdict(self) -> str:
        if self.goal == "info":
            return "info"
        return "n/a " if self.value is None else ("ok  " if self.met else "MISS")
