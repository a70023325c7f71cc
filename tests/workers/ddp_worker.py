"""A DDP (or FSDP2, --fsdp) training job for the distributed tests, one process per rank, under torchrun or srun:
the toy training (toy.py) without dropout.

Each rank draws its batches from its own global RNG (seeded by rank and saved per rank in the sharded
checkpoint), so a run resumed at the same world size continues exactly; gloo on CPU.

    torchrun --nproc-per-node 2 ddp_worker.py RUN_DIR --steps 300 [--step-sleep 0.02] [--pid-dir DIR]
        [--crash-at STEP [--crash-rank RANK]]
    srun -N 2 -n 2 python ddp_worker.py RUN_DIR --steps 300

Prints one JSON line per rank when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import toy
from torch.nn.parallel import DistributedDataParallel

from hpcckpt import Run, TrainState
from hpcckpt.distributed import init_process_group


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--save-every", default=None)
    parser.add_argument("--ballast", type=int, default=0, help="float32 elements of extra weights, for slow saves")
    parser.add_argument("--pid-dir", default=None, help="write RANK.pid there once training starts")
    parser.add_argument("--agree-every", type=int, default=1)
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 instead of DDP")
    parser.add_argument("--async-save", action="store_true", help="interval saves in the background")
    parser.add_argument("--crash-at", type=int, default=None, help="raise in the training code at this step")
    parser.add_argument("--crash-rank", type=int, default=None, help="the rank that crashes (default: every rank)")
    parser.add_argument(
        "--deadline-in",
        type=float,
        default=None,
        help="set HPCCKPT_DEADLINE this many seconds after the model is built (the slow start under load: "
        "imports, the process group) so that the budget leaves the same training time however busy the machine",
    )
    args = parser.parse_args()

    env = init_process_group("gloo")
    toy.deterministic()  # the same initial weights on every rank
    model = toy.mlp(dropout=None)
    if args.ballast:  # state that makes the checkpoint big (and its save slow)
        model.register_buffer("ballast", torch.zeros(args.ballast))
    if env.world_size > 1 and args.fsdp:  # FSDP2: parameters sharded over the ranks (DTensors)
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        ddp = fully_shard(model)
    elif env.world_size > 1:
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    else:
        ddp = model
    optimizer = toy.optimizer(model)
    torch.manual_seed(1000 + env.rank)  # then each rank its own batches
    x, y = toy.regression_data(256, seed=7)
    state = TrainState(model=ddp, optimizer=optimizer)
    if args.deadline_in is not None:
        os.environ["HPCCKPT_DEADLINE"] = str(time.time() + args.deadline_in)
    with Run(
        args.run_dir,
        state,
        total_steps=args.steps,
        save_every=args.save_every,
        agree_every=args.agree_every,
        async_save=args.async_save,
    ) as run:
        if args.pid_dir:
            Path(args.pid_dir, f"{env.rank}.pid").write_text(str(os.getpid()))
        for step in run:
            if step == args.crash_at and args.crash_rank in (None, env.rank):
                raise RuntimeError(f"diverged on rank {env.rank} at step {step}")
            loss = toy.train_step(ddp, optimizer, toy.random_batch(x, y))
            run.report(loss=loss.item())
            if args.step_sleep:
                time.sleep(args.step_sleep)
    print(
        json.dumps(
            {
                "rank": env.rank,
                "world": env.world_size,
                "step": state.step,
                "reason": run.stop_reason,
                "cause": run.cause,
                "resumed": run.resumed_from.step if run.resumed_from else None,
            }
        ),
        flush=True,
    )
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
