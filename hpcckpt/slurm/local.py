"""The local backend: a chain's tasks run one after another on this machine, as Slurm would run them.

Each task runs the rendered chain script with ``bash``, with the ``SLURM_*`` variables a task sees (job and
array ids, task id and count, the job's end time) and Slurm's time-limit behaviour: the ``--signal``
signal to the batch shell at the time limit minus its lead, SIGTERM to every process of the task at the
limit, SIGKILL ``kill_wait`` seconds later. Output goes to ``RUN_DIR/logs/<job>_<task>.out|.err`` as on
Slurm; one line per task is printed. The chain stops early once the registry says the run is complete
or failed, as the task guard's cancellation does on Slurm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .. import events as event_log
from ..errors import HpcckptError
from ..rundir import LOCAL_QUEUE, LOGS, task_log
from ..signals import SignalRecorder
from ..store.fileio import write_atomic
from ..store.registry import Registry, host_identity, lock_mode
from .commands import QueueEntry

KILL_WAIT = 5.0  # Slurm's KillWait default is 30 s; a laptop chain wants seconds
# What stops a local chain from the terminal: Ctrl-C, kill, a closed terminal.
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class TaskResult:
    task: int
    exit_status: int
    seconds: float
    signalled: tuple[str, ...]


class InterruptedChainError(HpcckptError):
    """Ctrl-C (or TERM, HUP) stopped a local chain; the running task was stopped as a time limit stops it.
    The CLI exits 128 + the signal's number (130 for Ctrl-C), as a shell reports a process it stopped."""

    def __init__(self, message: str, signum: int = int(signal.SIGINT)) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.signum))


def run_local_chain(
    script: Path,
    run_dir: Path,
    *,
    tasks: int,
    time_seconds: int,
    signal_name: str | None,
    signal_lead: int,
    job_id: str,
    kill_wait: float = KILL_WAIT,
    environ: Mapping[str, str] | None = None,
    out: TextIO = sys.stdout,
) -> list[TaskResult]:
    """Run the chain's tasks; returns one result per task that ran.

    ``tasks`` is the chain's own count; tasks that ``hpcckpt extend`` adds to this chain while it runs
    (submit events with this ``job_id``) and auto-extension (:func:`~hpcckpt.slurm.tasks.extension_size`) add
    to it. While it runs, ``RUN_DIR/.local-chain.json`` says which task runs and how many are left, for
    ``hpcckpt status`` and ``hpcckpt extend``. Ctrl-C, TERM or HUP stops the running task as its time
    limit would (the warning signal, TERM ``lead`` seconds later, KILL ``kill_wait`` after that; a second
    one sends TERM at once), starts no further task, records a ``cancel`` event and raises
    :class:`InterruptedChainError`."""
    base = dict(os.environ if environ is None else environ)
    registry = Registry(run_dir, lock=lock_mode(base))
    (run_dir / LOGS).mkdir(parents=True, exist_ok=True)
    results: list[TaskResult] = []
    with SignalRecorder(STOPS) as stops:
        try:
            task = 0
            while True:
                allowed, stopping = _next(registry, job_id, tasks, task, stops, out)
                if stopping:
                    break
                task += 1
                result = _run_task(
                    script,
                    run_dir,
                    base,
                    task,
                    allowed,
                    time_seconds,
                    signal_name,
                    signal_lead,
                    job_id,
                    kill_wait,
                    stops,
                )
                results.append(result)
                print(
                    f"[local {job_id}_{task}] task {task}/{allowed} ended: exit {result.exit_status} after "
                    f"{result.seconds:.1f} s{_signals(result)}; {_where(registry)}",
                    file=out,
                    flush=True,
                )
        finally:
            _queue_file(run_dir).unlink(missing_ok=True)
    if stops.received:
        signum = int(stops.received[0].signal)
        allowed = _allowed(registry.events(), job_id, tasks)
        registry.append_event(
            event_log.cancel(jobs=[job_id], why=f"{stops.received[0].signal.name} to the local chain")
        )
        left = max(0, allowed - len(results))
        raise InterruptedChainError(
            f"interrupted by {stops.received[0].signal.name}: "
            + (f"task {len(results)} was stopped as a time limit stops it ({_where(registry)})" if results else "")
            + f"; {left} task(s) not run. Continue with `hpcckpt extend {run_dir} --tasks N`",
            signum,
        )
    return results


def _next(
    registry: Registry, job_id: str, tasks: int, done: int, stops: SignalRecorder, out: TextIO
) -> tuple[int, bool]:
    """How many tasks this chain has now, and whether to stop before the next one. Decided under the
    registry's lock, with the queue file written or removed in the same hold, so that ``hpcckpt extend``
    either sees this chain running (and adds to it) or sees it gone (and runs the tasks itself)."""
    from .tasks import extension_size

    with registry.locked():
        events = registry.events()
        allowed = _allowed(events, job_id, tasks)
        status = registry.status()
        if status is None and not stops.received and done >= allowed:
            more = extension_size(events)
            if more:
                registry.append_event(event_log.submitted(job=job_id, tasks=more, auto=True, backend="local"))
                print(
                    f"[local {job_id}] run unfinished and progressing: {more} more task(s) (auto-extension)",
                    file=out,
                    flush=True,
                )
                allowed += more
        stopping = status is not None or bool(stops.received) or done >= allowed
        if status is not None and done < allowed:
            print(
                f"[local {job_id}] run is {status['event']}: the remaining {allowed - done} task(s) are cancelled",
                file=out,
                flush=True,
            )
        if stopping:
            _queue_file(registry.run_dir).unlink(missing_ok=True)
        else:
            _write_queue(registry.run_dir, job_id, done + 1, allowed)
    return allowed, stopping


def _allowed(events: list[dict[str, Any]], job_id: str, tasks: int) -> int:
    """The chain's tasks: its own, plus what extend and auto-extension added to it while it ran."""
    return max(tasks, event_log.tasks_submitted(events, job=job_id))


def _write_queue(run_dir: Path, job_id: str, task: int, tasks: int) -> None:
    record = {"job": job_id, "task": task, "tasks": tasks, "pid": os.getpid(), "host": host_identity()}
    write_atomic(_queue_file(run_dir), json.dumps(record).encode(), durable=False)


def _queue_file(run_dir: Path) -> Path:
    return run_dir / LOCAL_QUEUE  # the running local chain's queue, while it runs (item 22)


def running_chain(run_dir: Path) -> dict[str, Any] | None:
    """The local chain running for ``run_dir`` on this host (job, task, tasks, pid), None when none is."""
    try:
        record = json.loads(_queue_file(run_dir).read_text())
        pid = int(record["pid"])
        if record.get("host") != host_identity():
            return None
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no file, a torn one, or its runner is gone (killed -9): nothing runs
    return dict(record)


def local_queue(run_dir: Path, events: list[dict[str, Any]]) -> list[QueueEntry]:
    """The local chain's queue as squeue would show it: the running task and the pending rest (with
    what ``hpcckpt extend`` added since the runner last looked)."""
    record = running_chain(run_dir)
    if record is None:
        return []
    job, task = str(record["job"]), int(record["task"])
    tasks = _allowed(events, job, int(record["tasks"]))
    entries = [QueueEntry(job, f"{job}_{task}", "RUNNING", "None")]
    if tasks > task:
        entries.append(QueueEntry(job, f"{job}_[{task + 1}-{tasks}%1]", "PENDING", "JobArrayTaskLimit"))
    return entries


def _run_task(
    script: Path,
    run_dir: Path,
    base: dict[str, str],
    task: int,
    tasks: int,
    time_seconds: int,
    signal_name: str | None,
    signal_lead: int,
    job_id: str,
    kill_wait: float,
    stops: SignalRecorder,
) -> TaskResult:
    start = time.time()
    env = {k: v for k, v in base.items() if not k.startswith("SLURM_")}
    env.update(
        {
            "SLURM_JOB_ID": str(int(job_id) + task),
            "SLURM_ARRAY_JOB_ID": job_id,
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_MIN": "1",
            "SLURM_ARRAY_TASK_MAX": str(tasks),
            "SLURM_ARRAY_TASK_COUNT": str(tasks),
            "SLURM_JOB_END_TIME": str(int(start + time_seconds)),
            "SLURM_RESTART_COUNT": "0",
            "SLURM_JOB_NAME": script.stem,
            "HPCCKPT_BACKEND": "local",
        }
    )
    signalled: list[str] = []
    out, err = (task_log(run_dir, job_id, str(task), kind) for kind in ("out", "err"))
    with open(out, "a") as stdout, open(err, "a") as stderr:
        # Its own session: Ctrl-C in this terminal reaches this runner only, which then stops the task
        # as its time limit would (item 22), instead of killing the training mid-step.
        process = subprocess.Popen(
            ["bash", str(script)],
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        warn_at = start + time_seconds - signal_lead if signal_name else None
        term_at = start + time_seconds
        kill_at = term_at + kill_wait
        seen = 0
        while process.poll() is None:
            now = time.time()
            if len(stops.received) > seen:  # Ctrl-C: the time limit comes now
                if seen == 0 and signal_name and "TERM" not in signalled:
                    warn_at = None if warn_at is None else now  # None: already warned by the time limit
                    term_at = min(term_at, now + signal_lead)
                else:  # no warning signal, or a second Ctrl-C: TERM at once
                    term_at = min(term_at, now)
                kill_at = term_at + kill_wait
                seen = len(stops.received)
            if warn_at is not None and now >= warn_at:
                _send(process, getattr(signal, f"SIG{signal_name}"), group=False)  # B: the batch shell
                signalled.append(str(signal_name))
                warn_at = None
            elif now >= kill_at:
                _send(process, signal.SIGKILL, group=True)
                signalled.append("KILL")
                break
            elif now >= term_at and "TERM" not in signalled:
                _send(process, signal.SIGTERM, group=True)  # the time limit: every process of the task
                signalled.append("TERM")
            time.sleep(0.05)
        exit_status = process.wait()
    return TaskResult(task, exit_status, time.time() - start, tuple(signalled))


def _send(process: subprocess.Popen[bytes], sig: signal.Signals, *, group: bool) -> None:
    try:
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    except ProcessLookupError:
        pass


def _signals(result: TaskResult) -> str:
    return f" (sent {', '.join(result.signalled)})" if result.signalled else ""


def _where(registry: Registry) -> str:
    last = event_log.last(registry.events(), event_log.STOP, event_log.FAILED, event_log.COMPLETE)
    if last is None:
        return "no training recorded"
    if last["event"] == event_log.FAILED:
        return f"run FAILED: {last.get('reason')}"
    if last["event"] == event_log.COMPLETE:
        return f"run complete at step {last.get('step')}"
    return (
        f"stopped at step {last.get('step')} ({last.get('reason')}{', ' + last['cause'] if last.get('cause') else ''})"
    )
