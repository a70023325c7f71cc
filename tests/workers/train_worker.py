"""A real training job for the Run tests: a small CNN-free MLP with dropout on a shuffling DataLoader whose
dataset draws random augmentation in its workers. Prints one JSON line when training starts and one
when it ends, so tests can time signals and check outcomes.

    python train_worker.py RUN_DIR --epochs 3 [--steps N] [--save-every 7ba] [--workers 1] [--numel 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hpcckpt import TrainState
from hpcckpt.run import Run


class NoisyData(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed samples plus augmentation noise drawn in the worker (its RNG must be reproduced too)."""

    def __init__(self, n: int = 96) -> None:
        generator = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 16, generator=generator)
        self.y = self.x.sum(dim=1, keepdim=True).sin()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.01 * torch.randn(16), self.y[i]


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
    parser.add_argument(
        "--deadline-in",
        type=float,
        default=None,
        help="set HPCCKPT_DEADLINE this many seconds after the model is built, so that a slow start under load "
        "does not eat the budget",
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.9)
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
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        return loss.item()

    if args.deadline_in is not None:
        os.environ["HPCCKPT_DEADLINE"] = str(time.time() + args.deadline_in)
    with Run(args.run_dir, state, total_steps=args.steps, save_every=args.save_every, grace=args.grace) as run:
        print(json.dumps({"event": "started", "step": state.step}), flush=True)
        if args.steps is not None:
            batches = iter(())
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
    sys.exit(run.exit_code)


if __name__ == "__main__":
    main()
