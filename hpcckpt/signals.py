"""Recording Slurm's signals: the time-limit warning (``--signal``, SIGUSR1 by default) and SIGTERM.

A handler only records what arrived and when; the training loop acts at the next step boundary
(checkpointing inside a handler hangs: Lightning #21406). Handlers are installed by a context manager,
on the main thread only, and the previous ones are restored on exit.

Recorders nest: one installed while another is active starts with what the outer one has received for
the same signals, and hands back what it received when it leaves (``hpcckpt.integrations.submitit`` watches the
signals for a whole submitit job, ``Run`` for the training loop inside it).

Why a signal came (:func:`stop_cause`) is decided from the job's real end time, never from a fraction of
its time limit (submitit #1656 misread jobs shorter than 10 minutes that way): Slurm's own SIGTERM at the
time limit comes at the end time, its warning where :func:`hpcckpt.budget.is_time_limit_warning` says;
anything earlier is a preemption.

A forked process that still runs the inherited handler ignores the signal (it acts only in the process
that installed it). DataLoader workers do not keep it (PyTorch installs its own SIGTERM handler, and
spawned workers inherit none): ``hpcckpt.workers`` shields them (issue 11, item 7; KempnerForge #177).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Literal

from .budget import is_time_limit_warning
from .errors import UsageError

Cause = Literal["timeout", "preemption", "unknown"]

DEFAULT_SIGNAL = "USR1"
TERM_AT_LIMIT = 30.0  # a SIGTERM this close to the end time is the time limit's (clocks and squeue rounding)
WARNING_UNKNOWN_LEAD = 600.0  # without a known lead, a warning in the job's last 10 minutes is the time limit's
_ACCEPTED = "a signal name such as USR1, USR2, SIGUSR1, TERM, INT or HUP"


def parse_signal(name: str | int | signal.Signals) -> signal.Signals:
    """``USR1``, ``SIGUSR1``, ``usr1`` or a number -> ``signal.SIGUSR1``."""
    if isinstance(name, signal.Signals):
        return name
    text = str(name).strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            raise UsageError(f"Invalid signal {name!r}: no such signal number; expected {_ACCEPTED}") from None
    text = text if text.startswith("SIG") else f"SIG{text}"
    try:
        found = signal.Signals[text]
    except KeyError:
        raise UsageError(f"Invalid signal {name!r}: expected {_ACCEPTED}") from None
    if found in (signal.SIGKILL, signal.SIGSTOP):
        raise UsageError(f"Invalid signal {name!r}: it cannot be caught; expected {_ACCEPTED}")
    return found


def warning_signal(explicit: str | int | signal.Signals | None, environ: Mapping[str, str]) -> signal.Signals:
    """The time-limit warning signal: the argument, else ``HPCCKPT_SIGNAL`` (set by hpcckpt's sbatch
    template to match its ``--signal``), else SIGUSR1."""
    if explicit is not None:
        return parse_signal(explicit)
    return parse_signal(environ.get("HPCCKPT_SIGNAL") or DEFAULT_SIGNAL)


@dataclass(frozen=True)
class Received:
    signal: signal.Signals
    time: float


def stop_cause(first: Received, deadline: float | None, lead: float, started: float) -> Cause:
    """Timeout or preemption, from the job's end (``deadline``, Unix time): a signal near it is the time
    limit's. ``lead`` is the ``--signal`` lead (0 when unknown), ``started`` when the job started."""
    if deadline is None:
        return "unknown"
    left = deadline - first.time
    if first.signal == signal.SIGTERM:
        # Slurm's own SIGTERM at the time limit comes at the end time; one earlier is a preemption.
        return "timeout" if left <= TERM_AT_LIMIT else "preemption"
    if lead:
        # The lead is known: the warning is the time limit's only where Slurm sends it.
        return "timeout" if is_time_limit_warning(first.time, deadline, lead, started) else "preemption"
    return "timeout" if left <= WARNING_UNKNOWN_LEAD else "preemption"


class SignalRecorder:
    """Context manager that records the given signals while active."""

    def __init__(self, signals: tuple[signal.Signals, ...], clock: Callable[[], float] = time.time) -> None:
        self.signals = tuple(dict.fromkeys(signals))
        self.clock = clock
        self.received: list[Received] = []
        self.installed = False
        self._previous: dict[signal.Signals, Any] = {}
        self._pid = os.getpid()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked worker: not ours to act on
            return
        self.received.append(Received(signal.Signals(signum), self.clock()))

    def first(self, which: signal.Signals | None = None) -> Received | None:
        for item in self.received:
            if which is None or item.signal == which:
                return item
        return None

    def __enter__(self) -> SignalRecorder:
        # signal.signal works on the main thread only; elsewhere the loop still runs, without signals.
        if threading.current_thread() is threading.main_thread():
            with blocked(self.signals):  # none may land in a handler between the swap and the merge
                for sig in self.signals:
                    self._previous[sig] = signal.signal(sig, self._handle)
                    outer = _recorder_of(self._previous[sig])
                    if outer is not None:  # nested: what the outer recorder already got counts here too
                        self._merge(item for item in outer.received if item.signal == sig)
            self.installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        with blocked(tuple(self._previous)):
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
                outer = _recorder_of(previous)
                if outer is not None:  # and what arrived here is handed back out
                    outer._merge(item for item in self.received if item.signal == sig)
        self._previous.clear()
        self.installed = False

    def _merge(self, items: Iterable[Received]) -> None:
        known = {id(item) for item in self.received}
        self.received = sorted([*self.received, *(i for i in items if id(i) not in known)], key=lambda i: i.time)


@contextlib.contextmanager
def blocked(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """Hold these signals back in this thread (they stay pending, then go to whichever handler is installed)."""
    if not signals:
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _recorder_of(handler: Any) -> SignalRecorder | None:
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, SignalRecorder) else None


# -- after the loop: a recording handler until the process exits (issue 11, item 11) ----------------------
# Slurm's warning can come after training ended (a short last task), and a second SIGTERM during teardown:
# with the default action back in place either one killed a process whose run was complete or saved
# (status -10/-15, 138 under the chain script). Where leaving a recorder would put back the default action,
# this handler takes its place instead; it records, and the process says at exit what it ignored.
_late: list[Received] = []


def leave_recording(recorder: SignalRecorder) -> None:
    """Leave ``recorder`` (its previous handlers come back), but keep recording, until the process exits,
    each signal whose previous action was the default one (which ends the process)."""
    if not recorder.installed:
        recorder.__exit__(None, None, None)
        return
    # What the recorder puts back is the late recorder wherever it would be the default action: the
    # default action is never in place, not even between two swaps (another thread may take a signal).
    for sig, previous in recorder._previous.items():
        if previous in (signal.SIG_DFL, None):
            recorder._previous[sig] = _record_late
    recorder.__exit__(None, None, None)
    if not _late_report_registered:
        _register_late_report()


def late_signals() -> list[Received]:
    """The signals that arrived after every recorder had left (ignored), in order."""
    return list(_late)


def _record_late(signum: int, frame: FrameType | None) -> None:
    _late.append(Received(signal.Signals(signum), time.time()))


_late_report_registered = False


def _register_late_report() -> None:
    global _late_report_registered
    _late_report_registered = True
    atexit.register(_report_late)


def _report_late() -> None:
    if not _late:
        return
    counts = Counter(item.signal.name for item in _late)
    names = " and ".join(f"{name} ({count} times)" if count > 1 else name for name, count in counts.items())
    logging.getLogger("hpcckpt").warning("hpcckpt: %s arrived after the run had stopped; ignored", names)
