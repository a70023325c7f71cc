"""The ``dcp`` format in one process (issue 13): each file's checksum is computed while DCP writes it (no file
is read back to be checksummed), and a save may persist in the background, committed at ``wait()``."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hpcckpt import CheckpointStore, TrainState
from hpcckpt.errors import StoreError
from hpcckpt.store.formats import dcpwrite
from hpcckpt.store.manifest import FileRecord, file_digest
from hpcckpt.store.transaction import SaveRequest

DATA = (".metadata", "__0_0.distcp")


def model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def request(store: CheckpointStore, step: int, keep_last: int | None = None) -> SaveRequest:
    def retention(checkpoints: list[Any]) -> list[Any]:
        return checkpoints[:-keep_last] if keep_last else []

    return SaveRequest(registry=store.registry, step=step, epoch=0, metrics={}, retention=retention)


def assert_digests_fresh(checkpoint: Any) -> None:
    """Every file the manifest names, and only those, with its size and a checksum computed afresh."""
    on_disk = sorted(p.name for p in checkpoint.path.iterdir() if p.name not in ("manifest.json", ".owner"))
    assert [f.name for f in checkpoint.files] == on_disk == sorted(DATA)
    for record in checkpoint.files:
        path = checkpoint.path / record.name
        assert record.size == path.stat().st_size > 0, record
        assert record.digest == file_digest(path), record


def test_the_manifest_checksums_of_a_sharded_save_equal_a_fresh_read_of_every_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", format="dcp")
    net = model()
    checkpoint = store.save(TrainState(model=net, optimizer=torch.optim.AdamW(net.parameters()), step=5))
    assert_digests_fresh(checkpoint)
    assert store.verify(checkpoint) == checkpoint


def test_a_sharded_save_reads_none_of_its_files_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path / "run", format="dcp")
    checkpoints = store.registry.checkpoint_dir
    reads: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def note(path: Any, reading: bool) -> None:
        where = Path(os.fsdecode(path))
        if reading and checkpoints in where.parents and where.name in DATA:
            reads.append(where.name)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        note(path, flags & os.O_ACCMODE == os.O_RDONLY)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike):
            note(file, "r" in mode or "+" in mode)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    checkpoint = store.save(TrainState(model=model(), step=1))
    assert reads == [], "the files were read back to be checksummed"
    monkeypatch.undo()
    assert_digests_fresh(checkpoint)
    # The check itself sees reads: verifying the checkpoint reads every file.
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    store.verify(checkpoint)
    assert sorted(reads) == sorted(DATA)


def test_a_file_no_writer_recorded_is_hashed_whole_and_a_recorded_file_that_is_gone_refused(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"written by our stream")
    (tmp_path / "b").write_bytes(b"written past it")
    (tmp_path / "manifest.json").write_bytes(b"{}")
    recorded = FileRecord("a", 21, "xxh3_64:0000000000000001")  # as the writer computed it: kept as it is
    assert dcpwrite.complete(tmp_path, [recorded]) == [recorded, FileRecord("b", 15, file_digest(tmp_path / "b"))]
    with pytest.raises(FileNotFoundError, match=r"gone: \['c'\]"):
        dcpwrite.complete(tmp_path, [recorded, FileRecord("c", 1, "xxh3_64:0000000000000002")])


def test_a_background_save_commits_only_at_wait_and_keeps_its_snapshot(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", format="dcp")
    net = model()
    first = store.save(TrainState(model=net, step=1))
    state = TrainState(model=net, step=2, extra={"history": [0.5, 0.25], "best": torch.tensor(0.25)})
    handle = store.format.save_async(request(store, 2, keep_last=1), state, None)  # type: ignore[attr-defined]
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # training goes on while the part is persisted
        state.extra["best"].fill_(0.125)
    state.extra["history"].append(0.125)
    # Not committed before wait(): the previous checkpoint is the latest and retention has not run.
    assert [c.name for c in store.list()] == [first.name]
    committed = handle.wait()
    assert handle.done()
    assert [c.name for c in store.list()] == [committed.name] == ["step_000000002"], "keep_last=1 at the commit"
    assert handle.wait() == committed, "wait() again returns the same checkpoint"
    assert_digests_fresh(committed)
    restored = TrainState(model=model())
    assert store.restore(restored) == committed
    for key, value in restored.model.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(value, snapshot[key]), key
    extra = store.load(committed)["extra"]
    assert extra["history"] == [0.5, 0.25] and extra["best"].item() == 0.25


def test_a_failed_background_write_raises_at_wait_and_leaves_the_previous_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path / "run", format="dcp")
    net = model()
    first = store.save(TrainState(model=net, step=1))

    def full(self: dcpwrite.HashingStream, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcpwrite.HashingStream, "write", full)
    handle = store.format.save_async(request(store, 2, keep_last=1), TrainState(model=net, step=2), None)  # type: ignore[attr-defined]
    with pytest.raises(StoreError, match=r"step 2 failed, nothing committed: rank 0: .*No space left on device"):
        handle.wait()
    with pytest.raises(StoreError, match="No space left"):
        handle.wait()  # the same failure, again
    assert handle.done()
    assert store.list() == [first]
    assert [p.name for p in store.registry.checkpoint_dir.iterdir()] == [first.name], "the temporary is gone"
    store.verify(first)


def test_wait_with_a_timeout_raises_while_the_part_is_still_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    store = CheckpointStore(tmp_path / "run", format="dcp")
    gate = threading.Event()
    real_write = dcpwrite.HashingStream.write

    def held(self: dcpwrite.HashingStream, data: Any) -> int:
        gate.wait()
        return real_write(self, data)

    monkeypatch.setattr(dcpwrite.HashingStream, "write", held)
    handle = store.format.save_async(request(store, 1), TrainState(model=model(), step=1), None)  # type: ignore[attr-defined]
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.01)
    assert not handle.done() and store.list() == []
    gate.set()
    assert handle.wait(timeout=None).step == 1
    assert [c.step for c in store.list()] == [1]
