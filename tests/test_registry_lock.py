"""The registry lock under contention (issue 13): every writer gets through, each commit has its own sequence
number with none skipped, and the threads of one process exclude each other although POSIX fcntl locks belong
to the whole process."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import store_workers
from paths import WORKERS

from hpcckpt import CheckpointStore, StoreError
from hpcckpt.store.registry import Registry

WRITERS, COMMITS = 4, 5

HOLD_UNTIL_TOLD = """
import sys
from pathlib import Path
from hpcckpt.store.registry import Registry
with Registry(Path(sys.argv[1]), lock="fcntl").locked():
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def _writer(run_dir: Path, first: int) -> subprocess.Popen[str]:
    steps = ",".join(str(first + k) for k in range(COMMITS))
    code = f"import store_workers, sys; store_workers.save_steps(sys.argv[1], [{steps}], 4)"
    return subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=WORKERS, text=True)


def test_concurrent_writer_processes_all_finish_with_one_gapless_commit_order(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir)
    writers = [_writer(run_dir, 100 * (i + 1)) for i in range(WRITERS)]
    for writer in writers:
        assert writer.wait(timeout=280) == 0
    checkpoints = CheckpointStore(run_dir, create=False).list()
    # Each commit took the next number: no number twice, none skipped, whoever waited.
    assert [c.seq for c in checkpoints] == list(range(1, WRITERS * COMMITS + 1))
    for i in range(WRITERS):  # each writer's own saves in the order it made them
        mine = [c.step for c in checkpoints if c.step // 100 == i + 1]
        assert mine == [100 * (i + 1) + k for k in range(COMMITS)]
    events = [e for e in Registry(run_dir).events() if e["event"] == "commit"]
    # The log tells each commit once. (Its order is the renames'; the numbers are handed out before each
    # writer writes its manifest, so two writers' commits may land in the other order.)
    assert sorted(e["name"] for e in events) == sorted(c.name for c in checkpoints)


def test_threads_of_one_process_commit_one_at_a_time_while_another_lists(tmp_path: Path) -> None:
    # An async save's background thread commits while the main thread lists; here two committing threads,
    # each with its own store of the run: fcntl alone would let both hold the lock at once.
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir)
    committed: list[str] = []
    errors: list[BaseException] = []

    def save(first: int) -> None:
        store = CheckpointStore(run_dir, create=False, keep_last=None)
        try:
            for step in range(first, first + COMMITS):
                committed.append(store.save(store_workers.payload(step, 4), step=step).name)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=save, args=(first,)) for first in (100, 200)]
    for thread in threads:
        thread.start()
    reader = CheckpointStore(run_dir, create=False)
    while any(thread.is_alive() for thread in threads):
        before = list(committed)
        listed = [c.name for c in reader.list()]
        assert set(before) <= set(listed)  # nothing committed before the listing began is missing
    for thread in threads:
        thread.join()
    assert errors == []
    checkpoints = reader.list()
    assert [c.seq for c in checkpoints] == list(range(1, 2 * COMMITS + 1))
    assert sorted(c.name for c in checkpoints) == sorted(committed)


def test_a_lock_held_by_another_thread_times_out_with_the_usual_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir)
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with Registry(run_dir).locked():
            holding.set()
            done.wait(timeout=120)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(timeout=60)
        blocked = Registry(run_dir, lock_timeout=0.2)
        with pytest.raises(StoreError, match=r"could not lock .*\.hpcckpt\.lock within 0\.2 s: another process"):
            blocked.locked().__enter__()
    finally:
        done.set()
        holder.join(timeout=60)
    with Registry(run_dir, lock_timeout=60).locked():
        pass  # free again once its holder let go


def _hold_once(run_dir: Path, before_release: Callable[[], None]) -> None:
    """Another process takes the registry lock, ``before_release`` runs, then it lets go and exits."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_UNTIL_TOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        before_release()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0


def test_a_wait_given_up_never_leaves_the_lock_taken(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir)
    registry = Registry(run_dir, lock="fcntl", lock_timeout=0.2)

    def give_up() -> None:
        with pytest.raises(StoreError, match=r"within 0\.2 s"):
            registry.locked().__enter__()

    _hold_once(run_dir, give_up)
    # The waiter that gave up got the lock when the holder let go, and released it: another process takes it,
    _hold_once(run_dir, lambda: None)
    with Registry(run_dir, lock="fcntl", lock_timeout=60).locked():
        pass  # and so does this process again
