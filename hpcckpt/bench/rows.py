"""The rows of ``hpcckpt bench store``, one function per group of issue 13's target table.

Each group builds its state, runs its contenders interleaved (:func:`interleave`) and returns its targets;
figures go into one dict that ``--json`` writes. Contenders live in :mod:`.contenders` (plain saves and
loads), :mod:`.restore` (a live model and AdamW), :mod:`.overlap` (asynchronous saves) and :mod:`.memory`
(peak memory, in child processes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import contenders as c
from .mirror import mirror_rows
from .targets import GROUPS, Target

Figures = dict[str, Any]


def _noop() -> None:
    pass


@dataclass
class Trial:
    """A timed ``work``, with untimed steps before (making a directory, emptying the cache) and after."""

    work: Callable[[], None]
    before: Callable[[], None] = field(default=_noop)
    after: Callable[[], None] = field(default=_noop)


@dataclass(frozen=True)
class Timing:
    wall: float  # median seconds
    cpu: float  # median CPU seconds of this process (every thread)


def interleave(repeats: int, trials: dict[str, Trial]) -> dict[str, Timing]:
    """Median times of each trial, run in rounds (A, B, C, A, B, C...) whose first contender rotates: the
    first of a round pays for the previous round's deletions and write-back, which would otherwise bias
    one contender every time."""
    walls: dict[str, list[float]] = {label: [] for label in trials}
    cpus: dict[str, list[float]] = {label: [] for label in trials}
    order = list(trials)
    for round_ in range(repeats):
        shift = round_ % len(order)
        for label in order[shift:] + order[:shift]:
            trial = trials[label]
            trial.before()
            cpu, start = time.process_time(), time.perf_counter()
            trial.work()
            walls[label].append(time.perf_counter() - start)
            cpus[label].append(time.process_time() - cpu)
            trial.after()
    return {label: Timing(statistics.median(walls[label]), statistics.median(cpus[label])) for label in trials}


def bench_store(root: Path, args: argparse.Namespace, groups: set[str]) -> tuple[Figures, list[Target]]:
    import torch

    method = drop_method(args.cold)
    figures: Figures = {"repeats": args.repeats, "dir": str(root), "torch": torch.__version__, "cold": method}
    print(f"hpcckpt bench store in {root} (torch {torch.__version__}, {args.repeats} interleaved repeats)")
    print(f"cold page cache by {method}; {os.cpu_count()} CPUs")
    rows = {
        "save": save_rows,
        "tmpfs": tmpfs_rows,
        "restore": restore_rows,
        "small": small_rows,
        "async": async_rows,
        "memory": memory_rows,
        "registry": registry_rows,
        "mirror": mirror_rows,
    }
    targets: list[Target] = []
    # For the whole run: dcp.async_save's background thread warns after the call has returned.
    with c.single_process():
        for group in GROUPS:
            if group in groups:
                targets += rows[group](root / group, args, figures)
                figures["cold"] = _Cold.method or method
    return figures, targets


def drop_method(choice: str) -> str:
    """``drop`` or ``fadvise``: what ``--cold`` asks for, ``auto`` resolved to what this process may do."""
    if choice != "auto":
        return choice
    return "drop" if os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK) else "fadvise"


def shm_room(nbytes: int) -> Path | None:
    """/dev/shm when it has room for three copies of ``nbytes``, else None."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free >= 3 * nbytes:
        return shm
    return None


# -- emptying the page cache --------------------------------------------------------------------------------
class _Cold:
    method: str | None = None  # what was used, after a fallback


def cold(paths: list[Path], method: str) -> Callable[[], None]:
    """An untimed step that empties the page cache of ``paths`` (files or directories)."""

    def drop() -> None:
        if method == "drop" and _Cold.method != "fadvise":
            os.sync()
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("1\n")
                _Cold.method = "drop"
                return
            except OSError:
                _Cold.method = "fadvise"  # root in a container may not be allowed: evict file by file
        for path in paths:
            for file in c.files_under(path):
                _fadvise_dontneed(file)

    return drop


def _fadvise_dontneed(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _saving(directory: Path, save: Callable[[Path, dict[str, Any]], object], payload: dict[str, Any]) -> Trial:
    def work() -> None:
        save(directory, payload)

    return Trial(
        work=work,
        before=lambda: directory.mkdir(parents=True),
        after=lambda: shutil.rmtree(directory),
    )


def _print_times(times: dict[str, Timing], nbytes: int) -> None:
    for label, timing in times.items():
        rate = nbytes / timing.wall / 1e6
        print(f"  {label:<36} median {timing.wall:7.3f} s  cpu {timing.cpu:7.3f} s  {rate:8.0f} MB/s")


# -- save, disk; load vs raw read ---------------------------------------------------------------------------
def save_rows(root: Path, args: argparse.Namespace, figures: Figures) -> list[Target]:
    payload = c.tensors(args.large_mib << 20, 64)
    nbytes = c.nbytes_of(payload)
    print(f"\nsave on disk: {nbytes / 2**20:.0f} MiB in {len(payload)} tensors")
    root.mkdir(parents=True)
    c.warm_up(root / "warm-up")
    trials = {label: _saving(root / "work", save, payload) for label, save in c.SAVES.items()}
    checksum_ab = c.checksum_switch_available(root)
    if checksum_ab:
        trials["hpcckpt save, no checksum"] = _saving(root / "work", c.hpcckpt_save_unchecked, payload)
    saves = interleave(args.repeats, trials)
    c.hpcckpt_save(root / "load-hpcckpt", payload)
    raw = c.raw_write(root, payload, "load-raw.bin")
    buffer = bytearray(raw.stat().st_size)
    method = drop_method(args.cold)
    loads = interleave(
        args.repeats,
        {
            "hpcckpt load (verified), cold": Trial(
                lambda: c.hpcckpt_load(root / "load-hpcckpt", len(payload)), cold([root / "load-hpcckpt"], method)
            ),
            "raw read, cold": Trial(lambda: c.raw_read(raw, buffer), cold([raw], method)),
        },
    )
    _print_times({**saves, **loads}, nbytes)
    figures["large"] = {"bytes": nbytes, "seconds": {k: v.wall for k, v in {**saves, **loads}.items()}}
    best = min(c.PEERS, key=lambda label: saves[label].wall)
    mine = saves["hpcckpt save"].wall
    targets = [
        Target("save, disk: hpcckpt / best other", mine / saves[best].wall, "<= 0.9", f"best: {best}"),
        Target("save, disk: hpcckpt / raw write", mine / saves["raw write"].wall, "info"),
        Target(
            "load, cold: hpcckpt verified / raw read",
            loads["hpcckpt load (verified), cold"].wall / loads["raw read, cold"].wall,
            "<= 1.11",
        ),
    ]
    if checksum_ab:
        cost = mine / saves["hpcckpt save, no checksum"].wall - 1
        targets.append(Target("save, disk: checksum cost (A/B)", cost, "<= 0.05"))
    else:
        targets.append(Target("save, disk: checksum cost (A/B)", None, "<= 0.05", "format has no checksum switch"))
    return targets


# -- save CPU cost on tmpfs ---------------------------------------------------------------------------------
def tmpfs_rows(root: Path, args: argparse.Namespace, figures: Figures) -> list[Target]:
    payload = c.tensors(args.large_mib << 20, 64)
    nbytes = c.nbytes_of(payload)
    shm = shm_room(nbytes)
    name = "save CPU cost, tmpfs: hpcckpt / safetensors"
    if shm is None:
        print("\nsave on tmpfs: /dev/shm is missing or has no room for three copies; not measured")
        figures["tmpfs"] = None
        return [Target(name, None, "<= 1.1", "no room in /dev/shm")]
    print(f"\nsave on tmpfs (CPU cost): {nbytes / 2**20:.0f} MiB in {len(payload)} tensors")
    with tempfile.TemporaryDirectory(prefix="hpcckpt-bench-", dir=shm) as scratch:
        c.warm_up(Path(scratch) / "warm-up")
        work = Path(scratch) / "work"
        trials = {
            "hpcckpt save": _saving(work, c.hpcckpt_save, payload),
            "safetensors save_file": _saving(work, c.safetensors_save, payload),
        }
        checksum_ab = c.checksum_switch_available(Path(scratch))
        if checksum_ab:
            trials["hpcckpt save, no checksum"] = _saving(work, c.hpcckpt_save_unchecked, payload)
        times = interleave(args.repeats, trials)
    _print_times(times, nbytes)
    figures["tmpfs"] = {"bytes": nbytes, "cpu_seconds": {k: v.cpu for k, v in times.items()}}
    targets = [
        Target(name, times["hpcckpt save"].cpu / times["safetensors save_file"].cpu, "<= 1.1"),
        Target(
            "save time, tmpfs: hpcckpt / safetensors",
            times["hpcckpt save"].wall / times["safetensors save_file"].wall,
            "info",
        ),
    ]
    if checksum_ab:
        cost = times["hpcckpt save"].cpu / times["hpcckpt save, no checksum"].cpu - 1
        targets.append(Target("save CPU, tmpfs: checksum cost (A/B)", cost, "info"))
    return targets


# -- restore into a live model + AdamW ----------------------------------------------------------------------
def restore_rows(root: Path, args: argparse.Namespace, figures: Figures) -> list[Target]:
    from . import restore as r

    subject = r.trainee(3 * (args.model_mib << 20))
    nbytes = r.state_nbytes(subject)
    print(f"\nrestore into a live MLP + AdamW: {nbytes / 2**20:.0f} MiB of state")
    saved = {
        "hpcckpt restore()": (r.save_hpcckpt(subject, root / "hpcckpt"), r.restore_hpcckpt),
        "safetensors + load_state_dict": (r.save_safetensors(subject, root / "safetensors"), r.restore_safetensors),
        "torch.load + load_state_dict": (r.save_torch(subject, root / "torch"), r.restore_torch),
    }
    method = drop_method(args.cold)

    def trial(label: str, cache: bool) -> Trial:
        path, restore = saved[label]
        return Trial(lambda: restore(subject, path), _noop if cache else cold([path], method))

    warm = interleave(args.repeats, {f"{label}, warm": trial(label, True) for label in saved})
    cool = interleave(args.repeats, {f"{label}, cold": trial(label, False) for label in saved})
    _print_times({**warm, **cool}, nbytes)
    figures["restore"] = {"bytes": nbytes, "seconds": {k: v.wall for k, v in {**warm, **cool}.items()}}
    mine_warm, mine_cold = warm["hpcckpt restore(), warm"].wall, cool["hpcckpt restore(), cold"].wall
    others = [label for label in saved if not label.startswith("hpcckpt")]
    best = min(others, key=lambda label: cool[f"{label}, cold"].wall)
    return [
        Target(
            "restore, warm: hpcckpt / safetensors + load_state_dict",
            mine_warm / warm["safetensors + load_state_dict, warm"].wall,
            "<= 1.3",
        ),
        Target(
            "restore, cold: hpcckpt / best other", mine_cold / cool[f"{best}, cold"].wall, "<= 1.05", f"best: {best}"
        ),
        Target(
            "restore, warm: hpcckpt / torch.load + load_state_dict",
            mine_warm / warm["torch.load + load_state_dict, warm"].wall,
            "info",
        ),
    ]


# -- many small tensors -------------------------------------------------------------------------------------
def small_rows(root: Path, args: argparse.Namespace, figures: Figures) -> list[Target]:
    payload = c.tensors(args.small_mib << 20, args.small_count)
    nbytes = c.nbytes_of(payload)
    print(f"\nload of many small tensors: {nbytes / 2**20:.0f} MiB in {len(payload)} tensors")
    root.mkdir(parents=True)
    c.hpcckpt_save(root / "hpcckpt", payload)
    c.safetensors_save(root, payload)
    file = root / "state.safetensors"
    method = drop_method(args.cold)
    loads = {
        "hpcckpt load": (root / "hpcckpt", lambda: c.hpcckpt_load(root / "hpcckpt", len(payload))),
        "safetensors load_file": (file, lambda: c.safetensors_load(file, len(payload))),
    }
    warm = interleave(args.repeats, {f"{k}, warm": Trial(work) for k, (_, work) in loads.items()})
    cool = interleave(
        args.repeats, {f"{k}, cold": Trial(work, cold([path], method)) for k, (path, work) in loads.items()}
    )
    _print_times({**warm, **cool}, nbytes)
    figures["small"] = {
        "bytes": nbytes,
        "count": len(payload),
        "seconds": {k: v.wall for k, v in {**warm, **cool}.items()},
    }
    return [
        Target(
            f"{len(payload)} small tensors, warm: hpcckpt load / safetensors",
            warm["hpcckpt load, warm"].wall / warm["safetensors load_file, warm"].wall,
            "<= 1.2",
        ),
        Target(
            f"{len(payload)} small tensors, cold: hpcckpt load / safetensors",
            cool["hpcckpt load, cold"].wall / cool["safetensors load_file, cold"].wall,
            "<= 1.2",
        ),
    ]


# -- asynchronous saves -------------------------------------------------------------------------------------
def async_rows(root: Path, args: argparse.Namespace, figures: Figures) -> list[Target]:
    import torch

    figures["async"] = _async_case(root / "cpu", args, "cpu")
    targets = _async_targets("async", figures["async"], stall_goal="<= 0.5")
    if torch.cuda.is_available():
        figures["async_cuda"] = _async_case(root / "cuda", args, "cuda")
        targets += _async_targets("async, CUDA", figures["async_cuda"], stall_goal="<= 0.1")
    else:
        print("\nno CUDA GPU available: the CUDA async path (pinned staging, side stream) was not measured")
        figures["async_cuda"] = None
    return targets


def _async_case(root: Path, args: argparse.Namespace, device: str) -> Figures:
    from . import overlap as o
    from . import restore as r

    subject = r.trainee(args.async_mib << 20, device=device)
    nbytes = r.state_nbytes(subject)
    print(f"\nasync saves ({device}): {nbytes / 2**20:.0f} MiB of model + AdamW state")
    savers: dict[str, o.Saver] = {
        "dcp.async_save": o.DcpAsync(subject, root / "dcp"),
        "hpcckpt async": o.HpcckptAsync(subject, root / "hpcckpt-async"),
    }
    blocked = o.blocked(savers, args.repeats)
    savers["hpcckpt sync"] = o.HpcckptSync(subject, root / "hpcckpt-sync")
    stalls, base = o.stalls(subject, savers, args.repeats, args.loop_steps, args.save_every)
    for label, seconds in blocked.items():
        print(f"  {label:<36} training thread blocked per save  median {seconds:7.3f} s")
    for label, seconds in stalls.items():
        print(f"  {label:<36} net stall per save in the loop     {seconds:7.3f} s")
    print(f"  loop of {args.loop_steps} steps without saves: {base:.3f} s (a save every {args.save_every} steps)")
    return {"bytes": nbytes, "blocked_s": blocked, "stall_s": stalls, "baseline_loop_s": base}


def _async_targets(prefix: str, case: Figures, stall_goal: str) -> list[Target]:
    blocked, stalls = case["blocked_s"], case["stall_s"]
    cores = os.cpu_count() or 1
    few = f"{cores} cores: the writer competes with the step" if cores <= 2 else ""
    sync = stalls["hpcckpt sync"]
    return [
        Target(
            f"{prefix}: thread blocked per save, hpcckpt / dcp.async_save",
            blocked["hpcckpt async"] / blocked["dcp.async_save"],
            "<= 1.0",
        ),
        # A sync save that costs the loop nothing measurable leaves no stall to halve: a ratio of noise.
        Target(
            f"{prefix}: net stall per save, hpcckpt async / sync",
            stalls["hpcckpt async"] / sync if sync > 0 else None,
            stall_goal,
            few if sync > 0 else "the sync save stalled nothing measurable",
        ),
        Target(f"{prefix}: hpcckpt async blocked per save (s)", blocked["hpcckpt async"], "info"),
    ]


# -- peak memory --------------------------------------------------------------------------------------------
def memory_rows(root: Path, args: argparse.Namespace, figures: Figures) -> list[Target]:
    from .memory import CONTENDERS, measure

    nbytes = args.large_mib << 20
    print(f"\npeak extra memory of one save of {nbytes / 2**20:.0f} MiB (a fresh process each)")
    extra: dict[str, float] = {}
    crashed: dict[str, int] = {}
    for contender in CONTENDERS:
        samples = []
        for attempt in range(min(args.repeats, 3)):
            found = measure(contender, root / f"{contender.replace(' ', '-')}-{attempt}", nbytes)
            samples.append(found["extra"] / found["state"])
            if found["exit"] != 0:
                crashed[contender] = found["exit"]
            shutil.rmtree(root / f"{contender.replace(' ', '-')}-{attempt}")
        extra[contender] = statistics.median(samples)
        print(f"  {contender:<36} extra {extra[contender]:6.3f} x the state")
    figures["memory"] = {"bytes": nbytes, "extra_over_state": extra, "probe_exit": crashed}

    def note(contender: str) -> str:
        status = crashed.get(contender)
        return "" if status is None else f"its process exited with status {status} after the save"

    return [
        Target("peak extra memory, sync save / state", extra["hpcckpt save"], "<= 0.1", note("hpcckpt save")),
        Target(
            "peak extra memory, async save / state",
            extra["hpcckpt async save"],
            "<= 1.0",
            note("hpcckpt async save"),
        ),
        Target("peak extra memory, torch.save / state", extra["torch.save"], "info"),
        Target("peak extra memory, safetensors / state", extra["safetensors save_file"], "info"),
    ]


# -- the registry -------------------------------------------------------------------------------------------
def registry_rows(root: Path, args: argparse.Namespace, figures: Figures) -> list[Target]:
    """Commit and lookup latency with ``--history`` checkpoints and ``--writers`` writer processes
    (:func:`hpcckpt.bench.registry.measure`)."""
    from .registry import measure

    root.mkdir(parents=True)
    print(f"\nregistry with {args.history} checkpoints in history, {args.writers} writers:")
    found: Figures = measure(root, history=args.history, writers=args.writers)
    figures["registry"] = found
    commit, lookup = found["commit_ms"], found["lookup_ms"]
    print(f"  commit p50 {commit['p50']:8.2f} ms  p99 {commit['p99']:8.2f} ms  max {commit['max']:8.2f} ms")
    print(f"  lookup p50 {lookup['p50']:8.2f} ms  p99 {lookup['p99']:8.2f} ms  max {lookup['max']:8.2f} ms")
    return [
        Target("registry commit p99 (ms)", commit["p99"], "<= 50"),
        Target("registry lookup p99 (ms)", lookup["p99"], "<= 10"),
        Target("registry longest lock wait of a writer (ms)", found["lock_wait_max_ms"], "info"),
    ]


def _pct(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]
