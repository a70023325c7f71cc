"""The checkpoint store: save a training state durably, find the latest or best one, load it back.

Commit protocol of :meth:`CheckpointStore.save` (a crash at any instant leaves the previous or the new
checkpoint as the latest, never a partial one):

1. write the files into ``checkpoints/.tmp-<step>-<host>-<pid>-<token>/``, fsyncing each (the directory
   appears under that name with its writer's lock already held: see :class:`_Owner`);
2. under the registry lock, take the next commit sequence number and write ``manifest.json`` there (it,
   files, sizes, checksums, step, epoch, metrics, versions, Slurm ids, user metadata), durably;
3. rename the directory to its final name ``step_<step>`` and fsync ``checkpoints/`` -- the commit point;
4. record it in the registry, still under the lock; only then apply retention.

A failed save (disk full, quota) removes its temporary directory and raises :class:`StoreError`; the
previous checkpoints are untouched. Loading always uses ``torch.load(weights_only=True)`` unless the caller
passes ``unsafe_allow_pickle=True`` by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import operator
import os
import platform
import secrets
import shutil
import socket
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, StoreError, UsageError
from ..slurm.env import read_slurm_env
from ..state import RestoreOptions, TrainState
from .fileio import SyncedWriter, fsync_dir, open_nofollow, write_atomic
from .formats import DCP_FORMAT, FORMATS, CheckpointFormat, file_records, verify_file
from .manifest import MANIFEST, Checkpoint, FileRecord, combined_checksum
from .registry import CHECKPOINTS, CLAIM_PREFIX, OWNER, LockMode, Registry, warn
from .retention import KeepBest, Mode, check_keep_last, ranked, to_delete

CheckpointRef = Checkpoint | int | str | None
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class CheckpointStore:
    """Checkpoints of one run directory.

    ``keep_last`` newest checkpoints are kept (None: all); ``keep_best=(metric, "min"|"max", K)`` also
    keeps the K best by a metric. The newest, the best and tagged checkpoints are never deleted.
    ``metadata`` (hyper-parameters, a git commit...) is written into every manifest.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        keep_last: int | None = 3,
        keep_best: KeepBest | tuple[str, str, int] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        format: str = "torch",
        lock: LockMode = "auto",
        lock_timeout: float = 300.0,
        create: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir).expanduser().absolute()
        self.keep_last = check_keep_last(keep_last)
        self.keep_best = KeepBest.parse(keep_best)
        self.metadata = dict(metadata or {})
        if format not in FORMATS:
            raise UsageError(f"Invalid checkpoint format {format!r}: expected one of {sorted(FORMATS)}")
        self.format: CheckpointFormat = FORMATS[format]
        _prepare_run_dir(self.run_dir, create=create)
        self.registry = Registry(self.run_dir, lock=lock, lock_timeout=lock_timeout)

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.run_dir)!r}, keep_last={self.keep_last}, keep_best={self.keep_best})"

    # -- saving -------------------------------------------------------------------------------------------
    def save(
        self,
        state: TrainState | Mapping[str, Any],
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        *,
        tag: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Checkpoint:
        """Save ``state`` and commit it; the returned checkpoint is durable and registered.

        ``state`` is a :class:`TrainState` (step and epoch default to its own) or a plain dict of tensors
        and plain values, saved as it is.
        """
        if isinstance(state, TrainState):
            step = state.step if step is None else step
            epoch = state.epoch if epoch is None else epoch
            # The file's own step and epoch agree with the manifest even when given explicitly here.
            payload: Mapping[str, Any] = {**state.state_dict(), "step": step, "epoch": 0 if epoch is None else epoch}
        elif isinstance(state, Mapping):
            payload = state
        else:
            raise UsageError(f"Cannot save a {type(state).__name__}: expected a TrainState or a dict")
        step = _whole("step", step)
        epoch = _whole("epoch", 0 if epoch is None else epoch)
        clean_metrics = _metrics(metrics)
        if self.format.name == DCP_FORMAT:
            if not isinstance(state, TrainState) or tag is not None or metadata:
                raise UsageError("a sharded (dcp) save takes a TrainState, without tag or metadata")
            from . import dcp as sharded

            return sharded.save(self, state, clean_metrics)
        if tag is not None and (not tag or not set(tag) <= _TAG_CHARS):
            raise UsageError(f"Invalid tag {tag!r}: expected letters, digits, '_', '.' or '-', e.g. 'pre-finetune'")

        previous = self._latest_quietly()
        tmp, draft, owner = self._write(
            payload, step, epoch, clean_metrics, tag, {**self.metadata, **(metadata or {})}, previous
        )
        try:
            checkpoint, _ = self.registry.commit(
                lambda seq: self._rename_into_place(tmp, draft, seq), self._select_deletions
            )
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(_save_failure(self.registry.checkpoint_dir, step, error, previous)) from error
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # not renamed: nothing was committed
            raise
        finally:
            owner.release()
        owner.forget(checkpoint.path)
        return checkpoint

    def _latest_quietly(self) -> Checkpoint | None:
        """The latest checkpoint for an error message; never the reason a save fails."""
        try:
            checkpoints = self.list()
        except Exception:
            return None
        return checkpoints[-1] if checkpoints else None

    def _write(
        self,
        payload: Mapping[str, Any],
        step: int,
        epoch: int,
        metrics: dict[str, float],
        tag: str | None,
        metadata: Mapping[str, Any],
        previous: Checkpoint | None = None,
    ) -> tuple[Path, Checkpoint, _Owner]:
        """Step 1 of the commit protocol: the files, durable in a temporary directory that this process holds
        a lock on while it writes. Returns the directory, the checkpoint's record under its intended final
        name, and the lock (release it once the directory is renamed or removed)."""
        started = time.perf_counter()
        self.registry.clean_temporaries()
        tmp = self.registry.checkpoint_dir / self.registry.temporary_name(step, secrets.token_hex(4))
        owner = _Owner(None)
        try:
            owner = _Owner.create(tmp)
            files = tuple(self.format.write(payload, tmp))
            checkpoint = self._describe(tmp, files, step, epoch, metrics, tag, metadata, self.format.name, started)
            return tmp, checkpoint, owner
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            owner.release()
            raise StoreError(_save_failure(self.registry.checkpoint_dir, step, error, previous)) from error
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            owner.release()
            raise

    def _describe(
        self,
        tmp: Path,
        files: tuple[FileRecord, ...],
        step: int,
        epoch: int,
        metrics: dict[str, float],
        tag: str | None,
        metadata: Mapping[str, Any],
        format_name: str,
        started: float,
    ) -> Checkpoint:
        """Step 2: the checkpoint's record (written as ``tmp``'s manifest at the commit, with its number)."""
        slurm = read_slurm_env(os.environ)
        checkpoint = Checkpoint(
            name=self._final_path(step).name,
            path=self._final_path(step),
            step=step,
            epoch=epoch,
            metrics=metrics,
            size=sum(f.size for f in files),
            created=time.time(),
            checksum=combined_checksum(files),
            files=files,
            format=format_name,
            tag=tag,
            host=socket.gethostname(),
            job_id=slurm.job_id,
            array_job_id=slurm.array_job_id,
            array_task_id=slurm.array_task_id,
            save_seconds=time.perf_counter() - started,
            versions=_versions(),
            metadata=metadata,
        )
        return checkpoint

    def _commit_directory(
        self,
        tmp: Path,
        owner: _Owner,
        step: int,
        epoch: int,
        metrics: dict[str, float],
        format_name: str,
        started: float,
    ) -> Checkpoint:
        """Steps 2-4 for files that other processes wrote into ``tmp`` (a sharded save's ranks)."""
        try:
            files = tuple(file_records(tmp))
            draft = self._describe(tmp, files, step, epoch, metrics, None, self.metadata, format_name, started)
            checkpoint, _ = self.registry.commit(
                lambda seq: self._rename_into_place(tmp, draft, seq), self._select_deletions
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            owner.release()
        owner.forget(checkpoint.path)
        return checkpoint

    def newest_valid(self, skip: Collection[str] = ()) -> Checkpoint | None:
        """The newest checkpoint whose files verify (a corrupt newer one is warned about and skipped), of
        those not named in ``skip`` (found corrupt when read)."""
        problems = []
        for checkpoint in reversed(self.list()):
            if checkpoint.name in skip:
                continue
            try:
                return self.verify(checkpoint)
            except CheckpointNotFoundError:
                continue
            except CorruptCheckpointError as error:
                warn(f"checkpoint {checkpoint.name} is corrupt, trying an older one: {error}")
                problems.append(f"{checkpoint.name}: {error}")
        if problems:
            raise CorruptCheckpointError(f"every checkpoint in {self.run_dir} is corrupt: " + "; ".join(problems))
        return None

    def _rename_into_place(self, tmp: Path, checkpoint: Checkpoint, seq: int) -> Checkpoint:
        """Step 3, under the registry lock: write the manifest durably, with the commit sequence number
        ``seq`` the registry assigned, and rename ``tmp`` to a free final name. The commit point."""
        suffix = 0
        while True:
            final = checkpoint.path if suffix == 0 else checkpoint.path.with_name(f"{checkpoint.path.name}.{suffix}")
            named = _with(checkpoint, name=final.name, path=final, seq=seq)
            write_atomic(tmp / MANIFEST, _json(named.manifest()))  # it names its directory and its number
            try:
                # A rename onto an existing non-empty directory fails: a second save of one step takes the
                # next suffix instead of replacing the first.
                os.rename(tmp, final)
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY) and _manifest_created(final) != checkpoint.created:
                    suffix += 1
                    continue
                if not (_manifest_created(final) == checkpoint.created and not tmp.exists()):
                    raise
                # The rename went through and its answer was lost (NFS retransmits it, then says ENOENT).
            try:
                fsync_dir(self.registry.checkpoint_dir)
            except OSError as error:
                warn(
                    f"checkpoint {final.name} is committed, but syncing {self.registry.checkpoint_dir} failed "
                    f"({error.strerror or error}): it may not survive a power loss of the file server"
                )
            return named

    def _final_path(self, step: int) -> Path:
        return self.registry.checkpoint_dir / f"step_{step:09d}"

    def _select_deletions(self, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
        return to_delete(checkpoints, self.keep_last, self.keep_best)

    # -- finding ------------------------------------------------------------------------------------------
    def list(self) -> list[Checkpoint]:
        """Committed checkpoints, oldest first."""
        return self.registry.checkpoints()

    def latest(self) -> Checkpoint | None:
        """The newest committed checkpoint whose files are all present at their recorded sizes, or None.

        Checksums are verified when loading (:meth:`load`), which falls back to an older checkpoint if the
        newest turns out corrupt.
        """
        for checkpoint in reversed(self.list()):
            problem = _quick_problem(checkpoint)
            if problem is None:
                return checkpoint
            warn(f"checkpoint {checkpoint.name} is unusable ({problem}); using an older one")
        return None

    def best(self, metric: str, mode: Mode = "min") -> Checkpoint | None:
        """The checkpoint with the lowest (``min``) or highest (``max``) recorded ``metric``, or None."""
        if mode not in ("min", "max"):
            raise UsageError(f"Invalid mode {mode!r}: expected 'min' or 'max'")
        candidates = ranked(self.list(), metric, mode)
        return candidates[0] if candidates else None

    def get(self, ref: Checkpoint | int | str) -> Checkpoint:
        """A checkpoint by step number (the newest at that step), name, or record of this store."""
        checkpoints = self.list()
        if isinstance(ref, Checkpoint):
            matches = [c for c in checkpoints if c.name == ref.name and c.path == ref.path]
            what = f"checkpoint {ref.name} at {ref.path}"
        elif isinstance(ref, bool) or not isinstance(ref, int | str):
            raise UsageError(f"Invalid checkpoint {ref!r}: expected a step number, a name or a Checkpoint")
        elif isinstance(ref, int):
            matches = [c for c in checkpoints if c.step == ref]
            what = f"checkpoint at step {ref}"
        else:
            matches = [c for c in checkpoints if c.name == ref]
            what = f"checkpoint named {ref!r}"
        if not matches:
            steps = ", ".join(str(c.step) for c in checkpoints[-10:]) or "none"
            raise CheckpointNotFoundError(f"no {what} in {self.run_dir}; latest steps available: {steps}")
        return matches[-1]

    # -- checking and loading ---------------------------------------------------------------------------
    def verify(self, ckpt: CheckpointRef = None) -> Checkpoint:
        """Check every file of a checkpoint against its manifest (size and checksum).

        Raises :class:`CorruptCheckpointError` naming the file and what is wrong, and
        :class:`CheckpointNotFoundError` when the checkpoint was deleted (by retention) meanwhile.
        """
        checkpoint = ckpt if isinstance(ckpt, Checkpoint) else self._require(ckpt)
        try:
            for record in checkpoint.files:
                verify_file(checkpoint.path / record.name, record)
        except CorruptCheckpointError:
            if not checkpoint.path.exists():
                raise CheckpointNotFoundError(
                    f"checkpoint {checkpoint.name} was deleted (by retention) while it was being read"
                ) from None
            raise
        return checkpoint

    def load(
        self,
        ckpt: CheckpointRef = None,
        map_location: Any = "cpu",
        *,
        unsafe_allow_pickle: bool = False,
        mmap: bool = True,
    ) -> dict[str, Any]:
        """The saved state dict, verified first. ``ckpt`` None means the latest valid checkpoint: a corrupt
        newest one gives a warning and the previous valid one is loaded. A named checkpoint that is missing
        or corrupt raises. With ``mmap`` (the default) tensors map the checkpoint file instead of copying
        it: fast, but they keep the file in use while they live; pass ``mmap=False`` to copy."""
        return self.load_checkpoint(ckpt, map_location, unsafe_allow_pickle=unsafe_allow_pickle, mmap=mmap)[1]

    def load_checkpoint(
        self,
        ckpt: CheckpointRef = None,
        map_location: Any = "cpu",
        *,
        unsafe_allow_pickle: bool = False,
        mmap: bool = True,
    ) -> tuple[Checkpoint, dict[str, Any]]:
        """Like :meth:`load`, also returning which checkpoint was loaded."""
        if ckpt is not None:
            checkpoint = self.get(ckpt)
            return checkpoint, self._read_verified(checkpoint, map_location, unsafe_allow_pickle, mmap)
        problems: list[str] = []
        for _attempt in range(10):  # a listing goes stale when retention deletes while we read
            checkpoints = self.list()
            if not checkpoints:
                break
            stale = False
            for checkpoint in reversed(checkpoints):
                if any(checkpoint.name in p for p in problems):
                    continue
                try:
                    return checkpoint, self._read_verified(checkpoint, map_location, unsafe_allow_pickle, mmap)
                except CheckpointNotFoundError:
                    stale = True  # deleted meanwhile: list again rather than fall back to something older
                    break
                except CorruptCheckpointError as error:
                    warn(f"checkpoint {checkpoint.name} is corrupt, trying an older one: {error}")
                    problems.append(f"{checkpoint.name}: {error}")
            if not stale:
                break
        if problems:
            raise CorruptCheckpointError(f"every checkpoint in {self.run_dir} is corrupt: " + "; ".join(problems))
        raise CheckpointNotFoundError(f"no checkpoint in {self.run_dir} yet")

    def _read_verified(
        self, checkpoint: Checkpoint, map_location: Any, unsafe_allow_pickle: bool, mmap: bool
    ) -> dict[str, Any]:
        self.verify(checkpoint)
        try:
            return self.format_of(checkpoint).read(
                checkpoint, map_location, weights_only=not unsafe_allow_pickle, mmap=mmap
            )
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"checkpoint {checkpoint.name} was deleted (by retention) while it was being read"
            ) from None

    def restore(
        self,
        state: TrainState,
        ckpt: CheckpointRef = None,
        options: RestoreOptions | None = None,
        map_location: Any = "cpu",
    ) -> Checkpoint | None:
        """Load a checkpoint into ``state``. With ``ckpt`` None on a run with nothing saved yet, returns
        None and leaves ``state`` as it is (a first run starts fresh, quietly). The state is copied, not
        mapped: the objects restored into keep no checkpoint file in use."""
        from ..distributed import world

        if world()[1] > 1 or self.format.name == DCP_FORMAT:
            # Every rank restores the checkpoint rank 0 chose, whatever each one sees on a shared filesystem.
            from . import dcp as sharded

            skip: list[str] = []  # found corrupt when read: the same on every rank (DCP's errors are collective)
            while True:
                chosen = sharded.choose(self, ckpt, skip)
                if chosen is None:
                    if skip:
                        raise CorruptCheckpointError(f"every checkpoint in {self.run_dir} is corrupt: {skip}")
                    return None
                if chosen.format != DCP_FORMAT:
                    break
                try:
                    sharded.load_into(state, chosen, options or RestoreOptions())
                except CorruptCheckpointError as error:
                    if ckpt is not None:
                        raise
                    warn(f"checkpoint {chosen.name} is corrupt, trying an older one: {error}")
                    skip.append(chosen.name)
                    continue
                return chosen
            if world()[1] > 1:
                checkpoint, payload = self.load_checkpoint(chosen, map_location, mmap=False)
                sharded.load_full_into(state, payload, options or RestoreOptions())
                return checkpoint
            ckpt = chosen
        elif ckpt is None and not self.list():
            return None
        checkpoint, payload = self.load_checkpoint(ckpt, map_location, mmap=False)
        state.load_state_dict(payload, options or RestoreOptions())
        return checkpoint

    def export(
        self, out: str | os.PathLike[str], ckpt: CheckpointRef = None, *, weights_only: bool = False
    ) -> tuple[Path, Checkpoint]:
        """Write a checkpoint as one plain ``torch.load``-able file (only the model's weights when
        ``weights_only``), atomically. Returns the file's path and the checkpoint it came from."""
        import torch

        checkpoint, state = self.load_checkpoint(ckpt)
        if weights_only:
            if "model" not in state:
                raise StoreError(
                    f"checkpoint {checkpoint.name} has no 'model' entry to export (its keys: "
                    f"{', '.join(sorted(map(str, state)))}); export it whole instead"
                )
            state = state["model"]
        target = Path(out).expanduser().absolute()
        if target.is_dir():
            raise UsageError(f"Invalid --out {str(target)!r}: it is a directory; expected a file path")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        writer = None
        try:
            writer = SyncedWriter(tmp, checksum=False)
            torch.save(state, writer)  # type: ignore[arg-type]
            writer.close()
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException as error:
            if writer is not None:
                writer.abort()
            tmp.unlink(missing_ok=True)
            failed = writer.failed if writer is not None and writer.failed is not None else error
            if isinstance(failed, OSError):
                raise StoreError(f"could not write {target}: {failed.strerror or failed}") from error
            raise
        return target, checkpoint

    def format_of(self, checkpoint: Checkpoint) -> CheckpointFormat:
        try:
            return FORMATS[checkpoint.format]
        except KeyError:
            raise CorruptCheckpointError(
                f"{checkpoint.path}: format {checkpoint.format!r} is unknown to hpcckpt {__version__}"
            ) from None

    def _require(self, ckpt: CheckpointRef) -> Checkpoint:
        if ckpt is not None:
            return self.get(ckpt)
        latest = self.latest()
        if latest is None:
            raise CheckpointNotFoundError(f"no checkpoint in {self.run_dir} yet")
        return latest


def _prepare_run_dir(run_dir: Path, *, create: bool) -> None:
    """Check (and with ``create``, make) the run directory, so a bad one fails before any training."""
    try:
        exists, is_dir = run_dir.exists(), run_dir.is_dir()
    except OSError as error:
        raise StoreError(f"cannot access run directory {run_dir}: {error.strerror or error}") from None
    if not exists:
        if not create:
            raise StoreError(f"run directory {run_dir} does not exist")
        try:
            (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            fsync_dir(run_dir)  # the new directories survive a power loss before the first save counts
            fsync_dir(run_dir.parent)
        except OSError as error:
            raise StoreError(f"cannot create run directory {run_dir}: {error.strerror or error}") from None
        return
    if not is_dir:
        raise StoreError(f"run directory {run_dir} is not a directory")
    if not create:
        return
    try:
        (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
        probe = run_dir / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        os.close(open_nofollow(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        probe.unlink()
    except OSError as error:
        raise StoreError(f"run directory {run_dir} is not writable: {error.strerror or error}") from None


def _quick_problem(checkpoint: Checkpoint) -> str | None:
    for record in checkpoint.files:
        try:
            size = (checkpoint.path / record.name).stat().st_size
        except FileNotFoundError:
            return f"{record.name} is missing"
        if size != record.size:
            return f"{record.name} has {size} bytes, the manifest says {record.size}"
    return None


def _whole(name: str, value: Any) -> int:
    try:
        number = operator.index(value)  # int, and NumPy or torch integers
    except TypeError:
        number = -1
    if isinstance(value, bool) or number < 0:
        raise UsageError(f"Invalid {name}={value!r}: expected a whole number >= 0")
    return number


def _metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    clean = {}
    for key, value in (metrics or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"Invalid metric {key}={value!r}: expected a number") from None
        if not isinstance(key, str) or not key:
            raise UsageError(f"Invalid metric name {key!r}: expected a non-empty string")
        if not math.isfinite(number):
            # A diverged loss must not stop the save that preserves the run; it is left out of the record
            # (JSON has no NaN) and so out of keep_best's ranking.
            warn(f"metric {key}={number} is not finite; saved without it")
            continue
        clean[key] = number
    return clean


def _versions() -> dict[str, str]:
    import torch

    return {"hpcckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, indent=1, default=str, allow_nan=True).encode()


def _with(checkpoint: Checkpoint, **changes: Any) -> Checkpoint:
    return dataclasses.replace(checkpoint, **changes)


def _save_failure(checkpoint_dir: Path, step: int, error: OSError, previous: Checkpoint | None) -> str:
    kept = f"the previous checkpoint (step {previous.step}) is intact" if previous else "nothing was saved before"
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (disk full, quota or file-size limit)"
    return f"could not save step {step} into {checkpoint_dir}: {reason}; {kept}"


def _manifest_created(directory: Path) -> float | None:
    try:
        return float(json.loads((directory / MANIFEST).read_bytes())["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _Owner:
    """A lock on ``.owner`` inside a temporary checkpoint directory, held while it is written, so that a
    cleaner on any host (NFSv4, Lustre with flock) can tell a live writer from a dead one."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def create(cls, tmp: Path) -> _Owner:
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
