"""The checkpoint store: save a training state durably, find the latest or best one, load it back.

Commit protocol of :meth:`CheckpointStore.save` (a crash at any instant leaves the previous or the new
checkpoint as the latest, never a partial one):

1. write the files into ``checkpoints/.tmp-<step>-<host>-<pid>-<token>/``, fsyncing each;
2. write ``manifest.json`` there (files, sizes, CRC-32s, step, epoch, metrics, versions, Slurm ids,
   user metadata) and fsync the directory;
3. rename the directory to its final name ``step_<step>`` and fsync ``checkpoints/`` -- the commit point;
4. record it in the registry under the lock; only then apply retention.

A failed save (disk full, quota) removes its temporary directory and raises :class:`StoreError`; the
previous checkpoints are untouched. Loading always uses ``torch.load(weights_only=True)`` unless the caller
passes ``unsafe_allow_pickle=True`` by name.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import platform
import secrets
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._version import __version__
from .checkpoint import MANIFEST, Checkpoint, combined_checksum
from .errors import CheckpointNotFoundError, CorruptCheckpointError, StoreError, UsageError
from .fileio import fsync_dir, write_atomic
from .formats import FORMATS, CheckpointFormat, verify_file
from .registry import CHECKPOINTS, LockMode, Registry, warn
from .retention import KeepBest, Mode, check_keep_last, ranked, to_delete
from .slurmenv import read_slurm_env
from .state import RestoreOptions, TrainState

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
        if tag is not None and (not tag or not set(tag) <= _TAG_CHARS):
            raise UsageError(f"Invalid tag {tag!r}: expected letters, digits, '_', '.' or '-', e.g. 'pre-finetune'")

        tmp, draft = self._write(payload, step, epoch, clean_metrics, tag, {**self.metadata, **(metadata or {})})
        try:
            checkpoint, _ = self.registry.commit(lambda: self._rename_into_place(tmp, draft), self._select_deletions)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(self._save_failure(step, error)) from error
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # not renamed: nothing was committed
            raise
        return checkpoint

    def _write(
        self,
        payload: Mapping[str, Any],
        step: int,
        epoch: int,
        metrics: dict[str, float],
        tag: str | None,
        metadata: Mapping[str, Any],
    ) -> tuple[Path, Checkpoint]:
        """Steps 1-2 of the commit protocol: the files and manifest, durable in a temporary directory.
        Returns that directory and the checkpoint's record under its intended final name."""
        started = time.perf_counter()
        self.registry.clean_temporaries()
        tmp = self.registry.checkpoint_dir / self.registry.temporary_name(step, secrets.token_hex(4))
        try:
            tmp.mkdir()
            files = tuple(self.format.write(payload, tmp))
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
                format=self.format.name,
                tag=tag,
                host=socket.gethostname(),
                job_id=slurm.job_id,
                array_job_id=slurm.array_job_id,
                array_task_id=slurm.array_task_id,
                save_seconds=time.perf_counter() - started,
                versions=_versions(),
                metadata=metadata,
            )
            write_atomic(tmp / MANIFEST, _json(checkpoint.manifest()))
            return tmp, checkpoint
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(self._save_failure(step, error)) from error
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _rename_into_place(self, tmp: Path, checkpoint: Checkpoint) -> Checkpoint:
        """Step 3, under the registry lock: rename ``tmp`` to a free final name. The commit point."""
        suffix = 0
        while True:
            final = checkpoint.path if suffix == 0 else checkpoint.path.with_name(f"{checkpoint.path.name}.{suffix}")
            named = _with(checkpoint, name=final.name, path=final)
            if suffix:  # the manifest names its directory
                write_atomic(tmp / MANIFEST, _json(named.manifest()))
            try:
                # A rename onto an existing non-empty directory fails: a second save of one step takes the
                # next suffix instead of replacing the first.
                os.rename(tmp, final)
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    suffix += 1
                    continue
                raise
            fsync_dir(self.registry.checkpoint_dir)
            return named

    def _final_path(self, step: int) -> Path:
        return self.registry.checkpoint_dir / f"step_{step:09d}"

    def _select_deletions(self, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
        return to_delete(checkpoints, self.keep_last, self.keep_best)

    def _save_failure(self, step: int, error: OSError) -> str:
        previous = self.latest()
        kept = f"the previous checkpoint (step {previous.step}) is intact" if previous else "nothing was saved before"
        reason = error.strerror or str(error)
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            reason += " (disk full, quota or file-size limit)"
        return f"could not save step {step} into {self.registry.checkpoint_dir}: {reason}; {kept}"

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
        """Check every file of a checkpoint against its manifest (size and CRC-32).

        Raises :class:`CorruptCheckpointError` naming the file and what is wrong.
        """
        checkpoint = self._require(ckpt)
        for record in checkpoint.files:
            verify_file(checkpoint.path / record.name, record)
        return checkpoint

    def load(
        self, ckpt: CheckpointRef = None, map_location: Any = "cpu", *, unsafe_allow_pickle: bool = False
    ) -> dict[str, Any]:
        """The saved state dict, verified first. ``ckpt`` None means the latest valid checkpoint: a corrupt
        newest one gives a warning and the previous valid one is loaded. A named checkpoint that is missing
        or corrupt raises."""
        return self.load_checkpoint(ckpt, map_location, unsafe_allow_pickle=unsafe_allow_pickle)[1]

    def load_checkpoint(
        self, ckpt: CheckpointRef = None, map_location: Any = "cpu", *, unsafe_allow_pickle: bool = False
    ) -> tuple[Checkpoint, dict[str, Any]]:
        """Like :meth:`load`, also returning which checkpoint was loaded."""
        if ckpt is not None:
            checkpoint = self.verify(self.get(ckpt))
            return checkpoint, self.format_of(checkpoint).read(
                checkpoint, map_location, weights_only=not unsafe_allow_pickle
            )
        checkpoints = self.list()
        if not checkpoints:
            raise CheckpointNotFoundError(f"no checkpoint in {self.run_dir} yet")
        problems = []
        for checkpoint in reversed(checkpoints):
            try:
                self.verify(checkpoint)
                state = self.format_of(checkpoint).read(checkpoint, map_location, weights_only=not unsafe_allow_pickle)
            except CorruptCheckpointError as error:
                warn(f"checkpoint {checkpoint.name} is corrupt, trying an older one: {error}")
                problems.append(str(error))
                continue
            return checkpoint, state
        raise CorruptCheckpointError(f"every checkpoint in {self.run_dir} is corrupt: " + "; ".join(problems))

    def restore(
        self,
        state: TrainState,
        ckpt: CheckpointRef = None,
        options: RestoreOptions | None = None,
        map_location: Any = "cpu",
    ) -> Checkpoint | None:
        """Load a checkpoint into ``state``. With ``ckpt`` None on a run with nothing saved yet, returns
        None and leaves ``state`` as it is (a first run starts fresh, quietly)."""
        if ckpt is None and not self.list():
            return None
        checkpoint, payload = self.load_checkpoint(ckpt, map_location)
        state.load_state_dict(payload, options or RestoreOptions())
        return checkpoint

    def export(self, out: str | os.PathLike[str], ckpt: CheckpointRef = None, *, weights_only: bool = False) -> Path:
        """Write a checkpoint as one plain ``torch.load``-able file (only the model's weights when
        ``weights_only``), atomically. Returns the file's path."""
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
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"could not write {target}: {error.strerror or error}") from error
        fsync_dir(target.parent)
        return target

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
        probe.write_bytes(b"")
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
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"Invalid {name}={value!r}: expected a whole number >= 0")
    return value


def _metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    clean = {}
    for key, value in (metrics or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"Invalid metric {key}={value!r}: expected a number") from None
        if not isinstance(key, str) or not key or math.isinf(number):
            raise UsageError(f"Invalid metric {key!r}={value!r}: expected a name and a finite number")
        clean[key] = number
    return clean


def _versions() -> dict[str, str]:
    import torch

    return {"hpcckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, indent=1, default=str, allow_nan=True).encode()


def _with(checkpoint: Checkpoint, **changes: Any) -> Checkpoint:
    return dataclasses.replace(checkpoint, **changes)
