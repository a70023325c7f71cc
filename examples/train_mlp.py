"""Train a small MLP on synthetic regression data: the example job of hpcckpt's quickstart.

Runs on the CPU, or on a GPU when one is present. It needs nothing but torch.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def make_data(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    true_w = torch.randn(dim, 1, generator=generator)
    y = torch.sin(x @ true_w / dim**0.5) + 0.05 * torch.randn(n, 1, generator=generator)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    x, y = make_data(4096, 32, args.seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(args.seed)

    start = time.monotonic()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, x.shape[0], (args.batch_size,), generator=generator)
        xb, yb = x[index].to(device), y[index].to(device)
        loss = nn.functional.mse_loss(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 50 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    print(f"trained {args.steps} steps on {device} in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
