"""The ``hpcckpt`` command.

It runs on login nodes and must start fast, without torch. One way of deferring imports: what building
the parser needs (every subcommand's flags: :mod:`.chain`, the chain's options, the benchmarks' flags) is
imported at the top, standard library and light modules only; what a subcommand needs to run (the store,
Jinja, the Slurm task guard, the local backend) is imported inside the function that runs it. Deferring
the parser's modules would save nothing (``--help`` builds every subcommand's flags) and would hide the
handlers from mypy. Exit codes follow click's: 0 success, 1 an error, 2 bad usage (nothing was done).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..bench import main as bench
from ..environment import check_environment
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, HpcckptError, UsageError
from ..progress import Progress
from . import chain, mirror, show
from .show import human_age as _age
from .show import human_bytes as _bytes

if TYPE_CHECKING:
    from ..store.manifest import Checkpoint
    from ..store.store import CheckpointStore

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Handler


def _configure_templates(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", action="store_true", help="print only the templates' directory")


def _run_templates(args: argparse.Namespace) -> int:
    from ..slurm.resources import template_dir, template_names

    if args.path:
        print(template_dir())
        return 0
    print(f"templates in {template_dir()}:")
    for name in template_names():
        print(f"  {name}")
    return 0


_WHERE = "a run directory, or a location URL with its scheme (s3://bucket/prefix, gs://..., file:///abs/path)"


def _configure_ls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR|URL", help=_WHERE)
    parser.add_argument("--json", action="store_true", help="print the checkpoints as a JSON list")


def _run_ls(args: argparse.Namespace) -> int:
    bad: dict[str, str] = {}
    if mirror.is_location(args.run_dir):
        checkpoints = mirror.list_remote(args.run_dir)
    else:
        store = chain.open_run(args.run_dir)
        checkpoints = store.list(include_bad=True)  # bad ones (failed validation) too, marked BAD
        bad = {c.name: reason for c in checkpoints if (reason := store.registry.bad_reason(c)) is not None}
    if args.json:
        print(json.dumps([{**c.summary(), "bad": bad.get(c.name)} for c in checkpoints], indent=1))
        return 0
    if not checkpoints:
        print(f"no checkpoints in {args.run_dir}")
        return 0
    now = time.time()
    rows = [("NAME", "STEP", "EPOCH", "SIZE", "AGE", "SAVE", "TAG", "METRICS")]
    for c in checkpoints:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(c.metrics.items()))
        if c.name in bad:
            metrics = f"BAD ({bad[c.name]}) {metrics}".rstrip()
        save = "-" if c.save_seconds is None else f"{c.save_seconds:.2f}s"
        rows.append(
            (
                c.name,
                str(c.step),
                str(c.epoch),
                _bytes(c.size),
                _age(now - c.created),
                save,
                c.tag or "-",
                metrics,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def _configure_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR|URL", help=_WHERE)


def _run_verify(args: argparse.Namespace) -> int:
    if mirror.is_location(args.run_dir):
        return mirror.verify_remote(args.run_dir, print, _bytes)
    store = chain.open_run(args.run_dir)
    checkpoints = store.list()
    corrupt = gone = 0
    with Progress(sum(c.size for c in checkpoints), f"verify {store.run_dir}") as bar:
        for checkpoint in checkpoints:
            corrupt, gone = _verify_one(store, checkpoint, bar, corrupt, gone)
    print(f"{len(checkpoints) - corrupt - gone} ok, {corrupt} corrupt in {store.run_dir}")
    return 1 if corrupt else 0


def _verify_one(
    store: CheckpointStore, checkpoint: Checkpoint, bar: Progress, corrupt: int, gone: int
) -> tuple[int, int]:
    """Verify one checkpoint, print its line, count its bytes as done however it ended."""
    start = bar.done
    try:
        try:
            store.verify(checkpoint, on_bytes=bar.update)
        finally:
            bar.update(max(0, start + checkpoint.size - bar.done))  # a corrupt file stops early
    except CheckpointNotFoundError:
        print(f"gone     {checkpoint.name} (deleted by retention while verifying)")
        return corrupt, gone + 1  # retention deleted it while we were checking: not a fault of the run
    except CorruptCheckpointError as error:
        print(f"CORRUPT  {checkpoint.name}: {error}")
        return corrupt + 1, gone
    print(f"ok       {checkpoint.name}  step {checkpoint.step}  {_bytes(checkpoint.size)}")
    return corrupt, gone


def _configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="the checkpoint at this step (default: the latest)")
    which.add_argument("--best", metavar="METRIC", help="the checkpoint with the best value of METRIC")
    parser.add_argument(
        "--mode", choices=("min", "max"), default=None, help="with --best: lower (default) or higher is better"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    parser.add_argument(
        "--as",
        dest="as_",
        choices=("torch", "safetensors"),
        default="torch",
        help="torch (default): one torch.load-able file; safetensors: the model's weights as a .safetensors file",
    )
    parser.add_argument("--weights-only", action="store_true", help="export only the model's state dict")


def _run_export(args: argparse.Namespace) -> int:
    if args.best is None and args.mode is not None:
        raise UsageError(f"Invalid --mode {args.mode}: it goes with --best METRIC")
    store = chain.open_run(args.run_dir)
    ckpt: Any = args.step
    if args.best is not None:
        ckpt = store.best(args.best, args.mode or "min")
        if ckpt is None:
            raise CheckpointNotFoundError(f"no checkpoint in {store.run_dir} recorded the metric {args.best!r}")
    path, used = store.export(args.out, ckpt, weights_only=args.weights_only, as_=args.as_)
    what = "weights" if args.weights_only or args.as_ == "safetensors" else "state"
    print(f"wrote the {what} of {used.name} (step {used.step}) to {path}")
    return 0


_COMMANDS: tuple[_Command, ...] = (
    _Command(
        "submit",
        "validate, render and submit a chain of array tasks (or run it locally)",
        partial(chain.configure_chain, submitting=True),
        chain.run_submit,
    ),
    _Command(
        "render",
        "print the chain script that submit would submit",
        partial(chain.configure_chain, submitting=False),
        chain.run_render,
    ),
    _Command(
        "status", "where a run stands: state, step, tasks, history, warnings", chain.configure_status, chain.run_status
    ),
    _Command("cancel", "cancel every queued task of a run's chain", chain.configure_run_dir, chain.run_cancel),
    _Command(
        "extend", "add an array of tasks that starts after the current one", chain.configure_extend, chain.run_extend
    ),
    _Command(
        "task-begin",
        "(run by the chain script) the guard before the training command",
        partial(chain.configure_task, end=False),
        chain.run_task_begin,
    ),
    _Command(
        "task-end",
        "(run by the chain script) record the task's end; cancel, fail or extend the chain",
        partial(chain.configure_task, end=True),
        chain.run_task_end,
    ),
    _Command(
        "ls", "list the committed checkpoints of a run, or the complete ones at a location", _configure_ls, _run_ls
    ),
    _Command(
        "verify",
        "check every checkpoint of a run, or at a location, against its checksums",
        _configure_verify,
        _run_verify,
    ),
    _Command(
        "show", "print one checkpoint's manifest: hparams, command, git, versions, files", show.configure, show.run
    ),
    _Command(
        "pull",
        "copy the newest valid checkpoint at a location (or --step's) into a run directory, verified",
        mirror.configure_pull,
        mirror.run_pull,
    ),
    _Command(
        "push",
        "upload a run's committed checkpoints that a location lacks (manifest last, nothing deleted)",
        mirror.configure_push,
        mirror.run_push,
    ),
    _Command(
        "export",
        "write a checkpoint as one plain torch.load-able file or .safetensors weights",
        _configure_export,
        _run_export,
    ),
    _Command("bench", "measure hpcckpt against plain torch.save and raw I/O", bench.configure, bench.run),
    _Command("templates", "list the sbatch templates shipped with hpcckpt", _configure_templates, _run_templates),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcckpt",
        description="Resumable, preemption-safe PyTorch training on Slurm job-array chains.",
        epilog="Run 'hpcckpt COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hpcckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(command_parser)
        # Not `command`: submit's positional training command has that name (issue 11: error messages
        # began "hpcckpt ['--', 'python3', 'train.py']: error").
        command_parser.set_defaults(handler=command.run, subcommand=command.name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        check_environment(os.environ)  # every HPCCKPT_* variable, before any work (issue 11, item 10)
        code = handler(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except BrokenPipeError:
        # `hpcckpt ls --json | head -1`: the reader left, which is no error of ours. As the CPython docs
        # recommend, point stdout at devnull so that the flush at exit does not fail again, and leave quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except HpcckptError as error:
        print(f"hpcckpt {args.subcommand}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"hpcckpt {args.subcommand}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
