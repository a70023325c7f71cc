"""The toy training every test worker runs: a small MLP regressing ``sin(sum(x))`` with AdamW, deterministic on
the CPU. Written once; the workers differ only in how they are started and fed:

- train_worker.py: a script, batches from a shuffling DataLoader whose workers add noise (signals, budgets,
  loader resume);
- submitit_train.py: a function submitit pickles, batches drawn from the global RNG;
- ddp_worker.py: one process per rank under torchrun or srun, DDP or FSDP2.

Every random draw that training makes comes from state a checkpoint keeps (the global RNG, the loader's
workers' seeds), so an interrupted and resumed run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import time

import torch
from torch import nn

FEATURES = 16


def deterministic(seed: int = 0) -> None:
    """Seed the global RNG, forbid nondeterministic kernels, one thread (the machine is shared)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def regression_data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed inputs from their own generator (not the global RNG) and their targets ``sin(sum(x))``."""
    x = torch.randn(samples, FEATURES, generator=torch.Generator().manual_seed(seed))
    return x, x.sum(dim=1, keepdim=True).sin()


def mlp(dropout: float | None = 0.2) -> nn.Sequential:
    """16 -> 32 -> 1, with dropout (random draws that a resumed run must repeat) unless ``dropout`` is None."""
    middle: list[nn.Module] = [nn.Dropout(dropout)] if dropout is not None else []
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), *middle, nn.Linear(32, 1))


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def scheduler(optim: torch.optim.Optimizer, step_size: int) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(optim, step_size=step_size, gamma=0.9)


def random_batch(x: torch.Tensor, y: torch.Tensor, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples drawn from the global RNG (saved in the checkpoint, so a resumed run draws the same)."""
    index = torch.randint(0, len(x), (size,))
    return x[index], y[index]


def train_step(
    model: nn.Module,
    optim: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    sleep: float = 0.0,
) -> torch.Tensor:
    """One optimizer step on ``batch``; the loss. ``sleep`` stretches the step, so that a run outlasts
    an allocation."""
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    optim.zero_grad()
    loss.backward()
    optim.step()
    if sched is not None:
        sched.step()
    if sleep:
        time.sleep(sleep)
    return loss
