"""The record of one committed checkpoint and its manifest, and the check of its files against it.

A checkpoint is a directory ``checkpoints/<name>/`` holding its data files and ``manifest.json``. The
manifest is written before the directory gets its final name, so a directory with a final name and a
readable manifest is committed; anything else is not a checkpoint. A file is the one its manifest
describes when its size and xxh3-64 checksum match (:func:`verify_file`), whatever format wrote it.

A manifest also documents its checkpoint (issue 14): the user's ``hparams``, the ``command`` line the process
ran (``sys.argv``, secret-looking values redacted by :func:`hpcckpt.store.provenance.redact_argv`; pass
secrets through the environment, which is never recorded), the ``git`` commit of the working directory and
whether tracked files were modified (absent outside a repository), the versions and the Slurm ids. These
fields are in the manifest only, not in the registry's listing (:meth:`Checkpoint.summary`, which the index,
the journal and the event log repeat): a checkpoint listed by the registry has them empty;
:func:`read_manifest` gives them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import is_whole
from ..errors import CorruptCheckpointError, StoreError
from .fileio import DIGEST, format_digest, new_digest, read_nofollow

MANIFEST = "manifest.json"
# A checkpoint's directory and file names: no separators, no leading dot, so none can lead elsewhere.
PLAIN_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.][A-Za-z0-9_.-]*$")  # DCP writes ".metadata"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class FileRecord:
    """One data file of a checkpoint: its name inside the directory, size in bytes and checksum
    (``xxh3_64:<hex>``)."""

    name: str
    size: int
    digest: str


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint, as the registry knows it. ``path`` is its directory."""

    name: str
    path: Path
    step: int
    epoch: int
    metrics: Mapping[str, float]
    size: int
    created: float
    checksum: str
    files: tuple[FileRecord, ...]
    format: str
    tag: str | None = None
    host: str | None = None
    job_id: str | None = None
    array_job_id: str | None = None
    array_task_id: int | None = None
    save_seconds: float | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # The commit sequence number, assigned under the registry lock: the order of checkpoints (issue 11: a
    # saving node's skewed clock must not decide which is the latest). None for checkpoints written by
    # hpcckpt before it numbered commits.
    seq: int | None = None
    # How its files are compressed (issue 14): {"codec": "zstd", "level": 3}, or None for plain files.
    compression: Mapping[str, Any] | None = None
    # Self-documentation, in the manifest only (see the module docstring): empty when listed by the registry.
    # Not compared: the record the registry lists equals the one the save returned.
    hparams: Mapping[str, Any] = field(default_factory=dict, compare=False)
    command: tuple[str, ...] | None = field(default=None, compare=False)
    git: Mapping[str, Any] | None = field(default=None, compare=False)

    def __hash__(self) -> int:
        return hash(self.path)

    def summary(self) -> dict[str, Any]:
        """The record as the index and ``hpcckpt ls --json`` show it (``compression`` only when set)."""
        summary: dict[str, Any] = {
            "name": self.name,
            "seq": self.seq,
            "step": self.step,
            "epoch": self.epoch,
            "metrics": dict(self.metrics),
            "size": self.size,
            "created": self.created,
            "checksum": self.checksum,
            "format": self.format,
            "tag": self.tag,
            "host": self.host,
            "job_id": self.job_id,
            "array_job_id": self.array_job_id,
            "array_task_id": self.array_task_id,
            "save_seconds": self.save_seconds,
            "files": [{"name": f.name, "size": f.size, "digest": f.digest} for f in self.files],
            "versions": dict(self.versions),
            "metadata": dict(self.metadata),
        }
        if self.compression is not None:
            summary["compression"] = dict(self.compression)
        return summary

    def manifest(self) -> dict[str, Any]:
        """The whole manifest: the summary plus the self-documenting fields."""
        return {
            "hpcckpt_manifest": MANIFEST_VERSION,
            **self.summary(),
            "hparams": dict(self.hparams),
            "command": None if self.command is None else list(self.command),
            "git": None if self.git is None else dict(self.git),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path, *, source: str | None = None) -> Checkpoint:
        """Build from a manifest or an index entry; ``path`` is where the directory is, ``source`` names
        what was read in errors (by default the manifest)."""
        check_fields(data, source or str(path / MANIFEST))
        try:
            files = tuple(FileRecord(str(f["name"]), int(f["size"]), str(f["digest"])) for f in data["files"])
            for record in files:
                if not PLAIN_NAME.match(record.name):
                    raise CorruptCheckpointError(
                        f"{path / MANIFEST}: lists file {record.name!r}, which is not a plain file name inside the "
                        "checkpoint; refused"
                    )
            task = data.get("array_task_id")
            seq = data.get("seq")
            if seq is not None and not is_whole(seq, 1):
                raise CorruptCheckpointError(
                    f"{path / MANIFEST}: field 'seq' is {seq!r}; expected a whole number >= 1 (the commit order)"
                )
            return cls(
                name=str(data["name"]),
                path=path,
                step=int(data["step"]),
                epoch=int(data["epoch"]),
                metrics={str(k): float(v) for k, v in dict(data.get("metrics") or {}).items()},
                size=int(data["size"]),
                created=float(data["created"]),
                checksum=str(data["checksum"]),
                files=files,
                format=str(data["format"]),
                tag=data.get("tag"),
                host=data.get("host"),
                job_id=data.get("job_id"),
                array_job_id=data.get("array_job_id"),
                array_task_id=None if task is None else int(task),
                save_seconds=data.get("save_seconds"),
                versions=dict(data.get("versions") or {}),
                metadata=dict(data.get("metadata") or {}),
                seq=seq,
                compression=None if data.get("compression") is None else dict(data["compression"]),
                hparams=dict(data.get("hparams") or {}),
                command=None if data.get("command") is None else tuple(data["command"]),
                git=None if data.get("git") is None else dict(data["git"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptCheckpointError(f"{path / MANIFEST}: malformed entry ({error!r})") from None


# What each field of a manifest or index entry must be, checked when read (issue 11, item 13): a manifest
# written by hand or by another tool gives an error naming the file and the field, not a traceback in
# `hpcckpt ls` later. (JSON types; a bool is not a number here.)
_WHOLE, _NUMBER, _TEXT, _OBJECT = "a whole number >= 0", "a number", "a string", "an object"
_FIELDS: dict[str, tuple[str, bool]] = {  # field: (expected, may be null or absent)
    "name": (_TEXT, False),
    "step": (_WHOLE, False),
    "epoch": (_WHOLE, False),
    "size": (_WHOLE, False),
    "created": (_NUMBER, False),
    "checksum": (_TEXT, False),
    "format": (_TEXT, False),
    "files": ("a list of {name, size, digest}", False),
    "metrics": ("an object of numbers", True),
    "tag": (_TEXT, True),
    "host": (_TEXT, True),
    "job_id": (_TEXT, True),
    "array_job_id": (_TEXT, True),
    "array_task_id": (_WHOLE, True),
    "save_seconds": (_NUMBER, True),
    "versions": (_OBJECT, True),
    "metadata": (_OBJECT, True),
    "compression": (_OBJECT, True),
    "hparams": (_OBJECT, True),
    "command": ("a list of strings", True),
    "git": (_OBJECT, True),
}


def field_ok(expected: str, value: Any) -> bool:
    """Whether ``value`` (parsed JSON) is of the ``expected`` kind (one of the descriptions above)."""
    if expected == _WHOLE:
        return type(value) is int and value >= 0
    if expected == _NUMBER:
        return type(value) in (int, float)
    if expected == _TEXT:
        return isinstance(value, str)
    if expected == _OBJECT:
        return isinstance(value, dict)
    if expected == "a list of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if expected == "an object of numbers":
        return isinstance(value, dict) and all(type(v) in (int, float) for v in value.values())
    return isinstance(value, list) and all(
        isinstance(f, dict)
        and isinstance(f.get("name"), str)
        and field_ok(_WHOLE, f.get("size"))
        and isinstance(f.get("digest"), str)
        for f in value
    )


def check_fields(data: Mapping[str, Any], source: str) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``source`` and the first field of ``data`` that is not
    of its kind."""
    if not isinstance(data, Mapping):
        raise CorruptCheckpointError(f"{source}: holds {_shown(data)}; expected an object")
    for name, (expected, optional) in _FIELDS.items():
        if name not in data or data[name] is None:
            if not optional:
                raise CorruptCheckpointError(f"{source}: field {name!r} is missing; expected {expected}")
        elif not field_ok(expected, data[name]):
            null = " or null" if optional else ""
            raise CorruptCheckpointError(f"{source}: field {name!r} is {_shown(data[name])}; expected {expected}{null}")


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def combined_checksum(files: tuple[FileRecord, ...]) -> str:
    """One checksum for the whole checkpoint, over every file's name, size and checksum."""
    hasher = new_digest()
    for f in sorted(files, key=lambda f: f.name):
        hasher.update(f"{f.name}\0{f.size}\0{f.digest}\n".encode())
    return format_digest(hasher)


def read_manifest(directory: Path) -> Checkpoint:
    """Read and check ``directory/manifest.json``; :class:`CorruptCheckpointError` when it is unusable."""
    path = directory / MANIFEST
    try:
        data = json.loads(read_nofollow(path))
    except StoreError as refused:  # a symbolic link: never read through
        raise CorruptCheckpointError(str(refused)) from None
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing: the directory is not a committed checkpoint") from None
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(data, dict) or data.get("hpcckpt_manifest") != MANIFEST_VERSION:
        raise CorruptCheckpointError(f"{path}: not an hpcckpt manifest of version {MANIFEST_VERSION}")
    checkpoint = Checkpoint.from_dict(data, directory)
    if checkpoint.name != directory.name:
        raise CorruptCheckpointError(f"{path}: names checkpoint {checkpoint.name!r} but lies in {directory.name!r}")
    if combined_checksum(checkpoint.files) != checkpoint.checksum:
        raise CorruptCheckpointError(f"{path}: its file list does not match its checksum {checkpoint.checksum}")
    return checkpoint


def documented(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` (as the registry lists it) with the self-documenting fields of its manifest on disk:
    hparams, command, git. As it is when that manifest cannot be read or describes other files."""
    try:
        on_disk = read_manifest(checkpoint.path)
    except CorruptCheckpointError:
        return checkpoint
    if on_disk.checksum != checkpoint.checksum:
        return checkpoint
    return dataclasses.replace(checkpoint, hparams=on_disk.hparams, command=on_disk.command, git=on_disk.git)


def file_digest(path: Path) -> str:
    """The checksum of the file at ``path`` (not followed if it is a link), as a manifest records it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return _file_digest(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def verify_file(path: Path, record: FileRecord, on_bytes: Callable[[int], None] | None = None) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` when its size or checksum differ from ``record``.

    The file is read once, in chunks; its pages stay in the page cache for the ``mmap`` load that follows.
    ``on_bytes(n)`` is called after each chunk hashed (a progress bar's ``update``).
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
        check_size(path, size, record)
        digest = _file_digest(fd, size, on_bytes)
    except OSError as error:
        raise CorruptCheckpointError(f"{path}: unreadable ({error.strerror or error})") from None
    finally:
        os.close(fd)
    check_digest(path, digest, record)


def check_size(path: Path, size: int, record: FileRecord) -> None:
    """Raise :class:`CorruptCheckpointError` when a file of ``size`` bytes is not the one ``record``
    describes, or ``record``'s checksum is not of the kind hpcckpt computes: checked before reading."""
    if size != record.size:
        raise CorruptCheckpointError(
            f"{path}: size {size} bytes, the manifest says {record.size} (truncated or overwritten)"
        )
    if not record.digest.startswith(f"{DIGEST}:"):
        raise CorruptCheckpointError(f"{path}: checksum {record.digest!r} is not {DIGEST}, which hpcckpt uses")


def check_digest(path: Path, digest: str, record: FileRecord) -> None:
    """Raise :class:`CorruptCheckpointError` when the checksum read, ``digest``, is not ``record``'s."""
    if digest != record.digest:
        raise CorruptCheckpointError(
            f"{path}: checksum {digest}, the manifest says {record.digest} (the data changed on disk)"
        )


# Measured on a cold 1 GiB file: hashing the file through mmap (no copy into a buffer) runs at ~0.9x a raw
# read() of the whole file, 8 MiB read()s at ~0.8x, and a reader thread at ~0.45x (xxhash holds the GIL).
_SLICE = 64 << 20


def _file_digest(fd: int, size: int, on_bytes: Callable[[int], None] | None = None) -> str:
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
                    if on_bytes is not None:
                        on_bytes(piece.nbytes)
        finally:
            view.release()
    return format_digest(hasher)
