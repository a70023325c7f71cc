"""The training function the submitit tests submit: a small MLP with dropout, batches drawn from the
global RNG (saved in the checkpoint, so a resumed run draws the same ones), one optional sleep per step
so that a run outlasts a one-minute allocation.

The jobs import this module by name: the tests put this directory on PYTHONPATH.

    python submitit_train.py RUN_DIR STEPS                          # the uninterrupted reference
    python submitit_train.py debug RUN_DIR FOLDER STEPS single|chain  # through submitit's debug executor
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from hpcckpt import Run, TrainState


def train(total_steps: int, step_sleep: float = 0.0, save_every: str | None = None) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.9)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler)
    loss = torch.tensor(float("nan"))
    with Run(state=state, total_steps=total_steps, save_every=save_every) as run:
        for _ in run:
            index = torch.randint(0, len(x), (16,))
            loss = nn.functional.mse_loss(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            run.report(loss=loss.item())
            if step_sleep:
                time.sleep(step_sleep)
    return {"step": state.step, "loss": loss.item(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID")}


def crash(total_steps: int) -> None:
    raise RuntimeError("this training function is broken")


def rank_zero_trains(total_steps: int) -> Any:
    """A two-task job where only rank 0 opens a Run (the distributed Run is not this test's subject)."""
    rank = int(os.environ.get("SUBMITIT_LOCAL_GLOBALID") or os.environ.get("SLURM_PROCID") or 0)
    return train(total_steps) if rank == 0 else f"rank {rank}"


def through_debug_executor(run_dir: str, folder: str, total_steps: int, chain: bool) -> Any:
    """submitit's debug executor runs the job in this very process, when its result is asked for."""
    import submitit

    from hpcckpt.integrations.submitit import Resumable, submit_chain

    executor = submitit.DebugExecutor(folder=folder)
    if chain:
        return submit_chain(executor, Resumable(train, run_dir), total_steps, tasks=3).result()
    return executor.submit(Resumable(train, run_dir), total_steps).result()


if __name__ == "__main__":
    if sys.argv[1] == "debug":  # debug RUN_DIR FOLDER STEPS single|chain
        print(json.dumps(through_debug_executor(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "chain")))
    else:  # RUN_DIR STEPS: the reference
        os.environ["HPCCKPT_RUN_DIR"] = sys.argv[1]
        print(json.dumps(train(int(sys.argv[2]))))
