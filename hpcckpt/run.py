"""``Run``: the entrypoint side of a chain. Resume, train until the budget or a signal says stop, save, leave.

Step loop::

    with Run(run_dir, state, total_steps=10_000, save_every="500ba") as run:
        for step in run:                 # resumes after the latest checkpoint
            ...                          # one optimisation step
            run.report(loss=loss.item())

Epoch loop (a plain DataLoader resumes mid-epoch at the same batch, in the same order)::

    with Run(run_dir, state, save_every="1ep") as run:
        for epoch in run.epochs(10):
            for batch in run.batches(loader):
                ...                      # one optimisation step
            if not run.epoch_finished:   # the run is stopping mid-epoch: skip end-of-epoch work
                break
            validate()

At every step boundary the loop decides, in this order: the run is complete (final save, marked complete
in the registry); a signal arrived (save if it fits, then leave); the budget has no room for another step
and a save (save, leave); a save is due by ``save_every``. A process leaving on a budget or signal stop
has lost no step: the next task starts from the step after the last one done.

The time limit's own warning signal does not stop the loop: when the job's end and the ``--signal`` lead
are known and the warning came when Slurm sends it (:func:`hpcckpt.budget.is_time_limit_warning`), the
budget already knows when to stop, so training goes on until it says so (issue 11, item 27: leaving at the
warning left 35-41 s of every 1-minute task unused). Any other warning (a user's ``scancel --signal``, a
preemption, no known deadline) and any SIGTERM stop at the next step.

With ``async_save=True`` an interval save only takes a snapshot at the step boundary; a background thread
persists and commits it while training goes on (:mod:`hpcckpt.store.asyncsave`). The rule, the same on
every rank: one save in flight; a save that comes due while the previous one is in flight waits for it
first; a stop (completion, budget, signal) waits for it, then saves the step it stops at, and the budget
counts its remaining time. A background failure is raised as a :class:`~hpcckpt.StoreError` naming the
step that failed and the latest checkpoint: alone, at the next step boundary; with ranks, at the next save
or the stop (where the ranks all are: collecting a sharded save is collective). When it is collected at a
save, that save is still done first (synchronously), so a stop's checkpoint is committed before the
failure is raised. Leaving the ``with`` block after an exception waits for the save in flight (it holds a
finished step) up to the budget's time left; past that it is abandoned: nothing of it is visible, and the
next save removes its temporary directory. With ranks, a crash drops the save in flight instead of
waiting: its wait is collective, and the other ranks are still training.

Exit status: the script ends normally (0) after completion, a budget stop and a signal stop, saved or
not, so the array goes on to its next task; an exception in the training code propagates (non-zero).

``Run`` sequences; each decision lives with its concept (issue 12): whether a step and a save still fit,
and the first save's and the teardown's estimates, in :mod:`hpcckpt.budget`; why a signal came in
:func:`hpcckpt.signals.stop_cause`; whether a save is due in :meth:`hpcckpt.Interval.due`; the loader's
mid-epoch resume in :func:`hpcckpt.state.epoch_batches`. ``Run`` is an entry point: it reads the
environment when it is built and entered, and hands values to the rest.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal as signal_module
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from . import events as event_log
from .budget import (
    DEFAULT_MARGIN_FLOOR,
    Budget,
    Deadline,
    expected_teardown,
    find_deadline,
    first_save_guess,
    is_time_limit_warning,
)
from .checks import whole_number
from .distributed import Agreement, broadcast_object, world
from .environment import check_environment
from .errors import HpcckptError, StoreError, UsageError
from .signals import Cause, Received, SignalRecorder, leave_recording, stop_cause, warning_signal
from .slurm.env import read_slurm_env
from .state import RestoreOptions, TrainState, batch_done, epoch_batches, state_bytes
from .store.asyncsave import SaveHandle
from .store.formats import DCP_FORMAT, TENSORS_FORMAT
from .store.manifest import Checkpoint
from .store.mirror import DEFAULT_KEEP_LAST as DEFAULT_MIRROR_KEEP_LAST
from .store.registry import lock_mode
from .store.retention import KeepBest
from .store.store import CheckpointStore
from .store.validation import check_validate
from .timespec import Interval
from .workers import child_exits_deferred, shield, stop_signals

StopReason = Literal["completed", "budget", "signal"]
Decision = Literal["continue", "budget", "signal", "save"]  # "save": go on after an interval save

DEFAULT_GRACE = 5.0  # seconds between SIGTERM and SIGKILL assumed when nothing says otherwise

log = logging.getLogger("hpcckpt")


class Run:
    """A resumable, budgeted, signal-aware training loop over one run directory.

    Every parameter; a bad value is a :class:`~hpcckpt.UsageError` at construction, naming it:

    - ``run_dir``: the run directory (created if missing); default ``HPCCKPT_RUN_DIR``, which hpcckpt's
      sbatch template exports. One of them is required.
    - ``state``: the :class:`~hpcckpt.TrainState` to restore into and save (required).
    - ``total_steps``: the run is complete after that many steps (a whole number >= 0); ``None`` with
      :meth:`epochs`, whose count ends the run, or for a loop that only the budget or a signal stops.
    - ``save_every``: ``"500ba"`` (steps), ``"2ep"`` (epochs), ``"30min"``, ``"90s"``, ``"2h"`` (wall time
      since the last save) or an :class:`~hpcckpt.Interval`; ``None``: no interval saves. Every stop saves
      anyway, and so does the end of the run.
    - ``keep_last``: how many of the newest checkpoints retention keeps (default 3; ``None``: all).
    - ``keep_best``: ``(metric, "min" | "max", count)`` or a :class:`~hpcckpt.KeepBest`: also keep the
      ``count`` best checkpoints by a metric given to :meth:`report`.
    - ``signal``: the time limit's warning signal, a name (``"USR2"``, ``"SIGUSR2"``) or number; default
      ``HPCCKPT_SIGNAL`` (the template's ``--signal``), else SIGUSR1. SIGTERM is always watched.
    - ``grace``: seconds a save may take after SIGTERM, before SIGKILL (Slurm sends it KillWait seconds
      later); default ``HPCCKPT_GRACE``, else 5.
    - ``margin_floor``: the budget's smallest safety margin in seconds (the margin is otherwise half the
      predicted save); default ``HPCCKPT_MARGIN``, else 0.5.
    - ``restore``: what to restore from the latest checkpoint (:class:`~hpcckpt.RestoreOptions`; default
      everything, strictly).
    - ``metadata``: values written into every checkpoint's manifest (a learning rate, a git commit).
    - ``hparams``: the hyper-parameters, JSON values, recorded in every manifest beside the command line and
      the git commit of the working directory (``hpcckpt show`` prints them).
    - ``validate``: ``fn(state)``, run after the restore (a forward pass on a fixed batch, a finite-loss check);
      failing by raising or returning False, the checkpoint is marked bad (kept, never chosen again) and the
      previous valid one restored; none left: :class:`~hpcckpt.ValidationFailedError`, never a fresh start.
    - ``clock``: returns Unix time (default :func:`time.time`); tests pass their own to move time.
    - ``environ``: the environment read for ``HPCCKPT_*`` and ``SLURM_*`` values (default ``os.environ``).
      ``Run`` is an entry point: it reads the environment here, once, and hands values to the library.
    - ``deadline``: the task's end as a :class:`~hpcckpt.budget.Deadline`, instead of finding it
      (``SLURM_JOB_END_TIME``, squeue/scontrol, ``HPCCKPT_DEADLINE``).
    - ``agree_every``: with many ranks, agree on stopping every that many steps (a whole number >= 1;
      default 1); the budget looks that much further ahead. Alone, a process agrees with itself.
    - ``async_save``: interval saves take a snapshot and persist it in the background (see the module's
      docstring for the rule); stops still save before leaving.
    - ``async_staging_bytes``: the most host memory a snapshot may take (default: a quarter of the
      machine's); a larger state is saved synchronously, with a warning.
    - ``mirror``: a second place every checkpoint is uploaded to in the background (a path,
      ``s3://bucket/prefix``, ``gs://...``; see docs/locations.md); default ``HPCCKPT_MIRROR`` (the
      template's ``--mirror``); ``""``: none. A run directory without a checkpoint resumes from it; a stop
      waits for uploads at most as long as :func:`upload_wait` says (the grace window after SIGTERM, the
      budget, else 60 s or twice the longest upload), a crash not at all; the rest is left to the next task.
    - ``mirror_keep_last``: how many of the newest checkpoints the mirror keeps (default 3; ``None``: all);
      the newest complete one is never deleted.

    - ``compression``: ``"zstd"`` compresses checkpoints (needs ``hpcckpt[zstd]``), as on
      :class:`CheckpointStore`; default None. One process only: the sharded checkpoints of several ranks
      are not compressed (a :class:`UsageError`).
    - ``compression_level``: zstd's level, 1 to 22 (default 3).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        state: TrainState | None = None,
        total_steps: int | None = None,
        save_every: str | Interval | None = None,
        *,
        keep_last: int | None = 3,
        keep_best: KeepBest | tuple[str, str, int] | None = None,
        signal: str | int | signal_module.Signals | None = None,
        grace: float | None = None,
        margin_floor: float | None = None,
        restore: RestoreOptions | None = None,
        metadata: Mapping[str, Any] | None = None,
        hparams: Mapping[str, Any] | None = None,
        validate: Callable[[TrainState], Any] | None = None,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
        deadline: Deadline | None = None,
        agree_every: int = 1,
        async_save: bool = False,
        async_staging_bytes: int | None = None,
        mirror: str | None = None,
        mirror_keep_last: int | None = DEFAULT_MIRROR_KEEP_LAST,
        compression: str | None = None,
        compression_level: int = 3,
    ) -> None:
        self.environ = os.environ if environ is None else environ
        values = check_environment(self.environ)  # a bad HPCCKPT_* value fails now, not when a signal comes (item 10)
        if run_dir is None:
            run_dir = self.environ.get("HPCCKPT_RUN_DIR") or None
            if run_dir is None:
                raise UsageError("Run() needs a run directory: pass run_dir=... or set HPCCKPT_RUN_DIR")
        if not isinstance(state, TrainState):
            raise UsageError(f"Run() needs state=TrainState(...), got {type(state).__name__}")
        if total_steps is not None:
            whole_number(total_steps, "total_steps", minimum=0, also=", or None")
        self.run_dir = Path(run_dir)
        self.state = state
        self.total_steps = total_steps
        self.total_epochs: int | None = None
        self.save_every = None if save_every is None else Interval.parse(save_every)
        self.warning = warning_signal(signal, self.environ)
        self.grace = _seconds("grace", grace, values.get("HPCCKPT_GRACE", DEFAULT_GRACE))
        self.margin_floor = _seconds("margin_floor", margin_floor, values.get("HPCCKPT_MARGIN", DEFAULT_MARGIN_FLOOR))
        self._signal_lead: float = values.get("HPCCKPT_SIGNAL_LEAD", 0.0)
        # Under submitit the time limit's warning stays a stop: see _leave_to_budget.
        self._under_submitit = "SUBMITIT_EXECUTOR" in self.environ
        self.restore_options = restore or RestoreOptions()
        self.validate = check_validate(validate)
        self.clock = clock
        self._deadline = deadline
        whole_number(agree_every, "agree_every", of="steps")
        self.agree_every = agree_every
        # Ranks of a started process group save one sharded checkpoint together; a lone process one file.
        self.rank, self.world_size = world()
        self.store = CheckpointStore(
            self.run_dir,
            keep_last=keep_last,
            keep_best=keep_best,
            metadata=metadata,
            hparams=hparams,
            format=DCP_FORMAT if self.world_size > 1 else TENSORS_FORMAT,
            lock=lock_mode(self.environ),
            job=read_slurm_env(self.environ),
            async_staging_bytes=async_staging_bytes,
            mirror=values.get("HPCCKPT_MIRROR") if mirror is None else mirror,
            mirror_keep_last=mirror_keep_last,
            compression=compression,
            compression_level=compression_level,
        )
        if not isinstance(async_save, bool):
            raise UsageError(f"Invalid async_save={async_save!r}: expected True or False")
        if async_save and self.world_size > 1 and not hasattr(self.store.format, "save_async"):
            # A collective save on a thread of its own would interleave its collectives with training's.
            log.warning("hpcckpt: format %r has no async save of its own; saving synchronously", self.store.format.name)
            async_save = False
        self.async_save = async_save
        self._in_flight: _InFlight | None = None
        self._agreement: Agreement | None = Agreement(self.agree_every) if self.world_size > 1 else None

        self.completed = False
        self.stop_reason: StopReason | None = None
        self.cause: Cause | None = None
        self.resumed_from: Checkpoint | None = None
        self.last_checkpoint: Checkpoint | None = None
        self.epoch_finished = False
        self.steps_done = 0
        self.budget = Budget(None, clock=clock, margin_floor=self.margin_floor)
        self._metrics: dict[str, float] = {}
        self._signals = SignalRecorder((self.warning, signal_module.SIGTERM), clock=clock)
        self._started_at = clock()
        self._deferred: set[int] = set()  # ids of the time limit's warnings, left to the budget
        # DataLoader workers must outlive a stop signal sent to every process of the job (issue 11, item 7).
        self._stop_signals = stop_signals(self.warning)
        shield(self.state.dataloader, self._stop_signals)
        self._last_save_time = 0.0
        self._stopping = False
        self._pending_failure: StoreError | None = None  # an async save's failure collected by a stop's save
        self._saved_at: int | None = None
        self._entered = False

    # -- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> Run:
        _ensure_log_handler(quiet=self.rank != 0)  # one rank tells the story
        self._entered = True
        slurm = read_slurm_env(self.environ)
        status = broadcast_object(self.store.registry.status() if self.rank == 0 else None)
        if status is not None and status.get("event") == event_log.COMPLETE:
            self.completed, self.stop_reason, self._stopping = True, "completed", True
            self.state.step = int(status.get("step", self.state.step))
            log.info("hpcckpt: run %s is already complete at step %s; nothing to do", self.run_dir, self.state.step)
            return self
        self.resumed_from = self.store.restore(self.state, options=self.restore_options, validate=self.validate)
        self.last_checkpoint = self.resumed_from
        self.store.upload_to_mirror(None)  # what a previous task left un-uploaded, in the background
        # The state as resumed (or freshly built) needs no save of its own: nothing was trained yet.
        self._saved_at = self.state.step
        # Rank 0's deadline and save estimate for every rank: they stop at the same step anyway, but
        # their logs and records then agree too.
        deadline, guess, teardown = broadcast_object(
            (
                self._deadline or find_deadline(self.environ, slurm),
                first_save_guess(
                    self.store.list()[-5:], lambda: state_bytes(self.state), self.store.registry.checkpoint_dir
                ),
                expected_teardown(slurm.in_job, self.store.registry.events),
            )
            if self.rank == 0
            else None
        )
        self.budget = Budget(
            deadline.at, clock=self.clock, margin_floor=self.margin_floor, save_guess=guess, teardown=teardown
        )
        # The job started no later than this process (Slurm >= 23.02 says when): bounds the warning's window.
        self._started_at = min(self._started_at, float(slurm.start_time or self._started_at))
        self._last_save_time = self.clock()
        self._signals.__enter__()
        left = self.budget.remaining()
        self._record(
            event_log.start(
                job=slurm.job_label,
                host=socket.gethostname(),
                pid=os.getpid(),
                resumed_step=self.state.step,
                resumed_from=self.resumed_from.name if self.resumed_from else None,
                deadline=deadline.at,
                deadline_source=deadline.source,
                signal=self.warning.name,
                teardown=teardown,
                total_steps=self.total_steps,
                world_size=self.world_size,
            )
        )
        where = f"step {self.state.step} ({self.resumed_from.name})" if self.resumed_from else "scratch (step 0)"
        budget = "no deadline" if left is None else f"{left:.0f} s left ({deadline.source})"
        log.info(
            "hpcckpt: task %s on %s resumes %s from %s; %s",
            slurm.job_label,
            socket.gethostname(),
            self.run_dir,
            where,
            budget,
        )
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        leave_recording(self._signals)  # a signal after the loop must not kill the process (item 11)
        try:
            self._leave_in_flight(crashed=kind is not None)
        finally:
            self._leave_uploads(crashed=kind is not None)
        if kind is not None and self.stop_reason is None:
            # A crash: nothing is saved (the state may be mid-step); the last checkpoint stays the truth.
            self._record(
                event_log.crash(step=self.state.step, steps_done=self.steps_done, error=f"{kind.__name__}: {error}")
            )

    # -- the loops ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        """Yield step numbers (``state.step`` before the step runs), until the run stops."""
        return self._steps(itertools.count(), epoch_mode=False)

    def epochs(self, count: int) -> Iterator[int]:
        """Yield epoch numbers from the resumed epoch up to ``count - 1``; the run completes after the last."""
        whole_number(count, "epoch count")
        self.total_epochs = count
        self._require_entered()
        while not self._stopping and self.state.epoch < count:
            self.epoch_finished = False
            yield self.state.epoch
            if self._stopping or not self.epoch_finished:
                return
            self.state.epoch += 1
            self.state.loader_position = {}
            if self.state.epoch >= count:
                self._complete()
                return
            if self._save_due(epoch=self.state.epoch):
                self._save("interval", background=True)

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Yield the batches of one epoch, each one step; resumes mid-epoch at the next batch."""
        self._require_entered()
        return self._steps(self._epoch_batches(loader), epoch_mode=True)

    def report(self, **metrics: float) -> None:
        """Metrics recorded with the next checkpoint (and used by ``keep_best``)."""
        for key, value in metrics.items():
            self._metrics[key] = float(value)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- internals ----------------------------------------------------------------------------------------
    def _steps(self, source: Iterable[Any], *, epoch_mode: bool) -> Iterator[Any]:
        self._require_entered()
        if self._stopping:
            return
        if self._boundary_checks():
            iterator = iter(source)
            while True:
                started = self.clock()
                try:
                    item = next(iterator)
                except StopIteration:
                    if epoch_mode:
                        self.epoch_finished = True
                    return
                yield item if epoch_mode else self.state.step
                self.state.step += 1
                self.steps_done += 1
                if epoch_mode:
                    batch_done(self.state)
                self.budget.observe_step(self.clock() - started)
                if self.total_steps is not None and self.state.step >= self.total_steps:
                    self._complete()
                    return
                # A wall-time save with ranks is agreed at the boundary instead: their clocks differ.
                if self._save_due(step=self.state.step, by_clock=self._agreement is None):
                    self._save("interval", background=True)
                if not self._boundary_checks():
                    return

    def _epoch_batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The loader's batches for the current epoch, positioned after those already trained on."""
        shield(loader, self._stop_signals)
        yield from epoch_batches(self.state, loader)

    def _save_due(self, *, step: int | None = None, epoch: int | None = None, by_clock: bool = False) -> bool:
        """``save_every`` says save now: after ``step`` steps, at the end of epoch count ``epoch``, or (when
        ``by_clock``) as the wall time since the last save."""
        every = self.save_every
        elapsed = (lambda: self.clock() - self._last_save_time) if by_clock else None
        return every is not None and every.due(step=step, epoch=epoch, elapsed=elapsed)

    def _boundary_checks(self) -> bool:
        """At a step boundary: True to run the next step, False once the run stops (after saving)."""
        self._settle(wait=False)  # alone, a background failure surfaces here (with ranks: at the next save or stop)
        decision = self._agree(self._decide())
        if decision == "signal":
            with _worker_deaths_deferred():
                self._stop_for_signal(next(iter(self._acting_signals()), None))
            return False
        if decision == "budget":
            left = self.budget.remaining() or 0.0
            log.info(
                "hpcckpt: budget: %.1f s left, next step ~%.2f s + save ~%.2f s + margin %.2f s; stopping",
                left,
                self.budget.predicted_step,
                self.budget.predicted_save,
                self.budget.margin,
            )
            with _worker_deaths_deferred():
                self._save("budget")
                warned = self._signals.first(self.warning) if self._deferred else None
                # Warned by the time limit and stopped by the budget: the time limit's stop, said as such.
                self._finish("budget", "timeout" if warned else None, warned.signal.name if warned else None)
            return False
        if decision == "save":
            self._save("interval", background=True)
        return True

    def _decide(self) -> Decision:
        """This process's view: a signal arrived, the budget has no room for another step, or go on.
        Ranks see their views agreed a step or more later, so they look further ahead."""
        if self._acting_signals():
            return "signal"
        ahead = 1 if self._agreement is None else 1 + self._agreement.lag
        if not self.budget.room_for_step(ahead):
            return "budget"
        if self._agreement is not None and self._save_due(by_clock=True):
            return "save"
        return "continue"

    def _agree(self, decision: Decision) -> Decision:
        """One decision for every rank, at the same step: any rank's signal or budget stops them all.
        Alone, a process agrees with itself."""
        if self._agreement is None:
            return decision
        return self._agreement.decide(decision, self.state.step)

    def _acting_signals(self) -> list[Received]:
        """The signals that stop the loop: all but the time limit's warnings, which the budget handles."""
        acting = []
        for item in self._signals.received:
            if id(item) in self._deferred:
                continue
            if item.signal == self.warning and self._leave_to_budget(item):
                self._deferred.add(id(item))
                left = self.budget.remaining() or 0.0
                log.info(
                    "hpcckpt: got %s %.0f s before the job's end, where the time limit's warning comes; "
                    "training on until the budget says stop (%.0f s left)",
                    item.signal.name,
                    (self.budget.deadline or item.time) - item.time,
                    left,
                )
                continue
            acting.append(item)
        return acting

    def _leave_to_budget(self, item: Received) -> bool:
        """The time limit's warning, in a task that has nothing to do after training but exit. Under
        submitit the warning stays a stop: its checkpoint-and-requeue, which runs after the loop, needs the
        lead (``signal_delay_s`` is how long submitit takes to requeue)."""
        if self._under_submitit:
            return False
        return is_time_limit_warning(item.time, self.budget.deadline, self._signal_lead, self._started_at)

    def _stop_for_signal(self, first: Received | None) -> None:
        if first is None:  # another rank got the signal: stop as for the warning signal
            first = Received(self.warning, self.clock())
        cause = stop_cause(first, self.budget.deadline, self._signal_lead, self._started_at)
        saved = False
        warned = any(item.signal == self.warning for item in self._acting_signals())
        term_only = first.signal == signal_module.SIGTERM and not warned
        if self._agreement is not None:
            term_only = self._agreement.all_ranks(term_only, "any")
        if term_only:
            # Preemption or the time limit: SIGKILL follows after the grace window.
            left_in_grace = max(0.0, self.grace - (self.clock() - first.time))
            fits = self.budget.save_fits_in(left_in_grace)
            if self._agreement is not None:  # a sharded save needs every rank, or none
                fits = self._agreement.all_ranks(fits, "all")
            if fits:
                saved = self._save("signal") is not None
            else:
                log.info(
                    "hpcckpt: SIGTERM: a save (~%.2f s) does not fit the %.1f s left of the grace window; "
                    "leaving at once with checkpoint %s",
                    self.budget.predicted_save,
                    left_in_grace,
                    self.last_checkpoint.name if self.last_checkpoint else "none",
                )
        else:
            saved = self._save("signal") is not None
        log.info("hpcckpt: got %s (%s); %s", first.signal.name, cause, "saved" if saved else "not saved")
        self._finish("signal", cause, first.signal.name)

    def _save(self, why: str, *, background: bool = False) -> Checkpoint | None:
        """Save the current step, unless it is saved already; first wait for the save in flight. With
        ``background`` (and ``async_save``) only the snapshot is taken here."""
        # A failed save in flight does not prevent this one (a stop's save above all): it is collected here,
        # this save is done (synchronously), and then the failure is raised, naming the new latest checkpoint.
        failed = self._settle(wait=True, raise_failure=False)
        if failed is not None:
            background = False
        try:
            # None: this step is already in a checkpoint
            checkpoint = None if self._saved_at == self.state.step else self._save_now(why, background=background)
        except Exception as error:
            if failed is None:
                raise
            # This save failed too: the earlier failure is the one raised (its step, the latest that stays),
            # this one is logged.
            log.error("hpcckpt: the save of step %s after it failed too: %s", self.state.step, error)
            raise self._failure(*failed) from failed[1]
        if failed is not None:
            if why == "interval":
                raise self._failure(*failed)
            self._pending_failure = self._failure(*failed)  # raised once the stop is recorded (_finish)
        return checkpoint

    def _save_now(self, why: str, *, background: bool) -> Checkpoint | None:
        started = self.clock()
        metrics = dict(self._metrics) or None
        with _worker_deaths_deferred():
            if background and self.async_save:
                handle = self.store.save(self.state, metrics=metrics, blocking=False)
                self._in_flight = _InFlight(handle, self.state.step, why, started)
                self._last_save_time = self.clock()
                self.budget.save_started()
                self._settle(wait=False)  # saved synchronously (over the staging bound), or already failed
                return None
            checkpoint = self.store.save(self.state, metrics=metrics)
        self._saved(checkpoint, why, checkpoint.save_seconds or (self.clock() - started))
        return checkpoint

    def _saved(self, checkpoint: Checkpoint, why: str, elapsed: float) -> None:
        self.budget.observe_save(elapsed)
        self.last_checkpoint, self._saved_at = checkpoint, checkpoint.step
        if not self.async_save or why != "interval":
            self._last_save_time = self.clock()
        log.info("hpcckpt: saved %s (%s, %.1f MiB in %.2f s)", checkpoint.name, why, checkpoint.size / 2**20, elapsed)

    def _settle(
        self, *, wait: bool, timeout: float | None = None, raise_failure: bool = True
    ) -> tuple[int, BaseException] | None:
        """Collect the async save in flight once it is done (with ``wait``: wait for it, up to ``timeout``).
        Its failure is raised here, naming its step and the latest checkpoint; without ``raise_failure`` it
        is returned instead, as (step, error), for the caller to raise after its own save."""
        in_flight = self._in_flight
        if in_flight is None:
            return None
        if not wait and (self._agreement is not None or not in_flight.handle.done()):
            # Ranks collect a sharded save only where they all are (the next save, the stop): its wait() is
            # collective, and whether it is done differs from rank to rank.
            return None
        try:
            checkpoint = in_flight.handle.wait(timeout)
        except TimeoutError:
            raise
        except Exception as error:
            self._in_flight = None
            self.budget.save_settled()
            if raise_failure:
                raise self._failure(in_flight.step, error) from error
            return in_flight.step, error
        self._in_flight = None
        self.budget.save_settled()
        self._saved(checkpoint, in_flight.why, checkpoint.save_seconds or (self.clock() - in_flight.started))
        return None

    def _failure(self, step: int, error: BaseException) -> StoreError:
        """The error raised for the failed async save of ``step``: what failed, and what is the latest."""
        last = self.last_checkpoint
        if last is None:
            stays = "nothing is saved yet"
        elif last.step > step:
            stays = f"checkpoint {last.name} (step {last.step}, saved since) is the latest"
        else:
            stays = f"checkpoint {last.name} (step {last.step}) stays the latest"
        failure = StoreError(f"the async save of step {step} failed: {error}; {stays}")
        failure.__cause__ = error
        return failure

    def _leave_in_flight(self, *, crashed: bool) -> None:
        """At ``__exit__``: wait for the save in flight, up to the budget's time left; past that, abandon it
        (see the module's docstring). After a crash its failure is logged, not raised over the crash's; with
        ranks, a crash drops it without waiting (its wait is collective)."""
        in_flight = self._in_flight
        if in_flight is None:
            return
        if crashed and self._agreement is not None:
            # With ranks the save's wait is collective: run by the crashing rank alone it would pair with the
            # other ranks' training collectives (NCCL: a hang until the timeout). Nothing of it is committed
            # (rank 0 commits only in that wait); the next save's clean_temporaries removes its directory.
            self._drop_in_flight(in_flight)
            log.error(
                "hpcckpt: the async save of step %s is dropped after the crash (its wait is collective, the other "
                "ranks are still training); the latest checkpoint stays %s",
                in_flight.step,
                self.last_checkpoint.name if self.last_checkpoint else "none",
            )
            return
        left = self.budget.remaining()
        try:
            self._settle(wait=True, timeout=None if left is None else max(0.0, left))
        except TimeoutError:
            self._drop_in_flight(in_flight)
            log.warning(
                "hpcckpt: the async save of step %s is still running at the deadline; abandoned (nothing of it "
                "is visible; the next save removes its temporary directory)",
                in_flight.step,
            )
        except StoreError as error:
            if not crashed:
                raise
            log.error("hpcckpt: %s", error)

    def _leave_uploads(self, *, crashed: bool) -> None:
        """At ``__exit__``: wait for the mirror's uploads as long as :func:`upload_wait` allows, then say what
        is left for the next task, which retries it at its start. After an exception (a crash, Ctrl-C) it
        does not wait: the training code's error is what the user waits for (issue 14 review, item 8)."""
        uploads, mirror = self.store.uploads, self.store.mirror
        if uploads is None or mirror is None or self.rank != 0:
            return
        if crashed:
            why = "the process leaves after an exception without waiting for uploads"
        else:
            terms = [item.time for item in self._signals.received if item.signal == signal_module.SIGTERM]
            timeout, why = upload_wait(
                now=self.clock(),
                budget_left=self.budget.remaining(),
                margin=self.budget.margin,
                sigterm_at=min(terms, default=None),
                grace=self.grace,
                longest_upload=uploads.longest,
            )
        behind = uploads.wait(0.0 if crashed else timeout)
        if behind:
            failed = uploads.failed()
            log.warning(
                "hpcckpt: mirror %s: %s not uploaded (%s); left for the next task, or run: hpcckpt push %s %s",
                mirror.url,
                ", ".join(behind),
                f"{len(failed)} failed: the first failure's reason was logged, each is an upload_failed event"
                if failed
                else why,
                self.run_dir,
                mirror.url,
            )

    def _drop_in_flight(self, in_flight: _InFlight) -> None:
        """Leave the save in flight to itself: the process may exit without it (see the module's docstring)."""
        abandon = getattr(in_flight.handle, "abandon", None)
        if abandon is not None:
            abandon()
        self._in_flight = None
        self.budget.save_settled()

    def _complete(self) -> None:
        with _worker_deaths_deferred():
            self._save("final")
            self.completed = True
            self._record(
                event_log.complete(
                    step=self.state.step,
                    epoch=self.state.epoch,
                    checkpoint=self.last_checkpoint.name if self.last_checkpoint else None,
                )
            )
            self._finish("completed", None)

    def _finish(self, reason: StopReason, cause: Cause | None, signal_name: str | None = None) -> None:
        if self._agreement is not None:
            self._agreement.close()
        self._stopping = True
        self.stop_reason, self.cause = reason, cause
        lost = self.state.step - (self._saved_at if self._saved_at is not None else 0)
        left = self.budget.remaining()
        self._record(
            event_log.stop(
                reason=reason,
                cause=cause,
                signal=signal_name,
                step=self.state.step,
                steps_done=self.steps_done,
                saved=self._saved_at == self.state.step,
                checkpoint=self.last_checkpoint.name if self.last_checkpoint else None,
                save_seconds=self.budget.predicted_save if self._saved_at == self.state.step else None,
                time_left=left,
                steps_lost=lost,
            )
        )
        log.info(
            "hpcckpt: stop (%s%s) at step %s after %s steps; %s%s",
            reason,
            f", {cause}" if cause else "",
            self.state.step,
            self.steps_done,
            f"{left:.1f} s unused" if left is not None else "no deadline",
            f"; {lost} steps lost" if lost else "",
        )
        if self._pending_failure is not None:  # the stop is saved and recorded: now the earlier failure
            failure, self._pending_failure = self._pending_failure, None
            raise failure

    def _record(self, event: event_log.Event) -> None:
        """Registry events are rank 0's: one record per task, not one per rank."""
        if self.rank == 0:
            self.store.registry.append_event(event)

    def _require_entered(self) -> None:
        if not self._entered:
            raise HpcckptError("use Run as a context manager: `with Run(...) as run: for step in run: ...`")


@dataclass(frozen=True)
class _InFlight:
    """The async save running in the background: its handle, the step it holds, why and when it began."""

    handle: SaveHandle
    step: int
    why: str
    started: float


def _worker_deaths_deferred() -> contextlib.AbstractContextManager[None]:
    """While saving and recording a stop, PyTorch's SIGCHLD handler, which raises when a DataLoader
    worker has died (one hpcckpt did not shield), waits: its error comes once the checkpoint is durable
    and the stop recorded, never in the middle of a save."""
    return child_exits_deferred()


def _seconds(name: str, explicit: float | None, default: float) -> float:
    """``explicit`` as seconds, else ``default`` (the environment's value, checked by check_environment)."""
    if explicit is None:
        return default
    try:
        seconds = float(explicit)
    except (TypeError, ValueError):
        raise UsageError(f"Invalid {name}={explicit!r}: expected seconds, e.g. 5 or 0.5") from None
    if seconds < 0:
        raise UsageError(f"Invalid {name}={explicit!r}: expected seconds >= 0")
    return seconds


def _ensure_log_handler(*, quiet: bool = False) -> None:
    """One line per event on stderr, unless the application configured logging itself; warnings only
    when ``quiet`` (ranks other than 0). The logger keeps propagating: an application that configures
    logging later (``logging.basicConfig`` after ``Run`` started) gets each record once, through its own
    handlers, and this one steps aside (issue 11, item 26)."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = _UntilConfigured(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING if quiet else logging.INFO)


class _UntilConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """hpcckpt's own stderr handler, used only while the root logger has no handler of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


UPLOAD_WAIT_FLOOR = 60.0  # seconds a stop without deadline or signal waits for uploads, at least
UPLOAD_WAIT_FACTOR = 2.0  # ... or this many times the longest upload this process did, if longer


def upload_wait(
    *,
    now: float,
    budget_left: float | None,
    margin: float,
    sigterm_at: float | None,
    grace: float,
    longest_upload: float,
) -> tuple[float, str]:
    """How long a stop waits for the mirror's uploads, and what bounds it (said when some are left): after
    SIGTERM, the grace window's rest less the margin (SIGKILL follows: issue 14 review, item 8); with a
    deadline, the budget's time left less the margin; without either, ``max(UPLOAD_WAIT_FLOOR,
    UPLOAD_WAIT_FACTOR * longest_upload)`` (a stalled endpoint must not hold the job forever)."""
    bounds: list[tuple[float, str]] = []
    if sigterm_at is not None:
        bounds.append((grace - (now - sigterm_at) - margin, f"the {grace:g} s grace window after SIGTERM ran out"))
    if budget_left is not None:
        bounds.append((budget_left - margin, "no time left in the budget"))
    if not bounds:
        limit = max(UPLOAD_WAIT_FLOOR, UPLOAD_WAIT_FACTOR * longest_upload)
        bounds.append(
            (limit, f"still running after {limit:g} s (no deadline: the wait is max(60 s, 2 x the longest upload))")
        )
    seconds, why = min(bounds)
    return max(0.0, seconds), why
