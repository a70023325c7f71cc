"""kill -9 while a background save persists: the previous latest stays intact, nothing partial shows."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import async_workers
import pytest
import torch
from harness import wait_for

from hpcckpt import CheckpointStore


@pytest.fixture(scope="module")
def forkserver() -> Iterator[multiprocessing.context.ForkServerContext]:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "hpcckpt", "async_workers"])
    return context


def committed_steps(progress: Path) -> list[int]:
    if not progress.exists():
        return []
    return [int(line) for line in progress.read_text().split("\n")[:-1] if line]  # a torn last line is not counted


def temporaries(run_dir: Path) -> set[str]:
    try:
        return {p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")}
    except FileNotFoundError:
        return set()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("kills", "numel", "keep_last"), [(30, 1 << 18, 1), (20, 1 << 20, 2)])
def test_kill_9_during_background_persists_never_loses_the_latest(
    tmp_path: Path, forkserver: multiprocessing.context.ForkServerContext, kills: int, numel: int, keep_last: int
) -> None:
    """The saver is SIGKILLed once it has begun its k-th background save (k drawn at random), at whatever
    point that save then is: writing, syncing, committing, or retention deleting the previous one. After
    each kill the latest checkpoint verifies and loads the weights of its own step (never the values
    training wrote after save() returned), and is at most two steps past the last one logged committed
    (the one committed but not yet logged, and the one in flight)."""
    run_dir, progress = tmp_path / "run", tmp_path / "progress"
    rng = random.Random(4321 + numel)
    known = 0
    for kill in range(kills):
        worker = forkserver.Process(
            target=async_workers.save_async_forever, args=(str(run_dir), str(progress), numel, keep_last)
        )
        seen: set[str] = set()
        target = rng.randint(1, 4)
        worker.start()

        def begun(seen: set[str] = seen, target: int = target) -> bool:
            seen.update(temporaries(run_dir))
            return len(seen) >= target

        wait_for(begun, 120, f"the worker's background save number {target}", interval=0.002)
        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        worker.join(timeout=30)
        assert worker.exitcode == -signal.SIGKILL

        known = max([known, *committed_steps(progress)[-1:]])
        store = CheckpointStore(run_dir, keep_last=keep_last)
        latest = store.latest()
        if latest is None:
            assert known == 0, f"kill {kill}: step {known} was committed but latest() is None"
            continue
        assert known <= latest.step <= known + 2, f"kill {kill}: committed {known}, latest {latest.step}"
        known = latest.step
        store.verify(latest)
        state = store.load()
        assert state["step_seen"] == latest.step
        assert float(state["w"].min()) == float(state["w"].max()) == latest.step, "the snapshot, not later values"
    # Leftovers of killed writers are cleaned by the next save, never counted as checkpoints.
    store = CheckpointStore(run_dir, keep_last=keep_last)
    store.save({"w": torch.zeros(4), "step_seen": 10**6}, step=10**6, blocking=False).wait()
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert store.list()[-1].step == 10**6
