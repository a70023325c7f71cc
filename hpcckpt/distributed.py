"""Process groups from the launcher's environment: ``srun`` (one task per rank) or ``torchrun``.

    from hpcckpt.distributed import init_process_group
    env = init_process_group()          # gloo on CPU, nccl when CUDA is there
    model = DDP(model)                  # then Run(...) as usual: it sees the process group

Under ``srun`` the rank, world size and local rank come from ``SLURM_PROCID``, ``SLURM_NTASKS`` and
``SLURM_LOCALID``; the rendezvous host is the first node of the step (``SLURM_STEP_NODELIST``, else the
job's), its port ``HPCCKPT_MASTER_PORT`` or one derived from the job id, so that two jobs sharing a node
do not collide. Under ``torchrun`` its own variables win (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Outside both, a single process (rank 0 of 1).

The Slurm variables come from :func:`hpcckpt.slurm.env.read_slurm_env` (one table of their names);
:func:`dist_env` is a pure function of the mapping it is given, and only :func:`init_process_group`, the
entry point, falls back to ``os.environ``.

torch is imported when a process group is started, not when this module is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from .errors import UsageError
from .slurm.env import is_set, read_slurm_env, variable

Launcher = Literal["torchrun", "srun", "single"]
PORT_BASE, PORT_SPAN = 20000, 20000
# What an srun rank's rendezvous needs; another Slurm variable, malformed or not, is not dist_env's business.
_SRUN_FIELDS = ("procid", "ntasks", "localid", "node_list", "step_node_list", "job_id")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: Launcher


def dist_env(environ: Mapping[str, str]) -> DistEnv:
    """Rank, world size, local rank and rendezvous address from the launcher's variables in ``environ``."""
    if environ.get("RANK") is not None and environ.get("WORLD_SIZE") is not None:
        return DistEnv(
            rank=_int(environ, "RANK"),
            world_size=_int(environ, "WORLD_SIZE"),
            local_rank=_int(environ, "LOCAL_RANK", 0),
            master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(environ, "MASTER_PORT", 29500),
            launcher="torchrun",
        )
    if is_set(environ, "procid") and is_set(environ, "ntasks"):
        slurm = read_slurm_env(environ, fields=_SRUN_FIELDS)  # a bad variable srun does not need is no matter
        if slurm.procid is None or slurm.ntasks is None:  # set, but empty
            missing = variable("procid" if slurm.procid is None else "ntasks")
            raise UsageError(f"{missing} is not set: expected a whole number")
        nodes = slurm.step_node_list or slurm.node_list or ""
        hosts = expand_nodelist(nodes)
        if not hosts:
            raise UsageError(f"Invalid SLURM_STEP_NODELIST/SLURM_JOB_NODELIST={nodes!r}: expected e.g. gpu[01-04]")
        job = _whole(slurm.job_id, "SLURM_JOB_ID", 0)
        return DistEnv(
            rank=slurm.procid,
            world_size=slurm.ntasks,
            local_rank=0 if slurm.localid is None else slurm.localid,
            master_addr=hosts[0],
            master_port=_int(environ, "HPCCKPT_MASTER_PORT", PORT_BASE + job % PORT_SPAN),
            launcher="srun",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", _int(environ, "HPCCKPT_MASTER_PORT", 29500), "single")


def init_process_group(
    backend: str | None = None, *, timeout: float = 600.0, environ: Mapping[str, str] | None = None
) -> DistEnv:
    """Start torch.distributed for this process (a no-op when it is already started, or when the world
    is one process). ``backend``: ``nccl`` when CUDA is available, else ``gloo``."""
    import torch
    import torch.distributed as dist

    env = dist_env(os.environ if environ is None else environ)
    if env.world_size == 1 or dist.is_initialized():
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    # Under torchrun the rendezvous store lives in its agent (env://), not in rank 0, which may then leave
    # first without pulling the store from under the other ranks' teardown.
    init_method = "env://" if env.launcher == "torchrun" else f"tcp://{_bracketed(env.master_addr)}:{env.master_port}"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout),
    )
    return env


def world() -> tuple[int, int]:
    """(rank, world size) of the started process group; (0, 1) when there is none."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` as rank ``src`` has it, on every rank (itself without a process group)."""
    rank, size = world()
    if size == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, by rank, on every rank (``[value]`` without a process group; collective)."""
    _, size = world()
    if size == 1:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * size
    dist.all_gather_object(values, value)
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list: ``gpu[01-03,07],cpu1`` -> gpu01 gpu02 gpu03 gpu07 cpu1.

    Every form Slurm writes (issue 11, item 24): brackets anywhere in a name (``node[1-2]-ib``), several
    bracket groups as a product (``rack[1-2]-n[01-02]`` -> rack1-n01 rack1-n02 rack2-n01 rack2-n02), zero
    padding from the low bound (``n[098-101]``), blanks and empty items ignored, duplicates kept, in
    order: what ``scontrol show hostnames`` prints (tested against it on the test cluster). A pure parser,
    not a library: python-hostlist does this too but is GPL-2+, which this BSD-3 package cannot depend on."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        names = [""]
        for literal, ranges in _segments(item, nodelist):
            numbers = [literal] if ranges is None else _expand_ranges(ranges, nodelist)
            names = [name + number for name in names for number in numbers]
        hosts.extend(names)
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """The comma-separated items outside brackets, stripped, empty ones dropped."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in nodelist:
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise UsageError(f"Invalid node list {nodelist!r}: unbalanced brackets; expected e.g. gpu[01-04],cpu1")
        current.append(char)
    if depth:
        raise UsageError(f"Invalid node list {nodelist!r}: unbalanced brackets; expected e.g. gpu[01-04],cpu1")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


_SEGMENT = re.compile(r"([^\[\]]+)|\[([^\[\]]*)\]")


def _segments(item: str, nodelist: str) -> list[tuple[str, str | None]]:
    """``rack[1-2]-n`` -> ("rack", None), ("", "1-2"), ("-n", None)."""
    segments: list[tuple[str, str | None]] = []
    position = 0
    while position < len(item):
        match = _SEGMENT.match(item, position)
        if match is None:
            raise UsageError(f"Invalid node list {nodelist!r}: bad item {item!r}; expected e.g. gpu[01-04],cpu1")
        segments.append((match.group(1), None) if match.group(1) is not None else ("", match.group(2)))
        position = match.end()
    return segments


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """``01-03,7`` -> 01 02 03 7: each number as wide as its range's low bound (Slurm's rule)."""
    numbers: list[str] = []
    for part in ranges.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
            raise UsageError(
                f"Invalid node list {nodelist!r}: bad range {part!r}; expected N or LOW-HIGH with LOW <= HIGH"
            )
        numbers.extend(f"{number:0{len(first)}d}" for number in range(int(first), int(last or first) + 1))
    return numbers


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    return _whole(env.get(name), name, default)


def _whole(raw: str | None, name: str, default: int | None = None) -> int:
    if raw is None or raw == "":
        if default is None:
            raise UsageError(f"{name} is not set: expected a whole number")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"Invalid {name}={raw!r}: expected a whole number") from None


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Agreement:
    """Ranks agree on the stop decision at the same step, without a blocking collective per step.

    Every ``every`` steps each rank contributes its own view (a signal arrived; no budget left) to an
    asynchronous all-reduce (MAX), and acts on the result of the previous round: the communication
    overlaps a round of training. All ranks then stop at the same step, ``lag`` steps after the first
    rank saw a reason to; the budget looks that far ahead. The first round is synchronous.
    """

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.lag = every
        self._pending: tuple[Any, Any] | None = None
        self.rounds = 0

    def decide(self, local: str, step: int) -> Literal["continue", "budget", "signal", "save"]:
        """The agreed decision from every rank's ``local`` one: a signal anywhere beats a budget stop,
        which beats a wall-time save (ranks' clocks differ, so one rank's due save is everybody's)."""
        import torch.distributed as dist

        if self._pending is not None and step % self.every:
            return "continue"
        mine = _flags(local)
        if self._pending is None:
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            agreed = mine.clone()
        else:
            work, agreed = self._pending
            work.wait()
        self.rounds += 1
        decision: Literal["continue", "budget", "signal", "save"] = (
            "signal" if agreed[0] else "budget" if agreed[1] else "save" if agreed[2] else "continue"
        )
        self._pending = None
        if decision in ("continue", "save"):
            # A save agreed now answers this rank's due save; anything else goes into the next round.
            nxt = _flags("continue" if decision == "save" and local == "save" else local)
            self._pending = (dist.all_reduce(nxt, op=dist.ReduceOp.MAX, async_op=True), nxt)
        return decision

    def all_ranks(self, value: bool, how: Literal["any", "all"]) -> bool:
        """``value`` or-ed (``any``) or and-ed (``all``) over the ranks; a blocking collective."""
        import torch
        import torch.distributed as dist

        self.close()
        flag = torch.tensor([int(value)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX if how == "any" else dist.ReduceOp.MIN)
        return bool(flag.item())

    def close(self) -> None:
        """Wait for the round in flight (every rank has the same one) before the group does anything else."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def _flags(local: str) -> Any:
    import torch

    return torch.tensor([local == "signal", local == "budget", local == "save"], dtype=torch.int32)
