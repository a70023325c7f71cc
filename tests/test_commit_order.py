"""Checkpoint order does not depend on the saving host's clock (issue 11).

One node's clock is an hour ahead (a fault injected at the process edge: its ``time.time``): the
checkpoint it saves carries a ``created`` an hour in the future. Later saves on other nodes must still
be the latest, retention must keep them, and the crash-loop breaker must see their progress.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import store_workers
from harness import clean_env
from paths import WORKERS

from hpcckpt import CheckpointStore
from hpcckpt.store.registry import Registry

SKEWED_CLOCK = """
import time
real_time = time.time
time.time = lambda: real_time() + 3600.0  # this node's clock is an hour ahead
"""

# One task's training: resume from the latest checkpoint, train one step, save it (keep_last=2).
TRAIN_ONE_STEP = """
import sys
import store_workers
from hpcckpt import CheckpointStore
store = CheckpointStore(sys.argv[1], keep_last=2)
latest = store.latest()
resumed = store.load()["step_seen"] if latest is not None else 0
store.save(store_workers.payload(resumed + 1, 4), step=resumed + 1)
print(resumed, flush=True)
"""


def _env() -> dict[str, str]:
    env = clean_env()
    env["HPCCKPT_BACKEND"] = "local"  # nothing to cancel in a queue
    return env


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=WORKERS, env=_env(), capture_output=True, text=True, timeout=300, check=False)


def _task(run_dir: Path, *, skewed: bool = False) -> int | None:
    """One chain task as the chain script runs it; the step it resumed from, or None if told to leave."""
    hpcckpt = [sys.executable, "-m", "hpcckpt"]
    begin = _run([*hpcckpt, "task-begin", "--run-dir", str(run_dir), "--max-failures", "3"])
    if begin.returncode == 3:
        return None
    assert begin.returncode == 0, begin.stderr
    training = _run([sys.executable, "-c", (SKEWED_CLOCK if skewed else "") + TRAIN_ONE_STEP, str(run_dir)])
    assert training.returncode == 0, training.stderr
    end = _run([*hpcckpt, "task-end", "--run-dir", str(run_dir), "--status", "0", "--max-failures", "3"])
    assert end.returncode == 0, end.stderr
    return int(training.stdout)


def test_a_save_from_a_node_an_hour_ahead_does_not_hide_later_saves(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    skewed = _run([sys.executable, "-c", SKEWED_CLOCK + TRAIN_ONE_STEP, str(run_dir)])
    assert skewed.returncode == 0, skewed.stderr
    store = CheckpointStore(run_dir, keep_last=2)
    (first,) = store.list()
    assert first.step == 1
    for step in (2, 3, 4):
        store.save(store_workers.payload(step, 4), step=step)
        assert store.latest().step == step  # type: ignore[union-attr]
    assert [c.step for c in store.list()] == [3, 4]  # retention deleted the old ones, not the new
    assert [c.seq for c in store.list()] == [3, 4]  # the commit order, from 1 for the skewed node's save
    assert store.load()["step_seen"] == 4
    # The order survives the loss of the index: it is rebuilt from the manifests.
    store.registry.index_path.unlink()
    with pytest.warns(UserWarning, match="rebuilding it from the manifests"):
        assert [c.step for c in CheckpointStore(run_dir).list()] == [3, 4]
    assert json.loads((run_dir / "checkpoints" / "step_000000004" / "manifest.json").read_text())["seq"] == 4


@pytest.mark.timeout(900)
def test_chain_tasks_after_a_skewed_node_resume_from_the_newest_and_the_breaker_sees_progress(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    resumed = [_task(run_dir, skewed=True)] + [_task(run_dir) for _ in range(4)]
    assert resumed == [0, 1, 2, 3, 4]  # each task went on from the one before
    registry = Registry(run_dir)
    assert registry.status() is None  # not marked failed
    ends = [e for e in registry.events() if e["event"] == "task-end"]
    assert [e["progress"] for e in ends] == [True] * 5
    assert [e["latest_step"] for e in ends] == [1, 2, 3, 4, 5]
    store = CheckpointStore(run_dir, keep_last=2)
    assert [c.step for c in store.list()] == [4, 5]
    assert store.load()["step_seen"] == 5


def test_checkpoints_of_an_older_hpcckpt_without_seq_still_load_and_rank_first(tmp_path: Path) -> None:
    """A run directory written before commits were numbered: its checkpoints are ordered by step, then
    time saved, and every new save ranks after them, whatever their recorded times."""
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir, keep_last=None)
    for step in (1, 2, 3):
        store.save(store_workers.payload(step, 4), step=step)
    for checkpoint in store.list():  # as the previous version wrote them: no seq; one stamped an hour ahead
        manifest_path = checkpoint.path / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest.pop("seq", None)
        if checkpoint.step == 2:
            manifest["created"] += 3600
        manifest_path.write_text(json.dumps(manifest))
    store.registry.index_path.unlink()
    old = CheckpointStore(run_dir, keep_last=None)
    with pytest.warns(UserWarning, match="rebuilding it from the manifests"):
        assert [(c.step, c.seq) for c in old.list()] == [(1, None), (2, None), (3, None)]
    assert old.load()["step_seen"] == 3
    new = old.save(store_workers.payload(1, 4), step=1)  # a deliberate rewind to step 1, saved now
    assert new.seq == 1 and new.name == "step_000000001.1"
    assert old.latest() == new
    assert old.load()["step_seen"] == 1
