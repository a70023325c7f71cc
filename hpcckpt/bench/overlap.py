"""Asynchronous saves: how long the training thread is blocked per save, and what a save costs a training
loop in the end (its net stall), for hpcckpt's ``store.save(state, blocking=False)`` and ``dcp.async_save``.

Blocked time is from the call to its return (the snapshot), in steady state: one untimed save first, so
reusable staging buffers exist, as they do from a run's second save on. The net stall is the time of a loop
that saves every few steps minus the same loop without saves, divided by the number of saves; the loop waits
for a save still in flight before starting the next one and for the last one at its end, so nothing is left
uncounted. On a 2-core machine the background writer competes with the training step for the cores, which
limits the overlap: the figure is reported as measured.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .restore import Trainee


class HpcckptAsync:
    """Saves of one trainee through one store (keep_last=1), as a run makes them."""

    def __init__(self, subject: Trainee, directory: Path) -> None:
        from ..store.store import CheckpointStore

        self.subject = subject
        self.store = CheckpointStore(directory, keep_last=1)
        self.step = 0
        self.handle: Any = None

    def start(self) -> None:
        self.step += 1
        self.handle = self.store.save(self.subject.state(), step=self.step, blocking=False)

    def wait(self) -> None:
        if self.handle is not None:
            self.handle.wait()
            self.handle = None


class DcpAsync:
    """``dcp.async_save`` of the trainee's model and optimizer state dicts, one directory per save."""

    def __init__(self, subject: Trainee, directory: Path) -> None:
        self.subject = subject
        self.directory = directory
        self.step = 0
        self.future: Any = None

    def start(self) -> None:
        from torch.distributed.checkpoint.state_dict_saver import async_save

        from .contenders import single_process

        self.step += 1
        state = {"model": self.subject.model.state_dict(), "optimizer": self.subject.optimizer.state_dict()}
        with single_process():
            self.future = async_save(state, checkpoint_id=str(self.directory / f"step-{self.step}"))

    def wait(self) -> None:
        if self.future is not None:
            with _quiet():
                self.future.result()
            self.future = None
            shutil.rmtree(self.directory / f"step-{self.step - 1}", ignore_errors=True)  # keep the last one


class HpcckptSync:
    """hpcckpt's synchronous save, the reference for the net stall."""

    def __init__(self, subject: Trainee, directory: Path) -> None:
        from ..store.store import CheckpointStore

        self.subject = subject
        self.store = CheckpointStore(directory, keep_last=1)
        self.step = 0

    def start(self) -> None:
        self.step += 1
        self.store.save(self.subject.state(), step=self.step)

    def wait(self) -> None:
        pass


Saver = HpcckptAsync | DcpAsync | HpcckptSync


def blocked(savers: dict[str, Saver], repeats: int) -> dict[str, float]:
    """Median seconds the calling thread spends in each saver's ``start``, interleaved, in steady state."""
    for saver in savers.values():
        saver.start()
        saver.wait()
    samples: dict[str, list[float]] = {label: [] for label in savers}
    order = list(savers)
    for round_ in range(repeats):
        shift = round_ % len(order)
        for label in order[shift:] + order[:shift]:
            saver = savers[label]
            start = time.perf_counter()
            saver.start()
            samples[label].append(time.perf_counter() - start)
            saver.wait()
    return {label: statistics.median(values) for label, values in samples.items()}


def stalls(
    subject: Trainee, savers: dict[str, Saver], repeats: int, steps: int, every: int
) -> tuple[dict[str, float], float]:
    """Median net stall per save for each saver (seconds), and the median baseline loop time."""
    loops: dict[str, Callable[[], float]] = {"baseline": lambda: _loop(subject, None, steps, every)}
    for label, saver in savers.items():
        loops[label] = lambda s=saver: _loop(subject, s, steps, every)  # type: ignore[misc]
    loops["baseline"]()  # warm up the step (allocator, kernels)
    samples: dict[str, list[float]] = {label: [] for label in loops}
    order = list(loops)
    for round_ in range(repeats):
        shift = round_ % len(order)
        for label in order[shift:] + order[:shift]:
            samples[label].append(loops[label]())
    base = statistics.median(samples["baseline"])
    saves = steps // every
    return {label: (statistics.median(samples[label]) - base) / saves for label in savers}, base


def _loop(subject: Trainee, saver: Saver | None, steps: int, every: int) -> float:
    import torch

    cuda = subject.batch.is_cuda
    start = time.perf_counter()
    for step in range(1, steps + 1):
        subject.step()
        if saver is not None and step % every == 0:
            saver.wait()  # at most one save in flight
            saver.start()
    if saver is not None:
        saver.wait()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _quiet() -> Any:
    from .contenders import single_process

    return single_process()
