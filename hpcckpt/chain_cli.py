"""The chain's commands: ``submit``, ``render``, ``status``, ``cancel``, ``extend``, and the ``task-begin`` /
``task-end`` steps the chain script runs around the training command."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .errors import HpcckptError, UsageError

TASK_LEAVE = 3  # task-begin's status for "the run is complete or failed: leave with status 0"


def configure_chain(parser: argparse.ArgumentParser, *, submitting: bool) -> None:
    parser.add_argument("--run-dir", required=True, help="the run directory (checkpoints, registry, logs)")
    parser.add_argument("--tasks", type=_int("--tasks"), required=True, help="array tasks, run one after another")
    parser.add_argument("--time", required=True, help="each task's time limit, e.g. 4:00:00, 1-00:00:00, 30")
    parser.add_argument(
        "--signal",
        default=None,
        help="warning signal and lead before the time limit, e.g. USR1@300 (default USR1 with "
        "a lead that suits the time limit), or none",
    )
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--nodes", type=_int("--nodes"))
    parser.add_argument("--ntasks-per-node", type=_int("--ntasks-per-node"))
    parser.add_argument("--gpus", help="sbatch --gpus, e.g. 4 or a100:4")
    parser.add_argument("--gres")
    parser.add_argument("--cpus-per-task", type=_int("--cpus-per-task"))
    parser.add_argument("--mem")
    parser.add_argument("--constraint")
    parser.add_argument("--job-name")
    parser.add_argument("--srun", action="store_true", help="launch the command through srun (multi-node)")
    parser.add_argument("--no-requeue", action="store_true", help="ask Slurm not to requeue preempted tasks")
    parser.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="one more #SBATCH option, e.g. --mail-type=END (repeatable)",
    )
    parser.add_argument("--template", help="your own template, extending chain.sbatch.j2")
    parser.add_argument(
        "--max-failures",
        type=_int("--max-failures"),
        default=3,
        help="consecutive tasks without a new checkpoint before the run is marked failed",
    )
    parser.add_argument(
        "--auto-extend",
        type=_int("--auto-extend"),
        default=0,
        help="submit the chain again, at most this many times, when it ends unfinished",
    )
    if submitting:
        parser.add_argument(
            "--backend", choices=("slurm", "local"), default=None, help="slurm when sbatch is on PATH, else local"
        )
        parser.add_argument("--dry-run", action="store_true", help="validate and print, submit nothing")
        parser.add_argument(
            "--skip-command-check",
            action="store_true",
            help="do not require the command on this machine's PATH (your site setup provides it)",
        )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the training command and its arguments")


def run_render(args: argparse.Namespace) -> int:
    from .chain import render

    print(render(_spec(args), args.template), end="")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from . import slurm
    from .chain import render

    spec = _spec(args)
    backend = args.backend or ("slurm" if shutil.which("sbatch") else "local")
    if not args.skip_command_check:
        _check_command(spec.command)
    if backend == "slurm":
        if not shutil.which("sbatch"):
            raise UsageError("Invalid --backend slurm: sbatch is not on PATH; expected --backend local here")
        if spec.partition:
            try:
                known = slurm.partitions()
            except slurm.SlurmError:
                known = []  # sinfo does not answer: sbatch will judge
            if known and spec.partition not in known:
                raise UsageError(f"Invalid --partition {spec.partition!r}: expected one of {', '.join(known)}")
    script_text = render(spec, args.template)
    if args.dry_run:
        _check_writable(spec.run_dir)
        print(script_text, end="")
        print(
            f"# dry run: would write {spec.run_dir / 'chain.sbatch'} and run "
            f"{'sbatch --parsable' if backend == 'slurm' else 'the local backend on'} it",
            file=sys.stderr,
        )
        return 0
    from .store import CheckpointStore

    store = CheckpointStore(spec.run_dir, keep_last=None)  # creates the run directory, or says why not
    (spec.run_dir / "logs").mkdir(exist_ok=True)
    from .fileio import write_atomic

    script = spec.run_dir / "chain.sbatch"
    write_atomic(script, script_text.encode())
    record = {
        "tasks": spec.tasks,
        "time_seconds": spec.time_seconds,
        "signal": spec.signal_name,
        "lead": spec.signal_lead if spec.signal_name else None,
        "backend": backend,
        "script": str(script),
        "command": list(spec.command),
    }
    if backend == "slurm":
        job = slurm.submit(str(script))
        store.registry.record("submit", job=job, **record)
        print(f"submitted chain {job}: {spec.tasks} task(s) of {args.time} for {spec.run_dir}")
        print(f"  follow it:  hpcckpt status {_q(spec.run_dir)}")
        print(f"  its logs:   {spec.run_dir / 'logs'}/{job}_<task>.out and .err")
        print(f"  stop it:    hpcckpt cancel {_q(spec.run_dir)}")
        return 0
    from .local import run_local_chain

    job = str(int(time.time()))
    store.registry.record("submit", job=job, **record)
    print(
        f"local chain {job}: {spec.tasks} task(s) of {args.time} for {spec.run_dir} (logs in {spec.run_dir / 'logs'})",
        flush=True,
    )
    run_local_chain(
        script,
        spec.run_dir,
        tasks=spec.tasks,
        time_seconds=spec.time_seconds,
        signal_name=spec.signal_name,
        signal_lead=spec.signal_lead,
        job_id=job,
    )
    status = store.registry.status()
    print(
        f"local chain {job}: {'run ' + status['event'] if status else 'tasks used up, run unfinished'}; "
        f"hpcckpt status {_q(spec.run_dir)}"
    )
    return 1 if status is not None and status["event"] == "failed" else 0


def configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def run_status(args: argparse.Namespace) -> int:
    from .status import format_status, summarize
    from .store import CheckpointStore
    from .tasks import chain_jobs

    store = CheckpointStore(args.run_dir, keep_last=None, create=False)
    events = store.registry.events()
    queue, note = _queue(chain_jobs(events), events)
    status = summarize(store.run_dir, events, store.list(), queue, time.time())
    if note:
        status.warnings.append(note)
    if args.json:
        print(json.dumps(status.to_json(), indent=1))
    else:
        print(format_status(status))
    return 0


def configure_run_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")


def run_cancel(args: argparse.Namespace) -> int:
    from . import slurm
    from .store import CheckpointStore
    from .tasks import chain_jobs

    store = CheckpointStore(args.run_dir, keep_last=None, create=False)
    jobs = chain_jobs(store.registry.events())
    queued = sorted({e.array_job for e in slurm.queue(jobs)}) if jobs and shutil.which("squeue") else []
    if queued:
        slurm.cancel(queued)
    store.registry.record("cancel", jobs=queued)
    print(f"cancelled {', '.join(queued)}" if queued else f"nothing of {store.run_dir} is queued")
    return 0


def configure_extend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--tasks", type=_int("--tasks"), required=True, help="array tasks to add")


def run_extend(args: argparse.Namespace) -> int:
    from . import slurm
    from .store import CheckpointStore
    from .tasks import chain_jobs

    if args.tasks < 1:
        raise UsageError(f"Invalid --tasks {args.tasks}: expected a whole number of array tasks >= 1")
    store = CheckpointStore(args.run_dir, keep_last=None, create=False)
    events = store.registry.events()
    script = store.run_dir / "chain.sbatch"
    if not script.is_file():
        raise HpcckptError(f"{script} is missing: extend continues a chain submitted with `hpcckpt submit`")
    status = store.registry.status()
    if status is not None and status["event"] == "complete":
        raise HpcckptError(f"run {store.run_dir} is complete at step {status.get('step')}: nothing to extend")
    if status is not None:
        store.registry.record("reopen", why="hpcckpt extend")
        print(f"reopening run {store.run_dir}, which was marked failed: {status.get('reason')}")
    queued = sorted({e.array_job for e in slurm.queue(chain_jobs(events))})
    after = [f"--dependency=afterany:{':'.join(queued)}"] if queued else []
    job = slurm.submit(str(script), [f"--array=1-{args.tasks}%1", *after])
    store.registry.record("submit", job=job, tasks=args.tasks, extend=True, backend="slurm", script=str(script))
    print(
        f"submitted {job}: {args.tasks} more task(s) for {store.run_dir}"
        f"{' after ' + ', '.join(queued) if queued else ''}"
    )
    return 0


def configure_task(parser: argparse.ArgumentParser, *, end: bool) -> None:
    parser.add_argument("--run-dir", default=None, help="default: HPCCKPT_RUN_DIR")
    parser.add_argument("--max-failures", type=_int("--max-failures"), default=3)
    if end:
        parser.add_argument("--status", type=int, required=True, help="the training command's exit status")
        parser.add_argument("--auto-extend", type=_int("--auto-extend"), default=0)
        parser.add_argument(
            "--exited-at",
            type=_exited_at,
            default=None,
            help="Unix time the training command exited (the chain script's `date +%%s.%%N`): measures teardown",
        )


def run_task_begin(args: argparse.Namespace) -> int:
    from .tasks import task_begin

    return 0 if task_begin(_task_run_dir(args), os.environ, args.max_failures) else TASK_LEAVE


def run_task_end(args: argparse.Namespace) -> int:
    from .tasks import task_end

    task_end(
        _task_run_dir(args), os.environ, args.status, args.max_failures, args.auto_extend, exited_at=args.exited_at
    )
    return 0


def _exited_at(text: str) -> float | None:
    """``--exited-at``: Unix seconds; empty (no ``date`` on the node) means unknown, not an error, so that the
    task is still recorded."""
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid {text!r}: expected Unix time in seconds, e.g. 1795300000.25"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid {text!r}: expected Unix time in seconds > 0")
    return value


# -- helpers --------------------------------------------------------------------------------------------
def _spec(args: argparse.Namespace) -> Any:
    from .chain import chain_spec

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return chain_spec(
        run_dir=args.run_dir,
        command=command,
        tasks=args.tasks,
        time=args.time,
        signal=args.signal,
        job_name=args.job_name,
        srun=args.srun,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node,
        gpus=args.gpus,
        gres=args.gres,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        constraint=args.constraint,
        requeue=not args.no_requeue,
        extra_directives=args.sbatch_arg,
        max_failures=args.max_failures,
        auto_extend=args.auto_extend,
    )


def _int(name: str) -> Any:
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {name} {text!r}: expected a whole number") from None

    return parse


def _check_command(command: tuple[str, ...]) -> None:
    program = command[0]
    if os.sep in program:
        if not os.access(program, os.X_OK):
            raise UsageError(
                f"Invalid command {program!r}: no such executable file; expected a program and its arguments after --"
            )
    elif shutil.which(program) is None:
        raise UsageError(
            f"Invalid command {program!r}: not found on PATH; expected a program and its arguments "
            "after -- (or --skip-command-check when your site setup provides it)"
        )


def _check_writable(run_dir: Path) -> None:
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"Invalid --run-dir {str(run_dir)!r}: {existing} is not a writable directory")


def _queue(jobs: list[str], events: list[dict[str, Any]]) -> tuple[Any, str | None]:
    from . import slurm

    backends = {e.get("backend") for e in events if e.get("event") == "submit"}
    if not jobs or backends == {"local"}:
        return None, None
    try:
        return slurm.queue(jobs), None
    except slurm.SlurmError as error:
        return None, f"the queue is unknown: {error}"


def _task_run_dir(args: argparse.Namespace) -> Path:
    run_dir = args.run_dir or os.environ.get("HPCCKPT_RUN_DIR")
    if not run_dir:
        raise UsageError("task-begin/task-end need --run-dir or HPCCKPT_RUN_DIR (the chain script exports it)")
    return Path(run_dir)


def _q(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))
