"""``hpcckpt bench agree``: what it costs per step for ranks to agree on when to stop.

Two gloo ranks on this machine train a small DDP model; the same loop runs, interleaved, with no
agreement, with :class:`~hpcckpt.distributed.Agreement` every step (overlapped), every 4 steps, and with
a plain blocking all-reduce every step. The figure is the extra time per step, as a fraction of the
plain step (median of the rounds).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("none", "agree-1", "agree-4", "blocking")


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[str, float, str]]]:
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="hpcckpt-bench-agree-") as scratch:
        out = Path(scratch) / "rank0.txt"
        mp.spawn(_rank, args=(2, port, args.steps, args.repeats, str(out)), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]
        lines = out.read_text().split()
    seconds = {name: float(value) for name, value in (line.split("=") for line in lines)}
    base = seconds["none"]
    figures = {"step_seconds": seconds, "steps": args.steps, "repeats": args.repeats}
    targets = [
        ("agreement every step, overlapped: extra per step", seconds["agree-1"] / base - 1, "<= 0.05"),
        ("agreement every 4 steps: extra per step", seconds["agree-4"] / base - 1, "<= 0.05"),
        ("blocking all-reduce every step: extra per step", seconds["blocking"] / base - 1, "info"),
        ("plain DDP step (ms)", base * 1e3, "info"),
        ("agreement every step, overlapped: extra (us)", (seconds["agree-1"] - base) * 1e6, "info"),
        ("blocking all-reduce every step: extra (us)", (seconds["blocking"] - base) * 1e6, "info"),
    ]
    return figures, targets


def _rank(rank: int, world: int, port: int, steps: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from ..distributed import Agreement

    os.environ.pop("HPCCKPT_RUN_DIR", None)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 256), torch.randn(128, 1)

    def loop(variant: str) -> float:
        agreement = Agreement(4 if variant == "agree-4" else 1)
        flag = torch.zeros(2, dtype=torch.int32)
        dist.barrier()
        started = time.perf_counter()
        for step in range(steps):
            if variant.startswith("agree"):
                agreement.decide("continue", step)
            elif variant == "blocking":
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        agreement.close()
        dist.barrier()
        return (time.perf_counter() - started) / steps

    loop("none")  # warm up
    rounds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(repeats):
        order = VARIANTS[repeat % len(VARIANTS) :] + VARIANTS[: repeat % len(VARIANTS)]
        for name in order:
            rounds[name].append(loop(name))
    if rank == 0:
        Path(out).write_text(" ".join(f"{name}={statistics.median(values)!r}" for name, values in rounds.items()))
    dist.destroy_process_group()
