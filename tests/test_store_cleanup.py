"""Cleaning leftovers without harming live writers (issue 11): a cleaner never removes the temporary
directory of a writer that is still taking ownership of it, and a bandwidth probe left by a killed
process is removed by the next save.

The races are made deterministic with a fault hook at the process edge: the writer's process runs with
``fcntl.lockf`` (or ``os.fsync``) wrapped so that it stops at the chosen instant, announces it with a
file, and goes on when the test creates another; in between, the test runs a cleaner or kills it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import store_workers
from harness import clean_env
from paths import WORKERS

from hpcckpt import CheckpointStore

# Wraps fcntl.lockf: the first lock taken on a ".owner" file waits for the test (argv[1] paused, argv[2] go).
HOLD_BEFORE_OWNER_LOCK = """
import fcntl, os, sys, time
from pathlib import Path
paused, go = Path(sys.argv[1]), Path(sys.argv[2])
real_lockf = fcntl.lockf
def lockf(fd, *args):
    if os.readlink(f"/proc/self/fd/{fd}").endswith("/.owner") and not paused.exists():
        paused.touch()
        while not go.exists():
            time.sleep(0.01)
    return real_lockf(fd, *args)
fcntl.lockf = lockf
sys.argv = sys.argv[2:]
"""

SAVE_ONE = """
import store_workers
from hpcckpt import CheckpointStore
store = CheckpointStore(sys.argv[1], keep_last=None)
print(store.save(store_workers.payload(1, 1 << 16), step=1).name, flush=True)
"""

# Wraps os.fsync: the fsync of the bandwidth probe waits for the test.
HOLD_IN_PROBE = """
import os, sys, time
from pathlib import Path
paused, go = Path(sys.argv[1]), Path(sys.argv[2])
real_fsync = os.fsync
def fsync(fd):
    if ".bandwidth-probe-" in os.readlink(f"/proc/self/fd/{fd}"):
        paused.touch()
        while not go.exists():
            time.sleep(0.01)
    return real_fsync(fd)
os.fsync = fsync
"""

# A model of 2 MiB: Run measures the disk's write bandwidth before its first save.
TRAIN = """
import torch
from hpcckpt import Run, TrainState
torch.set_num_threads(1)
model = torch.nn.Linear(1024, 512)
with Run(sys.argv[3], TrainState(model=model), total_steps=3) as run:
    for _ in run:
        model.weight.data.add_(1.0)
print("completed" if run.completed else "not completed", flush=True)
"""


def _start(code: str, *args: str | Path) -> subprocess.Popen[str]:
    env = clean_env()
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=WORKERS,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 300) -> None:
    """Until ``path`` exists; the timeout only guards against a hang (imports take seconds under load)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the process ended ({process.returncode}) before {path.name}: {err}")
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.02)


def _hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


@pytest.mark.timeout(600)
def test_a_cleaner_between_a_writer_s_mkdir_and_its_lock_never_removes_the_writer_s_directory(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    cleaner = CheckpointStore(run_dir, keep_last=None)
    paused, go = tmp_path / "paused", tmp_path / "go"
    writer = _start(HOLD_BEFORE_OWNER_LOCK + SAVE_ONE, paused, go, run_dir)
    try:
        _wait_for(paused, writer)
        # The writer has made its directory and its owner file, and not locked it yet. Another process
        # saves now, which cleans leftovers first.
        assert len(_hidden(run_dir)) == 1
        assert cleaner.registry.clean_temporaries() == []
        cleaner.save(store_workers.payload(2, 4), step=2)
        go.touch()
        out, err = writer.communicate(timeout=300)
    finally:
        writer.kill()
    assert writer.returncode == 0, err
    assert out.strip() == "step_000000001"
    assert sorted(c.step for c in cleaner.list()) == [1, 2]
    assert float(cleaner.load(1)["w"][0]) == 1.0
    assert _hidden(run_dir) == []


@pytest.mark.timeout(600)
def test_a_writer_killed_while_taking_ownership_leaves_nothing_after_the_next_save(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir, keep_last=None)
    paused, go = tmp_path / "paused", tmp_path / "go"
    writer = _start(HOLD_BEFORE_OWNER_LOCK + SAVE_ONE, paused, go, run_dir)
    try:
        _wait_for(paused, writer)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.communicate(timeout=60)
    assert len(_hidden(run_dir)) == 1  # what it left
    store.save(store_workers.payload(2, 4), step=2)
    assert _hidden(run_dir) == []
    assert [c.step for c in store.list()] == [2]


def _start_training_held_in_probe(tmp_path: Path, run_dir: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    paused, go = tmp_path / "paused", tmp_path / "go"
    # 600,000 floats of extra state (2.4 MB): Run measures the disk's bandwidth before its first save.
    training = _start(HOLD_IN_PROBE + TRAIN, paused, go, run_dir)
    _wait_for(paused, training)
    return training, paused, go


@pytest.mark.timeout(600)
def test_a_run_killed_during_its_bandwidth_probe_leaves_no_probe_file_after_the_next_save(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    training, _, _ = _start_training_held_in_probe(tmp_path, run_dir)
    training.send_signal(signal.SIGKILL)
    training.communicate(timeout=60)
    probes = [name for name in _hidden(run_dir) if name.startswith(".bandwidth-probe-")]
    assert len(probes) == 1  # the killed process's file, 16 MiB when the disk is slow
    store = CheckpointStore(run_dir)
    store.save(store_workers.payload(1, 4), step=1)
    assert _hidden(run_dir) == []


@pytest.mark.timeout(600)
def test_a_live_run_s_bandwidth_probe_is_not_taken_for_a_leftover(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    training, _, go = _start_training_held_in_probe(tmp_path, run_dir)
    try:
        probes = [name for name in _hidden(run_dir) if name.startswith(".bandwidth-probe-")]
        assert len(probes) == 1
        CheckpointStore(run_dir).registry.clean_temporaries()
        assert probes[0] in _hidden(run_dir)  # its prober holds the lock on it
        go.touch()
        out, err = training.communicate(timeout=300)
    finally:
        training.kill()
    assert training.returncode == 0, err
    assert out.strip() == "completed"
    assert _hidden(run_dir) == []
