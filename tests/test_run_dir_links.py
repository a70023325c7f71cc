"""Nothing in a run directory is followed through a symbolic link (issue 11).

For each kind of file the registry writes or reads, a link planted in its place leads to a file outside
the run directory: the operation is refused with an error naming the link, and the target is unchanged.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import store_workers
from paths import WORKERS

from hpcckpt import CheckpointStore, StoreError
from hpcckpt.budget import measure_write_bandwidth
from hpcckpt.integrations.submitit import _store_result, stored_result
from hpcckpt.store.registry import Registry, host_identity

HOLD_LOCK = "import store_workers, sys; store_workers.hold_owner_lock(*sys.argv[1:])"
TARGET_TEXT = b"precious: outside the run directory\n"


def _outside(tmp_path: Path, name: str = "target") -> Path:
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(TARGET_TEXT)
    return target


def _assert_untouched(target: Path, link: Path, before: os.stat_result | None = None) -> None:
    assert target.read_bytes() == TARGET_TEXT
    assert link.is_symlink()  # the link is left for the user to look at, not replaced
    if before is not None:
        assert os.stat(target).st_mtime_ns == before.st_mtime_ns


def test_a_symlinked_event_log_is_refused_and_its_target_unchanged(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    target = _outside(tmp_path)
    link = store.registry.events_path
    link.symlink_to(target)
    with pytest.raises(StoreError, match=r"events\.jsonl is a symbolic link, refused"):
        store.registry.record("task-begin", job="1")
    with pytest.raises(StoreError, match=r"events\.jsonl is a symbolic link, refused"):
        store.save(store_workers.payload(1, 4), step=1)
    with pytest.raises(StoreError, match=r"events\.jsonl is a symbolic link, refused"):
        store.registry.events()
    _assert_untouched(target, link)
    # The CLI says the same, exit 1, and leaves the target alone.
    result = subprocess.run(
        [sys.executable, "-m", "hpcckpt", "status", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{link} is a symbolic link, refused" in result.stderr
    _assert_untouched(target, link)


def test_a_symlinked_index_is_refused_and_its_target_unchanged(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save(store_workers.payload(1, 4), step=1)
    target = _outside(tmp_path)
    link = store.registry.index_path
    link.unlink()
    link.symlink_to(target)
    fresh = CheckpointStore(tmp_path / "run")
    with pytest.raises(StoreError, match=r"registry\.json is a symbolic link, refused"):
        fresh.list()
    with pytest.raises(StoreError, match=r"registry\.json is a symbolic link, refused"):
        fresh.save(store_workers.payload(2, 4), step=2)
    _assert_untouched(target, link)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000000001"]


@pytest.mark.parametrize("mode", ["fcntl", "soft", "auto"])
def test_a_symlinked_lock_file_is_refused_at_once_and_its_target_unchanged(tmp_path: Path, mode: str) -> None:
    store = CheckpointStore(tmp_path / "run", lock=mode, lock_timeout=20)  # type: ignore[arg-type]
    target = _outside(tmp_path)
    link = tmp_path / "run" / (".hpcckpt.softlock" if mode == "soft" else ".hpcckpt.lock")
    link.symlink_to(target)
    before = os.stat(target)
    start = time.monotonic()
    with pytest.raises(StoreError, match=rf"{link.name} is a symbolic link, refused"):
        store.save(store_workers.payload(1, 4), step=1)
    assert time.monotonic() - start < 10  # refused, not waited for as if another process held it
    _assert_untouched(target, link, before)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == []  # nothing committed


def test_a_symlinked_result_is_refused_and_its_target_unchanged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    registry = Registry(run_dir)
    registry.record("complete", step=3, checkpoint="step_000000003")
    target = tmp_path / "elsewhere" / "result.pkl"
    target.parent.mkdir()
    target.write_bytes(pickle.dumps("someone else's value"))
    link = run_dir / "result.pkl"
    link.symlink_to(target)
    before = target.read_bytes()
    with pytest.raises(StoreError, match=r"refusing to unpickle .*result\.pkl: it is a symbolic link"):
        stored_result(run_dir)  # never unpickles what the link leads to
    with pytest.raises(StoreError, match=r"result\.pkl is a symbolic link, refused"):
        _store_result(registry, {"loss": 0.5})
    assert target.read_bytes() == before and link.is_symlink()


def test_a_symlinked_bandwidth_probe_is_refused_and_its_target_unchanged(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    target = _outside(tmp_path)
    # The probe's name is this process's own (host and pid): where it used to be `.bandwidth-probe-<pid>`,
    # a link under either name must not be written through.
    links = [
        directory / f".bandwidth-probe-{host_identity()}-{os.getpid()}",
        directory / f".bandwidth-probe-{os.getpid()}",
    ]
    for link in links:
        link.symlink_to(target)
    before = os.stat(target)
    with pytest.raises(StoreError, match=r"\.bandwidth-probe-\S+ is a symbolic link, refused"):
        measure_write_bandwidth(directory, nbytes=1 << 20)
    for link in links:
        _assert_untouched(target, link, before)


def test_a_symlinked_owner_file_is_no_writer_s_lock_and_its_target_unchanged(tmp_path: Path) -> None:
    """A dead writer's temporary directory whose ``.owner`` is a link to a file that some live process
    holds locked: the cleaner does not follow the link (it would take that lock for the writer's), it
    judges by the name (a pid that is dead here) and removes the directory; the target stays."""
    store = CheckpointStore(tmp_path / "run")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(outside), str(ready)],
        cwd=WORKERS,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        target = outside / ".owner"
        target.write_bytes(TARGET_TEXT)
        dead = tmp_path / "run" / "checkpoints" / f".tmp-000000007-{store.registry.host}-999999-deadbeef"
        dead.mkdir()
        (dead / ".owner").symlink_to(target)
        assert store.registry.clean_temporaries() == [dead]
        assert not dead.exists()
        assert target.read_bytes() == TARGET_TEXT
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_symlinked_manifest_is_not_read_through(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save(store_workers.payload(1, 4), step=1)
    second = store.save(store_workers.payload(2, 4), step=2)
    target = _outside(tmp_path, "manifest.json")
    target.write_bytes((second.path / "manifest.json").read_bytes())
    (second.path / "manifest.json").unlink()
    (second.path / "manifest.json").symlink_to(target)
    store.registry.index_path.unlink()  # rebuilt from the manifests
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [c.step for c in CheckpointStore(tmp_path / "run").list()] == [1]
    assert any(f"{second.path / 'manifest.json'} is a symbolic link, refused" in str(w.message) for w in caught)
