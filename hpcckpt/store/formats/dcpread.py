"""Reading a ``dcp`` checkpoint without running code from it (issue 11, items 1 and 2).

DCP keeps its ``.metadata`` as a pickle and reads it with ``pickle.load``; it stores every non-tensor value
(steps, RNG states, an optimizer's hyper-parameters) as a pickle too and reads those with
``torch.load(weights_only=False)``. A checkpoint whose files were rewritten (checksums recomputed, so it
verifies) could therefore run any code in whoever loads it: ``hpcckpt export``, ``store.load()``, a resuming
``Run``. Here:

- ``.metadata`` is read by :class:`_MetadataUnpickler`, which admits only the classes DCP's metadata is
  made of (found by reading the metadata that torch 2.13 writes) and sets state only on their instances;
  anything else, a file a shard entry names outside the checkpoint's own files, or an object that is not
  DCP's ``Metadata`` is a :class:`CorruptCheckpointError`, so a load falls back to the previous valid
  checkpoint (``unsafe_allow_pickle=True`` reads it with plain pickle, for a writer the caller trusts);
- the non-tensor values go through ``torch.load(weights_only=True)`` first (unless the caller asked for
  ``unsafe_allow_pickle``), like a ``torch`` checkpoint's ``state.pt``;
- DCP reports failures as ``CheckpointException``, a ``BaseException``: :func:`guarded` turns it into the
  error it stands for, so a shard that cannot be read is a :class:`CorruptCheckpointError` too.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import pickle
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, ClassVar

from ...errors import CorruptCheckpointError, HpcckptError, StoreError

METADATA = ".metadata"

# Every global that a DCP .metadata written by torch 2.13 refers to (read from real ones); torch's dtypes, layouts and
# memory formats are admitted by type (see _MetadataUnpickler.find_class).
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # maps a name like "torch.strided" to the layout
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath"}),  # StorageMeta.checkpoint_id
    "pathlib._local": frozenset({"PosixPath", "PurePosixPath"}),  # the same, pickled by Python 3.13
    "collections": frozenset({"OrderedDict"}),
}


# Python's own unpickler, in Python: its BUILD step can be checked (the C one's cannot), as torch's
# weights_only unpickler does. Metadata is small (kilobytes per thousand tensors), so speed does not matter.
_PythonUnpickler: Any = getattr(pickle, "_Unpickler")  # noqa: B009 - private by name, public in practice


class _MetadataUnpickler(_PythonUnpickler):  # type: ignore[misc]
    """Admits only the globals in ``_ALLOWED`` (and torch's dtypes, layouts and memory formats), and sets
    state only on instances of the admitted classes: a BUILD on a class itself would change that class for
    the whole process."""

    dispatch: ClassVar[dict[int, Any]] = dict(_PythonUnpickler.dispatch)

    def load_build(self) -> None:
        target = self.stack[-2]  # BUILD pops the state, then sets it on the object below
        if isinstance(target, type) or type(target).__name__ not in _ALLOWED.get(type(target).__module__, ()):
            raise pickle.UnpicklingError(f"refused to set the state of {type(target).__name__} {target!r:.60}")
        _PythonUnpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
                return value
        raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of DCP's metadata")


def read_metadata(directory: Path, files: Collection[str], *, trusted: bool = False) -> Any:
    """DCP's ``Metadata`` of the checkpoint in ``directory``, whose data files are ``files`` (its
    manifest's); :class:`CorruptCheckpointError` for anything else. ``trusted``: the caller passed
    ``unsafe_allow_pickle=True``, so plain pickle reads it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    path = directory / METADATA
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if not directory.exists():
            raise  # deleted (by retention) meanwhile
        raise CorruptCheckpointError(f"{path}: missing; a dcp checkpoint has one") from None
    except OSError as error:
        raise CorruptCheckpointError(f"{path}: unreadable ({error.strerror or error})") from None
    try:
        with os.fdopen(fd, "rb") as stream:
            metadata = pickle.load(stream) if trusted else _MetadataUnpickler(stream).load()  # noqa: S301
    except Exception as error:  # a refused global, a torn or garbled pickle: all mean the same here
        raise CorruptCheckpointError(
            f"{path}: not DCP metadata ({type(error).__name__}: {error}); refused without running it"
        ) from None
    if type(metadata) is not Metadata or not isinstance(metadata.storage_data, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(metadata).__name__}, expected DCP's Metadata")
    for info in metadata.storage_data.values():
        if type(info) is not _StorageInfo or info.relative_path not in files:
            where = getattr(info, "relative_path", info)
            raise CorruptCheckpointError(
                f"{path}: an entry points at {where!r}, which is not one of the checkpoint's files "
                f"({', '.join(sorted(files))})"
            )
    return metadata


def reader(directory: Path, files: Collection[str], *, trusted: bool = False) -> Any:
    """A ``FileSystemReader`` for ``directory`` that never unpickles its metadata unrestrictedly (unless
    ``trusted``): it is read here, through :func:`read_metadata`, before DCP is involved."""
    return _reader_class()(str(directory), read_metadata(directory, files, trusted=trusted))


def planner(base: str, *, weights_only: bool, **kwargs: Any) -> Any:
    """DCP's ``DefaultLoadPlanner`` (``base="default"``) or ``_EmptyStateDictLoadPlanner`` (``"empty"``),
    loading non-tensor values with ``torch.load(weights_only=True)`` unless ``weights_only`` is False."""
    return _planner_class(base)(weights_only, **kwargs)


@contextlib.contextmanager
def guarded(directory: Path, files: Collection[str]) -> Iterator[None]:
    """Run a DCP load of ``directory``, raising what its ``CheckpointException`` stands for:
    ``FileNotFoundError`` when the checkpoint was deleted meanwhile, an hpcckpt error raised inside,
    :class:`CorruptCheckpointError` when a shard cannot be read, :class:`StoreError` otherwise."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as error:
        raise _translate(error, directory, files) from None


def _translate(error: Any, directory: Path, files: Collection[str]) -> BaseException:
    causes = [cause for cause, _trace in error.failures.values()]
    for cause in causes:
        if isinstance(cause, KeyboardInterrupt | SystemExit):
            return cause
        if isinstance(cause, HpcckptError):
            return type(cause)(f"{directory}: {cause}")
    if not directory.exists():
        return FileNotFoundError(errno.ENOENT, "deleted while loading", str(directory))
    text = failures(error)
    step = error.args[0] if error.args else "?"
    if step == "read":
        shards = ", ".join(sorted(f for f in files if f != METADATA))
        return CorruptCheckpointError(f"{directory}: its shards ({shards}) cannot be read ({text})")
    return StoreError(f"{directory}: loading the sharded checkpoint failed in DCP's {step!r} step: {text}")


def failures(error: Any) -> str:
    """What went wrong on each rank, from DCP's ``CheckpointException``."""
    return "; ".join(
        f"rank {rank}: {type(cause).__name__}{f': {cause}' if str(cause) else ''}"
        for rank, (cause, _) in sorted(error.failures.items())
    )


@functools.cache
def _reader_class() -> type:
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def __init__(self, path: str, metadata: Any) -> None:
            super().__init__(path)
            self._hpcckpt_metadata = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise FileNotFoundError("hpcckpt writes no per-rank metadata")
            metadata = self._hpcckpt_metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeReader


@functools.cache
def _planner_class(base: str) -> type:
    import torch
    from torch.distributed.checkpoint import default_planner

    parent = {"default": default_planner.DefaultLoadPlanner, "empty": default_planner._EmptyStateDictLoadPlanner}

    class SafePlanner(parent[base]):  # type: ignore[misc, valid-type]
        def __init__(self, weights_only: bool, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._hpcckpt_weights_only = weights_only

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            if self._hpcckpt_weights_only:
                data = value.read()
                try:
                    torch.load(io.BytesIO(data), weights_only=True)
                except pickle.UnpicklingError as error:
                    refused = next((ln.strip() for ln in str(error).splitlines() if "Unsupported global" in ln), "")
                    raise StoreError(
                        f"entry {read_item.dest_index.fqn!r}: torch.load(weights_only=True) refuses its content "
                        f"({refused or 'arbitrary objects'}). Load it with unsafe_allow_pickle=True only if you "
                        "trust who wrote it: unpickling runs code"
                    ) from None
                value = io.BytesIO(data)  # now known to hold only what weights_only admits
            super().load_bytes(read_item, value)

    return SafePlanner
