"""The registry under load: commit and lookup latency with a long history and several writer processes.

``measure`` fills a run directory with ``history`` committed checkpoints, then starts ``writers`` processes
that each commit ``samples`` more, all at once, while this process looks up the latest checkpoint
(``store.latest()``) every 10 ms until they are done. A commit is timed as the benchmark of ``hpcckpt bench
store`` always timed it: the registry commit alone (:meth:`SaveTransaction.record`: waiting for the lock,
numbering, the manifest, the rename, the journal), not the writing of the checkpoint's files. Figures are
milliseconds; issue 13's targets are commit p99 <= 50 ms and lookup p99 <= 10 ms at 1,000 checkpoints and
8 writers.

Only public APIs of the store are used, so the same module measures an older hpcckpt (the longest lock wait
is then None: older registries did not record it).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

TINY_ELEMENTS = 4
LOOKUP_INTERVAL = 0.01  # seconds between two lookups


def measure(root: Path, history: int = 1000, writers: int = 8, samples: int = 50) -> dict[str, Any]:
    """Commit and lookup latency in ``root/run`` (created; ``root`` must exist): p50, p99 and max in ms of
    ``writers * samples`` commits and of every lookup made meanwhile, and the longest single wait for the
    registry lock (ms) any writer saw."""
    from ..store.store import CheckpointStore

    run_dir = root / "run"
    store = CheckpointStore(run_dir, keep_last=None)
    _fill(store, history)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch's threads
    start = context.Barrier(writers + 1)
    results = context.Queue()
    procs = [
        context.Process(target=_writer, args=(str(run_dir), history + i * samples, samples, start, results))
        for i in range(writers)
    ]
    for proc in procs:
        proc.start()
    reader = CheckpointStore(run_dir, create=False)
    reader.latest()  # a reader that has looked before: its parse is kept
    start.wait()
    lookups = _lookups_until(reader, procs)
    commits: list[float] = []
    waits: list[float | None] = []
    for _ in procs:
        times, wait = results.get(timeout=600)
        commits.extend(times)
        waits.append(wait)
    for proc in procs:
        proc.join(timeout=60)
        if proc.exitcode != 0:
            raise RuntimeError(f"a registry benchmark writer exited with status {proc.exitcode}")
    latest = reader.latest()
    known = [w for w in waits if w is not None]
    return {
        "history": history,
        "writers": writers,
        "commits": len(commits),
        "lookups": len(lookups),
        "commit_ms": _summary(commits),
        "lookup_ms": _summary(lookups),
        "lock_wait_max_ms": max(known) if known and len(known) == len(waits) else None,
        "checkpoints_after": len(reader.list()),
        "latest_seq": latest.seq if latest is not None else None,
    }


def _fill(store: Any, history: int) -> None:
    import torch

    have = len(store.list())
    tiny = {"w": torch.zeros(TINY_ELEMENTS)}
    for step in range(have, history):
        store.save(tiny, step=step, metrics={"loss": 1.0 / (step + 1)})


def _lookups_until(reader: Any, procs: list[Any]) -> list[float]:
    """Lookups every LOOKUP_INTERVAL while the writers run: spread over time, so that most follow some
    commit (back-to-back lookups would mostly find nothing changed and hide the slow ones)."""
    times = []
    while any(proc.is_alive() for proc in procs):
        began = time.perf_counter()
        latest = reader.latest()
        times.append((time.perf_counter() - began) * 1e3)
        if latest is None:
            raise RuntimeError("the registry benchmark's reader found no checkpoint")
        time.sleep(LOOKUP_INTERVAL)
    return times


def _writer(run_dir: str, first_step: int, samples: int, start: Any, results: Any) -> None:
    """One writer process: ``samples`` commits of a tiny checkpoint, each commit timed alone."""
    from ..store.store import CheckpointStore

    store = CheckpointStore(Path(run_dir), create=False, keep_last=None)
    start.wait()
    times = timed_commits(store, first_step, samples)
    wait = getattr(store.registry, "longest_lock_wait", None)  # None in hpcckpt before issue 13
    results.put((times, None if wait is None else wait * 1e3))


def timed_commits(store: Any, first_step: int, samples: int) -> list[float]:
    """``samples`` commits of a tiny checkpoint into ``store`` from ``first_step`` on, in ms each: the
    registry commit alone (:meth:`SaveTransaction.record`), not the writing of its file before it."""
    import torch

    from ..store.formats.torchfile import TorchFileFormat
    from ..store.transaction import SaveRequest, SaveTransaction

    tiny = {"w": torch.zeros(TINY_ELEMENTS)}
    times = []
    for step in range(first_step, first_step + samples):
        request = SaveRequest(store.registry, step, 0, {"loss": 0.0}, retention=lambda checkpoints: [])
        with SaveTransaction.begin(request) as transaction:
            draft = transaction.describe(tuple(TorchFileFormat().write(tiny, transaction.directory)), "torch")
            began = time.perf_counter()
            transaction.record(draft)
            times.append((time.perf_counter() - began) * 1e3)
    return times


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}
