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


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes as stored: compares values bit for bit, NaN payloads and signed zeros included."""
    return bytes(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())


def every_dtype_sample() -> dict[str, torch.Tensor]:
    """A 2x3 tensor of random bytes for each dtype the tensors format stores, by its name."""
    from hpcckpt.store.formats.tensorfile import dtypes

    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, dtype in dtypes().items():
        data = torch.randint(0, 256, (6 * dtype.itemsize,), dtype=torch.uint8, generator=generator)
        state[name] = data.view(dtype).reshape(2, 3)
    assert {"bfloat16", "float8_e4m3fn", "float8_e5m2", "complex64", "bool", "uint64", "uint16"} <= set(state)
    return state
