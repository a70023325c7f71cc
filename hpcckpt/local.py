"""The local backend: a chain's tasks run one after another on this machine, as Slurm would run them.

Each task runs the rendered chain script with ``bash``, with the ``SLURM_*`` variables a task sees (job and
array ids, task id and count, the job's end time) and Slurm's time-limit behaviour: the ``--signal``
signal to the batch shell at the time limit minus its lead, SIGTERM to every process of the task at the
limit, SIGKILL ``kill_wait`` seconds later. Output goes to ``RUN_DIR/logs/<job>_<task>.out|.err`` as on
Slurm; one line per task is printed. The chain stops early once the registry says the run is complete
or failed, as the task guard's cancellation does on Slurm.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .registry import Registry

KILL_WAIT = 5.0  # Slurm's KillWait default is 30 s; a laptop chain wants seconds


@dataclass(frozen=True)
class TaskResult:
    task: int
    exit_status: int
    seconds: float
    signalled: tuple[str, ...]


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
    """Run the chain's tasks; returns one result per task that ran."""
    registry = Registry(run_dir)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ if environ is None else environ)
    results = []
    for task in range(1, tasks + 1):
        status = registry.status()
        if status is not None:
            print(
                f"[local {job_id}] run is {status['event']}: the remaining {tasks - task + 1} task(s) are cancelled",
                file=out,
                flush=True,
            )
            break
        results.append(
            _run_task(script, logs, base, task, tasks, time_seconds, signal_name, signal_lead, job_id, kill_wait)
        )
        result = results[-1]
        print(
            f"[local {job_id}_{task}] task {task}/{tasks} ended: exit {result.exit_status} after "
            f"{result.seconds:.1f} s{_signals(result)}; {_where(registry)}",
            file=out,
            flush=True,
        )
    return results


def _run_task(
    script: Path,
    logs: Path,
    base: dict[str, str],
    task: int,
    tasks: int,
    time_seconds: int,
    signal_name: str | None,
    signal_lead: int,
    job_id: str,
    kill_wait: float,
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
    with open(logs / f"{job_id}_{task}.out", "a") as stdout, open(logs / f"{job_id}_{task}.err", "a") as stderr:
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
        while process.poll() is None:
            now = time.time()
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
    stops = [e for e in registry.events() if e.get("event") in ("stop", "failed", "complete")]
    if not stops:
        return "no training recorded"
    last = stops[-1]
    if last["event"] == "failed":
        return f"run FAILED: {last.get('reason')}"
    if last["event"] == "complete":
        return f"run complete at step {last.get('step')}"
    return (
        f"stopped at step {last.get('step')} ({last.get('reason')}{', ' + last['cause'] if last.get('cause') else ''})"
    )
