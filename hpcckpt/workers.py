"""DataLoader worker processes that outlive Slurm's stop signals, so that a stopping task can still save.

Slurm sends SIGTERM (preemption, the time limit) to every process of the job step, and a ``--signal``
without ``B:`` sends the warning there too. PyTorch's worker processes install a SIGTERM handler of their
own that ends them; the main process's SIGCHLD handler then raises ``RuntimeError: DataLoader worker ...
killed by signal: Terminated`` wherever the main process is, in the middle of the save (issue 11, item 7;
KempnerForge #177). A forked worker does not keep an inherited Python handler (PyTorch replaces it), and a
spawned one inherits none.

So hpcckpt shields the workers of every loader it is given (``run.batches(loader)`` or
``TrainState(dataloader=loader)``):

- while the loader starts its workers, the stop signals are blocked in the main thread; the signal mask
  survives fork and exec, so every worker (fork and spawn alike), the pin-memory thread and
  multiprocessing's resource tracker start with them blocked. One sent meanwhile stays pending in the
  main process and is recorded as soon as the workers are started;
- the loader's ``worker_init_fn`` is wrapped: in the worker it sets the stop signals to ``SIG_IGN`` (which
  drops one pending), unblocks them, then calls the user's own ``worker_init_fn``.

The workers then end the way PyTorch ends them: the main process finishes or drops the iterator, or dies
(a worker watches its parent). Loaders that hpcckpt is not given can use :func:`worker_init_fn`.

The stop signals are given (``Run`` passes its warning signal); only :func:`worker_init_fn`, the entry point
a DataLoader calls in a new worker, reads ``HPCCKPT_SIGNAL`` from the environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

from .errors import UsageError
from .signals import DEFAULT_SIGNAL, blocked, parse_signal, warning_signal

_STARTER = "_get_iterator"  # DataLoader.__iter__ starts its workers through this method (torch >= 1.7)


def stop_signals(warning: signal.Signals) -> tuple[signal.Signals, ...]:
    """SIGTERM and the warning signal."""
    return tuple(dict.fromkeys((signal.SIGTERM, warning)))


def ignore_stop_signals(signals: tuple[signal.Signals, ...]) -> None:
    """In a worker: ignore ``signals`` from now on (one pending is dropped).

    SIGTERM is ignored unless the main process sends it: multiprocessing ends daemonic workers that are
    still alive at the main process's exit (a loader with ``persistent_workers`` kept to the end) with
    SIGTERM and waits for them, so a worker that ignored its parent's SIGTERM would hang that exit.
    Python handlers cannot see the sender, so SIGTERM stays blocked and a thread takes it with
    ``sigwaitinfo``, which can (PyTorch's own worker handler makes the same distinction)."""
    others = tuple(sig for sig in signals if sig != signal.SIGTERM)
    for sig in others:
        signal.signal(sig, signal.SIG_IGN)
    if signal.SIGTERM in signals:
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM,))  # in this thread and those it starts
        thread = threading.Thread(
            target=_leave_on_parents_term, args=(os.getppid(),), name="hpcckpt-worker-sigterm", daemon=True
        )
        thread.start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, others)


def _leave_on_parents_term(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo((signal.SIGTERM,))
        if info.si_pid == parent:
            os._exit(0)  # the main process's multiprocessing ends its workers: as PyTorch's handler does


def worker_init_fn(worker_id: int) -> None:
    """A ``worker_init_fn`` for DataLoaders that hpcckpt does not see: the worker ignores SIGTERM and the
    warning signal, so a signal Slurm sends to every process of the job cannot kill it before the main
    process has saved. ``DataLoader(..., worker_init_fn=hpcckpt.worker_init_fn)``.

    An entry point: DataLoader calls it first thing in a new worker process, where nothing can hand it a
    value, so it reads the warning signal from the worker's environment (``HPCCKPT_SIGNAL``)."""
    ignore_stop_signals(stop_signals(_warning_in(os.environ)))


def _warning_in(environ: Mapping[str, str]) -> signal.Signals:
    """The warning signal ``HPCCKPT_SIGNAL`` names, else SIGUSR1; a bad name counts as unset here: a worker
    is no place to report it (Run and the CLI refuse it when they start)."""
    try:
        return warning_signal(None, environ)
    except UsageError:
        return parse_signal(DEFAULT_SIGNAL)


class ShieldedInit:
    """The user's ``worker_init_fn``, run after the worker has started ignoring the stop signals.
    A class, not a closure: spawned workers receive it pickled."""

    def __init__(self, signals: tuple[signal.Signals, ...], user: Callable[[int], Any] | None) -> None:
        self.signals = signals
        self.user = user

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(self.signals)
        if self.user is not None:
            self.user(worker_id)


class _ShieldedStart:
    """The loader's iterator factory, run with the stop signals blocked while it starts the workers."""

    def __init__(self, signals: tuple[signal.Signals, ...], loader: Any) -> None:
        self.signals = signals
        # The loader holds this object: a strong reference back would keep a loader with persistent
        # workers alive past its last use, until the interpreter's exit.
        self.loader = weakref.ref(loader)
        self.start = getattr(type(loader), _STARTER)

    def __call__(self) -> Any:
        loader = self.loader()
        if loader is None:
            raise ReferenceError("the DataLoader is gone")
        if loader.num_workers > 0 and _start_method(loader) != "fork":
            # multiprocessing starts its resource tracker with SIGINT and SIGTERM blocked, then UNBLOCKS
            # them in the calling thread: started inside the window below, it would let SIGTERM reach
            # the spawned workers again. Started here, it is already running there. It ignores SIGTERM
            # itself; started with the warning blocked, it outlives a warning sent to the job too.
            from multiprocessing import resource_tracker

            with blocked_in_main_thread(self.signals):
                resource_tracker.ensure_running()
        with blocked_in_main_thread(self.signals):
            return self.start(loader)


def _start_method(loader: Any) -> str | None:
    context = getattr(loader, "multiprocessing_context", None)
    if context is not None and hasattr(context, "get_start_method"):
        return str(context.get_start_method())
    import multiprocessing

    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def shield(loader: Any, signals: tuple[signal.Signals, ...]) -> None:
    """Make the workers of ``loader`` (a ``torch.utils.data.DataLoader``) ignore ``signals``; idempotent.
    Anything that is not a loader with worker processes is left alone."""
    if not isinstance(getattr(loader, "num_workers", None), int) or not hasattr(loader, "worker_init_fn"):
        return
    init = loader.worker_init_fn
    if not isinstance(init, ShieldedInit):
        loader.worker_init_fn = ShieldedInit(signals, init)
    if callable(getattr(type(loader), _STARTER, None)) and not isinstance(vars(loader).get(_STARTER), _ShieldedStart):
        # An attribute of this loader only: its class, and other loaders, are unchanged.
        setattr(loader, _STARTER, _ShieldedStart(signals, loader))


def blocked_in_main_thread(signals: tuple[signal.Signals, ...]) -> contextlib.AbstractContextManager[None]:
    """Hold ``signals`` back in the main thread (a no-op in others); pending ones arrive on leaving."""
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    return blocked(signals)


@contextlib.contextmanager
def child_exits_deferred() -> Iterator[None]:
    """Run the SIGCHLD handler (PyTorch's, which raises when a DataLoader worker has died) only once the
    block has ended without an error, if a SIGCHLD came meanwhile. Swapping the handler, not blocking
    the signal: another thread (a queue's feeder, the pin-memory thread) would take a blocked one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        arrived.append(signum)

    previous = signal.signal(signal.SIGCHLD, record)
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGCHLD, previous)
        raise
    signal.signal(signal.SIGCHLD, previous)
    if arrived and callable(previous):
        previous(signal.SIGCHLD, None)
