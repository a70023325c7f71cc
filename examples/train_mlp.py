"""Train a small MLP on synthetic regression data with hpcckpt's Run: the quickstart's example job.

Runs on the CPU, or on a GPU when one is present. Run it twice: the second run finds the run complete and
does nothing. Interrupt it (Ctrl-\\ sends SIGQUIT; `kill -USR1 PID` is what Slurm sends before the time
limit) and run it again: it resumes at the step where it stopped.

    python examples/train_mlp.py [--run-dir runs/mlp] [--steps 100000]

Torch uses as many threads as the job has CPUs (``SLURM_CPUS_PER_TASK``), and one outside Slurm: on a shared
login node or laptop, torch's default of one thread per core competes with everything else on the machine
and makes a tiny model like this one slower, not faster.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from hpcckpt import Run, TrainState


def make_data(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    true_w = torch.randn(dim, 1, generator=generator)
    y = torch.sin(x @ true_w / dim**0.5) + 0.05 * torch.randn(n, 1, generator=generator)
    return x, y


def torch_threads(environ: dict[str, str]) -> int:
    """The job's CPUs per task, or 1 outside a Slurm allocation that says."""
    value = environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=os.environ.get("HPCCKPT_RUN_DIR", "runs/mlp"))
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--save-every", default="10000ba")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(torch_threads(dict(os.environ)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    x, y = make_data(4096, 32, args.seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, extra={"seed": args.seed})

    with Run(args.run_dir, state, total_steps=args.steps, save_every=args.save_every) as run:
        for step in run:
            index = torch.randint(0, x.shape[0], (args.batch_size,))
            loss = nn.functional.mse_loss(model(x[index].to(device)), y[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            run.report(loss=loss.item())
            if step % 20000 == 0:
                print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    print(
        f"{'complete' if run.completed else 'stopped (' + str(run.stop_reason) + ')'} at step {state.step} "
        f"of {args.steps}; checkpoints in {args.run_dir}"
    )


if __name__ == "__main__":
    main()
