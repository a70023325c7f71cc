"""How a checkpoint's state is laid out in files.

A format writes a state dict into a (temporary) directory and reads it back; the store around it owns
naming, manifests, commit and retention. Today there is one format, ``torch``: a single ``state.pt``
written by ``torch.save``, loadable anywhere with ``torch.load(path, weights_only=True)``; and ``dcp``, a
torch.distributed.checkpoint directory with one file per rank (saved collectively by ``sharded.py``).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import CorruptCheckpointError, StoreError
from .fileio import DIGEST, SyncedWriter, format_digest, new_digest
from .manifest import Checkpoint, FileRecord

DCP_FORMAT = "dcp"


class CheckpointFormat(Protocol):
    name: str

    def write(self, state: Mapping[str, Any], directory: Path) -> list[FileRecord]:
        """Write ``state`` into ``directory``; every file fsynced when this returns."""
        ...

    def read(self, checkpoint: Checkpoint, map_location: Any, *, weights_only: bool, mmap: bool) -> dict[str, Any]:
        """Read the state back (files already verified). ``mmap``: tensors may map the files."""
        ...


class TorchFileFormat:
    """One ``state.pt`` file written by ``torch.save``."""

    name = "torch"
    filename = "state.pt"

    def __init__(self, *, checksum: bool = True) -> None:
        self.checksum = checksum

    def write(self, state: Mapping[str, Any], directory: Path) -> list[FileRecord]:
        import torch

        path = directory / self.filename
        out = SyncedWriter(path, checksum=self.checksum)
        try:
            torch.save(dict(state), out)  # type: ignore[arg-type]
            out.close()
        except BaseException as error:
            out.abort()
            # torch.save turns a failed write (ENOSPC, EDQUOT, EFBIG) into a RuntimeError about zip
            # positions; the OSError underneath is what the user needs to see.
            if out.failed is not None and not isinstance(error, OSError):
                raise out.failed from error
            raise
        return [FileRecord(self.filename, out.size, out.digest)]

    def read(self, checkpoint: Checkpoint, map_location: Any, *, weights_only: bool, mmap: bool) -> dict[str, Any]:
        import torch

        path = checkpoint.path / self.filename
        try:
            # With mmap, tensors are views of the page cache that verify_file just filled: nothing is copied,
            # but they keep the file mapped for as long as they live.
            state = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as error:
            if not weights_only:
                raise
            # The file is intact (its checksum matched) but holds objects other than tensors and containers.
            refused = next((ln.strip() for ln in str(error).splitlines() if "Unsupported global" in ln), "")
            raise StoreError(
                f"{path}: torch.load(weights_only=True) refuses its content ({refused or 'arbitrary objects'}). "
                "Load it with unsafe_allow_pickle=True only if you trust who wrote it: unpickling runs code"
            ) from None
        except Exception as error:
            if not path.exists():  # deleted (by retention) since it was verified; torch says RuntimeError
                raise FileNotFoundError(errno.ENOENT, "deleted while loading", str(path)) from error
            # Its checksum matched, so the file is not the problem: out of memory, a map_location this node
            # cannot honour... Not a reason to fall back to an older checkpoint.
            raise StoreError(f"{path}: torch.load(map_location={map_location!r}) failed: {error}") from error
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{path}: holds a {type(state).__name__}, expected a dict")
        return state


class DcpFormat:
    """A DCP directory: ``.metadata`` and one ``__R_0.distcp`` per rank."""

    name = DCP_FORMAT

    def write(self, state: Mapping[str, Any], directory: Path) -> list[FileRecord]:
        """A single process writing a plain state dict (rank-aware saves go through :func:`save`)."""
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        with single_process_quietly():
            dcp_save(dict(state), storage_writer=FileSystemWriter(str(directory), sync_files=True), no_dist=True)
        return file_records(directory)

    def read(self, checkpoint: Checkpoint, map_location: Any, *, weights_only: bool, mmap: bool) -> dict[str, Any]:
        """The whole state in this process, every shard gathered (the export and ``load`` path). Nothing in
        the files runs code: see :mod:`hpcckpt.store.dcpread`."""
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        from . import dcpread

        state: dict[str, Any] = {}
        files = [f.name for f in checkpoint.files]
        try:
            storage_reader = dcpread.reader(checkpoint.path, files, trusted=not weights_only)
            with single_process_quietly(), dcpread.guarded(checkpoint.path, files):
                _load_state_dict(
                    state,
                    storage_reader=storage_reader,
                    planner=dcpread.planner("empty", weights_only=weights_only),
                    no_dist=True,
                )
        except (FileNotFoundError, StoreError):
            raise
        except Exception as error:
            raise StoreError(f"{checkpoint.path}: reading the sharded checkpoint failed: {error}") from error
        return state


@contextlib.contextmanager
def single_process_quietly() -> Iterator[None]:
    """DCP warns at every save and load without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def file_records(directory: Path) -> list[FileRecord]:
    """Size and checksum of every file in ``directory`` but the manifest, by name."""
    return [
        FileRecord(path.name, path.stat().st_size, file_digest(path))
        for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name not in ("manifest.json", ".owner"))
    ]


def file_digest(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return _file_digest(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


FORMATS: Mapping[str, CheckpointFormat] = {TorchFileFormat.name: TorchFileFormat(), DCP_FORMAT: DcpFormat()}


def verify_file(path: Path, record: FileRecord) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` when its size or checksum differ from ``record``.

    The file is read once, in chunks; its pages stay in the page cache for the ``mmap`` load that follows.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing (the manifest lists it)") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CorruptCheckpointError(f"{path}: a symbolic link; checkpoint files must be plain files") from None
        raise CorruptCheckpointError(f"{path}: unreadable ({error.strerror or error})") from None
    try:
        size = os.fstat(fd).st_size
        if size != record.size:
            raise CorruptCheckpointError(
                f"{path}: size {size} bytes, the manifest says {record.size} (truncated or overwritten)"
            )
        if not record.digest.startswith(f"{DIGEST}:"):
            raise CorruptCheckpointError(f"{path}: checksum {record.digest!r} is not {DIGEST}, which hpcckpt uses")
        digest = _file_digest(fd, size)
    except OSError as error:
        raise CorruptCheckpointError(f"{path}: unreadable ({error.strerror or error})") from None
    finally:
        os.close(fd)
    if digest != record.digest:
        raise CorruptCheckpointError(
            f"{path}: checksum {digest}, the manifest says {record.digest} (the data changed on disk)"
        )


# Measured on a cold 1 GiB file: hashing the file through mmap (no copy into a buffer) runs at ~0.9x a raw
# read() of the whole file, 8 MiB read()s at ~0.8x, and a reader thread at ~0.45x (xxhash holds the GIL).
_SLICE = 64 << 20


def _file_digest(fd: int, size: int) -> str:
    hasher = new_digest()
    if size == 0:
        return format_digest(hasher)
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mapped)
        try:
            for offset in range(0, size, _SLICE):
                with view[offset : offset + _SLICE] as piece:
                    hasher.update(piece)
        finally:
            view.release()
    return format_digest(hasher)
