"""The mirror's order, retention and sweep as the review of issue 14 found them wanting: checkpoints pushed late
never pass for the newest, another process's upload in progress is never swept, a checkpoint whose files are gone
is not the one protected, a path mirror never follows a symbolic link, temporaries of killed copies go, and a
remote file longer than its manifest is never read to its end."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
import torch

from hpcckpt import TrainState
from hpcckpt.cli.main import main
from hpcckpt.errors import CorruptCheckpointError, UsageError
from hpcckpt.store.mirror import Mirror
from hpcckpt.store.store import CheckpointStore

HOURS_AGO = time.time() - 2 * 3600


def _steps(mirror: Mirror) -> list[int]:
    return [c.step for c in mirror.list()]


def test_older_checkpoints_pushed_late_never_become_the_newest_nor_push_the_newest_out(
    tmp_path: Path, mirror_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    store = CheckpointStore(run, keep_last=6, mirror=mirror_url, mirror_keep_last=2)
    for step in range(1, 7):
        store.save(TrainState(extra={"s": step}), step=step)
        assert store.uploads.wait(60) == []
    mirror = Mirror(mirror_url, keep_last=None)
    assert _steps(mirror) == [5, 6]

    assert main(["push", str(run), mirror_url]) == 0  # the run's older steps, archived late
    assert _steps(mirror) == [1, 2, 3, 4, 5, 6]  # commit order, not upload order
    out = capsys.readouterr().out
    assert "4 pushed, 2 already there" in out
    assert "older than the mirror's newest (step_000000006, step 6)" in out

    shutil.rmtree(run)  # purged: the next task resumes from the mirror
    resumed = CheckpointStore(run, keep_last=6, mirror=mirror_url, mirror_keep_last=2)
    state = TrainState(extra={})
    assert resumed.restore(state).step == 6
    assert state.extra == {"s": 6}
    resumed.save(TrainState(extra={"s": 7}), step=7)
    assert resumed.uploads.wait(60) == []
    assert _steps(mirror) == [6, 7]  # retention let the old ones go, never 5 or 6 before them


def test_another_process_upload_in_progress_is_never_swept(tmp_path: Path, mirror_url: str) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    saved = [store.save({"w": torch.full((100,), float(step))}, step=step) for step in (1, 2, 3, 4)]
    ours = Mirror(mirror_url, keep_last=3)
    for checkpoint in saved[:3]:
        ours.upload(checkpoint)
    theirs = Mirror(mirror_url, keep_last=3)  # e.g. `hpcckpt push` in another process
    send_manifest = theirs.location.put_bytes
    swept: list[list[str]] = []

    def retention_runs_first(name: str, data: bytes) -> None:
        swept.append(ours.retain())  # its data files are all there, its manifest not yet
        send_manifest(name, data)

    theirs.location.put_bytes = retention_runs_first  # type: ignore[method-assign]
    theirs.upload(saved[3])
    assert swept == [[]]
    assert _steps(ours) == [1, 2, 3, 4]
    newest = ours.newest_valid()
    assert newest is not None and newest.step == 4


def test_retention_protects_the_newest_checkpoint_whose_files_are_there(tmp_path: Path, mirror_url: str) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    mirror = Mirror(mirror_url, keep_last=None)
    for step in (1, 2, 3, 4):
        mirror.upload(store.save({"w": torch.full((100,), float(step))}, step=step))
    mirror.location.remove("checkpoints/step_000000004/state.tensors")  # a manifest whose data went
    removed = Mirror(mirror_url, keep_last=1).retain()
    assert removed == ["step_000000001", "step_000000002"]
    with pytest.warns(UserWarning, match="step_000000004 is unusable"):
        usable = mirror.newest_valid()
    assert usable is not None and usable.step == 3


def test_a_path_mirror_never_follows_a_symbolic_link_when_it_deletes(tmp_path: Path) -> None:
    victim = CheckpointStore(tmp_path / "victim", keep_last=None).save({"w": torch.ones(3)}, step=1)
    before = sorted(os.listdir(victim.path))
    mirror = Mirror(str(tmp_path / "mirror"), keep_last=1)
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    for step in (2, 3):
        mirror.upload(store.save({"w": torch.randn(3)}, step=step))
    checkpoints = tmp_path / "mirror" / "checkpoints"
    (checkpoints / victim.name).symlink_to(victim.path)  # linked in by hand, or a crafted mirror
    with pytest.warns(UserWarning, match=r"step_000000001 is a symbolic link; a mirror never follows one"):
        removed = mirror.retain()
    assert removed == ["step_000000002"]  # the link is neither listed nor said to be removed
    assert sorted(os.listdir(victim.path)) == before
    assert (checkpoints / victim.name).is_symlink()
    assert mirror.location.remove_tree(f"checkpoints/{victim.name}") is False
    assert mirror.location.remove(f"checkpoints/{victim.name}/manifest.json") is False
    assert sorted(os.listdir(victim.path)) == before


def test_a_killed_copy_s_temporary_inside_a_kept_checkpoint_is_swept_once_old(tmp_path: Path) -> None:
    mirror = Mirror(str(tmp_path / "mirror"), keep_last=None)
    remote = mirror.upload(CheckpointStore(tmp_path / "run").save({"w": torch.zeros(1000)}, step=1))
    directory = tmp_path / "mirror" / "checkpoints" / remote.name
    # What a copy killed with SIGKILL leaves (its `except BaseException` never runs): a full-size temporary.
    old = directory / ".state.tensors.4242.0a1b2c3d.tmp"
    young = directory / ".state.tensors.4343.deadbeef.tmp"
    for leftover in (old, young):
        shutil.copyfile(directory / "state.tensors", leftover)
    os.utime(old, (HOURS_AGO, HOURS_AGO))
    assert mirror.retain() == [f"{remote.name}/{old.name}"]
    assert sorted(p.name for p in directory.iterdir()) == sorted([young.name, "manifest.json", "state.tensors"])
    assert mirror.verify(remote) is remote


def test_a_remote_file_longer_than_its_manifest_is_read_no_further_than_one_byte_past(
    tmp_path: Path, mirror_url: str
) -> None:
    mirror = Mirror(mirror_url)
    remote = mirror.upload(CheckpointStore(tmp_path / "run").save({"w": torch.zeros(10)}, step=1))
    record = remote.files[0]
    name = f"checkpoints/{remote.name}/{record.name}"
    mirror.location.put_bytes(name, mirror.location.get_bytes(name) + b"\0" * (3 << 20))  # grew by 3 MiB
    read: list[int] = []
    opened = mirror.location.open_read

    @contextmanager
    def counting(path: str) -> Iterator[IO[bytes]]:
        with opened(path) as handle:
            real = handle.read

            def read_some(n: int = -1) -> bytes:
                data = real(n)
                read.append(len(data))
                return data

            handle.read = read_some  # type: ignore[method-assign]
            yield handle

    mirror.location.open_read = counting  # type: ignore[method-assign]
    with pytest.raises(CorruptCheckpointError, match=rf"size {record.size + 1} bytes, the manifest says .*\(longer\)"):
        mirror.verify(remote)
    assert sum(read) == record.size + 1


@pytest.mark.parametrize("grace", [-1, float("nan"), "1h", True])
def test_a_bad_grace_is_refused_naming_it(tmp_path: Path, grace: object) -> None:
    with pytest.raises(UsageError, match=r"Invalid grace=.*: expected seconds >= 0, e.g. 3600"):
        Mirror(str(tmp_path / "mirror"), grace=grace)  # type: ignore[arg-type]
