"""``hpcckpt show RUN_DIR[:STEP]``: one checkpoint's manifest, readably (issue 14: a checkpoint documents
itself).

What it prints is read from the checkpoint's own ``manifest.json`` (the registry's listing does not carry the
hparams, command line and git state), plus the registry's bad mark. ``--json`` prints the manifest as it is on
disk. Runs on login nodes: no torch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFoundError, UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="RUN_DIR[:STEP]",
        help="a run directory, and optionally the step of the checkpoint (default: the newest, bad ones included)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw manifest")


def run(args: argparse.Namespace) -> int:
    from ..store.manifest import read_manifest
    from . import chain

    run_dir, step = split_target(args.target)
    store = chain.open_run(run_dir)
    listed = store.list(include_bad=True)
    chosen = pick(listed, step, store.run_dir)
    if args.json:
        print(json.dumps(json.loads((chosen.path / "manifest.json").read_bytes()), indent=1))
        return 0
    checkpoint = read_manifest(chosen.path)
    print(describe(checkpoint, store.registry.bad_reason(chosen), time.time()))
    return 0


def split_target(target: str) -> tuple[str, int | None]:
    """``RUN_DIR`` and the step of ``RUN_DIR:STEP`` (None without one). A directory whose own name ends in
    ``:<digits>`` is taken whole when it exists."""
    head, colon, tail = target.rpartition(":")
    if not colon or Path(target).is_dir():
        return target, None
    if not tail.isdigit() or not head:
        raise UsageError(f"Invalid checkpoint {target!r}: expected RUN_DIR or RUN_DIR:STEP, e.g. runs/a:1200")
    return head, int(tail)


def pick(listed: list[Any], step: int | None, run_dir: Path) -> Any:
    """The newest checkpoint of ``listed`` (at ``step`` when given); a clear error naming the steps there are."""
    if not listed:
        raise CheckpointNotFoundError(f"no checkpoints in {run_dir}")
    if step is None:
        return listed[-1]
    matches = [c for c in listed if c.step == step]
    if not matches:
        steps = sorted({c.step for c in listed})
        shown = ", ".join(map(str, steps[-30:]))
        more = f" (the newest 30 of {len(steps)})" if len(steps) > 30 else ""
        raise CheckpointNotFoundError(f"no checkpoint at step {step} in {run_dir}; steps available{more}: {shown}")
    return matches[-1]


def describe(c: Any, bad: str | None, now: float) -> str:
    """The readable text of checkpoint ``c`` (read from its manifest) and its bad mark ``bad``."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(c.created))
    saved = f"{when} ({human_age(now - c.created)} ago) on {c.host or 'an unknown host'}"
    if c.save_seconds is not None:
        saved += f", in {c.save_seconds:.2f} s"
    lines = [f"checkpoint {c.name} in {c.path.parent.parent}"]
    if bad is not None:
        lines.append(f"  BAD:       failed validation, never restored again: {bad}")
    lines += [
        f"  step:      {c.step}   epoch: {c.epoch}   commit: {c.seq if c.seq is not None else '-'}",
        f"  saved:     {saved}",
        f"  size:      {human_bytes(c.size)} in {len(c.files)} file(s), format {c.format}, tag {c.tag or '-'}",
        f"  slurm:     {_slurm(c)}",
        f"  command:   {shlex.join(c.command) if c.command else '(not recorded)'}",
        f"  git:       {_git(c.git)}",
        f"  versions:  {', '.join(f'{k} {v}' for k, v in sorted(c.versions.items())) or '(not recorded)'}",
        f"  metrics:   {' '.join(f'{k}={v:.6g}' for k, v in sorted(c.metrics.items())) or '-'}",
    ]
    lines += _mapping("hparams", c.hparams)
    lines += _mapping("metadata", c.metadata)
    lines.append(f"  checksum:  {c.checksum}")
    lines.append("  files:")
    width = max((len(f.name) for f in c.files), default=0)
    lines += [f"    {f.name.ljust(width)}  {human_bytes(f.size):>10}  {f.digest}" for f in c.files]
    return "\n".join(lines)


def _slurm(c: Any) -> str:
    if c.job_id is None and c.array_job_id is None:
        return "(not saved in a Slurm job)"
    array = "" if c.array_job_id is None else f" (array job {c.array_job_id}, task {c.array_task_id})"
    return f"job {c.job_id or '-'}{array}"


def _git(git: Mapping[str, Any] | None) -> str:
    if not git:
        return "(not a git repository, or no git)"
    dirty = git.get("dirty")
    state = "dirty: tracked files modified" if dirty else "clean" if dirty is False else "state unknown"
    return f"{git.get('commit')} ({state})"


def _mapping(title: str, values: Mapping[str, Any]) -> list[str]:
    if not values:
        return [f"  {title + ':':<10} -"]
    return [f"  {title}:"] + [f"    {k}: {json.dumps(v, default=str)}" for k, v in sorted(values.items())]


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def human_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
