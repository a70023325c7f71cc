"""A real training job for the Run tests: the toy training (toy.py) on a shuffling DataLoader whose dataset
draws random augmentation in its workers. Prints one JSON line when training starts and one when it ends,
so tests can time signals and check outcomes.

    python train_worker.py RUN_DIR --epochs 3 [--steps N] [--save-every 7ba] [--workers 1] [--numel 0]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Iterator

import torch
import toy
from torch.utils.data import DataLoader, Dataset

from hpcckpt import TrainState
from hpcckpt.run import Run


class NoisyData(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed samples plus augmentation noise drawn in the worker (its RNG must be reproduced too)."""

    def __init__(self, n: int = 96) -> None:
        self.x, self.y = toy.regression_data(n, seed=123)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.01 * torch.randn(toy.FEATURES), self.y[i]


def settle_queue_feeders() -> None:
    """Wait until multiprocessing's queue feeder threads have ended, before the interpreter ends.

    The feeder thread of a DataLoader iterator's queue holds the queue's semaphores, so when an iterator
    is dropped CPython runs their finalizer (unlink the semaphore, then tell the resource tracker) in that
    daemon thread as it ends. At the interpreter's shutdown a daemon thread can be frozen between the two:
    the tracker then reports a "leaked semaphore" that it fails to unlink ("No such file or directory").
    Seen once with spawned workers at a plain completion (issue 12); CPython's doing, not hpcckpt's, and
    tests/test_workers.py asserts that stderr holds no message of the tracker."""
    gc.collect()  # the dropped iterators shut their workers down and close their queues
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread":
            thread.join(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="step loop instead of epochs (the loader's place is not kept: no exact resume)",
    )
    parser.add_argument("--save-every", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--numel", type=int, default=0, help="extra state, to make saves take time")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--grace", type=float, default=None)
    parser.add_argument("--start-method", default=None, help="the workers' multiprocessing start method")
    parser.add_argument("--persistent", action="store_true", help="persistent_workers=True")
    parser.add_argument("--loader-in-state", action="store_true", help="TrainState(dataloader=loader)")
    parser.add_argument("--linger", action="store_true", help="after the loop, wait for a line on stdin")
    parser.add_argument("--async-save", action="store_true", help="Run(async_save=True)")
    parser.add_argument("--compression", default=None, help="Run(compression=...), e.g. zstd")
    parser.add_argument(
        "--deadline-in",
        type=float,
        default=None,
        help="set HPCCKPT_DEADLINE this many seconds after the model is built, so that a slow start under load "
        "does not eat the budget",
    )
    args = parser.parse_args()

    toy.deterministic()
    model = toy.mlp()
    optimizer = toy.optimizer(model)
    scheduler = toy.scheduler(optimizer, step_size=5)
    loader = DataLoader(
        NoisyData(),
        batch_size=8,
        shuffle=True,
        num_workers=args.workers,
        multiprocessing_context=args.start_method if args.workers else None,
        persistent_workers=args.persistent,
    )
    state = TrainState(
        model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader if args.loader_in_state else None
    )
    if args.numel:
        state.extra["ballast"] = torch.zeros(args.numel)

    def one_step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        return toy.train_step(model, optimizer, batch, scheduler, sleep=args.step_sleep).item()

    if args.deadline_in is not None:
        os.environ["HPCCKPT_DEADLINE"] = str(time.time() + args.deadline_in)
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
    with Run(
        args.run_dir,
        state,
        total_steps=args.steps,
        save_every=args.save_every,
        grace=args.grace,
        async_save=args.async_save,
        compression=args.compression,
    ) as run:
        print(json.dumps({"event": "started", "step": state.step}), flush=True)
        if args.steps is not None:
            for _ in run:
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    batch = next(batches)
                run.report(loss=one_step(batch))
        else:
            for _epoch in run.epochs(args.epochs):
                for batch in run.batches(loader):
                    run.report(loss=one_step(batch))
                if not run.epoch_finished:
                    break
    if args.linger:
        # The loop has stopped: say so, then stay alive (teardown, evaluation) until the test says go.
        print(json.dumps({"event": "after", "step": state.step}), flush=True)
        sys.stdin.readline()
    print(
        json.dumps(
            {
                "event": "end",
                "step": state.step,
                "epoch": state.epoch,
                "reason": run.stop_reason,
                "cause": run.cause,
                "completed": run.completed,
                "saved": run.last_checkpoint.step if run.last_checkpoint else None,
            }
        ),
        flush=True,
    )
    if args.workers and not args.persistent:  # a persistent loader keeps its queues (and feeders) to the end
        batches = iter(())  # the step loop's iterator: dropped, as the epoch loop's are
        settle_queue_feeders()
    sys.exit(0)


if __name__ == "__main__":
    main()
