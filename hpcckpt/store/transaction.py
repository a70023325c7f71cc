"""One save transaction: every checkpoint, one file or sharded, is committed through it.

Its steps (a crash at any instant leaves the previous or the new checkpoint as the latest, never a partial
one):

1. :meth:`SaveTransaction.begin` makes ``checkpoints/.tmp-<step>-<host>-<pid>-<token>/``; the directory
   appears under that name with this process's lock on its ``.owner`` already held (:class:`Owner`), so a
   cleaner on any host can tell a live writer from a dead one;
2. the files are written into :attr:`SaveTransaction.directory`, each fsynced: by a format in this process,
   or by every rank of a collective save;
3. :meth:`SaveTransaction.commit` reserves the next commit sequence number from the registry, writes
   ``manifest.json`` (files, sizes, checksums, step, epoch, metrics, versions, the job's ids, metadata, that
   number, and the provenance: hparams, command line, git state, :mod:`.provenance`) durably, then, under
   the registry lock, renames the directory to ``step_<step>`` (the commit point);
4. still under the lock, the registry records it, then retention applies; ``checkpoints/`` is fsynced
   (under the lock only when retention deletes something, before it does; else after the lock is released:
   no fsync of this save holds up the other writers, issue 13).

Anything that fails before the rename aborts (:meth:`SaveTransaction.abort`): the temporary directory is
removed and its lock released, and the previous checkpoints are untouched. A failed write (disk full,
quota) is a :class:`StoreError` naming the step, the directory, the reason and the checkpoint that stays.
Nothing here reads the environment: the job's ids come with the :class:`SaveRequest`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import platform
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from .._version import __version__
from ..errors import StoreError
from ..state import TrainState
from .fileio import fsync_dir, open_nofollow, write_atomic
from .manifest import MANIFEST, Checkpoint, FileRecord, combined_checksum, file_digest
from .provenance import command_line, git_state
from .registry import CLAIM_PREFIX, OWNER, Registry, warn


class JobIds(Protocol):
    """The batch job a checkpoint is saved in, as its manifest records it (:class:`hpcckpt.slurm.env.SlurmEnv`
    is one; every field None outside a job)."""

    @property
    def job_id(self) -> str | None: ...

    @property
    def array_job_id(self) -> str | None: ...

    @property
    def array_task_id(self) -> int | None: ...


@dataclass(frozen=True)
class SaveRequest:
    """What a save records besides its files, and where: validated by the store before a format sees it.

    ``retention`` chooses, among the committed checkpoints (the new one included), those to delete.
    """

    registry: Registry
    step: int
    epoch: int
    metrics: Mapping[str, float]
    retention: Callable[[list[Checkpoint]], list[Checkpoint]]
    tag: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    job: JobIds | None = None
    hparams: Mapping[str, Any] = field(default_factory=dict)  # checked by the store (provenance.check_hparams)

    def payload(self, state: TrainState | Mapping[str, Any]) -> Mapping[str, Any]:
        """What a format writes for ``state``: a :class:`TrainState`'s state dict with this request's step
        and epoch (so that the file agrees with the manifest even when they were given explicitly), or a
        plain dict as it is."""
        if isinstance(state, TrainState):
            return {**state.state_dict(), "step": self.step, "epoch": self.epoch}
        return state


class SaveTransaction:
    """One checkpoint being saved: its temporary directory, held by this process until :meth:`commit` or
    :meth:`abort`. As a context manager it aborts when left without a commit, an ``OSError`` becoming the
    :class:`StoreError` that says what stays."""

    def __init__(
        self, request: SaveRequest, directory: Path, owner: Owner, previous: Checkpoint | None, started: float
    ) -> None:
        self.request = request
        self.directory = directory
        self.owner = owner
        self.previous = previous  # the latest checkpoint before this save, for the error message
        self.started = started  # time.perf_counter() when the save began: the manifest's save_seconds
        self.committed: Checkpoint | None = None

    @classmethod
    def begin(cls, request: SaveRequest) -> SaveTransaction:
        """Step 1: clean what dead writers left, then make the temporary directory, owned by this process."""
        registry = request.registry
        previous = _latest_quietly(registry)
        started = time.perf_counter()
        registry.clean_temporaries()
        directory = registry.checkpoint_dir / registry.temporary_name(request.step, secrets.token_hex(4))
        try:
            owner = Owner.create(directory)
        except OSError as error:
            raise StoreError(save_failure(registry.checkpoint_dir, request.step, error, previous)) from error
        return cls(request, directory, owner, previous, started)

    def commit(
        self, files: Sequence[FileRecord] | None, *, format: str, compression: Mapping[str, Any] | None = None
    ) -> Checkpoint:
        """Steps 2-4: describe, number, rename and record the checkpoint; durable and registered on return.

        ``files`` are those a format wrote with their checksums; None checksums every file in the directory
        (files that other processes wrote). On any failure the transaction is aborted and the error raised
        as it is (an ``OSError`` becomes the :class:`StoreError` that says what stays when the transaction
        is left as a context manager). ``compression`` says how the files are compressed, for the manifest.
        """
        try:
            records = tuple(file_records(self.directory) if files is None else files)
            checkpoint = self.record(self.describe(records, format, compression))
        except BaseException:
            self.abort()  # not renamed: nothing was committed
            raise
        self.owner.forget(checkpoint.path)
        return checkpoint

    def record(self, draft: Checkpoint) -> Checkpoint:
        """Steps 3-4 for the checkpoint :meth:`describe` drafted: take a commit sequence number, write the
        manifest with it, and under the registry lock rename and record it; then release this process's
        lock on the directory and make the rename durable (the registry commit alone, which the benchmark
        times). Abort the transaction if this raises before the rename."""
        registry = self.request.registry
        seq = registry.reserve()
        named = dataclasses.replace(draft, seq=seq)
        write_atomic(self.directory / MANIFEST, _json(named.manifest()))  # durable before it can be visible
        checkpoint, _ = registry.commit(
            lambda number: self._rename_into_place(named, number), self.request.retention, seq=seq
        )
        self.committed = checkpoint
        self.owner.release()
        try:
            fsync_dir(registry.checkpoint_dir)  # the rename, durable
        except OSError as error:
            warn(
                f"checkpoint {checkpoint.name} is committed, but syncing {registry.checkpoint_dir} failed "
                f"({error.strerror or error}): it may not survive a power loss of the file server"
            )
        return checkpoint

    def abort(self) -> None:
        """Remove the temporary directory and release its lock: nothing is committed. Safe to repeat."""
        if self.committed is None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.owner.release()

    def failure(self, error: OSError) -> StoreError:
        """The error a failed write becomes: the step, the directory, the reason and what stays."""
        return StoreError(save_failure(self.request.registry.checkpoint_dir, self.request.step, error, self.previous))

    def __enter__(self) -> SaveTransaction:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.committed is not None:
            return
        self.abort()
        if isinstance(error, OSError):
            raise self.failure(error) from error

    def describe(
        self, files: tuple[FileRecord, ...], format_name: str, compression: Mapping[str, Any] | None = None
    ) -> Checkpoint:
        """The checkpoint's record under its intended final name (written as the manifest at the commit)."""
        request, job = self.request, self.request.job
        final = _final_path(request.registry, request.step)
        return Checkpoint(
            name=final.name,
            path=final,
            step=request.step,
            epoch=request.epoch,
            metrics=dict(request.metrics),
            size=sum(f.size for f in files),
            created=time.time(),
            checksum=combined_checksum(files),
            files=files,
            format=format_name,
            tag=request.tag,
            host=socket.gethostname(),
            job_id=None if job is None else job.job_id,
            array_job_id=None if job is None else job.array_job_id,
            array_task_id=None if job is None else job.array_task_id,
            save_seconds=time.perf_counter() - self.started,
            versions=_versions(),
            metadata=request.metadata,
            compression=compression,
            hparams=dict(request.hparams),
            command=command_line(),
            git=git_state(),
        )

    def _rename_into_place(self, checkpoint: Checkpoint, seq: int) -> Checkpoint:
        """Step 3, under the registry lock: rename the directory, whose manifest already names it and its
        commit sequence number ``seq``, to a free final name. The commit point. Where that name is taken (a
        second save of one step), the manifest is rewritten durably for the next free one first."""
        suffix = 0
        while True:
            final = checkpoint.path if suffix == 0 else checkpoint.path.with_name(f"{checkpoint.path.name}.{suffix}")
            named = dataclasses.replace(checkpoint, name=final.name, path=final, seq=seq)
            if suffix:
                write_atomic(self.directory / MANIFEST, _json(named.manifest()))  # it names its directory
            try:
                # A rename onto an existing non-empty directory fails: a second save of one step takes the
                # next suffix instead of replacing the first.
                os.rename(self.directory, final)
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY) and _manifest_created(final) != checkpoint.created:
                    suffix += 1
                    continue
                if not (_manifest_created(final) == checkpoint.created and not self.directory.exists()):
                    raise
                # The rename went through and its answer was lost (NFS retransmits it, then says ENOENT).
            return named


class Owner:
    """A lock on ``.owner`` inside a temporary checkpoint directory, held while it is written, so that a
    cleaner on any host (NFSv4, Lustre with flock) can tell a live writer from a dead one."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def create(cls, tmp: Path) -> Owner:
        """Make the temporary directory ``tmp`` with this process's lock on its ``.owner`` already held.

        Ownership is atomic (issue 11: a cleaner that probed between the owner file's creation and its
        locking took the writer for dead and deleted its directory): the directory is made under a private
        name (``.claim-...``, which cleaners judge by host and pid only, never by its lock), the owner file
        created and locked there, and only then is it renamed to ``tmp``. Where locks do not work, the owner
        file is removed before the rename and cleaners fall back to host, pid and age.
        """
        import fcntl

        claim = tmp.with_name(CLAIM_PREFIX + tmp.name.partition("-")[2])
        claim.mkdir()
        fd: int | None = None
        try:
            fd = open_nofollow(claim / OWNER, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                fd = None
                os.unlink(claim / OWNER)  # an unlocked owner file would read as a dead writer's
            os.rename(claim, tmp)
        except BaseException:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(claim, ignore_errors=True)
            raise
        return cls(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def forget(directory: Path) -> None:
        """Remove the lock file from a committed checkpoint (it was renamed along with its directory)."""
        with contextlib.suppress(OSError):
            (directory / OWNER).unlink()


def file_records(directory: Path) -> list[FileRecord]:
    """Size and checksum of every file in ``directory`` but the manifest and the owner's lock, by name."""
    return [
        FileRecord(path.name, path.stat().st_size, file_digest(path))
        for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST, OWNER))
    ]


def save_failure(checkpoint_dir: Path, step: int, error: OSError, previous: Checkpoint | None) -> str:
    kept = f"the previous checkpoint (step {previous.step}) is intact" if previous else "nothing was saved before"
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (disk full, quota or file-size limit)"
    return f"could not save step {step} into {checkpoint_dir}: {reason}; {kept}"


def _latest_quietly(registry: Registry) -> Checkpoint | None:
    """The latest checkpoint for an error message; never the reason a save fails."""
    try:
        checkpoints = registry.checkpoints()
    except Exception:
        return None
    return checkpoints[-1] if checkpoints else None


def _final_path(registry: Registry, step: int) -> Path:
    return registry.checkpoint_dir / f"step_{step:09d}"


def _versions() -> dict[str, str]:
    import torch

    return {"hpcckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, indent=1, default=str, allow_nan=True).encode()


def _manifest_created(directory: Path) -> float | None:
    try:
        return float(json.loads((directory / MANIFEST).read_bytes())["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
