"""The store under faults: kill -9 at random moments, many writers at once, a full disk."""

from __future__ import annotations

import multiprocessing
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import store_workers
from unprivileged import as_nobody

from hpcckpt import CheckpointStore, StoreError


@pytest.fixture(scope="module")
def forkserver() -> Iterator[multiprocessing.context.ForkServerContext]:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "hpcckpt", "store_workers"])
    return context


def _committed_steps(progress: Path) -> list[int]:
    if not progress.exists():
        return []
    return [int(line) for line in progress.read_text().split("\n")[:-1] if line]  # a torn last line is not counted


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("kills", "numel", "keep_last"), [(70, 1 << 18, 2), (40, 1 << 10, 1)])
def test_kill_9_at_random_moments_never_loses_a_commit(
    tmp_path: Path, forkserver: multiprocessing.context.ForkServerContext, kills: int, numel: int, keep_last: int
) -> None:
    """A saver is SIGKILLed at random moments (writing, renaming, committing, deleting old checkpoints);
    after each kill the latest checkpoint verifies, loads, and is the last one committed or the one
    that was being committed when the kill came."""
    run_dir, progress = tmp_path / "run", tmp_path / "progress"
    rng = random.Random(1234 + numel)
    # The newest step known to be committed: logged by a worker, or found as the latest after an earlier
    # kill. A worker killed between its commit and its log line leaves a commit the log does not show; the
    # next worker resumes from it, so under load two such kills in a row put the latest two steps past the
    # log (seen in a loaded run). What must hold: the latest is that step, or the one being committed.
    known = 0
    for kill in range(kills):
        before = _committed_steps(progress)
        worker = forkserver.Process(
            target=store_workers.save_forever, args=(str(run_dir), str(progress), numel, keep_last)
        )
        worker.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        worker.join(timeout=30)
        assert worker.exitcode == -signal.SIGKILL

        committed = _committed_steps(progress)
        known = max([known, *committed[-1:]])
        store = CheckpointStore(run_dir, keep_last=keep_last)
        latest = store.latest()
        if latest is None:
            assert known == 0, f"kill {kill}: step {known} was committed but latest() is None"
            continue
        assert latest.step in (known, known + 1), f"kill {kill}: committed {known}, latest {latest.step}"
        known = latest.step
        store.verify(latest)
        state = store.load()
        assert state["step_seen"] == latest.step and float(state["w"][0]) == latest.step
        assert len(committed) >= len(before)
    # Leftovers of killed writers are cleaned by the next save, never counted as checkpoints.
    store = CheckpointStore(run_dir, keep_last=keep_last)
    store.save(store_workers.payload(10**6, 4), step=10**6)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert [c.step for c in store.list()][-1] == 10**6


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_processes_committing_at_once_lose_no_update(
    tmp_path: Path, forkserver: multiprocessing.context.ForkServerContext
) -> None:
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir)
    writers = 8
    # Writers 0 and 1 also save the same steps, to collide on names.
    plans = [list(range(w + 1, 81, writers)) for w in range(writers)]
    plans[1] = plans[1] + plans[0][:3]
    workers = [
        forkserver.Process(target=store_workers.save_steps, args=(str(run_dir), plan, 1 << 12)) for plan in plans
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
        assert worker.exitcode == 0

    store = CheckpointStore(run_dir, keep_last=None)
    checkpoints = store.list()
    expected = sorted(step for plan in plans for step in plan)
    assert sorted(c.step for c in checkpoints) == expected
    commits = [e for e in store.registry.events() if e["event"] == "commit"]
    assert len(commits) == len(expected) == 83
    assert len({c.name for c in checkpoints}) == 83
    for checkpoint in checkpoints[:: len(checkpoints) // 10]:
        assert float(store.load(checkpoint)["w"][0]) == checkpoint.step


def _assert_failed_save_left_previous_intact(run_dir: Path, message: str) -> None:
    assert "could not save step 2" in message
    assert "the previous checkpoint (step 1) is intact" in message
    store = CheckpointStore(run_dir, keep_last=None)
    assert [c.step for c in store.list()] == [1]
    assert store.load()["step_seen"] == 1
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000000001"]


def _can_mount_tmpfs(target: Path) -> bool:
    if os.geteuid() != 0:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(target)], capture_output=True, check=False, timeout=30
    )
    return result.returncode == 0


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """On a real full filesystem (a 2 MiB tmpfs) when root may mount one, else under a file-size limit."""
    mount = tmp_path / "small"
    mount.mkdir()
    if _can_mount_tmpfs(mount):
        try:
            store = CheckpointStore(mount / "run", keep_last=None)
            store.save(store_workers.payload(1, 16), step=1)
            with pytest.raises(StoreError) as info:
                store.save(store_workers.payload(2, 1 << 20), step=2)  # 4 MiB into 2 MiB
            assert "No space left on device (disk full, quota or file-size limit)" in str(info.value)
            _assert_failed_save_left_previous_intact(mount / "run", str(info.value))
        finally:
            subprocess.run(["umount", str(mount)], check=True, timeout=30)
    _disk_full_under_file_size_limit(tmp_path / "limited")


def _disk_full_under_file_size_limit(run_dir: Path) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing

    result = subprocess.run(
        [sys.executable, str(Path(store_workers.__file__)), str(run_dir), str(1 << 20)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=limit,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "hpcckpt.errors.StoreError: could not save step 2" in result.stderr
    assert "File too large (disk full, quota or file-size limit)" in result.stderr
    _assert_failed_save_left_previous_intact(run_dir, result.stderr)
    assert not (run_dir / "unexpected-success").exists()
    assert CheckpointStore(run_dir).load(1)["step_seen"] == 1


HOLD_LOCK = """
import sys, time
from pathlib import Path
from hpcckpt.store.registry import Registry
registry = Registry(Path(sys.argv[1]), lock=sys.argv[2])
with registry.locked():
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["soft", "fcntl"])
def test_lock_held_by_a_live_process_times_out_clearly_and_a_killed_holder_does_not_block(
    tmp_path: Path, mode: str
) -> None:
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir, lock=mode)  # type: ignore[arg-type]
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir), mode], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            blocked = CheckpointStore(run_dir, lock=mode, lock_timeout=0.5)  # type: ignore[arg-type]
            with pytest.raises(StoreError, match=r"could not lock .*\.hpcckpt\.(soft)?lock within 0\.5 s"):
                blocked.save(store_workers.payload(1, 4), step=1)
            assert blocked.list() == []  # the save that raised committed nothing
            assert [p.name for p in (run_dir / "checkpoints").iterdir()] == []
            holder.kill()  # SIGKILL: no release; a soft lock's marker stays behind
            holder.wait(timeout=30)
            after = CheckpointStore(run_dir, lock=mode, lock_timeout=10)  # type: ignore[arg-type]
            assert after.save(store_workers.payload(1, 4), step=1).step == 1
            assert [c.step for c in after.list()] == [1]
        finally:
            holder.kill()


@pytest.mark.slow
def test_readers_never_fail_while_retention_deletes_under_them(
    tmp_path: Path, forkserver: multiprocessing.context.ForkServerContext
) -> None:
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir).save(store_workers.payload(0, 1 << 16), step=0)
    writer = forkserver.Process(target=store_workers.save_until, args=(str(run_dir), 4.0, 1 << 16))
    writer.start()
    loads = verifies = 0
    reader = CheckpointStore(run_dir, keep_last=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a "corrupt, trying an older one"
        while writer.is_alive():
            state = reader.load()
            assert float(state["w"][0]) == state["step_seen"]
            loads += 1
            result = (
                subprocess.run(
                    ["hpcckpt", "verify", str(run_dir)], capture_output=True, text=True, timeout=60, check=False
                )
                if verifies < 5
                else None
            )
            if result is not None:
                assert result.returncode == 0, result.stdout + result.stderr
                verifies += 1
    writer.join(timeout=30)
    assert writer.exitcode == 0
    assert loads > 20 and verifies == 5


def test_a_live_writer_s_temporary_is_kept_whatever_its_name_says(
    tmp_path: Path, forkserver: multiprocessing.context.ForkServerContext
) -> None:
    """Liveness comes from the writer's lock, not from the pid in the name: a writer in another PID
    namespace (a container on the same node) or on another host is not mistaken for a dead one."""
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir)
    tmp = run_dir / "checkpoints" / f".tmp-000000007-{store.registry.host}-999999-deadbeef"  # no such pid here
    tmp.mkdir()
    ready = tmp_path / "ready"
    holder = forkserver.Process(target=store_workers.hold_owner_lock, args=(str(tmp), str(ready)))
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert store.registry.clean_temporaries() == []
        assert tmp.exists()
    finally:
        holder.kill()
        holder.join(timeout=30)
    assert store.registry.clean_temporaries() == [tmp]  # its writer is gone now
    assert not tmp.exists()


def test_soft_lock_mode_after_fcntl_mode_does_not_wait(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir, lock="fcntl").save(store_workers.payload(1, 4), step=1)
    start = time.monotonic()
    soft = CheckpointStore(run_dir, lock="soft", lock_timeout=5)
    soft.save(store_workers.payload(2, 4), step=2)
    assert time.monotonic() - start < 3
    assert [c.step for c in soft.list()] == [1, 2]


def test_a_read_only_run_directory_can_be_listed_and_loaded(tmp_path: Path) -> None:
    """Another user's run, or a read-only mount: readers reconcile in memory and write nothing."""
    with tempfile.TemporaryDirectory() as parent:
        Path(parent).chmod(0o755)
        run_dir = Path(parent) / "run"
        store = CheckpointStore(run_dir, keep_last=None)
        for step in (1, 2):
            store.save(store_workers.payload(step, 4), step=step)
        (run_dir / "registry.json").unlink()  # an index update was lost: the reader must reconcile
        for path in (run_dir, run_dir / "checkpoints"):
            path.chmod(0o555)

        def read() -> str:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = CheckpointStore(run_dir, create=False)
                return f"{[c.step for c in reader.list()]} {reader.load()['step_seen']}"

        ok, said = as_nobody(read)
        assert ok, said
        assert said == "[1, 2] 2"
        assert not (run_dir / "registry.json").exists()


def test_export_on_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir).save(store_workers.payload(1, 1 << 20), step=1)  # 4 MiB
    out = tmp_path / "exported.pt"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    result = subprocess.run(
        ["hpcckpt", "export", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=limit,
    )
    assert result.returncode == 1
    assert f"hpcckpt export: error: could not write {out}: File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.glob("*exported*")) == []
