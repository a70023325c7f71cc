"""Where a run stands: ``hpcckpt status RUN_DIR``. A pure summary of the registry's events, the committed
checkpoints and the Slurm queue, and its text form.

A mirrored run's part (issue 14) comes from the run's events (``uploaded``, ``upload_failed``, ``pulled``)
and, when the caller could list the mirror quickly, from that listing; it says which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import events as event_log
from ..store.manifest import Checkpoint
from .commands import QueueEntry

# "unknown": the queue could not be read (squeue failed even after retries) and no task is known to run;
# never read as "stalled", which would tell the user to extend a chain that may be queued (item 25).
State = Literal["pending", "running", "complete", "failed", "stalled", "unknown"]


@dataclass(frozen=True)
class TaskRecord:
    job: str
    host: str | None
    resumed_step: int | None
    step: int | None
    steps_done: int | None
    reason: str | None  # completed, budget, signal; "killed" or "crashed" when Run did not stop it
    cause: str | None
    saved: bool | None
    seconds: float | None
    time_left: float | None
    steps_lost: int | None
    exit_status: int | None
    # "SIGTERM" when the signal ended the process after training had saved and stopped: a clean stop
    ended_by: str | None = None


@dataclass(frozen=True)
class MirrorStatus:
    """The mirror of a run: its credential-free URL, the newest complete remote checkpoint (``name``,
    ``step``, ``age_seconds``; None when none is known), where that answer came from, the local commits
    not uploaded yet, and the last failed upload since the last success (``name``, ``error``, ``failures``)."""

    url: str
    newest: dict[str, Any] | None
    source: str
    pending: list[str]
    failed: dict[str, Any] | None
    remote_count: int | None = None  # complete remote checkpoints, when listed


@dataclass(frozen=True)
class RunStatus:
    run_dir: str
    state: State
    step: int | None
    total_steps: int | None
    last_checkpoint: dict[str, Any] | None
    tasks_used: int
    tasks_left: int | None  # None when the queue is unknown (no squeue, local backend)
    tasks_running: int
    jobs: list[str]
    history: list[TaskRecord]
    steps_lost_to_preemption: int
    time_lost_to_preemption: float
    steps_per_second: float | None
    eta_seconds: float | None
    warnings: list[str] = field(default_factory=list)
    reason: str | None = None
    log_tail: str | None = None
    # Item 28: tasks the ETA needs at the current rate, and what auto-extension may still add (the
    # chain's --max-tasks less the tasks submitted); None when unknown or the chain has no cap.
    tasks_needed: int | None = None
    max_tasks: int | None = None
    extension_left: int | None = None
    mirror: MirrorStatus | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    run_dir: Path,
    events: Sequence[dict[str, Any]],
    checkpoints: Sequence[Checkpoint],
    queue: Sequence[QueueEntry] | None,
    now: float,
) -> RunStatus:
    submits = event_log.of_kind(events, event_log.SUBMIT)
    jobs = event_log.chain_jobs(events)
    history = _history(events)
    last_state = event_log.last_status(events)
    running = sum(e.task_count for e in queue or () if e.state in ("RUNNING", "COMPLETING", "CONFIGURING"))
    left = None if queue is None else sum(e.task_count for e in queue)
    if last_state is not None and last_state["event"] == event_log.COMPLETE:
        state: State = "complete"
    elif last_state is not None and last_state["event"] == event_log.FAILED:
        state = "failed"
    elif running:
        state = "running"
    elif left:
        state = "pending"
    elif queue is None and event_log.training_open(events):
        state = "running"
    elif queue is None and jobs:
        state = "unknown"
    else:
        state = "stalled"
    latest = checkpoints[-1] if checkpoints else None
    starts = event_log.of_kind(events, event_log.START)
    total = next((e.get("total_steps") for e in reversed(starts) if e.get("total_steps") is not None), None)
    step = latest.step if latest else None

    trained = [t for t in history if t.steps_done and t.seconds]
    rate = sum(t.steps_done or 0 for t in trained) / sum(t.seconds or 0 for t in trained) if trained else None
    eta = None
    if rate and total is not None and step is not None and state not in ("complete", "failed"):
        eta = max(0, total - step) / rate
    preempted = [t for t in history if t.cause == "preemption"]
    steps_lost = sum(t.steps_lost or 0 for t in preempted)
    time_lost = sum((t.steps_lost or 0) * (t.seconds or 0) / t.steps_done for t in preempted if t.steps_done)

    warnings: list[str] = []
    slowest_save = max((c.save_seconds or 0.0 for c in checkpoints), default=0.0)
    lead = next((e.get("lead") for e in reversed(submits) if e.get("lead")), None)
    if lead is not None and slowest_save > float(lead):
        warnings.append(
            f"the signal lead ({lead:g} s) is shorter than the slowest save ({slowest_save:.1f} s): a task warned "
            "by the signal may be killed mid-save; resubmit with a longer --signal lead"
        )
    task_seconds = next((e.get("time_seconds") for e in reversed(submits) if e.get("time_seconds")), None)
    needed = None
    if eta is not None and task_seconds and state not in ("complete", "failed"):
        needed = math.ceil(eta / (0.9 * float(task_seconds)))
    max_tasks = event_log.max_tasks(events)
    extension_left = None
    if max_tasks is not None:
        extension_left = max(0, max_tasks - event_log.tasks_submitted(events))
    if needed is not None and left is not None and state in ("running", "pending") and task_seconds:
        short = needed - left - (extension_left or 0)
        if short > 0:
            warnings.append(
                f"at the current rate ({rate:.3g} steps/s) the run needs about {needed} more task(s) of "
                f"{task_seconds / 60:g} min, but only {left} are queued"
                f"{f' and auto-extension adds at most {extension_left}' if extension_left else ''}: "
                f"`hpcckpt extend {run_dir} --tasks {short}`"
            )
    if state == "stalled" and total is not None:
        warnings.append(f"no task is queued and the run is not complete: `hpcckpt extend {run_dir} --tasks N`")

    failed = last_state if state == "failed" else None
    return RunStatus(
        run_dir=str(run_dir),
        state=state,
        step=step,
        total_steps=total,
        last_checkpoint=None
        if latest is None
        else {
            "name": latest.name,
            "step": latest.step,
            "age_seconds": now - latest.created,
            "size": latest.size,
            "save_seconds": latest.save_seconds,
        },
        tasks_used=len(event_log.of_kind(events, event_log.TASK_BEGIN)) or len(starts),
        tasks_left=left,
        tasks_running=running,
        jobs=jobs,
        history=history,
        steps_lost_to_preemption=steps_lost,
        time_lost_to_preemption=time_lost,
        steps_per_second=rate,
        eta_seconds=eta,
        warnings=warnings,
        reason=failed.get("reason") if failed else None,
        log_tail=_tail(failed.get("log")) if failed else None,
        tasks_needed=needed,
        max_tasks=max_tasks,
        extension_left=extension_left,
    )


_UPLOADED, _UPLOAD_FAILED, _PULLED = event_log.UPLOADED, event_log.UPLOAD_FAILED, event_log.PULLED


def _of(event: dict[str, Any], url: str) -> bool:
    return event_log.mirror_of(event) == url


def mirror_url(events: Sequence[dict[str, Any]]) -> str | None:
    """The mirror the run's newest upload, failed upload or pull named (:func:`hpcckpt.events.mirror_of`);
    None when the events name none."""
    for event in reversed(events):
        mirror = event_log.mirror_of(event)
        if mirror:
            return mirror
    return None


def summarize_mirror(
    url: str,
    events: Sequence[dict[str, Any]],
    checkpoints: Sequence[Checkpoint],
    listed: Sequence[Checkpoint] | None,
    why_not_listed: str | None,
    now: float,
) -> MirrorStatus:
    """The mirror's part of the status. ``listed``: the complete remote checkpoints when the mirror was
    listed (oldest first), else None and ``why_not_listed`` says why; the events answer then."""
    done = [e for e in events if e.get("event") in (_UPLOADED, _PULLED) and _of(e, url)]
    newest: dict[str, Any] | None = None
    if listed is not None:
        source = "listed at the mirror"
        if listed:
            c = listed[-1]
            newest = {"name": c.name, "step": c.step, "age_seconds": now - c.created}
    else:
        source = "from the run's events" + (f" (the mirror was not listed: {why_not_listed})" if why_not_listed else "")
        if done:
            e = max(done, key=lambda e: (int(e.get("step") or 0), float(e.get("time") or 0)))
            newest = {"name": e.get("name"), "step": e.get("step"), "age_seconds": now - float(e.get("time") or now)}
    remote_names = {str(e.get("name")) for e in done} | {c.name for c in listed or ()}
    top = max((int(e.get("step") or 0) for e in done), default=None)
    if listed:
        top = max(top or 0, listed[-1].step)
    pending = [c.name for c in checkpoints if c.name not in remote_names and (top is None or c.step > top)]
    failures: list[dict[str, Any]] = []
    for event in events:
        if event.get("event") == _UPLOADED and _of(event, url):
            failures = []
        elif event.get("event") == _UPLOAD_FAILED and _of(event, url):
            failures.append(event)
    failed = None
    if failures:
        last_failure = failures[-1]
        failed = {"name": last_failure.get("name"), "error": last_failure.get("error"), "failures": len(failures)}
    return MirrorStatus(
        url=url,
        newest=newest,
        source=source,
        pending=pending,
        failed=failed,
        remote_count=None if listed is None else len(listed),
    )


def _history(events: Sequence[dict[str, Any]]) -> list[TaskRecord]:
    """One record per task, pairing Run's start/stop with the chain's task-begin/task-end."""
    records: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for event in events:
        kind = event.get("event")
        if kind == event_log.TASK_BEGIN or (kind == event_log.START and (current is None or "start" in current)):
            current = {"job": event.get("job"), "host": event.get("host")}
            records.append(current)
        if current is None:
            continue
        if kind == event_log.START:
            current.update(start=event, host=event.get("host"), resumed_step=event.get("resumed_step"))
        elif kind == event_log.STOP:
            current["stop"] = event
        elif kind == event_log.CRASH:
            current["crash"] = event
        elif kind == event_log.TASK_END:
            current["end"] = event
            current = None
    result = []
    for r in records:
        stop, start, end = r.get("stop") or {}, r.get("start") or {}, r.get("end") or {}
        reason = stop.get("reason") or ("crashed" if "crash" in r else "killed" if end.get("killed") else None)
        seconds = stop["time"] - start["time"] if "time" in stop and "time" in start else None
        result.append(
            TaskRecord(
                job=str(r.get("job")),
                host=r.get("host"),
                resumed_step=r.get("resumed_step"),
                step=stop.get("step", end.get("latest_step")),
                steps_done=stop.get("steps_done"),
                reason=reason,
                cause=stop.get("cause"),
                saved=stop.get("saved"),
                seconds=seconds,
                time_left=stop.get("time_left"),
                steps_lost=stop.get("steps_lost"),
                exit_status=end.get("status"),
                ended_by=end.get("ended_by") if isinstance(end.get("ended_by"), str) else None,
            )
        )
    return result


def _tail(path: str | None, lines: int = 15) -> str | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    return "\n".join(text.splitlines()[-lines:])


def format_status(status: RunStatus) -> str:
    def duration(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        if seconds < 120:
            return f"{seconds:.0f} s"
        if seconds < 7200:
            return f"{seconds / 60:.0f} min"
        return f"{seconds / 3600:.1f} h"

    lines = [f"run      {status.run_dir}", f"state    {status.state.upper()}"]
    total = f" of {status.total_steps}" if status.total_steps is not None else ""
    lines.append(f"step     {status.step if status.step is not None else '-'}{total}")
    if status.last_checkpoint:
        c = status.last_checkpoint
        save = f", saved in {c['save_seconds']:.2f} s" if c.get("save_seconds") is not None else ""
        lines.append(f"latest   {c['name']} ({c['size'] / 2**20:.1f} MiB, {duration(c['age_seconds'])} ago{save})")
    left = "unknown" if status.tasks_left is None else str(status.tasks_left)
    lines.append(
        f"tasks    {status.tasks_used} used, {left} queued ({status.tasks_running} running)"
        f"{'; jobs ' + ', '.join(status.jobs) if status.jobs else ''}"
    )
    if status.tasks_needed is not None or status.max_tasks is not None:
        parts = []
        if status.tasks_needed is not None:
            parts.append(f"the ETA needs about {status.tasks_needed} more task(s), {left} queued")
        if status.max_tasks is not None:
            parts.append(
                f"auto-extension may add {status.extension_left} more (--max-tasks {status.max_tasks})"
                if status.extension_left
                else f"auto-extension used up (--max-tasks {status.max_tasks})"
            )
        lines.append(f"         {'; '.join(parts)}")
    if status.eta_seconds is not None:
        lines.append(
            f"eta      {duration(status.eta_seconds)} of training at {status.steps_per_second:.3g} steps/s "
            "(queue waits not counted)"
        )
    if status.steps_lost_to_preemption or any(t.cause == "preemption" for t in status.history):
        lines.append(
            f"lost     {status.steps_lost_to_preemption} steps, {duration(status.time_lost_to_preemption)} "
            "to preemption"
        )
    if status.reason:
        lines.append(f"failed   {status.reason}")
    if status.history:
        lines.append("history")
        for t in status.history:
            how = t.reason or "running"
            if t.cause:
                how += f" ({t.cause})"
            extra = []
            if t.steps_done is not None:
                extra.append(f"{t.steps_done} steps")
            if t.saved is False and t.reason not in (None, "completed"):
                extra.append("NOT saved")
            if t.steps_lost:
                extra.append(f"{t.steps_lost} lost")
            if t.time_left is not None:
                extra.append(f"{duration(t.time_left)} unused")
            if t.ended_by:
                extra.append(f"{t.ended_by} after the save (clean)")
            elif t.exit_status not in (None, 0):
                extra.append(f"exit {t.exit_status}")
            lines.append(
                f"  {t.job:<14} {t.host or '-':<10} from {t.resumed_step if t.resumed_step is not None else '-':>7} "
                f"to {t.step if t.step is not None else '-':>7}  {how}{'; ' + ', '.join(extra) if extra else ''}"
            )
    if status.mirror is not None:
        lines.extend(_mirror_lines(status.mirror, duration))
    for warning in status.warnings:
        lines.append(f"WARNING  {warning}")
    if status.log_tail:
        lines.append("last task's error log (tail):")
        lines.extend(f"  | {line}" for line in status.log_tail.splitlines())
    return "\n".join(lines)


def _mirror_lines(m: MirrorStatus, duration: Any) -> list[str]:
    lines = [f"mirror   {m.url}"]
    if m.newest is not None:
        count = f"; {m.remote_count} complete there" if m.remote_count is not None else ""
        lines.append(
            f"         newest there: {m.newest['name']} (step {m.newest['step']}, "
            f"{duration(m.newest['age_seconds'])} ago{count}; {m.source})"
        )
    else:
        lines.append(f"         nothing complete there yet ({m.source})")
    if m.pending:
        lines.append(f"         uploads pending: {', '.join(m.pending)}")
    if m.failed is not None:
        lines.append(
            f"         upload FAILED {m.failed['failures']} time(s) since the last success; last, "
            f"{m.failed['name']}: {m.failed['error']} (retried at the next save)"
        )
    return lines
