"""Launch resumable training from Python with submitit: no sbatch file to write.

The training function builds its model, optimizer and data, and trains inside ``hpcckpt.Run``. Wrapped in
``Resumable``, it resumes from the run directory's latest checkpoint in every allocation, saves when
submitit's time-limit signal (USR2) or a preemption (SIGTERM) arrives, and goes on in the next allocation.

    # a chain of 4 one-minute tasks that run one after another (a Slurm array with parallelism 1)
    python examples/submitit_chain.py --run-dir runs/submitit --tasks 4 --time 1 --partition low

    # one job that requeues itself at each time limit until the training is done
    python examples/submitit_chain.py --run-dir runs/submitit-one --tasks 0 --time 1

    # the same without Slurm: submitit's local executor (tasks of --time minutes, may be fractional)
    python examples/submitit_chain.py --cluster local --run-dir runs/submitit-local --time 0.25

`hpcckpt status RUN_DIR` shows where the run stands at any time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from hpcckpt import Resumable, Run, TrainState, submit_chain


def train(total_steps: int, step_sleep: float) -> dict[str, Any]:
    """A small regression MLP. Batches are drawn from torch's global RNG, which the checkpoint keeps,
    so a resumed run draws the same batches as an uninterrupted one."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32, generator=generator)
    y = torch.sin(x.sum(dim=1, keepdim=True) / 4)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    state = TrainState(model=model, optimizer=optimizer)
    loss = torch.tensor(float("nan"))
    # The run directory comes from HPCCKPT_RUN_DIR, which Resumable sets; so does the signal to watch.
    with Run(state=state, total_steps=total_steps, save_every="200ba") as run:
        for step in run:
            index = torch.randint(0, len(x), (64,))
            loss = nn.functional.mse_loss(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.report(loss=loss.item())
            if step % 200 == 0:
                print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
            time.sleep(step_sleep)  # stands in for a real model's step time
    return {"step": state.step, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/submitit"))
    parser.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm")
    parser.add_argument("--tasks", type=int, default=4, help="chain length; 0 for one self-requeueing job")
    parser.add_argument("--time", type=float, default=1.0, help="minutes per task (whole minutes on Slurm)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--step-sleep", type=float, default=0.05)
    args = parser.parse_args()

    folder = args.run_dir / "submitit"  # submitit's pickles and logs, next to the checkpoints
    if args.cluster == "slurm":
        # Every requeue at a time limit counts against max_num_timeout (submitit's default is 3).
        executor: Any = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=50)
        executor.update_parameters(timeout_min=int(args.time), slurm_signal_delay_s=30)
        if args.partition:
            executor.update_parameters(slurm_partition=args.partition)
    elif args.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=50)
        executor.update_parameters(timeout_min=args.time, signal_delay_s=5)
    else:
        executor = submitit.DebugExecutor(folder=folder)

    work = Resumable(train, args.run_dir)
    if args.tasks:
        chain = submit_chain(executor, work, args.steps, args.step_sleep, tasks=args.tasks)
        print(f"submitted {chain}; follow it with: hpcckpt status {args.run_dir}", flush=True)
        result = chain.result()
    else:
        job = executor.submit(work, args.steps, args.step_sleep)
        print(f"submitted job {job.job_id}; follow it with: hpcckpt status {args.run_dir}", flush=True)
        result = job.result()
    print(f"complete: {result}")


if __name__ == "__main__":
    sys.exit(main())
