"""Values outside the safe encoding (issue 13 §1): pickled alone, loaded with the weights-only allow-list,
full pickle only by name; and the tensors the format cannot hold as raw bytes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hpcckpt import CheckpointStore, TrainState
from hpcckpt.errors import StoreError, UsageError


@dataclasses.dataclass
class Cursor:
    """A user Stateful's own object: not in the encoding, not in torch's allow-list."""

    shard: str
    offset: int


def test_an_object_outside_the_allow_list_is_refused_naming_its_key_and_the_remedy(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save({"w": torch.ones(2), "loader": {"cursor": Cursor("a", 7)}}, step=1)
    with pytest.raises(StoreError) as info:
        store.load()
    message = str(info.value)
    assert "state.tensors: at ['loader']['cursor']: a test_format_fallback.Cursor" in message
    assert "torch.load(weights_only=True) refuses" in message and "unsafe_allow_pickle=True" in message
    loaded = store.load(unsafe_allow_pickle=True)
    assert loaded["loader"]["cursor"] == Cursor("a", 7) and loaded["w"].tolist() == [1.0, 1.0]


def test_the_refusal_does_not_fall_back_to_an_older_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save({"w": torch.zeros(1)}, step=1)
    store.save({"w": torch.ones(1), "x": Cursor("b", 1)}, step=2)
    with pytest.raises(StoreError, match=r"at \['x'\]"):
        store.load()  # the file is sound: the caller decides, no silent substitute


def test_allow_listed_values_and_sparse_tensors_load_without_full_pickle(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    sparse = torch.eye(3).to_sparse()
    store.save({"sparse": sparse, "set": {1, 2}, "bytearray": bytearray(b"ab")}, step=1)
    loaded = store.load()
    assert torch.equal(loaded["sparse"].to_dense(), torch.eye(3)) and loaded["sparse"].is_sparse
    assert loaded["set"] == {1, 2} and loaded["bytearray"] == bytearray(b"ab")


def test_a_meta_tensor_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    with pytest.raises(UsageError, match=r"at \['model'\]\['weight'\]: a meta tensor holds no data"):
        store.save(TrainState(model=torch.nn.Linear(2, 2, device="meta")))
    assert store.list() == []
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == []


def test_a_state_nested_too_deep_is_refused_at_save(tmp_path: Path) -> None:
    deep: list[object] = []
    for _ in range(80):
        deep = [deep]
    with pytest.raises(UsageError, match=r"nested deeper than 64 levels"):
        CheckpointStore(tmp_path / "run").save({"deep": deep}, step=1)
