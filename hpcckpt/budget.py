"""The wall-time budget of a task: may it run one more step and still save before the job ends?

Rule: run the next step only if ``now + predicted step + predicted save + teardown + margin <= deadline``.
Step and save times are predicted from what was observed, leaning to the safe side (the slowest recent
step, the slowest save); the margin follows the predicted save (``margin_fraction`` of it) with a floor, so
a model that saves in milliseconds trains until seconds before the end, and one whose save takes minutes
stops minutes early. ``teardown`` is the time from the last save to the end of the task (the interpreter's
exit, DataLoader workers, the chain's ``task-end``), measured by earlier tasks of the run
(:func:`measured_teardown`): without it, the time limit's SIGTERM came during the exit and a task that had
saved was reported killed, ``exit 143`` (issue 11, item 23).

An async save in flight (``Run(async_save=True)``) still needs its remaining time: its predicted duration
less the time it has run (:meth:`Budget.in_flight_left`), counted before the stop's own save, which waits
for it.

Before a task has saved, its save time is a guess (:func:`first_save_guess`): earlier saves of the run
scaled by size, else the state's size over the measured write bandwidth.

The deadline is the job's real end time (:func:`find_deadline`), never a fraction of its time limit
(submitit #1656 misread jobs shorter than 10 minutes that way).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import events as event_log
from .errors import UsageError
from .slurm.env import SlurmEnv

if TYPE_CHECKING:
    from .store.manifest import Checkpoint

DEFAULT_MARGIN_FLOOR = 0.5
DEFAULT_MARGIN_FRACTION = 0.5
# Teardown before any task of the run measured one. Chain tasks on the 2-core test cluster took 0.6 s
# without DataLoader workers and 1.7-2.9 s with one (interpreter exit, worker shutdown and `hpcckpt
# task-end`'s start: from the stop event to the task-end event). The first task only; later ones measure.
DEFAULT_TEARDOWN = 2.0
TEARDOWN_HISTORY = 5  # tasks whose teardown counts (the slowest of them)

# Slurm's time-limit warning (`--signal=SIG@LEAD`): slurmctld checks every running job every 30 s
# (PERIODIC_TIMEOUT) and sends the signal at the first check where `lead + 30 + now >= end`. So it comes
# at or after end - lead - 30, and no later than end - lead (the check before did not send it), or, in a
# job shorter than lead + 30 s, no later than the first check after the job started (start + 30). Slurm
# documents "up to 60 s early"; 22.05 on the test cluster kept to the 30 s rule (notes/slurm-lab.md).
SLURM_WARNING_CHECK = 30.0
WARNING_EARLY_SLACK = 2.0  # EndTime is whole seconds; the controller's and the node's clocks differ
WARNING_LATE_SLACK = 10.0  # a loaded controller's check runs late; delivery through slurmd and the batch shell


@dataclass
class Budget:
    """Time left in this task, and the predictions that decide when to stop. ``clock`` returns Unix time;
    tests pass their own to move time."""

    deadline: float | None
    clock: Callable[[], float] = time.time
    margin_floor: float = DEFAULT_MARGIN_FLOOR
    margin_fraction: float = DEFAULT_MARGIN_FRACTION
    save_guess: float = 0.0  # before any save was seen: from earlier tasks, or size over bandwidth
    teardown: float = 0.0  # from the last save to the end of the task: see measured_teardown
    window: int = 50
    _steps: deque[float] = field(default_factory=deque, repr=False)
    _saves: list[float] = field(default_factory=list, repr=False)
    _in_flight_since: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.margin_floor < 0 or self.margin_fraction < 0:
            raise UsageError(
                f"Invalid margin: floor={self.margin_floor!r}, fraction={self.margin_fraction!r}; "
                "expected numbers >= 0 (seconds, and a fraction of the predicted save time)"
            )
        if self.teardown < 0:
            raise UsageError(f"Invalid teardown={self.teardown!r}: expected seconds >= 0")
        self._steps = deque(maxlen=self.window)

    def observe_step(self, seconds: float) -> None:
        self._steps.append(max(0.0, seconds))

    def observe_save(self, seconds: float) -> None:
        self._saves.append(max(0.0, seconds))

    def save_started(self) -> None:
        """An async save began now; it runs until :meth:`save_settled`."""
        self._in_flight_since = self.clock()

    def save_settled(self) -> None:
        self._in_flight_since = None

    def in_flight_left(self) -> float:
        """Seconds the async save in flight is still predicted to need (0 without one): the predicted save
        less the time it has run."""
        if self._in_flight_since is None:
            return 0.0
        return max(0.0, self.predicted_save - (self.clock() - self._in_flight_since))

    @property
    def predicted_step(self) -> float:
        """The slowest of the recent steps (0 before the first)."""
        return max(self._steps, default=0.0)

    @property
    def predicted_save(self) -> float:
        """The slowest save of this task, else the guess from earlier tasks or the state's size."""
        return max(self._saves, default=self.save_guess)

    @property
    def margin(self) -> float:
        return max(self.margin_floor, self.margin_fraction * self.predicted_save)

    def remaining(self) -> float | None:
        """Seconds until the deadline (negative once past), or None without a deadline."""
        return None if self.deadline is None else self.deadline - self.clock()

    def room_for_step(self, steps: int = 1) -> bool:
        """True when ``steps`` more steps, the save in flight, a save and the task's teardown still fit before
        the deadline."""
        left = self.remaining()
        if left is None:
            return True
        needed = steps * self.predicted_step + self.in_flight_left() + self.predicted_save + self.teardown
        return needed + self.margin <= left

    def room_for_save(self, within: float | None = None) -> bool:
        """True when a save fits before the deadline (and within ``within`` seconds, when given)."""
        left = self.remaining()
        limits = [x for x in (left, within) if x is not None]
        return not limits or self.save_fits_in(min(limits))

    def save_fits_in(self, seconds: float) -> bool:
        """True when a save and the margin floor fit in ``seconds``: the grace window after SIGTERM, where
        SIGKILL follows the signal whether the deadline is before or after it (the time limit's own SIGTERM
        comes at the deadline, with the window still ahead). The save in flight is waited for first."""
        return self.in_flight_left() + self.predicted_save + self.margin_floor <= seconds


@dataclass(frozen=True)
class Deadline:
    """When the job ends (Unix time) and where that came from; ``at`` is None when nothing knows."""

    at: float | None
    source: str


def find_deadline(
    environ: Mapping[str, str],
    slurm: SlurmEnv,
    query_end_time: Callable[[str], float | None] | None = None,
) -> Deadline:
    """The job's real end time: ``SLURM_JOB_END_TIME`` (Slurm >= 23.02), else squeue/scontrol for this job
    (Slurm 22.05 does not set the variable), else ``HPCCKPT_DEADLINE`` (Unix seconds; the local backend and
    tests set it); else no deadline."""
    if slurm.end_time is not None:
        return Deadline(float(slurm.end_time), "SLURM_JOB_END_TIME")
    if slurm.job_id is not None:
        if query_end_time is None:
            from .slurm.commands import job_end_time

            query_end_time = job_end_time
        end = query_end_time(slurm.job_id)
        if end is not None:
            return Deadline(end, f"squeue/scontrol for job {slurm.job_id}")
    raw = environ.get("HPCCKPT_DEADLINE")
    if raw:
        try:
            return Deadline(float(raw), "HPCCKPT_DEADLINE")
        except ValueError:
            raise UsageError(
                f"Invalid HPCCKPT_DEADLINE={raw!r}: expected Unix time in seconds, e.g. 1795300000"
            ) from None
    return Deadline(None, "none (no Slurm end time, no HPCCKPT_DEADLINE): no budget")


def first_save_guess(
    recent: Sequence[Checkpoint], state_size: Callable[[], int], directory: os.PathLike[str] | str
) -> float:
    """Seconds the first save of a task is expected to take, before it has saved: the slowest rate of the
    run's ``recent`` checkpoints (seconds per byte) times the newest one's size; without any, small states
    (under 1 MiB, from ``state_size()``) 0.05 s, larger ones twice their size over the write bandwidth
    measured in ``directory`` (the first save also pays for the page cache)."""
    history = [c for c in recent if c.save_seconds and c.size]
    if history:
        return max(c.save_seconds / c.size for c in history) * max(history[-1].size, 1)  # type: ignore[operator]
    size = state_size()
    if size < (1 << 20):
        return 0.05
    return 2.0 * size / measure_write_bandwidth(directory) + 0.05


def expected_teardown(in_job: bool, events: Callable[[], Sequence[Mapping[str, Any]]]) -> float:
    """Seconds from the last save to the task's end: as earlier tasks of the run took (``events()``, the
    run's event log, read only in a job), else :data:`DEFAULT_TEARDOWN`. Outside a Slurm job (or the local
    backend's) the deadline is the caller's (``HPCCKPT_DEADLINE``, ``deadline=``): the time by which the
    state must be saved, so nothing is set aside after it."""
    if not in_job:
        return 0.0
    measured = measured_teardown(events())
    return DEFAULT_TEARDOWN if measured is None else measured


def measured_teardown(events: Sequence[Mapping[str, Any]]) -> float | None:
    """The slowest teardown of the run's last tasks: seconds from a task's ``stop`` event (its last save
    done) to the training process's exit, which its ``task-end`` event records (``exited``; else the
    event's own time, a little later); None when no task of the run has both (the first task, or a run
    outside a chain)."""
    measured: list[float] = []
    stop: Mapping[str, Any] | None = None
    for event in events:
        kind = event.get("event")
        if kind == event_log.TASK_BEGIN:
            stop = None
        elif kind == event_log.STOP:
            stop = event
        elif kind == event_log.TASK_END and stop is not None:
            exited = event.get("exited")
            seconds = _number(event.get("time") if exited is None else exited) - _number(stop.get("time"))
            if seconds == seconds and 0 <= seconds < 600:  # a number, and not a stop of another day
                measured.append(seconds)
            stop = None
    return max(measured[-TEARDOWN_HISTORY:]) if measured else None


def is_time_limit_warning(at: float, deadline: float | None, lead: float, started: float) -> bool:
    """True when a warning signal received at ``at`` (Unix time) can only be the time limit's: the job's
    end (``deadline``) and the ``--signal`` lead are known and ``at`` falls where Slurm sends it (see
    SLURM_WARNING_CHECK). ``started`` is when the job started (or later: when this process started).
    Anything else (a user's ``scancel --signal``, a preemption, an unknown deadline or lead) is not."""
    if deadline is None or lead <= 0:
        return False
    earliest = deadline - lead - SLURM_WARNING_CHECK - WARNING_EARLY_SLACK
    latest = max(deadline - lead, started + SLURM_WARNING_CHECK) + WARNING_LATE_SLACK
    return earliest <= at <= latest


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else float("nan")


def measure_write_bandwidth(directory: os.PathLike[str] | str, nbytes: int = 16 << 20) -> float:
    """Bytes per second of a synced write into ``directory`` (the filesystem checkpoints go to).

    The probe file (``.bandwidth-probe-<host>-<pid>``, up to ``nbytes``) is created exclusively, never
    through a link, and locked while it is written: a process killed during the probe leaves it behind, and
    the store's cleanup (:meth:`Registry.clean_temporaries`) removes it once its lock is free (issue 11).
    """
    import fcntl

    from .store.fileio import link_refused, open_nofollow
    from .store.registry import probe_name

    path = os.path.join(directory, probe_name())
    data = os.urandom(1 << 20)
    start = time.perf_counter()
    try:
        fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # This host and pid's own name: a leftover of an earlier process with our pid (pids are reused,
        # in containers soon). A link there is refused, never followed nor removed.
        if os.path.islink(path):
            raise link_refused(path) from None
        os.unlink(path)
        fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with contextlib.suppress(OSError):  # without a lock service the cleaner goes by host, pid and age
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for _ in range(max(1, nbytes >> 20)):
            os.write(fd, data)
        os.fsync(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):  # a cleaner that took it for a dead one's: harmless
            os.unlink(path)
        os.close(fd)  # after the unlink: while the lock is held, no cleaner takes the file for a leftover
    return nbytes / max(time.perf_counter() - start, 1e-6)
