"""The run's event log (``RUN_DIR/events.jsonl``): its kinds, the records hpcckpt writes, and the readers.

One JSON object a line, appended under the registry's lock and never rewritten::

    {"time":1795300000.5,"event":"task-begin","job":"812_3","array_job":"812",...}

Invariants every reader keeps:

- the log is the run's history and the run's state: a run is complete or failed when its last
  ``complete``/``failed``/``reopen`` event says so (:func:`last_status`), never by any other file;
- a line torn by a crash is skipped, a field of the wrong kind is dropped with a message naming the line
  (issue 11, item 13), and an event of a kind this version does not know (written by a newer hpcckpt) is
  kept and ignored by every reader here: an old hpcckpt keeps reading a newer run's log;
- the format is the one hpcckpt has always written: the writers build the same objects the raw dicts did
  (``time`` first, then ``event``, then the fields), so old runs read as before.

Writers build records with the constructors below (one per kind, keyword-only, typed) and hand them to
:meth:`hpcckpt.store.registry.Registry.append_event`. This module imports nothing of hpcckpt's but the run
directory's names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, Protocol

from . import rundir

# -- the kinds ---------------------------------------------------------------------------------------------
Kind = Literal[
    "start",  # Run: training began in this task (resumed step, deadline, host...)
    "stop",  # Run: training stopped (completed, budget, signal), saved or not
    "crash",  # Run: the training loop raised; nothing was saved
    "complete",  # Run: the run is done (its final checkpoint)
    "failed",  # the breaker: consecutive tasks without progress
    "reopen",  # hpcckpt extend on a failed run
    "commit",  # the store: a checkpoint was committed
    "delete",  # the store: retention deleted a checkpoint
    "task-begin",  # the chain's guard before the training command
    "task-end",  # the chain's guard after it (or for a task that never ended: killed)
    "submit",  # an array (or a task) was submitted: hpcckpt submit/extend, auto-extension, submitit
    "cancel",  # hpcckpt cancel, Ctrl-C on a local chain
    "result",  # submitit: the training function's return value was stored
    "result-error",  # submitit: it could not be
    "bad",  # the store: a restored checkpoint failed validation; marked bad, kept on disk
    "uploaded",  # the store's mirror: a checkpoint is complete on the mirror
    "upload_failed",  # the store's mirror: an upload failed (retried at the next save)
    "pulled",  # the store's mirror: a checkpoint was downloaded from the mirror and committed here
]
START: Final = "start"
STOP: Final = "stop"
CRASH: Final = "crash"
COMPLETE: Final = "complete"
FAILED: Final = "failed"
REOPEN: Final = "reopen"
COMMIT: Final = "commit"
DELETE: Final = "delete"
TASK_BEGIN: Final = "task-begin"
TASK_END: Final = "task-end"
SUBMIT: Final = "submit"
CANCEL: Final = "cancel"
RESULT: Final = "result"
RESULT_ERROR: Final = "result-error"
BAD: Final = "bad"
UPLOADED: Final = "uploaded"
UPLOAD_FAILED: Final = "upload_failed"
PULLED: Final = "pulled"

Event = dict[str, Any]  # one line of the log, as read: ``event`` (the kind), ``time``, then its fields

FILE = rundir.EVENTS


class Latest(Protocol):
    """The newest committed checkpoint, as a task's events describe it (a store ``Checkpoint``)."""

    @property
    def name(self) -> str: ...
    @property
    def step(self) -> int: ...
    @property
    def created(self) -> float: ...
    @property
    def seq(self) -> int | None: ...


# -- constructors: what each writer appends ----------------------------------------------------------------
def start(
    *,
    job: str,
    host: str,
    pid: int,
    resumed_step: int,
    resumed_from: str | None,
    deadline: float | None,
    deadline_source: str,
    signal: str,
    teardown: float,
    total_steps: int | None,
    world_size: int,
) -> Event:
    """``Run`` began training in this task: where it resumed, its deadline and where that came from."""
    return {
        "event": START,
        "job": job,
        "host": host,
        "pid": pid,
        "resumed_step": resumed_step,
        "resumed_from": resumed_from,
        "deadline": deadline,
        "deadline_source": deadline_source,
        "signal": signal,
        "teardown": teardown,
        "total_steps": total_steps,
        "world_size": world_size,
    }


def stop(
    *,
    reason: str,
    cause: str | None,
    signal: str | None,
    step: int,
    steps_done: int,
    saved: bool,
    checkpoint: str | None,
    save_seconds: float | None,
    time_left: float | None,
    steps_lost: int,
) -> Event:
    """``Run`` stopped training (completed, budget, signal...), and whether its last step is saved."""
    return {
        "event": STOP,
        "reason": reason,
        "cause": cause,
        "signal": signal,
        "step": step,
        "steps_done": steps_done,
        "saved": saved,
        "checkpoint": checkpoint,
        "save_seconds": save_seconds,
        "time_left": time_left,
        "steps_lost": steps_lost,
    }


def crash(*, step: int, steps_done: int, error: str) -> Event:
    """The training loop raised; nothing was saved (the state may be mid-step)."""
    return {"event": CRASH, "step": step, "steps_done": steps_done, "error": error[:500]}


def complete(*, step: int, epoch: int, checkpoint: str | None) -> Event:
    """The run is done: its final checkpoint is committed."""
    return {"event": COMPLETE, "step": step, "epoch": epoch, "checkpoint": checkpoint}


def commit(summary: Mapping[str, Any]) -> Event:
    """A checkpoint was committed; ``summary`` is its manifest summary (name, step, size, seq...)."""
    return {"event": COMMIT, **summary}


def delete(name: str, step: int, why: str = "retention") -> Event:
    return {"event": DELETE, "name": name, "step": step, "why": why}


def marked_bad(name: str, step: int, seq: int | None, created: float, reason: str) -> Event:
    """A restored checkpoint failed validation: marked bad (this instance of ``name``: ``seq``, ``created``)."""
    return {"event": BAD, "name": name, "step": step, "seq": seq, "created": created, "reason": reason[:2000]}


# The mirror events carry the mirror's base URL (credential-free) as ``mirror``, apart from ``url`` (the
# checkpoint's there, or the mirror's for a failure): status reads the mirror from it, never by parsing ``url``
# (issue 14 review, item 11: s3://lab/checkpoints/run42 is a mirror too). Events written before it lack
# ``mirror``; :func:`mirror_of` reads them as before.
def uploaded(name: str, step: int, url: str, size: int, seconds: float, *, mirror: str) -> Event:
    """Checkpoint ``name`` is complete on the mirror ``mirror`` at ``url`` (credential-free): files, then manifest."""
    return {
        "event": UPLOADED,
        "name": name,
        "step": step,
        "url": url,
        "mirror": mirror,
        "size": size,
        "seconds": round(seconds, 3),
    }


def upload_failed(name: str, step: int, url: str, error: str) -> Event:
    """Uploading checkpoint ``name`` to the mirror at ``url`` failed; it is retried at the next save or task."""
    return {"event": UPLOAD_FAILED, "name": name, "step": step, "url": url, "mirror": url, "error": error[:500]}


def pulled(name: str, step: int, url: str, *, mirror: str) -> Event:
    """Checkpoint ``name`` was downloaded from the mirror ``mirror`` at ``url``, verified and committed here."""
    return {"event": PULLED, "name": name, "step": step, "url": url, "mirror": mirror}


def mirror_of(event: Mapping[str, Any]) -> str | None:
    """The mirror an ``uploaded``, ``upload_failed`` or ``pulled`` event names (None for other kinds or none
    named): its ``mirror`` field; in an older event without it, an upload failure's ``url`` is the mirror's,
    and an upload's or a pull's is ``<mirror>/checkpoints/<name>``."""
    kind, url = event.get("event"), event.get("url")
    if kind not in (UPLOADED, UPLOAD_FAILED, PULLED):
        return None
    if isinstance(event.get("mirror"), str) and event["mirror"]:
        return str(event["mirror"])
    if not isinstance(url, str) or not url:
        return None
    if kind == UPLOAD_FAILED:
        return url
    head, sep, name = url.rpartition(f"/{rundir.CHECKPOINTS}/")
    return head if sep and name and "/" not in name else url


def task_begin(
    *,
    job: str,
    array_job: str | None,
    task: int | None,
    restart: int | None,
    host: str,
    pid: int,
    latest: Latest | None,
) -> Event:
    """A task passed its guard and runs the training command; ``latest`` is what was committed then (the
    task's progress is judged against it, in commit order)."""
    return {
        "event": TASK_BEGIN,
        "job": job,
        "array_job": array_job,
        "task": task,
        "restart": restart,
        "host": host,
        "pid": pid,
        "latest": latest.name if latest else None,
        "latest_step": latest.step if latest else None,
        "latest_created": latest.created if latest else None,
        "latest_seq": latest.seq if latest else None,
    }


def task_killed(*, job: str | None, progress: bool, latest_step: int | None) -> Event:
    """The ``task-end`` a later task records for one that began and never ended (its time limit, a node
    failure): no exit status, ``killed``."""
    return {
        "event": TASK_END,
        "job": job,
        "status": None,
        "killed": True,
        "progress": progress,
        "latest_step": latest_step,
    }


def task_end(
    *,
    job: str,
    status: int,
    progress: bool,
    latest_step: int | None,
    clean: bool,
    ended_by: str | None,
    exited: float | None,
    log: str | None,
) -> Event:
    """How a task ended: its exit ``status``, whether it made ``progress`` (a new checkpoint), whether the
    stop was ``clean`` (``ended_by``: the signal that ended it after its save), when the training command
    ``exited`` and its error ``log``."""
    return {
        "event": TASK_END,
        "job": job,
        "status": status,
        "killed": False,
        "progress": progress,
        "latest_step": latest_step,
        "clean": clean,
        "ended_by": ended_by,
        "exited": exited,
        "log": log,
    }


@dataclass(frozen=True)
class ChainSettings:
    """What ``hpcckpt submit`` records of a chain's tasks, which extending a local chain copies."""

    time_seconds: int | None
    signal: str | None
    lead: int | None
    script: str | None
    command: list[str] | None

    @classmethod
    def recorded(cls, event: Mapping[str, Any]) -> ChainSettings:
        """The settings a submit event recorded (None for each it lacks)."""
        command = event.get("command")
        return cls(
            time_seconds=event.get("time_seconds"),
            signal=event.get("signal"),
            lead=event.get("lead"),
            script=event.get("script"),
            command=list(command) if command is not None else None,
        )


def chain_submitted(*, job: str, tasks: int, backend: str, settings: ChainSettings, max_tasks: int) -> Event:
    """``hpcckpt submit`` submitted a chain of ``tasks`` tasks as ``job``: its settings and its
    ``--max-tasks`` cap, which auto-extension and ``hpcckpt status`` read back."""
    return {
        "event": SUBMIT,
        "job": job,
        "tasks": tasks,
        **{"time_seconds": settings.time_seconds, "signal": settings.signal, "lead": settings.lead},
        **{"backend": backend, "script": settings.script, "command": settings.command, "max_tasks": max_tasks},
    }


def submitted(
    *,
    job: str | None,
    tasks: int | None,
    backend: str,
    task: int | None = None,
    auto: bool = False,
    extend: bool = False,
    script: str | None = None,
    folder: str | None = None,
    settings: ChainSettings | None = None,
) -> Event:
    """More tasks were submitted for the run: ``auto`` by auto-extension, ``extend`` by ``hpcckpt extend``
    (with the chain's ``settings`` when it starts a new local chain), else by submitit (its ``folder``, or
    the chain's next ``task`` where its executor has no arrays). Fields left at their default are not
    written."""
    event: Event = {"event": SUBMIT, "job": job}
    if task is not None:
        event["task"] = task
    event["tasks"] = tasks
    if auto:
        event["auto"] = True
    if extend:
        event["extend"] = True
    event["backend"] = backend
    if settings is not None:
        event.update(asdict(settings))
    elif script is not None:
        event["script"] = script
    if folder is not None:
        event["folder"] = folder
    return event


def cancel(*, jobs: Sequence[str], why: str | None = None) -> Event:
    event: Event = {"event": CANCEL, "jobs": list(jobs)}
    if why is not None:
        event["why"] = why
    return event


def failed(*, reason: str, log: str | None) -> Event:
    """The breaker marked the run failed: ``reason`` (the tasks' statuses), the last task's error ``log``."""
    return {"event": FAILED, "reason": reason, "log": log}


def reopen(*, why: str) -> Event:
    return {"event": REOPEN, "why": why}


def result(*, type_name: str, size: int) -> Event:
    """submitit stored the training function's return value (``result.pkl``): its type and size."""
    return {"event": RESULT, "type": type_name, "bytes": size}


def result_error(*, error: str) -> Event:
    return {"event": RESULT_ERROR, "error": error[:500]}


# -- readers -------------------------------------------------------------------------------------------
def of_kind(events: Iterable[Mapping[str, Any]], *kinds: Kind) -> list[Event]:
    """The events of these kinds, oldest first."""
    return [dict(e) for e in events if e.get("event") in kinds]


def last(events: Sequence[Mapping[str, Any]], *kinds: Kind) -> Event | None:
    """The newest event of one of these kinds, or None. Every "what happened last" question below is
    this scan with the kinds that can answer it."""
    return next((dict(e) for e in reversed(events) if e.get("event") in kinds), None)


def last_status(events: Sequence[Mapping[str, Any]]) -> Event | None:
    """The run's state: its last ``complete`` or ``failed`` event, or None while the run is open (never
    settled, or reopened since by ``hpcckpt extend``)."""
    event = last(events, COMPLETE, FAILED, REOPEN)
    return None if event is None or event["event"] == REOPEN else event


def open_task(events: Sequence[Mapping[str, Any]]) -> Event | None:
    """The ``task-begin`` of a chain task that has not ended (no ``task-end`` after it): the running task,
    or one killed before its ``task-end`` (a time limit, a node failure); None when none is open."""
    event = last(events, TASK_BEGIN, TASK_END)
    return event if event is not None and event["event"] == TASK_BEGIN else None


def training_open(events: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the newest task or training began and has neither ended nor stopped: a chain task without
    its ``task-end`` and training without its ``stop``, or a ``Run`` outside a chain that started and has
    not stopped. What ``hpcckpt status`` calls running when the queue cannot tell."""
    event = last(events, TASK_BEGIN, START, TASK_END, STOP)
    return event is not None and event["event"] in (TASK_BEGIN, START)


def stop_since_begin(events: Sequence[Mapping[str, Any]]) -> Event | None:
    """The newest task's ``stop`` or ``crash`` event, None when its training has neither (yet)."""
    event = last(events, TASK_BEGIN, STOP, CRASH)
    return None if event is None or event["event"] == TASK_BEGIN else event


def chain_jobs(events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Array job ids of the chain, from its submit events, oldest first."""
    return list(dict.fromkeys(str(e["job"]) for e in of_kind(events, SUBMIT) if e.get("job")))


def tasks_submitted(events: Iterable[Mapping[str, Any]], job: str | None = None) -> int:
    """Tasks submitted for the run (by ``job`` only, when given): the sum of the submit events' ``tasks``."""
    submits = of_kind(events, SUBMIT)
    return sum(int(e.get("tasks") or 0) for e in submits if job is None or str(e.get("job")) == job)


def capped_submits(events: Iterable[Mapping[str, Any]]) -> list[Event]:
    """The submit events that carry a ``--max-tasks`` cap (``hpcckpt submit``'s), oldest first."""
    return [e for e in of_kind(events, SUBMIT) if e.get("max_tasks") is not None]


def max_tasks(events: Iterable[Mapping[str, Any]]) -> int | None:
    """The chain's ``--max-tasks`` as its newest submission recorded it; None for a chain without a cap."""
    capped = capped_submits(events)
    return int(capped[-1]["max_tasks"]) if capped else None


def cancelled(events: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a ``cancel`` (``hpcckpt cancel``, Ctrl-C on a local chain) came after the newest submission."""
    event = last(events, CANCEL, SUBMIT)
    return event is not None and event["event"] == CANCEL


def backends(events: Iterable[Mapping[str, Any]]) -> set[Any]:
    """The backends the run's tasks were submitted to (``slurm``, ``local``, ``submitit``...)."""
    return {e.get("backend") for e in of_kind(events, SUBMIT)}


# -- the file format -------------------------------------------------------------------------------------
def encode(events: Iterable[Mapping[str, Any]], now: float) -> str:
    """The lines that append ``events`` at time ``now``: ``time`` first, compact JSON, one a line."""
    return "".join(json.dumps({"time": now, **e}, separators=(",", ":")) + "\n" for e in events)


def parse(text: str, source: str) -> tuple[list[Event], list[str]]:
    """The events of a log's ``text``, oldest first, and what was wrong with it: a line that is no JSON
    object (torn by a crash) is skipped silently; a field that is not of its kind is dropped from its event,
    with one message naming ``source``, the line, the field, its value and the accepted form."""
    events: list[Event] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(checked(event, f"{source}, line {number}", problems.append))
    return events, problems


# The kind of every event field that hpcckpt's readers (status, the breaker, results) use, checked when
# read (issue 11, item 13); null is accepted for each. Other fields are left as they are.
FIELDS: dict[str, str] = {
    **dict.fromkeys(("time", "lead", "time_seconds", "time_left", "latest_created", "deadline"), "a number"),
    **dict.fromkeys(
        (
            *("step", "steps_done", "steps_lost", "resumed_step", "total_steps", "latest_step", "tasks"),
            *("status", "max_tasks", "latest_seq"),
        ),
        "a whole number",
    ),
    **dict.fromkeys(("saved", "killed", "progress", "auto", "extend"), "true or false"),
    **dict.fromkeys(("event", "host", "reason", "cause", "log", "checkpoint", "error"), "a string"),
    "job": "a string or a whole number",
    "jobs": "a list of strings",
}
_FORMS: dict[str, Callable[[Any], bool]] = {
    "a number": lambda v: type(v) in (int, float),
    "a whole number": lambda v: type(v) is int,
    "true or false": lambda v: type(v) is bool,
    "a string": lambda v: isinstance(v, str),
    "a string or a whole number": lambda v: isinstance(v, str) or type(v) is int,
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(j, str) for j in v),
}


def checked(event: Event, where: str, report: Callable[[str], None]) -> Event:
    """``event`` without the fields that are not of their kind, each reported naming ``where`` (the file
    and line), the field, its value and the accepted form: the rest of the log stays usable."""
    bad = [
        name
        for name, value in event.items()
        if value is not None and name in FIELDS and not _FORMS[FIELDS[name]](value)
    ]
    for name in bad:
        shown = json.dumps(event[name], default=str)
        report(
            f"{where}: field {name!r} is {shown if len(shown) <= 60 else shown[:57] + '...'}; expected "
            f"{FIELDS[name]} or null; ignoring that field"
        )
    return {k: v for k, v in event.items() if k not in bad} if bad else event
