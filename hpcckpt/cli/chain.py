"""The chain's commands: ``submit``, ``render``, ``status``, ``cancel``, ``extend``, and the ``task-begin`` /
``task-end`` steps the chain script runs around the training command."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import events as event_log
from ..checks import whole_number, whole_number_arg
from ..errors import HpcckptError, UsageError
from ..rundir import LOGS, SCRIPT
from ..slurm.spec import DEFAULT_MAX_FAILURES, ChainSpec, Option, chain_spec, options
from .rundirs import open_run as open_run

DEFAULT_MAX_TASKS_FACTOR = 4  # --max-tasks default: 4 x --tasks (item 28)


def configure_chain(parser: argparse.ArgumentParser, *, submitting: bool) -> None:
    """The flags of ``render`` and ``submit``: the chain's options as :mod:`hpcckpt.slurm.spec` declares
    them (the training command last), with submit's own before it."""
    declared = [o for o in options() if o.flag is not None]
    for declared_option in declared:
        if declared_option.flag != "command":
            _add(parser, declared_option)
    if submitting:
        parser.add_argument(
            "--backend",
            choices=("slurm", "local"),
            default=None,
            help="slurm (the default: sbatch must be on PATH) or local (the tasks run on this machine)",
        )
        parser.add_argument(
            "--max-tasks",
            type=whole_number_arg("--max-tasks"),
            default=None,
            help="cap on the chain's tasks in all: while the run is unfinished and its last task made "
            "progress, the chain submits --tasks more, up to this (default 4 x --tasks; = --tasks: never)",
        )
        parser.add_argument("--dry-run", action="store_true", help="validate and print, submit nothing")
        parser.add_argument(
            "--skip-command-check",
            action="store_true",
            help="do not require the command on this machine's PATH (your site setup provides it)",
        )
    _add(parser, next(o for o in declared if o.flag == "command"))


def _add(parser: argparse.ArgumentParser, declared: Option) -> None:
    """One chain option as an argparse argument; only what it declares is passed on."""
    assert declared.flag is not None
    settings: dict[str, Any] = {"help": declared.help}
    if declared.flag.startswith("-"):
        settings.update(dest=declared.name, required=declared.required)
        # argparse appends to its default: a fresh list each time, never the declared tuple.
        settings["default"] = list(declared.default) if declared.action == "append" else declared.default
    for key, value in (("action", declared.action), ("type", declared.parse), ("nargs", declared.nargs)):
        if value is not None:
            settings[key] = value
    if declared.metavar is not None:
        settings["metavar"] = declared.metavar
    parser.add_argument(declared.flag, **settings)


def run_render(args: argparse.Namespace) -> int:
    from ..slurm.script import render

    print(render(_spec(args)), end="")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from ..slurm import commands as slurm
    from ..slurm.script import render

    spec = _spec(args)
    backend = args.backend or "slurm"
    if not args.skip_command_check:
        _check_command(spec.command)
    if backend == "slurm":
        if not slurm.available("sbatch"):
            # Never fall back to the local backend by itself (issue 11, item 15): it would run the job on
            # this (login) node and ignore --gpus, --partition and the rest.
            raise UsageError(
                f"sbatch is not on PATH, so the chain cannot go to Slurm"
                f"{'' if args.backend else ' (the default backend)'}: "
                "load Slurm first (e.g. `module load slurm`, or run this on the cluster's login node), "
                "or pass --backend local to run the tasks on this machine"
            )
        if spec.partition:
            try:
                known = slurm.partitions()
            except slurm.SlurmError:
                known = []  # sinfo does not answer: sbatch will judge
            if known and spec.partition not in known:
                raise UsageError(f"Invalid --partition {spec.partition!r}: expected one of {', '.join(known)}")
    max_tasks = _max_tasks(args, spec.tasks)
    script_text = render(spec)
    if not args.skip_command_check:  # after the template's own checks: a bad --template is named first
        _check_script(spec)
        _check_venv(spec)
    if spec.mirror is not None:
        from .mirror import check_writable

        check_writable(spec.mirror)  # before anything is written or submitted (issue 14)
    if args.dry_run:
        _check_writable(spec.run_dir)
        print(script_text, end="")
        print(
            f"# dry run: would write {spec.run_dir / SCRIPT} and run "
            f"{'sbatch --parsable' if backend == 'slurm' else 'the local backend on'} it",
            file=sys.stderr,
        )
        return 0
    from ..store.store import CheckpointStore

    # Creates the run directory, or says why not.
    store = CheckpointStore(spec.run_dir, keep_last=None)
    # Slurm's log directory (the local backend keeps its logs in RUN_DIR/logs and makes it itself).
    (spec.log_dir if backend == "slurm" else spec.run_dir / LOGS).mkdir(parents=True, exist_ok=True)
    from ..store.fileio import write_atomic

    script = spec.run_dir / SCRIPT
    write_atomic(script, script_text.encode())
    lead = spec.signal_lead if spec.signal_name else None
    settings = event_log.ChainSettings(spec.time_seconds, spec.signal_name, lead, str(script), list(spec.command))
    record = functools.partial(
        event_log.chain_submitted, tasks=spec.tasks, backend=backend, settings=settings, max_tasks=max_tasks
    )
    if backend == "slurm":
        job = slurm.submit(str(script))
        store.registry.append_event(record(job=job))
        print(
            f"submitted chain {job}: {spec.tasks} task(s) of {args.time} for {spec.run_dir}"
            f"{_extension_note(spec.tasks, max_tasks)}"
        )
        print(f"  follow it:  hpcckpt status {_q(spec.run_dir)}")
        print(f"  its logs:   {spec.log_dir}/{job}_<task>.out and .err")
        if spec.mirror is not None:
            print(f"  mirror:     {spec.mirror}")
        print(f"  stop it:    hpcckpt cancel {_q(spec.run_dir)}")
        return 0
    from ..slurm.local import run_local_chain

    job = str(int(time.time()))
    store.registry.append_event(record(job=job))
    print(
        f"local chain {job}: {spec.tasks} task(s) of {args.time} for {spec.run_dir}"
        f"{_extension_note(spec.tasks, max_tasks)} (logs in {spec.run_dir / LOGS})",
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
    return 1 if status is not None and status["event"] == event_log.FAILED else 0


MIRROR_LIST_TIMEOUT = 5.0  # seconds `hpcckpt status` waits for the mirror's listing before it answers from the events


def configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument(
        "--mirror",
        metavar="URL",
        default=None,
        help="the run's mirror (default: the one its events or chain script name)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help=f"do not list the mirror (by default it is listed, for at most {MIRROR_LIST_TIMEOUT:g} s)",
    )


def run_status(args: argparse.Namespace) -> int:
    from ..slurm.status import format_status, mirror_url, summarize, summarize_mirror

    store = _open_status_run(args.run_dir)
    events = store.registry.events()
    queue, note = _queue(event_log.chain_jobs(events), events, store.run_dir)
    checkpoints = store.list()
    now = time.time()
    status = summarize(store.run_dir, events, checkpoints, queue, now)
    url = args.mirror or mirror_url(events) or _script_mirror(store.run_dir)
    if url is not None:
        from ..slurm.spec import check_mirror, redact_url

        url = redact_url(str(check_mirror(url)))
        listed, why = (None, "--offline") if args.offline else _list_quickly(url, MIRROR_LIST_TIMEOUT)
        status = dataclasses.replace(status, mirror=summarize_mirror(url, events, checkpoints, listed, why, now))
    if note:
        status.warnings.append(note)
    for bad in store.list(include_bad=True):  # failed validation after a restore: never restored again
        if (reason := store.registry.bad_reason(bad)) is not None:
            status.warnings.append(f"checkpoint {bad.name} (step {bad.step}) is BAD: {reason}")
    if args.json:
        print(json.dumps(status.to_json(), indent=1))
    else:
        print(format_status(status))
    return 0


def configure_run_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")


def run_cancel(args: argparse.Namespace) -> int:
    from ..slurm import commands as slurm

    store = open_run(args.run_dir)
    jobs = event_log.chain_jobs(store.registry.events())
    queued = sorted({e.array_job for e in slurm.queue(jobs)}) if jobs and slurm.available("squeue") else []
    if queued:
        slurm.cancel(queued)
    store.registry.append_event(event_log.cancel(jobs=queued))
    print(f"cancelled {', '.join(queued)}" if queued else f"nothing of {store.run_dir} is queued")
    return 0


def configure_extend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--tasks", type=whole_number_arg("--tasks"), required=True, help="array tasks to add")


def run_extend(args: argparse.Namespace) -> int:
    from ..slurm import commands as slurm
    from ..store.store import CheckpointStore

    whole_number(args.tasks, "--tasks", of="array tasks")
    store = CheckpointStore(args.run_dir, keep_last=None, create=False)
    events = store.registry.events()
    script = store.run_dir / SCRIPT
    if not script.is_file():
        raise HpcckptError(f"{script} is missing: extend continues a chain submitted with `hpcckpt submit`")
    status = store.registry.status()
    if status is not None and status["event"] == event_log.COMPLETE:
        raise HpcckptError(f"run {store.run_dir} is complete at step {status.get('step')}: nothing to extend")
    if status is not None:
        store.registry.append_event(event_log.reopen(why="hpcckpt extend"))
        print(f"reopening run {store.run_dir}, which was marked failed: {status.get('reason')}")
    submits = event_log.of_kind(events, event_log.SUBMIT)
    if submits and submits[-1].get("backend") == "local":
        return _extend_local(store, next(e for e in reversed(submits) if e.get("time_seconds")), args.tasks)
    queued = sorted({e.array_job for e in slurm.queue(event_log.chain_jobs(events))})
    after = [f"--dependency=afterany:{':'.join(queued)}"] if queued else []
    job = slurm.submit(str(script), [f"--array=1-{args.tasks}%1", *after])
    store.registry.append_event(
        event_log.submitted(job=job, tasks=args.tasks, extend=True, backend="slurm", script=str(script))
    )
    print(
        f"submitted {job}: {args.tasks} more task(s) for {store.run_dir}"
        f"{' after ' + ', '.join(queued) if queued else ''}"
    )
    return 0


def _extend_local(store: Any, last: dict[str, Any], tasks: int) -> int:
    """Extend a local run (item 22): add the tasks to its chain while that runs on this host, else run
    them here and now, as ``submit --backend local`` does."""
    from ..slurm.local import run_local_chain, running_chain

    registry = store.registry
    with registry.locked():  # the runner decides to stop under the same lock: the tasks are never lost
        running = running_chain(store.run_dir)
        if running is not None:
            added = event_log.submitted(job=str(running["job"]), tasks=tasks, extend=True, backend="local")
            registry.append_event(added)
    if running is not None:
        print(f"added {tasks} task(s) to local chain {running['job']} (pid {running['pid']}) for {store.run_dir}")
        return 0
    job = str(int(time.time()))
    settings = event_log.ChainSettings.recorded(last)
    registry.append_event(event_log.submitted(job=job, tasks=tasks, extend=True, backend="local", settings=settings))
    print(f"local chain {job}: {tasks} more task(s) for {store.run_dir}", flush=True)
    run_local_chain(
        store.run_dir / SCRIPT,
        store.run_dir,
        tasks=tasks,
        time_seconds=int(last["time_seconds"]),
        signal_name=last.get("signal"),
        signal_lead=int(last.get("lead") or 0),
        job_id=job,
    )
    status = registry.status()
    print(
        f"local chain {job}: {'run ' + status['event'] if status else 'tasks used up, run unfinished'}; "
        f"hpcckpt status {_q(store.run_dir)}"
    )
    return 1 if status is not None and status["event"] == event_log.FAILED else 0


def configure_task(parser: argparse.ArgumentParser, *, end: bool) -> None:
    parser.add_argument("--run-dir", default=None, help="default: HPCCKPT_RUN_DIR")
    failures = whole_number_arg("--max-failures", minimum=1, of="tasks")
    parser.add_argument("--max-failures", type=failures, default=DEFAULT_MAX_FAILURES)
    parser.add_argument("--log-dir", type=Path, default=None, help="where the chain's tasks log (default RUN_DIR/logs)")
    if not end:
        parser.add_argument(
            "--script", type=Path, default=None, help="the chain script this task runs, put back when the run lost it"
        )
    if end:
        parser.add_argument("--status", type=int, required=True, help="the training command's exit status")
        parser.add_argument("--auto-extend", type=whole_number_arg("--auto-extend"), default=0)
        parser.add_argument(
            "--exited-at",
            type=_exited_at,
            default=None,
            help="Unix time the training command exited (the chain script's `date +%%s.%%N`): measures teardown",
        )


def run_task_begin(args: argparse.Namespace) -> int:
    """Exit :data:`~hpcckpt.slurm.script.TASK_GO_ON` to run the training command, or
    :data:`~hpcckpt.slurm.script.TASK_LEAVE`: the chain script reads them."""
    from ..slurm.script import TASK_GO_ON, TASK_LEAVE
    from ..slurm.tasks import task_begin

    go_on = task_begin(
        _task_run_dir(args), os.environ, args.max_failures, script=args.script, log_dir=_task_log_dir(args)
    )
    return TASK_GO_ON if go_on else TASK_LEAVE


def run_task_end(args: argparse.Namespace) -> int:
    from ..slurm.tasks import task_end

    task_end(
        _task_run_dir(args),
        os.environ,
        args.status,
        args.max_failures,
        args.auto_extend,
        exited_at=args.exited_at,
        log_dir=_task_log_dir(args),
    )
    return 0


def _exited_at(text: str) -> float | None:
    """``--exited-at``: Unix seconds. Anything else (empty where the node has no ``date``, ``1795300000.N``
    from a ``date`` without ``%N``) means unknown, not an error: the task must still be recorded."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not value > 0:
        return None
    return value


# -- helpers --------------------------------------------------------------------------------------------
def _spec(args: argparse.Namespace) -> ChainSpec:
    """The chain's spec from the parsed flags: every option by its name, the command without its ``--``."""
    given = {o.name: getattr(args, o.name) for o in options() if o.flag is not None}
    if given["command"][:1] == ["--"]:
        given["command"] = given["command"][1:]
    return chain_spec(**given)


def _open_status_run(text: str) -> Any:
    """``open_run`` for ``status``, which also explains a mirrored chain's run directory that is gone."""
    run_dir = Path(text).expanduser()
    if text.strip() and not run_dir.exists():
        from ..slurm.spec import log_dir

        logs = log_dir(run_dir.absolute(), "mirrored")
        if logs.is_dir():
            raise HpcckptError(
                f"run directory {run_dir} does not exist (deleted or purged?), but its mirrored chain's logs "
                f"are in {logs}: the chain's next task makes it again and resumes from the mirror; "
                "`hpcckpt ls URL` lists what the mirror holds"
            )
    return open_run(text)


def _script_mirror(run_dir: Path) -> str | None:
    """The mirror the chain script exports (``export HPCCKPT_MIRROR=...``, as our template writes it)."""
    try:
        text = (run_dir / SCRIPT).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("export HPCCKPT_MIRROR="):
            words = shlex.split(line.removeprefix("export HPCCKPT_MIRROR="))
            return words[0] if words else None
    return None


def _list_quickly(url: str, timeout: float) -> tuple[list[Any] | None, str | None]:
    """The mirror's complete checkpoints if it answers within ``timeout`` seconds, else (None, why).
    A daemon thread: a mirror that hangs must not hold the command (it exits without waiting for it)."""
    import threading

    from .mirror import list_remote

    answer: list[Any] = []

    def work() -> None:
        try:
            answer.append(list_remote(url))
        except Exception as error:  # reported as the reason the events answer instead
            answer.append(error)

    thread = threading.Thread(target=work, name="hpcckpt-status-mirror", daemon=True)
    thread.start()
    thread.join(timeout)
    if not answer:
        return None, f"no answer within {timeout:g} s"
    if isinstance(answer[0], BaseException):
        return None, str(answer[0])
    return list(answer[0]), None


def _max_tasks(args: argparse.Namespace, tasks: int) -> int:
    """The cap on the chain's tasks in all (item 28): --max-tasks, else --tasks x (1 + --auto-extend)
    for the older flag, else 4 x --tasks: a chain whose length was guessed short still finishes, one
    that stops progressing is stopped by the breaker, and none runs on unbounded."""
    if args.max_tasks is None:
        return tasks * (1 + args.auto_extend) if args.auto_extend else DEFAULT_MAX_TASKS_FACTOR * tasks
    if args.max_tasks < tasks:
        raise UsageError(
            f"Invalid --max-tasks {args.max_tasks}: expected a whole number >= --tasks ({tasks}); "
            f"--max-tasks {tasks} turns auto-extension off"
        )
    return int(args.max_tasks)


def _extension_note(tasks: int, max_tasks: int) -> str:
    return f", extended while unfinished and progressing up to {max_tasks}" if max_tasks > tasks else ""


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


# Python's options that take a value (`python3 -W error train.py`); -c ends the options with code.
_PYTHON_VALUE_OPTIONS = "WX"
_PYTHON_LONG_VALUE = {"--check-hash-based-pycs"}
# torchrun's options without a value (torch 2.13's argument parser); every other option takes one.
_TORCHRUN_FLAGS = {
    "-h",
    "--help",
    "--standalone",
    "-m",
    "--module",
    "--no-python",
    "--no_python",
    "--run-path",
    "--run_path",
    "--virtual-local-rank",
    "--virtual_local_rank",
}
_PYTHON_NAME = re.compile(r"^python(\d+(\.\d+)?)?$")


def command_target(command: Sequence[str]) -> tuple[str, str] | None:
    """What a python/torchrun command runs: ("script", path), ("module", name), or None (code given with
    -c, stdin, ``torchrun --no-python``, another program, or options this parser does not know)."""
    program = os.path.basename(command[0]) if command else ""
    if _PYTHON_NAME.match(program):
        return _python_target(command[1:])
    if program == "torchrun":
        return _torchrun_target(command[1:])
    return None


def _python_target(args: Sequence[str]) -> tuple[str, str] | None:
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return ("script", args[i + 1]) if i + 1 < len(args) else None
        if arg == "-" or not arg.startswith("-"):
            return None if arg == "-" else ("script", arg)
        if arg.startswith("--"):
            i += 2 if arg in _PYTHON_LONG_VALUE else 1
            continue
        for j, letter in enumerate(arg[1:], start=1):
            if letter == "c":
                return None
            if letter == "m":
                name = arg[j + 1 :] or (args[i + 1] if i + 1 < len(args) else "")
                return ("module", name) if name else None
            if letter in _PYTHON_VALUE_OPTIONS:
                i += 0 if arg[j + 1 :] else 1  # the value is attached (-Werror) or the next word
                break
        i += 1
    return None


def _torchrun_target(args: Sequence[str]) -> tuple[str, str] | None:
    module = False
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            return ("module" if module else "script", arg)
        if arg in ("--no-python", "--no_python"):
            return None
        module = module or arg in ("-m", "--module")
        i += 1 if arg in _TORCHRUN_FLAGS or "=" in arg else 2
    return None


def _check_script(spec: ChainSpec) -> None:
    """The training script a python/torchrun command names exists where the job starts (the directory
    `hpcckpt submit` runs in; --chdir is refused); ``-m module`` is findable when the job's Python is this
    one. Otherwise the chain would fail task after task in the queue until the breaker stops it."""
    target = command_target(spec.command)
    if target is None:
        return
    kind, name = target
    workdir = Path.cwd()
    if kind == "script":
        path = workdir / name  # as the job sees it: the command is quoted, so no ~ expansion
        if not path.is_file():
            raise UsageError(
                f"Invalid command {shlex.join(spec.command)!r}: the script {name!r} does not exist in the job's "
                f"working directory ({path} is not a file); expected an existing script, or "
                "--skip-command-check when your site setup provides it"
            )
        return
    if not _same_python(spec) or not name:
        return
    import importlib.machinery

    top = name.split(".")[0]
    # The path finder looks for the top-level package without importing anything; `python -m` puts the
    # working directory first on sys.path.
    if (
        top not in sys.builtin_module_names
        and importlib.machinery.PathFinder.find_spec(top, [str(workdir), *sys.path[1:]]) is None
    ):
        raise UsageError(
            f"Invalid command {shlex.join(spec.command)!r}: the module {top!r} of -m {name} is not importable "
            f"from {workdir} by {sys.executable}; expected an installed module, or --skip-command-check "
            "when your site setup provides it"
        )


def _same_python(spec: ChainSpec) -> bool:
    """Whether the command's interpreter is of this environment (same bin directory), with no site setup
    that could change it: only then does this process's sys.path say what the job can import."""
    if spec.setup or spec.conda or spec.venv:
        return False
    program = spec.command[0]
    found = program if os.sep in program else shutil.which(program)
    return found is not None and Path(found).absolute().parent == Path(sys.executable).absolute().parent


def _check_venv(spec: ChainSpec) -> None:
    if spec.venv is not None and not (spec.venv / "bin" / "activate").is_file():
        raise UsageError(
            f"Invalid --venv {str(spec.venv)!r}: {spec.venv / 'bin' / 'activate'} is not a file; expected "
            "the directory of a virtual environment (python -m venv DIR)"
        )


def _check_writable(run_dir: Path) -> None:
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"Invalid --run-dir {str(run_dir)!r}: {existing} is not a writable directory")


def _queue(jobs: list[str], events: list[dict[str, Any]], run_dir: Path | None = None) -> tuple[Any, str | None]:
    from ..slurm import commands as slurm

    backends = event_log.backends(events)
    if jobs and backends == {"local"} and run_dir is not None:
        from ..slurm.local import local_queue

        return local_queue(run_dir, events), None  # the local chain running for it on this host, if any
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


def _task_log_dir(args: argparse.Namespace) -> Path | None:
    """The chain script's --log-dir, for Slurm's tasks; the local backend writes its logs in RUN_DIR/logs."""
    return None if os.environ.get("HPCCKPT_BACKEND") == "local" else args.log_dir


def _q(path: Path) -> str:
    return shlex.quote(str(path))
