"""What each array task of a chain does around the training command (``hpcckpt task-begin``/``task-end``).

Before: a fast guard (no torch import). When the run is complete or failed it cancels what is left of the
chain and tells the script to leave with status 0. It also notices a previous task that never ended
(killed at its time limit, a node failure) and counts it.

After: it records whether the task made progress (a new checkpoint) and whether it ended cleanly: exit 0,
or training saved and stopped and a signal then ended the process during its teardown (the time limit's
SIGTERM during the interpreter's exit gave ``exit 143`` for tasks that had saved: issue 11, item 23), and
- cancels the chain's pending tasks once training is complete, so no allocation is wasted;
- marks the run failed after ``max_failures`` consecutive tasks without progress (the crash-loop
  breaker), and cancels the rest; ``hpcckpt status`` says why, with the last task's error log;
- auto-extension (item 28): when the last task of the chain's newest array ends with the run unfinished
  and that task made progress, submits the chain script again as a new array of ``--tasks`` tasks, up to
  the ``max_tasks`` that ``hpcckpt submit`` recorded (``--max-tasks``, by default 4 x ``--tasks``).
  Chains without that record keep the older ``--auto-extend N`` (the script again, at most N times).

On the local backend (``HPCCKPT_BACKEND=local``) nothing is cancelled or submitted: the local runner
reads the same registry, stops launching tasks, and extends itself with :func:`extension_size`.

A mirrored chain (issue 14) outlives its run directory: when a task finds the directory gone (a purge of
scratch between two tasks), task-begin makes it again, puts the chain script back from the copy Slurm
runs (``script``) and records the array it belongs to, so that ``hpcckpt status``, ``cancel`` and
``extend`` know the chain again; Run then resumes from the mirror. What the lost event log held (the
tasks before, the ``--max-tasks`` cap) is gone with it: the queued tasks of the array go on, and
auto-extension, which needs that cap, stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import events as event_log
from ..rundir import SCRIPT, task_log
from ..store.manifest import Checkpoint
from ..store.registry import Registry, lock_mode
from ..store.store import CheckpointStore
from .env import SlurmEnv, read_slurm_env


def task_begin(
    run_dir: Path,
    environ: Mapping[str, str],
    max_failures: int,
    *,
    pid: int | None = None,
    cancel: bool = True,
    script: Path | None = None,
    log_dir: Path | None = None,
) -> bool:
    """True to run the training command; False when this task must leave (status 0) at once.

    ``pid`` is the task's process: by default the caller's parent (the batch script that runs the command).
    ``cancel=False``: the task is no chain's, so nothing is cancelled (its array may be a sweep of runs).
    ``script``: the chain script this task runs, put back in the run directory when that has lost it;
    ``log_dir``: where the chain's tasks log, made again when gone (a mirrored chain's)."""
    recovered = not (run_dir / SCRIPT).exists() and script is not None
    store = CheckpointStore(run_dir, keep_last=None, lock=lock_mode(environ))
    registry = store.registry
    slurm = read_slurm_env(environ)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    if recovered and script is not None:
        _recover_chain(store, slurm, script)
    status = registry.status()
    if status is not None:
        _cancel_rest(registry, slurm, environ, cancel)
        _say(
            f"run {run_dir} is {status['event']}"
            f"{': ' + str(status.get('reason')) if status.get('reason') else ''}; this task has nothing to do"
        )
        return False
    events = registry.events()
    unfinished = event_log.open_task(events)
    if unfinished is not None:
        latest = store.latest()
        progress, step = _progressed(unfinished, latest), latest.step if latest else None
        registry.append_event(event_log.task_killed(job=unfinished.get("job"), progress=progress, latest_step=step))
        events = registry.events()
    if _breaker_tripped(events, max_failures):
        _fail(registry, slurm, environ, max_failures, events, cancel)
        return False
    latest = store.latest()
    registry.append_event(
        event_log.task_begin(
            job=slurm.job_label,
            array_job=slurm.array_job_id,
            task=slurm.array_task_id,
            restart=slurm.restart_count,
            host=socket.gethostname(),
            pid=os.getppid() if pid is None else pid,
            latest=latest,
        )
    )
    return True


def task_end(
    run_dir: Path,
    environ: Mapping[str, str],
    exit_status: int,
    max_failures: int,
    auto_extend: int,
    *,
    log: str | None = None,
    cancel: bool = True,
    exited_at: float | None = None,
    log_dir: Path | None = None,
) -> None:
    """Record how the task ended; cancel, fail or extend the chain as the registry says. ``log`` is the
    task's error log, by default the chain script's ``logs/ARRAY_TASK.err``; ``exited_at`` is when the
    training command exited (the teardown the next tasks set aside is measured up to it)."""
    store = CheckpointStore(run_dir, keep_last=None, lock=lock_mode(environ))
    registry = store.registry
    slurm = read_slurm_env(environ)
    events = registry.events()
    begin = event_log.last(events, event_log.TASK_BEGIN)
    latest = store.latest()
    ended_by = _signal_after_save(events, exit_status)
    registry.append_event(
        event_log.task_end(
            job=slurm.job_label,
            status=exit_status,
            progress=_progressed(begin, latest) if begin else latest is not None,
            latest_step=latest.step if latest else None,
            clean=exit_status == 0 or ended_by is not None,
            ended_by=ended_by,
            exited=exited_at,
            log=log or _log_path(run_dir, slurm, "err", log_dir),
        )
    )
    if ended_by is not None:
        _say(f"the training saved and stopped, then {ended_by} ended it (exit {exit_status}): a clean stop")
    events = registry.events()
    status = registry.status()
    if status is not None:
        _cancel_rest(registry, slurm, environ, cancel)
        if status["event"] == event_log.COMPLETE:
            rest = "; the rest of the chain is cancelled" if cancel else ""
            _say(f"run {run_dir} is complete at step {status.get('step')}{rest}")
        return
    if _breaker_tripped(events, max_failures):
        _fail(registry, slurm, environ, max_failures, events, cancel)
        return
    if environ.get("HPCCKPT_BACKEND") != "local" and event_log.max_tasks(events) is not None:
        if _last_task_of_array(slurm) and cancel:
            _auto_extend(run_dir, registry, slurm, events)
        return
    if auto_extend and _last_task_of_array(slurm) and environ.get("HPCCKPT_BACKEND") != "local":
        used = sum(1 for e in event_log.of_kind(events, event_log.SUBMIT) if e.get("auto"))
        if used < auto_extend:
            from . import commands as slurm_commands

            job = slurm_commands.submit(str(run_dir / SCRIPT))
            submitted = event_log.submitted(
                job=job, tasks=slurm.array_task_max, auto=True, backend="slurm", script=str(run_dir / SCRIPT)
            )
            registry.append_event(submitted)
            _say(f"run {run_dir} is unfinished after the last task; auto-extend {used + 1}/{auto_extend}: job {job}")
        else:
            _say(f"run {run_dir} is unfinished and auto-extend is used up ({used}/{auto_extend})")


def extension_size(events: list[dict[str, Any]]) -> int:
    """How many tasks auto-extension adds now (item 28): the chain's ``--tasks`` again, within what its
    ``--max-tasks`` cap leaves of the tasks submitted so far, when the last task made progress (a new
    checkpoint) and the run is neither complete nor failed; else 0. A chain submitted without a cap
    (rendered and submitted by hand, or by an earlier hpcckpt) is not extended here. The breaker still
    ends a run that stops progressing: it is checked before this, and a task without progress is never
    extended."""
    capped = event_log.capped_submits(events)
    # A cancel after the newest submission: the user stopped the run, and auto-extension must not start
    # it again (``hpcckpt extend`` submits anew and reopens it).
    if not capped or event_log.last_status(events) is not None or event_log.cancelled(events):
        return 0
    last_end = event_log.last(events, event_log.TASK_END)
    if last_end is None or not last_end.get("progress"):
        return 0
    submitted = event_log.tasks_submitted(events)
    return max(0, min(int(capped[0].get("tasks") or 1), int(capped[-1]["max_tasks"]) - submitted))


def _auto_extend(run_dir: Path, registry: Registry, slurm: SlurmEnv, events: list[dict[str, Any]]) -> None:
    """The last task of the chain's newest array ended with the run unfinished: submit the next array
    (the same script, ``--array=1-K%1``, after this task), or say why not."""
    jobs = event_log.chain_jobs(events)
    if jobs and slurm.array_job_id != jobs[-1]:
        return  # a newer array (hpcckpt extend) is queued after this one: it continues the run
    more = extension_size(events)
    submitted = event_log.tasks_submitted(events)
    cap = event_log.max_tasks(events)
    if not more:
        last_end = event_log.last(events, event_log.TASK_END) or {}
        why = "its last task made no progress" if not last_end.get("progress") else f"--max-tasks {cap} is reached"
        why = "it was cancelled (hpcckpt cancel)" if event_log.cancelled(events) else why
        _say(
            f"run {run_dir} is unfinished after {submitted} task(s) and is not extended: {why}. "
            f"`hpcckpt extend {run_dir} --tasks N` continues it"
        )
        return
    from . import commands as slurm_commands

    after = [f"--dependency=afterany:{slurm.array_job_id}"] if slurm.array_job_id else []
    try:
        job = slurm_commands.submit(str(run_dir / SCRIPT), [f"--array=1-{more}%1", *after])
    except slurm_commands.SlurmError as error:
        _say(f"run {run_dir} is unfinished and auto-extension could not submit: {error}")
        return
    registry.append_event(
        event_log.submitted(job=job, tasks=more, auto=True, backend="slurm", script=str(run_dir / SCRIPT))
    )
    _say(f"run {run_dir} is unfinished and progressing: {more} more task(s) as job {job} ({submitted + more}/{cap})")


def _cancel_rest(registry: Registry, slurm: SlurmEnv, environ: Mapping[str, str], cancel: bool = True) -> None:
    if not cancel or environ.get("HPCCKPT_BACKEND") == "local":
        return
    jobs = event_log.chain_jobs(registry.events())
    if slurm.array_job_id and slurm.array_job_id not in jobs:
        jobs.append(slurm.array_job_id)
    if not jobs:
        return
    from . import commands as slurm_commands

    try:
        slurm_commands.cancel(jobs, pending_only=True)
    except slurm_commands.SlurmError as error:
        _say(f"could not cancel the pending tasks of {', '.join(jobs)}: {error}")


def _fail(
    registry: Registry,
    slurm: SlurmEnv,
    environ: Mapping[str, str],
    max_failures: int,
    events: list[dict[str, Any]],
    cancel: bool = True,
) -> None:
    ends = event_log.of_kind(events, event_log.TASK_END)[-max_failures:]
    statuses = ", ".join("killed" if e.get("killed") else f"exit {e.get('status')}" for e in ends)
    reason = f"{max_failures} consecutive tasks made no progress (no new checkpoint): {statuses}"
    registry.append_event(event_log.failed(reason=reason, log=ends[-1].get("log") if ends else None))
    _cancel_rest(registry, slurm, environ, cancel)
    _say(
        f"run {registry.run_dir} is marked failed: {reason}{'; the rest of the chain is cancelled' if cancel else ''}. "
        f"See `hpcckpt status {registry.run_dir}`"
    )


def _breaker_tripped(events: list[dict[str, Any]], max_failures: int) -> bool:
    """``max_failures`` tasks in a row ended without progress, since the run was last reopened."""
    streak = 0
    for event in reversed(event_log.of_kind(events, event_log.REOPEN, event_log.TASK_END)):
        if event["event"] == event_log.REOPEN or event.get("progress"):
            break
        streak += 1
    return streak >= max_failures


def _signal_after_save(events: list[dict[str, Any]], exit_status: int) -> str | None:
    """The signal's name (``SIGTERM``) when it ended a task whose training had already stopped with its
    state saved; None otherwise. ``exit_status`` is the shell's: 128 + the signal's number (or minus it)."""
    number = exit_status - 128 if exit_status > 128 else -exit_status
    try:
        name = signal.Signals(number).name
    except ValueError:
        return None
    if name not in ("SIGTERM", "SIGKILL"):  # the time limit's, or its SIGKILL KillWait seconds later
        return None
    stop = event_log.stop_since_begin(events)
    if stop is None or stop["event"] != event_log.STOP or stop.get("saved") is not True:
        return None
    return name


def _progressed(begin: dict[str, Any], latest: Checkpoint | None) -> bool:
    """Whether ``latest`` was committed after the task began: in the registry's commit order, never by
    the saving host's clock (issue 11: a checkpoint stamped an hour ahead hid every later one)."""
    if latest is None:
        return False
    if begin.get("latest") is None and begin.get("latest_created") is None:
        return True  # nothing was saved when the task began
    before_seq = begin.get("latest_seq")
    if latest.seq is not None:
        # A numbered commit ranks after every unnumbered one (written before hpcckpt numbered them).
        return before_seq is None or latest.seq > int(before_seq)
    if before_seq is not None:
        return False
    # Only checkpoints of an hpcckpt that did not number commits: their order, by step then time saved.
    before = (begin.get("latest_step"), begin.get("latest_created"))
    if before[0] is None or before[1] is None:
        return latest.name != begin.get("latest")
    return (latest.step, latest.created) > (int(before[0]), float(before[1]))


def _last_task_of_array(slurm: SlurmEnv) -> bool:
    return slurm.array_task_id is not None and slurm.array_task_id == slurm.array_task_max


def _log_path(run_dir: Path, slurm: SlurmEnv, kind: str, log_dir: Path | None = None) -> str | None:
    if slurm.array_job_id is None or slurm.array_task_id is None:
        return None
    path = task_log(run_dir, slurm.array_job_id, str(slurm.array_task_id), kind)
    return str(path if log_dir is None else log_dir / path.name)


def _recover_chain(store: CheckpointStore, slurm: SlurmEnv, script: Path) -> None:
    """The run directory lost its chain script (and with it, most likely, its event log): put the script
    back from the copy this task runs, and record this task's array when the log knows no chain."""
    run_dir = store.run_dir
    try:
        shutil.copyfile(script, run_dir / SCRIPT)
    except OSError as error:
        _say(f"could not put the chain script back in {run_dir}: {error}")
    events = store.registry.events()
    if event_log.of_kind(events, event_log.SUBMIT) or slurm.array_job_id is None:
        return
    store.registry.append_event(
        event_log.submitted(
            job=slurm.array_job_id, tasks=slurm.array_task_max, backend="slurm", script=str(run_dir / SCRIPT)
        )
    )
    _say(
        f"the run directory {run_dir} had lost its chain records (purged?): made it again, with array "
        f"{slurm.array_job_id}; the run resumes from its mirror"
    )


def _say(message: str) -> None:
    print(f"hpcckpt: {message}", file=sys.stderr, flush=True)
