"""``hpcckpt bench``: side-by-side measurements of hpcckpt against the plain ways of doing the same work.

These machines are noisy, so every comparison is interleaved (A, B, C, A, B, C, ...) in one process, with
the order rotated each round, and reported as a ratio of medians (hpcckpt's time over the other's: below 1
is faster). Each row of issue 13's target table is printed with its verdict (``ok``, ``MISS``, or ``n/a``
where it could not be measured here, which ``--check`` also counts as a miss); ``--check`` exits 1 on a miss
and ``--json`` writes every figure. ``--only GROUP`` runs some rows alone (e.g. ``--only async``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from . import compression as bench_compression
from . import mirror as bench_mirror
from .targets import GROUPS, Target

SIZES = ("large_mib", "small_mib", "small_count", "model_mib", "async_mib", "history", "writers", "mirror_mib")
QUICK = {
    "repeats": 1,
    "large_mib": 4,
    "small_mib": 1,
    "small_count": 200,
    "model_mib": 2,
    "async_mib": 3,
    "loop_steps": 4,
    "save_every": 2,
    "history": 20,
    "writers": 2,
    "mirror_mib": 4,
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("store", "agree", "compression"), help="which benchmark to run")
    parser.add_argument("--steps", type=int, default=300, help="agree: steps per timed loop")
    parser.add_argument("--dir", help="where to write (default: a temporary directory in the current one)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions, median taken")
    parser.add_argument("--large-mib", type=int, default=1024, help="large case: this many MiB in 64 tensors")
    parser.add_argument("--small-mib", type=int, default=256, help="small-tensor case: this many MiB ...")
    parser.add_argument("--small-count", type=int, default=20_000, help="... in this many tensors")
    parser.add_argument(
        "--model-mib", type=int, default=400, help="restore case: MLP parameters (AdamW state makes it 3x)"
    )
    parser.add_argument("--async-mib", type=int, default=625, help="async case: model + AdamW state in MiB")
    parser.add_argument("--loop-steps", type=int, default=24, help="async case: training steps per timed loop")
    parser.add_argument("--save-every", type=int, default=6, help="async case: a save every this many steps")
    parser.add_argument("--history", type=int, default=1000, help="checkpoints in the registry's history")
    parser.add_argument("--writers", type=int, default=8, help="registry case: writer processes")
    parser.add_argument(
        "--cold",
        choices=("auto", "drop", "fadvise"),
        default="auto",
        help="how to empty the page cache for cold loads: drop (root: /proc/sys/vm/drop_caches), fadvise "
        "(POSIX_FADV_DONTNEED on each file), auto (drop where allowed)",
    )
    bench_mirror.configure(parser)
    parser.add_argument(
        "--only", action="append", choices=GROUPS, help="run only this group of rows (repeatable); default: all"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks that it all runs")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    bench_compression.configure(parser)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    whole = ("repeats", "loop_steps", "save_every", *SIZES)
    if any(getattr(args, name) < 1 for name in whole):
        raise UsageError(
            "Invalid benchmark size: "
            + ", ".join(f"--{name.replace('_', '-')}" for name in whole)
            + " must be whole numbers >= 1"
        )
    if args.save_every > args.loop_steps:
        raise UsageError(f"Invalid --save-every {args.save_every}: expected at most --loop-steps ({args.loop_steps})")
    if args.what == "agree":
        from . import agree as bench_agree

        if args.steps < 1:
            raise UsageError(f"Invalid --steps {args.steps}: expected a whole number >= 1")
        figures, found = bench_agree.run(args)
        targets = [Target(name, value, goal) for name, value, goal in found]
    elif args.what == "compression":
        parent = Path(args.dir) if args.dir else Path.cwd()
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hpcckpt-bench-", dir=parent) as scratch:
            figures, targets = bench_compression.run(Path(scratch), args)
    else:
        from .rows import bench_store

        needs = set(args.only or GROUPS) - {"async", "registry", "mirror"}
        if needs and importlib.util.find_spec("safetensors") is None:
            raise UsageError(
                f"hpcckpt bench store's rows {', '.join(sorted(needs))} measure against safetensors, which is "
                "not installed: pip install safetensors (or hpcckpt[test]); --only async, --only registry and "
                "--only mirror run without it"
            )

        parent = Path(args.dir) if args.dir else Path.cwd()
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hpcckpt-bench-", dir=parent) as scratch:
            figures, targets = bench_store(Path(scratch), args, set(args.only or GROUPS))
    _report(targets)
    if args.json:
        report = {"figures": figures, "targets": [asdict(t) | {"met": t.met} for t in targets]}
        Path(args.json).write_text(json.dumps(report, indent=1, allow_nan=False))
    return 1 if args.check and not all(t.met for t in targets) else 0


def _report(targets: list[Target]) -> None:
    print()
    for target in targets:
        goal = "" if target.goal == "info" else f"target {target.goal}"
        value = "       -" if target.value is None else f"{target.value:8.3f}"
        note = f"   ({target.note})" if target.note else ""
        print(f"  {target.verdict}  {target.name:<58} {value}   {goal}{note}")
