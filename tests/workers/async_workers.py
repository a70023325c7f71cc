"""A process the async kill test starts and kills: it saves in the background, step after step.

Kept in its own module so multiprocessing's forkserver can import it with torch already loaded.
"""

from __future__ import annotations

import os

import torch

from hpcckpt import CheckpointStore


def save_async_forever(run_dir: str, progress: str, numel: int, keep_last: int) -> None:
    """Resume after the latest checkpoint; each step fills the weights with the step number, saves them in
    the background and scribbles over them at once (training goes on); a step is logged once the save
    after it has returned, which waits for it to commit."""
    store = CheckpointStore(run_dir, keep_last=keep_last)
    latest = store.latest()
    step = 0 if latest is None else latest.step
    weights = torch.zeros(numel)
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    previous = None
    while True:
        step += 1
        weights.fill_(float(step))
        handle = store.save({"w": weights, "step_seen": step}, step=step, blocking=False)
        weights.fill_(-1.0)  # the next training step, while the save is written
        if previous is not None:
            os.write(fd, f"{previous.wait().step}\n".encode())
        previous = handle
