"""Bitwise comparison of saved states, for the exact-resume tests."""

from __future__ import annotations

from typing import Any

import torch


def assert_bitwise_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training(expected: dict[str, Any], got: dict[str, Any]) -> None:
    for key in ("model", "optimizer", "scheduler", "step", "epoch"):
        assert_bitwise_equal(expected[key], got[key], key)
