"""One rank of a sharded (``dcp``) store saving in the background, for tests/test_dcp_async.py: started once per
rank with torchrun's variables (gloo on CPU).

    dcp_async_worker.py RUN_DIR MODE [--victim RANK] [--marker PATH]

Every mode first trains the toy DDP model a few steps and commits step 1 with a blocking save, then:

- ``commit``: starts the save of step 2 in the background, writes what it snapshotted to
  ``RUN_DIR/../expected-rank<R>.pt``, changes the model and the optimizer (training goes on) and calls
  ``wait()``;
- ``fail``: the same, but on rank ``--victim`` every write of the background save fails with ENOSPC (the fault
  is injected at the file's stream, the process edge);
- ``hang``: on rank ``--victim`` the background save's first write blocks forever after touching ``--marker``
  (the test kills that rank with SIGKILL there); every rank then calls ``wait()``.

Prints one JSON line per rank: ``{"rank", "first", "committed" or "error"}``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import toy
from torch.nn.parallel import DistributedDataParallel

from hpcckpt import CheckpointStore, TrainState
from hpcckpt.distributed import init_process_group
from hpcckpt.store.formats import dcpwrite
from hpcckpt.store.transaction import SaveRequest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("mode", choices=["commit", "fail", "hang", "train"])
    parser.add_argument("--victim", type=int, default=1)
    parser.add_argument("--marker", default=None)
    parser.add_argument("--stop-at", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--final", default=None, help="train: write each rank's final state to FINAL-rank<R>.pt")
    args = parser.parse_args()

    env = init_process_group("gloo", timeout=120)
    toy.deterministic()
    model = toy.mlp(dropout=None)
    ddp = DistributedDataParallel(model)
    optimizer = toy.optimizer(model)
    torch.manual_seed(1000 + env.rank)
    x, y = toy.regression_data(256, seed=7)
    state = TrainState(model=ddp, optimizer=optimizer)

    def train(steps: int) -> None:
        for _ in range(steps):
            toy.train_step(ddp, optimizer, toy.random_batch(x, y))
            state.step += 1

    store = CheckpointStore(args.run_dir, format="dcp")
    if args.mode == "train":
        return train_resumably(store, state, train, args.stop_at, args.save_every, f"{args.final}-rank{env.rank}.pt")
    train(1)
    first = store.save(state)
    train(1)
    if env.rank == args.victim and args.mode != "commit":
        inject(args.mode, args.marker)
    request = SaveRequest(registry=store.registry, step=state.step, epoch=0, metrics={}, retention=lambda _: [])
    handle = store.format.save_async(request, state, None)  # type: ignore[attr-defined]
    moments = {name: clone(optimizer.state[p]) for name, p in model.named_parameters()}
    snapshot = {"model": clone(model.state_dict()), "moments": moments, "step": state.step}
    torch.save(snapshot, Path(args.run_dir).parent / f"expected-rank{env.rank}.pt")
    if args.mode != "hang":  # (a rank killed during a training step would fail the others' step instead)
        train(2)  # training goes on while the parts are persisted: the checkpoint keeps the snapshot
    line: dict[str, Any] = {"rank": env.rank, "first": first.name}
    try:
        line["committed"] = handle.wait().name
        line["done"] = handle.done()
    except Exception as error:
        line["error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(line), flush=True)
    if args.mode == "hang":
        os._exit(0)  # a peer is dead: the group cannot be torn down together
    dist.barrier()
    dist.destroy_process_group()


def train_resumably(
    store: CheckpointStore, state: TrainState, train: Any, stop_at: int, every: int, final: str
) -> None:
    """Resume from the latest checkpoint, train to step ``stop_at`` saving every ``every`` steps in the
    background (each save waited for at the next one, and at the stop), then write the final state."""
    resumed = store.restore(state)
    handle = None
    while state.step < stop_at:
        train(1)
        if state.step % every == 0:
            if handle is not None:
                handle.wait()
            request = SaveRequest(registry=store.registry, step=state.step, epoch=0, metrics={}, retention=lambda _: [])
            handle = store.format.save_async(request, state, None)  # type: ignore[attr-defined]
    if handle is not None:
        handle.wait()
    model = state.model.module  # type: ignore[union-attr]
    moments = {name: clone(state.optimizer.state[p]) for name, p in model.named_parameters()}  # type: ignore[union-attr]
    torch.save({"model": clone(model.state_dict()), "moments": moments, "step": state.step}, final)
    line = {"rank": dist.get_rank(), "step": state.step, "resumed": resumed.step if resumed else None}
    print(json.dumps(line), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def inject(mode: str, marker: str | None) -> None:
    """This rank's background save fails (``fail``) or blocks (``hang``) at its first write."""

    def full(self: dcpwrite.HashingStream, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def blocked(self: dcpwrite.HashingStream, data: Any) -> int:
        Path(str(marker)).write_text("writing")
        threading.Event().wait()  # until killed
        return 0

    dcpwrite.HashingStream.write = full if mode == "fail" else blocked  # type: ignore[method-assign]


def clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


if __name__ == "__main__":
    main()
