"""Async saves: the calling thread takes a snapshot, a background thread persists and commits it.

Invariant: what an async save writes is the state as it was when ``save(..., blocking=False)`` returned,
byte for byte what a blocking save of that state writes, and it becomes visible only through the one save
transaction, once durable. Training may change every tensor the moment ``save`` returns (pytorch #144657:
``async_save`` wrote CPU tensors that changed during the save): every tensor is copied first into
:class:`Staging`, reusable host buffers kept by the store between saves, one per storage, so that tensors
sharing a storage (tied weights, views) share one staged storage at the same offsets and strides and the
format writes the same bytes. Non-tensor values are deep-copied. On CUDA the buffers are pinned and filled
by non-blocking copies on a side stream; later work on the training stream waits for those copies on the
device, and the writer waits for them on the host before it reads.

Memory is bounded (radixark/Megatron-LM PR #61: staging a whole shard in host memory OOM-killed the first
save): staging holds at most one state, at most ``limit`` bytes; a larger state is saved synchronously.
At most one save is in flight per store (the store waits for it before the next), so the buffers are never
refilled while a writer reads them.

A background failure is kept on its handle and raised by every :meth:`BackgroundSave.wait`. A process that
exits while a save is in flight waits for it at exit, unless the save was abandoned
(:meth:`BackgroundSave.abandon`, after a crash whose wait ran out): then the process ends at once with
``os._exit(1)`` (a writer still inside torch while the interpreter tears torch down crashed the process
with SIGSEGV, measured), and the temporary directory, no longer locked by a live writer, is removed by the
next save's ``clean_temporaries``. Nothing of an abandoned save is ever visible: its rename never happened.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import UsageError
from .manifest import Checkpoint

if TYPE_CHECKING:
    import torch


class SaveHandle(Protocol):
    """A save that may still be running: ``store.save(..., blocking=False)`` returns one."""

    def done(self) -> bool:
        """True once the save has committed or failed (never blocks)."""
        ...

    def wait(self, timeout: float | None = None) -> Checkpoint:
        """The committed checkpoint, after waiting up to ``timeout`` seconds (None: until it is done).
        Raises the background error, every time it is asked; ``TimeoutError`` when still running."""
        ...


class BackgroundSave:
    """One save running on a thread of its own (see the module's docstring)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.abandoned = False
        self._finished = threading.Event()
        self._checkpoint: Checkpoint | None = None
        self._error: BaseException | None = None
        self._traceback: TracebackType | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, step: int, work: Callable[[], Checkpoint]) -> BackgroundSave:
        """Run ``work`` (persist, checksum, commit) on a daemon thread; see :func:`_wait_at_exit`."""
        handle = cls(step)
        handle._thread = threading.Thread(target=handle._run, args=(work,), name=f"hpcckpt-save-{step}", daemon=True)
        watch_at_exit(handle)
        handle._thread.start()
        return handle

    @classmethod
    def finished(cls, checkpoint: Checkpoint) -> BackgroundSave:
        """A handle for a save already done on the calling thread (a state over the staging bound)."""
        handle = cls(checkpoint.step)
        handle._checkpoint = checkpoint
        handle._finished.set()
        return handle

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> Checkpoint:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the save of step {self.step} is still running after {timeout:g} s")
        self._join()
        if self._error is not None:
            raise self._error.with_traceback(self._traceback)
        assert self._checkpoint is not None
        return self._checkpoint

    def _join(self) -> None:
        # The thread ends right after it has set _finished; joined, it has dropped its last reference to
        # torch objects. A daemon thread still finishing when the interpreter shuts down is stopped by
        # pthread_exit, which aborts the process when it unwinds through C++ ("terminate called without
        # an active exception", seen when a script ended right after its save).
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def settle_at_exit(self) -> None:
        """At exit (:func:`_wait_at_exit`): wait until the save has committed or failed."""
        self._finished.wait()
        self._join()

    def abandon(self) -> None:
        """Let the process exit without this save (after a crash): if it is still running at exit, the
        process ends with ``os._exit(1)``; see the module's docstring."""
        self.abandoned = True

    def _run(self, work: Callable[[], Checkpoint]) -> None:
        try:
            self._checkpoint = work()
        except BaseException as error:  # kept for wait(): a thread's exception is otherwise only printed
            self._error, self._traceback = error, error.__traceback__
        finally:
            self._finished.set()

    def __repr__(self) -> str:
        state = "failed" if self._error else "committed" if self._checkpoint else "running"
        return f"BackgroundSave(step={self.step}, {state})"


class ExitWatched(Protocol):
    """A save the process settles at exit (:func:`watch_at_exit`): BackgroundSave, the sharded format's."""

    abandoned: bool

    def done(self) -> bool: ...

    def settle_at_exit(self) -> None: ...


_LIVE: weakref.WeakSet[ExitWatched] = weakref.WeakSet()


def watch_at_exit(handle: ExitWatched) -> None:
    # Registered at the first save, after torch's own exit handlers: they run last (atexit is last in,
    # first out), so the writer never runs into a torch being torn down (it aborts the process).
    if not _LIVE:
        atexit.unregister(_wait_at_exit)
        atexit.register(_wait_at_exit)
    _LIVE.add(handle)


def _wait_at_exit() -> None:
    """A script that ends right after ``save(..., blocking=False)`` still gets its checkpoint: the
    interpreter waits here for saves in flight (not for abandoned ones)."""
    handles = list(_LIVE)
    for handle in handles:
        if not handle.abandoned:
            handle.settle_at_exit()
    if any(not handle.done() for handle in handles):  # abandoned, still writing
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)


class Staging:
    """Reusable host buffers that hold one snapshot of a state, at most ``limit`` bytes (None: no bound).

    Buffers are kept between snapshots and reused by position when a storage has the same size as before,
    which a training state's storages do from one save to the next.
    """

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise UsageError(f"Invalid async_staging_bytes={limit!r}: expected a whole number of bytes >= 0, or None")
        self.limit = limit
        self._buffers: list[torch.Tensor] = []
        self._streams: dict[Any, Any] = {}  # a side stream per CUDA device, kept between snapshots
        self._active: set[Any] = set()  # the devices the snapshot being taken copies from
        self._events: list[Any] = []

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers now."""
        return sum(int(b.numel()) for b in self._buffers)

    def stage(self, state: Mapping[str, Any]) -> dict[str, Any] | None:
        """A copy of ``state`` whose plain tensors live in the staging buffers, or None when they would
        need more than ``limit`` bytes (nothing is copied then)."""
        tensors = [t for t in _tensors(state) if _stageable(t)]
        values = {id(t): _resolved(t) for t in tensors}  # what the tensor's storage holds, as a blocking save writes
        storages: dict[int, Any] = {}
        for value in values.values():
            storage = value.untyped_storage()
            storages.setdefault(storage._cdata, storage)  # the identity torch.save shares storages by
        needed = sum(int(s.nbytes()) for s in storages.values())
        if self.limit is not None and needed > self.limit:
            return None
        staged = dict(zip(storages, self._fill(list(storages.values())), strict=True))
        memo: dict[int, Any] = {
            id(t): _view_like(t, staged[values[id(t)].untyped_storage()._cdata], values[id(t)]) for t in tensors
        }
        return dict(copy.deepcopy(dict(state), memo))

    def ready(self) -> None:
        """Wait (on the host) until the device-to-host copies of the last snapshot are done."""
        for event in self._events:
            event.synchronize()
        self._events = []

    def _fill(self, storages: list[Any]) -> list[Any]:
        import torch

        pinned = any(s.device.type == "cuda" for s in storages)
        old, buffers = self._buffers, []
        for index, storage in enumerate(storages):
            size = int(storage.nbytes())
            if index < len(old) and old[index].numel() == size and old[index].is_pinned() == pinned:
                buffers.append(old[index])
            else:
                buffers.append(torch.empty(size, dtype=torch.uint8, pin_memory=pinned))
        self._buffers = buffers
        for buffer, storage in zip(buffers, storages, strict=True):
            if storage.device.type == "cuda":
                self._copy_from_device(buffer, storage)
            else:
                buffer.copy_(_bytes_of(storage))
        self._record_device_copies()
        return [b.untyped_storage() for b in buffers]

    def _copy_from_device(self, buffer: torch.Tensor, storage: Any) -> None:
        """Non-blocking copy on a side stream that first waits for the work queued so far (the values
        the snapshot must hold)."""
        import torch

        device = storage.device
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        if device not in self._active:
            stream.wait_stream(torch.cuda.current_stream(device))
            self._active.add(device)
        with torch.cuda.stream(stream):
            buffer.copy_(_bytes_of(storage), non_blocking=True)

    def _record_device_copies(self) -> None:
        import torch

        for device in self._active:
            stream = self._streams[device]
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
            # Training's next kernels (an optimizer step writing these tensors) wait for the copies on
            # the device; the training thread itself goes on.
            torch.cuda.current_stream(device).wait_stream(stream)
            self._events.append(event)
        self._active = set()


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples, in order (others, in objects, are deep-copied)."""
    import torch

    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list | tuple):
            stack.extend(reversed(item))
    return found


def _stageable(tensor: torch.Tensor) -> bool:
    """Plain dense tensors and parameters on the CPU or a GPU; anything else (sparse, quantized, a
    subclass such as DTensor) is deep-copied, which clones it."""
    import torch

    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and tensor.device.type in ("cpu", "cuda")
    )


def _bytes_of(storage: Any) -> torch.Tensor:
    import torch

    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _resolved(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or for a lazy conjugate or negative view (``x.conj()``, ``x._neg_view()``, whose storage
    alone is not its value) a copy with the conjugation and negation applied: what the blocking save
    resolves it to (formats/tensorfile.py), so both write the same bytes."""
    if tensor.is_conj() or tensor.is_neg():
        return tensor.detach().resolve_conj().resolve_neg()
    return tensor


def _view_like(tensor: torch.Tensor, storage: Any, value: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor``'s view (offset, size, stride, dtype, requires_grad, Parameter-ness) of ``storage``; the
    offset, size and stride are those of ``value`` when given (``tensor`` resolved, see :func:`_resolved`)."""
    import torch

    from .formats.tensorfile import on_storage

    like = tensor if value is None else value
    view: torch.Tensor = on_storage(storage, like.dtype, like.storage_offset(), like.size(), like.stride())
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
    return view.requires_grad_(tensor.requires_grad) if tensor.requires_grad else view
