"""Writing a ``dcp`` checkpoint with each file's checksum computed as DCP writes it (issue 13: one pass).

DCP writes through a ``FileSystemBase`` (``create_stream``, ``rename``, ``rm_file``): here every stream
opened for writing hashes (xxh3, :func:`~hpcckpt.store.fileio.new_digest`) and counts the bytes on their way
to the file, so no file is read back to be checksummed. What is promised: :meth:`Records.files` holds, for
every file this process's writer created and kept in the checkpoint directory, its final name (DCP writes
``.metadata`` under a temporary name, then renames it), its size and the checksum of exactly the bytes
written. A stream that failed records nothing; a file whose size on disk differs from the bytes counted
(written past our stream) records nothing either, so the committing rank finds it unrecorded and hashes it
whole (:func:`complete`): a single pass is an optimisation, never a different answer.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ..fileio import format_digest, new_digest
from ..manifest import MANIFEST, FileRecord, file_digest
from ..registry import OWNER


class Records:
    """The files one writer kept, by name; shared with its DCP writer's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, FileRecord] = {}

    def add(self, record: FileRecord) -> None:
        with self._lock:
            self._files[record.name] = record

    def renamed(self, old: str, new: str) -> None:
        with self._lock:
            record = self._files.pop(old, None)
            self._files.pop(new, None)  # replaced: whatever it held before is gone
            if record is not None:
                self._files[new] = FileRecord(new, record.size, record.digest)

    def removed(self, name: str) -> None:
        with self._lock:
            self._files.pop(name, None)

    def files(self) -> list[FileRecord]:
        with self._lock:
            return sorted(self._files.values(), key=lambda f: f.name)


class HashingStream:
    """A file opened for writing that hashes and counts what is written through it (the surface DCP and
    ``torch.save`` use: write, tell, flush, fileno, close)."""

    def __init__(self, raw: IO[Any]) -> None:
        self._raw = raw
        self._hasher = new_digest()
        self.size = 0
        self.disk_size: int | None = None  # the file's size when closed

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = self._raw.write(view)  # a buffered file writes everything or raises
        self._hasher.update(view[:written])
        self.size += written
        return written

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        # Callers take the descriptor to fsync it (DCP's ``os.fsync(stream.fileno())`` before close): what is
        # still in the buffer above it must reach the file first, or the fsync misses the file's tail (a
        # ``.metadata`` of a few KB was fsynced with 0 bytes, then written at close, never synced).
        self._raw.flush()
        return self._raw.fileno()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # a seek would make the running checksum wrong

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def close(self) -> None:
        if self._raw.closed:
            return
        self._raw.flush()
        self.disk_size = os.fstat(self._raw.fileno()).st_size
        self._raw.close()

    @property
    def digest(self) -> str:
        return format_digest(self._hasher)

    def __enter__(self) -> HashingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def writer(directory: str, records: Records, **options: Any) -> Any:
    """A DCP ``FileSystemWriter`` into ``directory`` whose written files land in ``records``."""
    return _writer_class()(directory, records, **options)


def complete(directory: Path, recorded: Iterable[FileRecord]) -> list[FileRecord]:
    """The checkpoint's files: those ``recorded`` (by every rank) that are in ``directory``, and any other
    file there hashed whole (none, when every rank's writer recorded its files). A recorded file that is
    missing raises ``FileNotFoundError``: nothing is committed without it."""
    by_name = {record.name: record for record in recorded}
    present = sorted(
        entry.name for entry in os.scandir(directory) if entry.is_file() and entry.name not in (MANIFEST, OWNER)
    )
    missing = sorted(set(by_name) - set(present))
    if missing:
        raise FileNotFoundError(f"{directory}: files written by the ranks are gone: {missing}")
    return [by_name.get(name) or _hashed(directory / name) for name in present]


def _hashed(path: Path) -> FileRecord:
    return FileRecord(path.name, path.stat().st_size, file_digest(path))


@functools.cache
def _writer_class() -> type:
    """DCP's writer over a filesystem whose write streams hash (made on first use: torch is imported here)."""
    from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter

    class HashingFileSystem(FileSystem):
        def __init__(self, records: Records) -> None:
            super().__init__()
            self.records = records

        @contextlib.contextmanager
        def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with open(path, mode) as raw:
                hashing = HashingStream(raw)
                yield hashing
                hashing.close()
            # Reached only when the body raised nothing: a failed write records nothing.
            if hashing.disk_size == hashing.size:
                self.records.add(FileRecord(Path(path).name, hashing.size, hashing.digest))

        def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
            super().rename(path, new_path)
            self.records.renamed(Path(path).name, Path(new_path).name)

        def rm_file(self, path: str | os.PathLike[str]) -> None:
            super().rm_file(path)
            self.records.removed(Path(path).name)

    class HashingWriter(FileSystemWriter):
        def __init__(self, path: str, records: Records, **options: Any) -> None:
            super().__init__(path, **options)
            self.fs = HashingFileSystem(records)
            self.path = self.fs.init_path(path)

    return HashingWriter
