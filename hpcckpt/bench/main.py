"""``hpcckpt bench``: side-by-side measurements of hpcckpt against the plain ways of doing the same work.

These machines are noisy, so every comparison is interleaved (A, B, C, A, B, C, ...) in one process and
reported as a ratio of medians. Targets are printed next to the figures; ``--check`` turns a missed target
into exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    goal: str  # e.g. ">= 0.9"

    @property
    def met(self) -> bool:
        if self.goal == "info":
            return True
        op, bound = self.goal.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("store", "agree"), help="which benchmark to run")
    parser.add_argument("--steps", type=int, default=300, help="agree: steps per timed loop")
    parser.add_argument("--dir", help="where to write (default: a temporary directory in the current one)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions, median taken")
    parser.add_argument("--large-mib", type=int, default=1024, help="large case: this many MiB in 64 tensors")
    parser.add_argument("--small-mib", type=int, default=256, help="small-tensor case: this many MiB ...")
    parser.add_argument("--small-count", type=int, default=20_000, help="... in this many tensors")
    parser.add_argument("--history", type=int, default=1000, help="checkpoints in the registry's history")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    if args.repeats < 1 or args.large_mib < 1 or args.small_mib < 1 or args.small_count < 1 or args.history < 1:
        raise UsageError(
            "Invalid benchmark size: --repeats, --large-mib, --small-mib, --small-count and --history "
            "must be whole numbers >= 1"
        )
    if args.what == "agree":
        from . import agree as bench_agree

        if args.steps < 1:
            raise UsageError(f"Invalid --steps {args.steps}: expected a whole number >= 1")
        figures, found = bench_agree.run(args)
        targets = [Target(name, value, goal) for name, value, goal in found]
    else:
        parent = Path(args.dir) if args.dir else Path.cwd()
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hpcckpt-bench-", dir=parent) as scratch:
            figures, targets = bench_store(Path(scratch), args)
    print()
    for target in targets:
        verdict = "info" if target.goal == "info" else ("ok  " if target.met else "MISS")
        goal = "" if target.goal == "info" else f"target {target.goal}"
        print(f"  {verdict}  {target.name:<44} {target.value:8.3f}   {goal}")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "targets": [t.__dict__ for t in targets]}, indent=1))
    return 1 if args.check and not all(t.met for t in targets) else 0


def bench_store(root: Path, args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    import torch

    figures: dict[str, Any] = {"repeats": args.repeats, "dir": str(root)}
    targets: list[Target] = []
    cases = {
        "large": _tensors(args.large_mib << 20, 64),
        "small": _tensors(args.small_mib << 20, args.small_count),
    }
    print(f"hpcckpt bench store in {root} (torch {torch.__version__}, {args.repeats} interleaved repeats)")
    for case, payload in cases.items():
        nbytes = sum(t.numel() * t.element_size() for t in payload.values())
        print(f"\n{case}: {nbytes / 2**20:.0f} MiB in {len(payload)} tensors")
        saves = _interleave(
            args.repeats,
            {
                "hpcckpt save": lambda d, p=payload: _hpcckpt_save(d, p, checksum=True),  # type: ignore[misc]
                "hpcckpt save, no checksum": lambda d, p=payload: _hpcckpt_save(d, p, checksum=False),  # type: ignore[misc]
                "torch.save + fsync": lambda d, p=payload: _torch_save(d, p),  # type: ignore[misc]
                "raw write + fsync": lambda d, p=payload: _raw_write(d, p),  # type: ignore[misc]
            },
            root,
        )
        loads = _interleave(
            args.repeats,
            {"hpcckpt load (verified)": _hpcckpt_load_setup(root, payload), "raw read": _raw_read_setup(root, payload)},
            root,
        )
        digest = _median_seconds(args.repeats, lambda p=payload: _digest_all(p))  # type: ignore[misc]
        in_memory = _in_memory_checksum_ab(payload, args.repeats)
        for label, seconds in {**saves, **loads}.items():
            print(f"  {label:<28} median {seconds:7.3f} s   {nbytes / seconds / 1e6:8.0f} MB/s")
        print(f"  {'xxh3 of the bytes alone':<28} median {digest:7.3f} s")
        if in_memory is not None:
            print(f"  on tmpfs: save {in_memory[0]:.3f} s, without checksum {in_memory[1]:.3f} s")
        figures[case] = {"bytes": nbytes, "seconds": {**saves, **loads, "xxh3 alone": digest}}
        # Speed ratios: > 1 means hpcckpt is faster. The targets are set on the large case; the small-tensor
        # case is reported for information (torch.load(weights_only=True) unpickles each tensor in Python,
        # about 50 us apiece, which no file layout avoids).
        large = case == "large"
        targets += [
            Target(
                f"{case}: save speed vs raw write",
                saves["raw write + fsync"] / saves["hpcckpt save"],
                ">= 0.9" if large else "info",
            ),
            Target(
                f"{case}: save speed vs torch.save",
                saves["torch.save + fsync"] / saves["hpcckpt save"],
                ">= 1.0" if large else "info",
            ),
            Target(
                f"{case}: load speed vs raw read",
                loads["raw read"] / loads["hpcckpt load (verified)"],
                ">= 0.9" if large else "info",
            ),
            # The hashing is inline, overlapping the disk's write-back of earlier chunks. The A/B on disk is the
            # check; the A/B on tmpfs (memory only, nothing to overlap with) is the worst case, for information.
            Target(
                f"{case}: checksum cost A/B on disk",
                saves["hpcckpt save"] / saves["hpcckpt save, no checksum"] - 1,
                "<= 0.05",
            ),
            Target(f"{case}: hashing alone / save", digest / saves["hpcckpt save"], "info"),
        ]
        if in_memory is not None:
            targets.append(Target(f"{case}: checksum cost A/B on tmpfs", in_memory[0] / in_memory[1] - 1, "info"))
    commit_ms, lookup_ms = _registry_latency(root / "registry", args.history)
    figures["registry"] = {"history": args.history, "commit_ms": commit_ms, "lookup_ms": lookup_ms}
    print(f"\nregistry with {args.history} checkpoints in history:")
    for label, samples in (("commit", commit_ms), ("lookup (latest)", lookup_ms)):
        print(f"  {label:<16} p50 {_pct(samples, 50):6.2f} ms   p99 {_pct(samples, 99):6.2f} ms")
    targets += [
        Target("registry commit p99 (ms)", _pct(commit_ms, 99), "<= 20"),
        Target("registry lookup p99 (ms)", _pct(lookup_ms, 99), "<= 20"),
    ]
    return figures, targets


# -- the contenders ----------------------------------------------------------------------------------------
Step = Callable[[Path], None]


def _tensors(nbytes: int, count: int) -> dict[str, Any]:
    import torch

    numel = max(1, nbytes // 4 // count)
    generator = torch.Generator().manual_seed(0)
    return {f"t{i:05d}": torch.randn(numel, generator=generator) for i in range(count)}


def _hpcckpt_save(directory: Path, payload: dict[str, Any], *, checksum: bool) -> None:
    from ..store.formats.torchfile import TorchFileFormat
    from ..store.store import CheckpointStore

    store = CheckpointStore(directory, keep_last=None)
    store.format = TorchFileFormat(checksum=checksum)
    store.save(payload, step=1)


def _torch_save(directory: Path, payload: dict[str, Any]) -> None:
    import torch

    with open(directory / "state.pt", "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def _raw_write(directory: Path, payload: dict[str, Any]) -> None:
    fd = os.open(directory / "raw.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for tensor in payload.values():
            view = memoryview(tensor.numpy()).cast("B")
            while view.nbytes:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _hpcckpt_load_setup(root: Path, payload: dict[str, Any]) -> Step:
    from ..store.store import CheckpointStore

    saved = root / "load-hpcckpt"
    CheckpointStore(saved, keep_last=None).save(payload, step=1)

    def load(_: Path) -> None:
        store = CheckpointStore(saved, keep_last=None, create=False)
        latest = store.latest()
        assert latest is not None
        for record in latest.files:  # whatever the store's default format writes
            _drop_cache(latest.path / record.name)
        state = store.load()
        assert len(state) == len(payload)

    return load


def _raw_read_setup(root: Path, payload: dict[str, Any]) -> Step:
    path = root / "load-raw.bin"
    _raw_write(root, payload)
    (root / "raw.bin").rename(path)
    buffer = bytearray(path.stat().st_size)

    def read(_: Path) -> None:
        _drop_cache(path)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as f:
            while view.nbytes:
                view = view[f.readinto(view) :]

    return read


def _digest_all(payload: dict[str, Any]) -> None:
    from ..store.fileio import new_digest

    hasher = new_digest()
    for tensor in payload.values():
        hasher.update(memoryview(tensor.numpy()).cast("B"))


def _drop_cache(path: Path) -> None:
    """Evict a file from the page cache, so a read comes from the disk as on a fresh node."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _interleave(repeats: int, contenders: dict[str, Step], root: Path) -> dict[str, float]:
    samples: dict[str, list[float]] = {label: [] for label in contenders}
    order = list(contenders)
    for round_ in range(repeats):
        # Rotate who goes first: the first contender of a round pays for the previous round's deletions
        # and write-back, which otherwise biases one of them every time.
        shift = round_ % len(order)
        for label in order[shift:] + order[:shift]:
            step = contenders[label]
            directory = root / "work"
            directory.mkdir()
            start = time.perf_counter()
            step(directory)
            samples[label].append(time.perf_counter() - start)
            shutil.rmtree(directory)
    return {label: statistics.median(values) for label, values in samples.items()}


def _in_memory_checksum_ab(payload: dict[str, Any], repeats: int) -> tuple[float, float] | None:
    """Median save time with and without the checksum into /dev/shm, or None where there is none."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shutil.disk_usage(shm).free < 3 * sum(
        t.numel() * t.element_size() for t in payload.values()
    ):
        return None
    with tempfile.TemporaryDirectory(prefix="hpcckpt-bench-", dir=shm) as scratch:
        times = _interleave(
            repeats,
            {
                "with": lambda d, p=payload: _hpcckpt_save(d, p, checksum=True),  # type: ignore[misc]
                "without": lambda d, p=payload: _hpcckpt_save(d, p, checksum=False),  # type: ignore[misc]
            },
            Path(scratch),
        )
    return times["with"], times["without"]


def _median_seconds(repeats: int, work: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _registry_latency(directory: Path, history: int, samples: int = 200) -> tuple[list[float], list[float]]:
    import torch

    from ..store.formats.torchfile import TorchFileFormat
    from ..store.store import CheckpointStore
    from ..store.transaction import SaveRequest, SaveTransaction

    store = CheckpointStore(directory, keep_last=None)
    tiny = {"w": torch.zeros(4)}
    for step in range(history):
        store.save(tiny, step=step, metrics={"loss": 1.0 / (step + 1)})
    commit_ms, lookup_ms = [], []
    for step in range(history, history + samples):
        request = SaveRequest(store.registry, step, 0, {"loss": 0.0}, retention=lambda checkpoints: [])
        with SaveTransaction.begin(request) as transaction:
            draft = transaction.describe(tuple(TorchFileFormat().write(tiny, transaction.directory)), "torch")
            start = time.perf_counter()
            transaction.record(draft)  # the registry commit alone (and the lock's release), as timed before
            commit_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        latest = store.latest()
        lookup_ms.append((time.perf_counter() - start) * 1e3)
        assert latest is not None and latest.step == step
    return commit_ms, lookup_ms


def _pct(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]
