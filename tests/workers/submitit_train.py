"""The training function the submitit tests submit: the toy training (toy.py), batches drawn from the global
RNG (saved in the checkpoint, so a resumed run draws the same ones), one optional sleep per step so that a
run outlasts a one-minute allocation.

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
import toy

from hpcckpt import Run, TrainState


def train(total_steps: int, step_sleep: float = 0.0, save_every: str | None = None) -> dict[str, Any]:
    toy.deterministic()
    x, y = toy.regression_data(512, seed=1)
    model = toy.mlp()
    optimizer = toy.optimizer(model)
    scheduler = toy.scheduler(optimizer, step_size=100)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler)
    loss = torch.tensor(float("nan"))
    with Run(state=state, total_steps=total_steps, save_every=save_every) as run:
        for _ in run:
            loss = toy.train_step(model, optimizer, toy.random_batch(x, y), scheduler)
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
