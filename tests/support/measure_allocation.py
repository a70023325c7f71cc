"""Measure the unused allocation of a chain's tasks on a real Slurm cluster (issue 11, items 23 and 27).

Submits a chain of 1-minute tasks of tests/workers/train_worker.py, watches the queue for each task's start and
end time (``squeue %S %e``, the scheduled end: the time limit's), and, once the run has ended, prints one
line per task from Slurm's times and the run's events:

- ``first step``: seconds from the task's start (Slurm's StartTime) to Run's ``start`` event (training's
  first step follows at once);
- ``stop``: seconds from the start to Run's stop event (the last save done);
- ``unused after save``: scheduled end - stop event (allocation left when training stopped);
- ``unused after exit``: scheduled end - the training process's exit (``task-end --exited-at``; else the
  task-end event's time, a little later): the allocation no one used;
- the stop's reason/cause, the task's exit status (143 = ended by the time limit's TERM).

    export SLURM_CONF=...   # printed by `bash tests/cluster/slurm-lab start DIR`
    PYTHONPATH=$PWD python tests/support/measure_allocation.py WORKDIR [--tasks 3] [--signal USR1@20] [--workers 0]

Not a test (it takes minutes and asserts nothing): tests/test_allocation_slurm.py asserts the targets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from paths import TRAIN_WORKER


def slurm_time(text: str) -> float | None:
    """squeue's ``2026-12-01T16:05:00`` (local time) -> Unix seconds; None for N/A or Unknown."""
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def queue_times(array_job: str) -> dict[str, tuple[float | None, float | None, str]]:
    """Task id (``123_1``) -> (start, end, state) for the running tasks of the array."""
    out = subprocess.run(
        ["squeue", "--me", "-h", "-r", "-o", "%i|%S|%e|%T"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    found = {}
    for line in out.splitlines():
        job, start, end, state = line.strip().split("|")
        if job.startswith(f"{array_job}_") and state in ("RUNNING", "COMPLETING"):
            found[job] = (slurm_time(start), slurm_time(end), state)
    return found


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--signal", default="USR1@20")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=400, help="enough training for more than --tasks tasks")
    parser.add_argument("--step-sleep", type=float, default=0.05)
    args = parser.parse_args()

    run_dir = args.workdir.resolve() / "chain"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(TRAIN_WORKER), str(run_dir), "--epochs", str(args.epochs)]
    command += ["--step-sleep", str(args.step_sleep), "--workers", str(args.workers)]
    options = ["--backend", "slurm", "--run-dir", str(run_dir), "--tasks", str(args.tasks), "--time", "1"]
    options += ["--max-tasks", str(args.tasks)]  # measure these tasks only, no auto-extension
    submitted = subprocess.run(
        ["hpcckpt", "submit", *options, "--signal", args.signal, "--", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=run_dir.parent,
    )
    job = submitted.stdout.split()[2].rstrip(":")
    print(f"submitted chain {job}: {args.tasks} x 1 min, --signal {args.signal}, workers {args.workers}", flush=True)
    times: dict[str, tuple[float | None, float | None, str]] = {}
    deadline = time.time() + args.tasks * 150 + 120
    while time.time() < deadline:
        for task, value in queue_times(job).items():
            # Keep the first start and end seen: Slurm rewrites EndTime once the task has ended.
            times.setdefault(task, value)
        ends = [e for e in events(run_dir) if e["event"] == "task-end" and str(e.get("job")).startswith(f"{job}_")]
        if len(ends) >= args.tasks or any(e["event"] in ("complete", "failed") for e in events(run_dir)):
            break
        time.sleep(1)
    time.sleep(2)
    print(json.dumps(report(job, times, events(run_dir)), indent=1))
    return 0


def report(job: str, times: dict[str, tuple[float | None, float | None, str]], log: list[dict[str, Any]]) -> Any:
    rows = []
    current: dict[str, Any] = {}
    for event in log:
        kind = event["event"]
        if kind == "task-begin":
            current = {"job": event.get("job"), "begin": event["time"]}
        elif kind in ("start", "stop", "task-end") and current:
            current[kind] = event
            if kind == "task-end":
                rows.append(current)
                current = {}
    tasks = []
    for row in rows:
        start, end, _ = times.get(row["job"], (None, None, ""))
        stop, first, ended = row.get("stop") or {}, row.get("start") or {}, row["task-end"]
        end = end if end is not None else first.get("deadline")

        def since_start(t: float | None, start: float | None = start) -> float | None:
            return None if t is None or start is None else round(t - start, 1)

        def before_end(t: float | None, end: float | None = end) -> float | None:
            return None if t is None or end is None else round(end - t, 1)

        tasks.append(
            {
                "task": row["job"],
                "first_step_after_start_s": since_start(first.get("time")),
                "stop_after_start_s": since_start(stop.get("time")),
                "unused_after_save_s": before_end(stop.get("time")),
                # The chain script passes the training process's exit time; older ones did not: task-end's.
                "unused_after_exit_s": before_end(ended.get("exited") or ended["time"]),
                "teardown_set_aside_s": first.get("teardown"),
                "reason": stop.get("reason"),
                "cause": stop.get("cause"),
                "saved": stop.get("saved"),
                "exit": ended.get("status"),
                "clean": ended.get("clean"),
            }
        )
    full = [t for t in tasks if t["reason"] != "completed" and t["unused_after_exit_s"] is not None]
    mean = round(sum(t["unused_after_exit_s"] for t in full) / len(full), 1) if full else None
    return {"chain": job, "tasks": tasks, "mean_unused_after_exit_s_of_unfinished_tasks": mean}


if __name__ == "__main__":
    sys.exit(main())
