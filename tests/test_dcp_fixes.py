"""Review fixes of the ``dcp`` format (issue 13): every file a sharded save commits is whole on disk when it
is fsynced, and a single-process script that ends right after ``save(blocking=False)`` still gets its
checkpoint (with ranks, a save never waited for is said to be uncommitted at exit)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from hpcckpt import CheckpointStore, TrainState


def state(step: int) -> TrainState:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 3))
    return TrainState(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), step=step)


@pytest.mark.parametrize("blocking", [True, False])
def test_every_file_a_sharded_save_commits_is_whole_on_disk_when_it_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocking: bool
) -> None:
    synced: dict[int, list[int]] = {}  # inode -> the file's size at each fsync (a rename keeps the inode)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.setdefault(info.st_ino, []).append(info.st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = CheckpointStore(tmp_path / "run", format="dcp")
    handle = store.save(state(1), blocking=blocking)
    checkpoint = handle if blocking else handle.wait()  # type: ignore[union-attr]
    assert {f.name for f in checkpoint.files} == {".metadata", "__0_0.distcp"}
    for record in checkpoint.files:
        sizes = synced.get((checkpoint.path / record.name).stat().st_ino, [])
        # .metadata was fsynced with 0 of its bytes on disk, the rest written at close, never synced.
        assert record.size in sizes, f"{record.name}: {record.size} bytes committed, fsynced at sizes {sizes}"


def run_script(body: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body), str(run_dir)],
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_a_script_that_ends_right_after_a_sharded_async_save_still_commits_it(tmp_path: Path) -> None:
    script = """
        import sys, torch
        from hpcckpt import CheckpointStore, TrainState
        torch.manual_seed(3)
        net = torch.nn.Linear(4, 4)
        CheckpointStore(sys.argv[1], format="dcp").save(
            TrainState(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), step=7), blocking=False
        )
        """
    run_dir = tmp_path / "run"
    result = run_script(script, run_dir)
    assert result.returncode == 0, result.stderr
    store = CheckpointStore(run_dir, format="dcp")
    assert [c.step for c in store.list()] == [7]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000000007"], "no temporary left"
    torch.manual_seed(3)
    expected = torch.nn.Linear(4, 4).weight
    restored = state(0)
    restored.model = torch.nn.Linear(4, 4)
    restored.optimizer = torch.optim.SGD(restored.model.parameters(), lr=0.1)
    with torch.no_grad():
        restored.model.weight.zero_()
    store.restore(restored)
    assert torch.equal(restored.model.weight, expected)


def test_a_sharded_async_save_never_waited_for_with_ranks_is_said_uncommitted_at_exit(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from hpcckpt.store.formats import dcp

    store = CheckpointStore(tmp_path / "run", format="dcp")
    handle = store.save(state(4), blocking=False)
    assert isinstance(handle, dcp.AsyncDcpSave)
    handle._ranks = 2  # as saved in a process group of 2: the commit is collective, it cannot run at exit
    handle.settle_at_exit()
    err = capfd.readouterr().err
    assert "the sharded async save of step 4 was never waited for and is NOT committed" in err
    assert "call handle.wait() on every rank before exiting" in err
    assert store.list() == []
    handle._ranks = 1
    assert handle.wait().step == 4  # still committable by wait(); then nothing is said at exit
    handle.settle_at_exit()
    assert capfd.readouterr().err == ""
