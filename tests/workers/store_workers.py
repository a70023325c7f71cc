"""Processes the fault tests start and kill: each saves checkpoints in a loop.

Kept in their own module so multiprocessing's forkserver can import them with torch already loaded,
which makes a hundred kill-and-restart cycles take seconds instead of minutes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from hpcckpt import CheckpointStore


def payload(step: int, numel: int) -> dict[str, object]:
    # The tensor's values encode the step, so a loaded checkpoint proves which save it came from.
    return {"w": torch.full((numel,), float(step)), "step_seen": step}


def save_forever(run_dir: str, progress: str, numel: int, keep_last: int) -> None:
    """Resume after the latest checkpoint and save step after step, logging each committed step."""
    store = CheckpointStore(run_dir, keep_last=keep_last)
    latest = store.latest()
    step = 0 if latest is None else latest.step
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while True:
        step += 1
        store.save(payload(step, numel), step=step)
        os.write(fd, f"{step}\n".encode())  # written only after save() returned: committed


def save_steps(run_dir: str, steps: list[int], numel: int) -> None:
    store = CheckpointStore(run_dir, keep_last=None)
    for step in steps:
        store.save(payload(step, numel), step=step, metrics={"writer": float(os.getpid())})


if __name__ == "__main__":  # python store_workers.py RUN_DIR NUMEL: save until the disk fills
    store = CheckpointStore(sys.argv[1], keep_last=None)
    store.save(payload(1, 16), step=1)
    store.save(payload(2, int(sys.argv[2])), step=2)
    Path(sys.argv[1], "unexpected-success").touch()


def save_until(run_dir: str, seconds: float, numel: int) -> None:
    """Save with keep_last=1 for a while: every save deletes the previous checkpoint."""
    store = CheckpointStore(run_dir, keep_last=1)
    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        step += 1
        store.save(payload(step, numel), step=step)


def hold_owner_lock(directory: str, ready: str) -> None:
    """Hold the writer's lock on a temporary checkpoint directory, as a live writer does, until killed."""
    import fcntl

    fd = os.open(os.path.join(directory, ".owner"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    Path(ready).touch()
    time.sleep(600)
