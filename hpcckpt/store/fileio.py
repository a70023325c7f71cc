"""Durable file writing: atomic replacement, directory fsync, and a checksumming writer.

What is promised: a file written through :func:`write_atomic` or :class:`SyncedWriter` and then renamed
into place is complete and on stable storage once the call returns (fsync of the file, then of its
directory). Temporary files are created next to their destination, never in ``$TMPDIR``: a rename across
filesystems is not atomic and fails on Slurm nodes whose ``$TMPDIR`` is node-local (Lightning #20270).

Nothing in a run directory is followed through a symbolic link (issue 11: a symlinked ``events.jsonl``
made every event append land in the link's target, outside the run directory): files are opened with
``O_NOFOLLOW`` (:func:`open_nofollow`), temporary files are created with ``O_EXCL``, and a link where a
file of hpcckpt's is expected is a :class:`~hpcckpt.errors.StoreError` naming it, its target untouched.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import stat
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import StoreError

# Dirty pages are handed to the disk every this many bytes while a large file is written, so that the
# final fsync waits mostly for the tail instead of the whole file (plain torch.save leaves it all to the end).
WRITEBACK_CHUNK = 64 << 20
# Writes smaller than this are gathered first: torch.save issues many tiny writes (zip headers, padding).
_GATHER = 1 << 20


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_refused(path: os.PathLike[str] | str) -> StoreError:
    return StoreError(
        f"{path} is a symbolic link, refused: hpcckpt never follows a link inside a run directory (it may lead "
        "outside it); expected a plain file there (remove the link; nothing is lost, or restore the file itself)"
    )


def open_nofollow(path: os.PathLike[str] | str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` itself (its target is never opened) with a
    :class:`StoreError` naming it. Links in the directories above are followed as usual."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as error:
        # O_NOFOLLOW answers ELOOP for a link; O_CREAT | O_EXCL answers EEXIST for one, dangling or not.
        if error.errno in (errno.ELOOP, errno.EEXIST) and os.path.islink(path):
            raise link_refused(path) from None
        raise


def read_nofollow(path: os.PathLike[str] | str) -> bytes:
    """The whole content of the plain file ``path``; a symbolic link there raises :class:`StoreError`."""
    with open(open_nofollow(path, os.O_RDONLY), "rb") as f:
        return f.read()


def write_atomic(path: Path, data: bytes, *, durable: bool = True, private: bool = False) -> None:
    """Replace ``path`` by ``data`` so that readers see the old or the new content, never a mix.

    With ``durable`` (the default) the new content also survives a power loss once this returns. A
    symbolic link at ``path`` is refused (:class:`StoreError`), never replaced nor written through. With
    ``private`` the file is writable by its owner only, whatever the umask (group-writable umasks are common
    on clusters; a file that others could have written must not be unpickled).
    """
    if os.path.islink(path):
        raise link_refused(path)
    # A fresh random name, created exclusively: nothing planted under it (a link) is ever written through.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            if private:
                os.fchmod(f.fileno(), stat.S_IMODE(os.fstat(f.fileno()).st_mode) & ~0o022)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


class SyncedWriter:
    """A binary file opened for writing that checksums what passes through it and syncs as it goes.

    The checksum (:func:`new_digest`, xxh3-64) is computed on the bytes as they are written. Every
    :data:`WRITEBACK_CHUNK` bytes the kernel is asked to start writing them out (``sync_file_range``,
    which, unlike ``fdatasync``, sends no cache flush to the device), so the disk works on the first part
    of a checkpoint while the rest is still being serialised. :meth:`close` ends with one ``fsync``; after
    it returns the content is durable (the file's name is not: fsync the directory).
    """

    def __init__(self, path: Path, *, checksum: bool = True) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._hasher = new_digest() if checksum else None
        self.size = 0
        self.failed: OSError | None = None  # the first write error; torch.save may hide it behind its own
        self._pending = bytearray()
        self._written_back = 0

    @property
    def digest(self) -> str:
        """The checksum of everything written so far, as ``xxh3_64:<16 hex digits>``."""
        return format_digest(self._hasher or new_digest())

    # -- the file-like surface torch.save needs ----------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if n < _GATHER:
            self._pending += view
            if len(self._pending) >= _GATHER:
                self._emit(self._pending)
                self._pending = bytearray()
        else:
            if self._pending:
                self._emit(self._pending)
                self._pending = bytearray()
            self._emit(view)
        return n

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending)
            self._pending = bytearray()

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size + len(self._pending)

    # -------------------------------------------------------------------------------------------------------
    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        # Hashed inline: xxh3 costs ~3 % of a disk write here, and a hashing thread measured slower, not
        # faster, beside blocking disk writes (2 cores).
        if self._hasher is not None:
            self._hasher.update(data)
        view = memoryview(data)
        try:
            while view.nbytes:
                view = view[os.write(self._fd, view) :]
        except OSError as error:
            self.failed = self.failed or error
            raise
        self.size += len(data)
        if self.size - self._written_back >= WRITEBACK_CHUNK:
            _start_writeback(self._fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def close(self) -> None:
        """Write what is gathered, fsync, and close. Raises the first error met on the way."""
        if self._fd < 0:
            return
        try:
            self.flush()
            os.fsync(self._fd)
        except OSError as error:
            self.failed = self.failed or error
            raise
        finally:
            self._stop()

    def abort(self) -> None:
        """Close without syncing, after an error; the caller removes the file."""
        if self._fd >= 0:
            self._stop()

    def _stop(self) -> None:
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> SyncedWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask Linux to start writing a dirty range out, without waiting and without a device flush."""
    function = _sync_file_range()
    if function is not None:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Any:
    """libc's sync_file_range (Linux only; Python's os module lacks it), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


DIGEST = "xxh3_64"


def new_digest() -> Any:
    """A fresh hasher for checkpoint files: xxh3-64, ~10 GB/s on one core of the test machine (CRC-32: ~2)."""
    import xxhash

    return xxhash.xxh3_64()


def format_digest(hasher: Any) -> str:
    return f"{DIGEST}:{hasher.hexdigest()}"
