"""Which checkpoints a store may delete: a pure function of the committed ones and the policy.

Checkpoints come ordered oldest first, in the registry's commit order (``Registry.checkpoints``). Never
deleted: the newest checkpoint (the one the next task resumes from; Ray #27790 deleted it), the best
by the ``keep_best`` metric, and tagged checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..checks import is_whole, whole_number
from ..errors import UsageError
from .manifest import Checkpoint

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``count`` best checkpoints by ``metric`` (lowest when ``mode`` is ``min``)."""

    metric: str
    mode: Mode
    count: int

    @classmethod
    def parse(cls, value: KeepBest | tuple[str, str, int] | None) -> KeepBest | None:
        if value is None or isinstance(value, KeepBest):
            return value
        try:
            metric, mode, count = value
        except (TypeError, ValueError):
            raise UsageError(
                f"Invalid keep_best={value!r}: expected (metric, 'min' or 'max', count), e.g. ('val_loss', 'min', 2)"
            ) from None
        if mode not in ("min", "max") or not is_whole(count, 1) or not metric:
            raise UsageError(
                f"Invalid keep_best={value!r}: expected (metric, 'min' or 'max', count >= 1), "
                "e.g. ('val_loss', 'min', 2)"
            )
        return cls(str(metric), "min" if mode == "min" else "max", count)


def check_keep_last(keep_last: int | None) -> int | None:
    if keep_last is not None:
        whole_number(keep_last, "keep_last", also=", or None to keep all")
    return keep_last


def ranked(checkpoints: Sequence[Checkpoint], metric: str, mode: Mode) -> list[Checkpoint]:
    """Checkpoints that recorded ``metric`` (a number, not NaN), best first; ties go to the newer, in the
    order of ``checkpoints`` (oldest first: the registry's commit order, not the saving hosts' clocks)."""
    sign = 1.0 if mode == "min" else -1.0
    scored = [
        (sign * c.metrics[metric], -position, c)
        for position, c in enumerate(checkpoints)
        if metric in c.metrics and not math.isnan(c.metrics[metric])
    ]
    return [c for *_, c in sorted(scored, key=lambda item: item[:2])]


def to_delete(checkpoints: Sequence[Checkpoint], keep_last: int | None, keep_best: KeepBest | None) -> list[Checkpoint]:
    """The checkpoints the policy lets go, oldest first. ``checkpoints`` are ordered oldest first.

    ``keep_last=None`` keeps every checkpoint unless ``keep_best`` is set; then only the best ones and the
    newest are kept.
    """
    if not checkpoints or (keep_last is None and keep_best is None):
        return []
    keep: set[str] = {checkpoints[-1].name}
    keep.update(c.name for c in checkpoints if c.tag)
    if keep_last is not None:
        keep.update(c.name for c in checkpoints[-keep_last:])
    if keep_best is not None:
        keep.update(c.name for c in ranked(checkpoints, keep_best.metric, keep_best.mode)[: keep_best.count])
    return [c for c in checkpoints if c.name not in keep]
