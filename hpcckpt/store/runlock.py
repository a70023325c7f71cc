"""The registry's lock: one holder at a time, across processes and the threads of each, waiters woken at once.

Invariant: while a thread holds the fcntl lock of a run directory, no other thread of any process holds it; a
waiter gives up after its timeout, and a wait that was given up never leaves the lock taken.

Why not filelock's ``FileLock`` (issue 13): it polls every 50 ms, so with 8 writers a waiter kept losing to
whoever happened to poll right after a release, and commits took up to 1.6 s. Here a waiter blocks in
``F_SETLKW``: the kernel wakes it when the holder lets go. The blocking call runs in a helper thread, so the wait
is bounded by the timeout; a helper that gets the lock after its caller gave up releases it at once.

POSIX record locks belong to the process: two threads do not exclude each other through them, and closing any
descriptor of the file drops the process's lock. So every lock of one file in this process goes through one
:class:`_Slot` (a thread lock, its holder and depth), held for as long as the file lock is: an async save's
background thread commits while the main thread lists or saves (issue 13).

The soft mode (a marker file naming host and pid, for filesystems without fcntl locks) stays filelock's
``SoftFileLock``, behind the same slot.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

# Errors of a filesystem that has no working fcntl locks (some NFS mounts without lockd, FUSE): "auto" falls
# back to the soft marker there.
NO_FCNTL = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


class LockTimeoutError(Exception):
    """The lock was not obtained within the timeout (another holder)."""


class _Slot:
    """This process's state for one lock file: who holds it and how deeply (the lock is reentrant)."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.owner: int | None = None
        self.depth = 0
        self.holder: RunLock | None = None  # the object that took the file lock (it lets go of it)


_SLOTS: dict[str, _Slot] = {}
_SLOTS_GUARD = threading.Lock()


def _slot(path: Path) -> _Slot:
    key = os.path.join(os.path.realpath(path.parent), path.name)
    with _SLOTS_GUARD:
        return _SLOTS.setdefault(key, _Slot())


class RunLock:
    """A reentrant, thread-safe lock on ``path``: ``fcntl`` (or its soft fallback, ``auto``) or ``soft``."""

    def __init__(self, path: Path, soft_path: Path, *, mode: str, timeout: float, soft_lifetime: float) -> None:
        self.mode = mode
        self.timeout = timeout
        self._fcntl_path = path
        self._soft_path = soft_path
        self._soft_lifetime = soft_lifetime
        self._soft: Any = self._make_soft() if mode == "soft" else None
        self._fd: int | None = None
        self.longest_wait = 0.0  # seconds: the longest any acquire of this object waited, for the benchmark

    @property
    def lock_file(self) -> str:
        return str(self._soft_path if self._soft is not None else self._fcntl_path)

    def acquire(self) -> None:
        """Take the lock, waiting at most ``timeout`` seconds; :class:`LockTimeoutError` when another holds it,
        ``OSError`` when the lock file cannot be opened or locked at all."""
        slot = _slot(self._fcntl_path)
        me = threading.get_ident()
        if slot.owner == me:
            slot.depth += 1
            return
        started = time.monotonic()
        deadline = started + self.timeout
        if not slot.mutex.acquire(timeout=max(self.timeout, 0.0)):
            raise LockTimeoutError(self.lock_file)
        try:
            self._acquire_file(deadline)
        except BaseException as error:
            if not isinstance(error, _AbandonedError):
                slot.mutex.release()  # an abandoned helper releases the slot itself, once it is done
            if isinstance(error, _AbandonedError):
                raise LockTimeoutError(self.lock_file) from None
            raise
        slot.owner, slot.depth, slot.holder = me, 1, self
        self.longest_wait = max(self.longest_wait, time.monotonic() - started)

    def release(self) -> None:
        slot = _slot(self._fcntl_path)
        slot.depth -= 1
        if slot.depth:
            return
        holder, slot.owner, slot.holder = slot.holder or self, None, None
        try:
            holder._release_file()
        finally:
            slot.mutex.release()

    def _release_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the process's fcntl lock
        elif self._soft is not None:
            self._soft.release()

    # -- internals ----------------------------------------------------------------------------------------
    def _acquire_file(self, deadline: float) -> None:
        if self._soft is None:
            try:
                self._fd = self._acquire_fcntl(deadline)
                return
            except OSError as error:
                if self.mode != "auto" or error.errno not in NO_FCNTL:
                    raise
                self._soft = self._make_soft()
        import filelock

        try:
            self._soft.acquire(timeout=max(deadline - time.monotonic(), 0.0), poll_interval=0.005)
        except filelock.Timeout:
            raise LockTimeoutError(self.lock_file) from None

    def _acquire_fcntl(self, deadline: float) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._fcntl_path, flags, 0o644)
        except FileNotFoundError:
            # A run directory not made yet (a submitit chain records its submission before the first task
            # runs): made here, as filelock, the lock before this one, made its lock file's directory.
            os.makedirs(os.path.dirname(self._fcntl_path), exist_ok=True)
            fd = os.open(self._fcntl_path, flags, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
        waiter = _Waiter(fd, _slot(self._fcntl_path))
        return waiter.wait(deadline)

    def _make_soft(self) -> Any:
        import filelock

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the age-based expiry is chosen on purpose (registry.py)
            return filelock.SoftFileLock(self._soft_path, timeout=self.timeout, lifetime=self._soft_lifetime)


class _AbandonedError(Exception):
    """The wait timed out; the helper thread now owns the descriptor and the slot."""


class _Waiter:
    """One blocking ``F_SETLKW`` in a helper thread. If its caller gives up first, the helper, once the call
    returns, closes the descriptor (dropping the lock it may just have got) and frees the slot: until then no
    other thread of this process may touch the lock file, or the helper's unlock would drop theirs."""

    def __init__(self, fd: int, slot: _Slot) -> None:
        self.fd, self.slot = fd, slot
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.error: OSError | None = None
        self.abandoned = False
        threading.Thread(target=self._run, name="hpcckpt-lock-wait", daemon=True).start()

    def wait(self, deadline: float) -> int:
        self.finished.wait(max(deadline - time.monotonic(), 0.0))
        with self.lock:
            if not self.finished.is_set():
                self.abandoned = True
                raise _AbandonedError()
        if self.error is not None:
            os.close(self.fd)
            raise self.error
        return self.fd

    def _run(self) -> None:
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX)
                break
            except OSError as error:
                if error.errno == errno.EINTR:
                    continue
                if error.errno == errno.EDEADLK:  # the kernel's deadlock guess across processes: try again
                    time.sleep(0.001)
                    continue
                self.error = error
                break
        with self.lock:
            self.finished.set()
            if not self.abandoned:
                return
        os.close(self.fd)
        self.slot.mutex.release()
