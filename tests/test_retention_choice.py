"""Which checkpoints a store lets go (``keep_last``, ``keep_best``), on hand-built records: no disk, no torch.

The checkpoints are listed oldest first, in the registry's commit order; the names say which step each is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcckpt import UsageError
from hpcckpt.store.manifest import Checkpoint
from hpcckpt.store.retention import KeepBest, check_keep_last, ranked, to_delete

NAN = float("nan")


def checkpoints(*metrics: float | None, tags: dict[int, str] | None = None) -> list[Checkpoint]:
    """Checkpoints at steps 1, 2, ... with ``val`` = each value (None: not recorded), oldest first."""
    return [
        Checkpoint(
            name=f"step-{step}",
            path=Path("run/checkpoints") / f"step-{step}",
            step=step,
            epoch=0,
            metrics={} if value is None else {"val": value},
            size=1,
            created=1000.0 + step,
            checksum="0" * 64,
            files=(),
            format="torch",
            tag=(tags or {}).get(step),
            seq=step,
        )
        for step, value in enumerate(metrics, 1)
    ]


def steps(chosen: list[Checkpoint]) -> list[int]:
    return [c.step for c in chosen]


def test_without_a_policy_nothing_is_deleted() -> None:
    assert to_delete(checkpoints(1, 2, 3), keep_last=None, keep_best=None) == []
    assert to_delete([], keep_last=1, keep_best=KeepBest("val", "min", 1)) == []


def test_keep_last_lets_the_oldest_go_first() -> None:
    assert steps(to_delete(checkpoints(*[None] * 5), keep_last=2, keep_best=None)) == [1, 2, 3]
    assert steps(to_delete(checkpoints(*[None] * 5), keep_last=5, keep_best=None)) == []
    assert steps(to_delete(checkpoints(*[None] * 2), keep_last=10, keep_best=None)) == []


def test_the_newest_is_the_one_in_commit_order_whatever_its_clock_said() -> None:
    listed = checkpoints(None, None, None)
    # The newest commit came from a node whose clock is an hour behind (issue 11): it is still kept.
    skewed = [listed[0], listed[1], Checkpoint(**{**vars(listed[2]), "created": 1000.0 - 3600})]
    assert steps(to_delete(skewed, keep_last=1, keep_best=None)) == [1, 2]


def test_keep_best_alone_keeps_the_best_and_the_newest() -> None:
    chosen = to_delete(checkpoints(0.9, 0.2, 0.5, 0.1, 0.7, 0.8), keep_last=None, keep_best=KeepBest("val", "min", 2))
    assert steps(chosen) == [1, 3, 5]  # kept: 0.1 (step 4), 0.2 (step 2) and the newest (step 6)


def test_keep_best_with_mode_max_keeps_the_highest() -> None:
    chosen = to_delete(checkpoints(0.9, 0.2, 0.5, 0.1, 0.7, 0.8), keep_last=None, keep_best=KeepBest("val", "max", 1))
    assert steps(chosen) == [2, 3, 4, 5]  # kept: 0.9 (step 1) and the newest


def test_keep_last_and_keep_best_keep_the_union() -> None:
    chosen = to_delete(checkpoints(0.1, 0.5, 0.6, 0.7, 0.8), keep_last=2, keep_best=KeepBest("val", "min", 1))
    assert steps(chosen) == [2, 3]


def test_among_equal_metrics_the_newer_ranks_first() -> None:
    listed = checkpoints(0.3, 0.3, 0.3, 0.9)
    assert steps(ranked(listed, "val", "min")) == [3, 2, 1, 4]
    assert steps(to_delete(listed, keep_last=None, keep_best=KeepBest("val", "min", 1))) == [1, 2]


def test_nan_and_missing_metrics_never_rank_so_they_never_displace_a_real_best() -> None:
    listed = checkpoints(NAN, 0.4, None, NAN, 0.6, None)
    assert steps(ranked(listed, "val", "min")) == [2, 5]
    assert steps(ranked(listed, "val", "max")) == [5, 2]
    assert steps(to_delete(listed, keep_last=None, keep_best=KeepBest("val", "min", 1))) == [1, 3, 4, 5]
    assert ranked(listed, "loss", "min") == []


def test_a_metric_no_checkpoint_recorded_keeps_only_the_newest() -> None:
    listed = checkpoints(0.1, 0.2, 0.3)
    assert steps(to_delete(listed, keep_last=None, keep_best=KeepBest("accuracy", "max", 2))) == [1, 2]


def test_tagged_checkpoints_are_never_deleted() -> None:
    listed = checkpoints(0.9, 0.8, 0.7, 0.6, tags={1: "baseline", 2: "before-lr-drop"})
    assert steps(to_delete(listed, keep_last=1, keep_best=None)) == [3]
    assert steps(to_delete(listed, keep_last=None, keep_best=KeepBest("val", "max", 1))) == [3]


@pytest.mark.parametrize(
    "value",
    [("val", "avg", 2), ("val", "min", 0), ("val", "min", True), ("val", "min", 1.5), ("", "min", 1), ("val", "min")],
)
def test_a_bad_keep_best_names_the_value_and_the_accepted_form(value: object) -> None:
    with pytest.raises(UsageError, match=r"Invalid keep_best=.*expected \(metric, 'min' or 'max', count") as error:
        KeepBest.parse(value)  # type: ignore[arg-type]
    assert repr(value) in str(error.value)
    assert "e.g. ('val_loss', 'min', 2)" in str(error.value)


def test_keep_best_parses_a_tuple_and_passes_a_parsed_one_through() -> None:
    parsed = KeepBest.parse(("val_loss", "max", 3))
    assert parsed == KeepBest("val_loss", "max", 3)
    assert KeepBest.parse(parsed) is parsed
    assert KeepBest.parse(None) is None


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "3"])
def test_a_bad_keep_last_names_the_value_and_the_accepted_form(value: object) -> None:
    with pytest.raises(UsageError) as error:
        check_keep_last(value)  # type: ignore[arg-type]
    assert str(error.value) == f"Invalid keep_last={value!r}: expected a whole number >= 1, or None to keep all"


def test_keep_last_accepts_a_whole_number_or_none() -> None:
    assert check_keep_last(1) == 1
    assert check_keep_last(None) is None
