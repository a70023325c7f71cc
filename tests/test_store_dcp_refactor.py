"""What a sharded (dcp) save did before the one save transaction, and still does: it refuses a tag, per-save
metadata and a dict with the message it always gave, takes the step and epoch from the TrainState, checks
its arguments in the old order, says a failure's reason once, and leaves no temporary directory when
interrupted; and the benchmark's registry commit times the registry commit alone."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hpcckpt import CheckpointStore, StoreError, TrainState, UsageError
from hpcckpt.store import registry as registry_module
from hpcckpt.store import transaction as transaction_module

REFUSED = "a sharded (dcp) save takes a TrainState, without tag or metadata"


def _store(tmp_path: Path) -> tuple[CheckpointStore, TrainState]:
    """A dcp store with one checkpoint, at step 1, and the state that saved it."""
    store = CheckpointStore(tmp_path / "run", keep_last=None, format="dcp", metadata={"lr": 0.1})
    state = TrainState(model=nn.Linear(2, 2), step=1, epoch=1)
    store.save(state)
    return store, state


def _hidden(store: CheckpointStore) -> list[str]:
    return sorted(p.name for p in store.registry.checkpoint_dir.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("state", "arguments"),
    [
        ("train", {"tag": "warm"}),
        ("train", {"tag": "not a tag"}),  # refused as a sharded save's tag before it is judged as a tag
        ("train", {"metadata": {"note": "x"}}),
        ("dict", {"step": 4}),
    ],
)
def test_a_sharded_save_refuses_a_tag_metadata_or_a_dict_as_it_always_did(
    tmp_path: Path, state: str, arguments: dict[str, Any]
) -> None:
    store, train = _store(tmp_path)
    saved = train if state == "train" else {"w": torch.ones(1)}
    with pytest.raises(UsageError) as raised:
        store.save(saved, **arguments)
    assert str(raised.value) == REFUSED
    assert [c.step for c in store.list()] == [1] and _hidden(store) == []


def test_a_sharded_save_records_the_stores_metadata_and_no_tag(tmp_path: Path) -> None:
    store, train = _store(tmp_path)
    train.step = 2
    checkpoint = store.save(train, metadata={})  # empty per-save metadata was always accepted
    manifest = json.loads((checkpoint.path / "manifest.json").read_text())
    assert (manifest["tag"], manifest["metadata"]) == (None, {"lr": 0.1})


def test_a_sharded_save_takes_the_states_step_and_epoch_not_explicit_ones(tmp_path: Path) -> None:
    store, train = _store(tmp_path)
    train.step, train.epoch = 3, 2
    checkpoint = store.save(train, step=9, epoch=5)
    assert (checkpoint.name, checkpoint.step, checkpoint.epoch) == ("step_000000003", 3, 2)
    assert (store.load(3)["step"], store.load(3)["epoch"]) == (3, 2)


@pytest.mark.parametrize("format", ["torch", "dcp"])
def test_a_bad_step_is_reported_before_a_bad_tag(tmp_path: Path, format: str) -> None:
    store = CheckpointStore(tmp_path / "run", format=format)
    with pytest.raises(UsageError, match=r"^Invalid step=-1: expected a whole number >= 0$"):
        store.save(TrainState(model=nn.Linear(2, 2)), step=-1, tag="not a tag")
    with pytest.raises(UsageError, match=r"^Invalid metric a='x': expected a number$"):
        store.save(TrainState(model=nn.Linear(2, 2)), metrics={"a": "x"}, tag="not a tag")


def test_a_sharded_save_that_cannot_make_its_directory_says_why_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, train = _store(tmp_path)

    def full(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(os, "mkdir", full)
    with pytest.raises(StoreError) as raised:
        store.save(train)
    monkeypatch.undo()
    checkpoints = store.registry.checkpoint_dir
    assert str(raised.value).startswith(
        f"cannot make a temporary directory in {checkpoints}: [Errno 28] No space left on device: "
        f"'{checkpoints}/.claim-000000001-"
    )
    assert "could not save" not in str(raised.value)
    assert [c.step for c in store.list()] == [1] and _hidden(store) == []


def test_a_sharded_save_whose_commit_fails_says_why_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, train = _store(tmp_path)
    train.step = 2

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(registry_module.Registry, "commit", broken)
    with pytest.raises(StoreError) as raised:
        store.save(train)
    monkeypatch.undo()
    assert str(raised.value) == "rank 0 could not commit step 2: [Errno 5] Input/output error"
    assert [c.step for c in store.list()] == [1] and _hidden(store) == []


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_sharded_save_leaves_no_temporary_and_the_previous_checkpoint_latest(
    tmp_path: Path, interrupt: type[BaseException]
) -> None:
    store, train = _store(tmp_path)
    train.step = 2
    seen: list[str] = []

    def interrupted(module: Any, state_dict: Any, prefix: str, local_metadata: Any) -> None:
        seen.extend(_hidden(store))  # the save is under way: its state is being gathered
        raise interrupt

    assert train.model is not None
    hook = train.model.register_state_dict_post_hook(interrupted)
    with pytest.raises(interrupt):
        store.save(train)
    hook.remove()
    assert len(seen) == 1 and seen[0].startswith(".tmp-000000002-")
    assert _hidden(store) == []  # neither the temporary directory nor its owner lock is left
    latest = store.latest()
    assert latest is not None and latest.step == 1
    train.step = 3
    assert store.save(train).step == 3  # and the store saves on


def test_the_registry_commit_benchmark_times_the_registry_commit_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcckpt.bench.registry import timed_commits

    describing = transaction_module._versions

    def slow() -> dict[str, str]:  # the checkpoint's description (versions, host): before the commit
        time.sleep(0.5)
        return describing()

    monkeypatch.setattr(transaction_module, "_versions", slow)
    commit_ms = timed_commits(CheckpointStore(tmp_path / "registry", keep_last=None), first_step=1, samples=3)
    assert len(commit_ms) == 3
    assert max(commit_ms) < 500, commit_ms
