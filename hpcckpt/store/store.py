"""The checkpoint store: save a training state durably, find the latest or best one, load it back.

A save goes through its format (the store's, by name: :mod:`hpcckpt.store.formats`), which writes its files
through one save transaction (:mod:`hpcckpt.store.transaction`): a crash at any instant leaves the previous
or the new checkpoint as the latest, never a partial one. A failed save (disk full, quota) removes its
temporary directory and raises :class:`StoreError`; the previous checkpoints are untouched. Loading and
restoring go through the format a checkpoint's manifest names; they always use
``torch.load(weights_only=True)`` unless the caller passes ``unsafe_allow_pickle=True`` by name.

The registry, the transaction and the formats read no environment variable: the lock mode and the job's
ids are arguments. ``CheckpointStore``'s constructor is where a user's own script starts, so it is an entry
point: a ``lock`` or ``job`` left out is read there, once, from ``HPCCKPT_LOCK`` and Slurm's variables
(``Run``, the ``hpcckpt`` commands and the chain's task guard pass them from the environment they were given).
"""

from __future__ import annotations

import logging
import math
import operator
import os
import secrets
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, overload

from .._version import __version__
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, StoreError, UsageError, ValidationFailedError
from ..progress import Progress
from ..rundir import CHECKPOINTS
from ..slurm.env import read_slurm_env
from ..state import RestoreOptions, TrainState
from .asyncsave import BackgroundSave, SaveHandle, Staging
from .export import EXPORT_FORMATS, write_export
from .fileio import fsync_dir, open_nofollow
from .formats import DCP_FORMAT, FORMATS, CheckpointFormat, CheckpointRef, writing_format
from .journal import Instance
from .manifest import Checkpoint, verify_file
from .mirror import DEFAULT_KEEP_LAST as DEFAULT_MIRROR_KEEP_LAST
from .mirror import Mirror, describe_failure
from .provenance import check_hparams, warn_other_torch
from .registry import LockMode, Registry, lock_mode, warn
from .retention import KeepBest, Mode, check_keep_last, ranked, to_delete
from .transaction import JobIds, SaveRequest
from .uploads import Uploads
from .validation import Validate, check_validate, restore_validated

log = logging.getLogger("hpcckpt")
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class CheckpointStore:
    """Checkpoints of one run directory.

    ``keep_last`` newest checkpoints are kept (None: all); ``keep_best=(metric, "min"|"max", K)`` also
    keeps the K best by a metric. The newest, the best and tagged checkpoints are never deleted.
    ``metadata`` (any values) and ``hparams`` (the hyper-parameters, JSON values) are written into every
    manifest, with the command line and the git commit of the working directory (:mod:`.provenance`). ``format`` names
    how checkpoints are written (``"tensors"``, the default: one file, raw tensor bytes and a JSON index, no
    pickle; ``"torch"``: one ``torch.save`` file; ``"dcp"``: sharded, saved by every rank together); a
    checkpoint is always read by the format its manifest names.
    ``lock`` is the registry's lock mode (``"auto"``: fcntl, a marker file where the filesystem refuses
    fcntl locks; ``"fcntl"``; ``"soft"``: the marker; left out: ``HPCCKPT_LOCK``, else ``"auto"``) and
    ``lock_timeout`` how long to wait for it. ``job`` is the batch job saving, whose ids go into every
    manifest (left out: this process's Slurm job, from its environment; ``read_slurm_env({})`` for none);
    ``create`` makes the run directory when it does not exist. ``async_staging_bytes`` bounds the host
    memory an async save (``save(..., blocking=False)``) may stage a state in (default: a quarter of this
    machine's memory); a larger state is saved synchronously, with a warning the first time.
    ``mirror`` is a second place every commit is copied to in the background (a path, ``file:///path``,
    ``s3://bucket/prefix``, ``gs://...``; :mod:`hpcckpt.store.mirror`), with its own retention
    (``mirror_keep_last``, default 3; ``mirror_keep_best``); ``uploads`` is then its upload thread (None
    without a mirror), and :meth:`restore` takes the mirror's newest valid checkpoint when this run
    directory has none.
    ``compression="zstd"`` compresses what the ``tensors`` format writes, at ``compression_level`` (1-22;
    needs ``hpcckpt[zstd]``); off by default. Any checkpoint loads whatever this setting.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        keep_last: int | None = 3,
        keep_best: KeepBest | tuple[str, str, int] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        hparams: Mapping[str, Any] | None = None,
        format: str = "tensors",
        lock: LockMode | None = None,
        lock_timeout: float = 300.0,
        create: bool = True,
        job: JobIds | None = None,
        async_staging_bytes: int | None = None,
        mirror: str | None = None,
        mirror_keep_last: int | None = DEFAULT_MIRROR_KEEP_LAST,
        mirror_keep_best: KeepBest | tuple[str, str, int] | None = None,
        compression: str | None = None,
        compression_level: int = 3,
    ) -> None:
        self.run_dir = Path(run_dir).expanduser().absolute()
        self.keep_last = check_keep_last(keep_last)
        self.keep_best = KeepBest.parse(keep_best)
        self.metadata = dict(metadata or {})
        self.hparams = check_hparams(hparams)
        # The constructor is a user's entry point: what the caller leaves out comes from the environment,
        # read here once (as before issue 12), never deeper in the store.
        self.job = read_slurm_env(os.environ) if job is None else job
        if lock is None:
            lock = lock_mode(os.environ)
        self.format: CheckpointFormat = writing_format(format, compression, compression_level)
        # Checked before anything is written: a bad mirror URL is a usage error, not a half-made run.
        self.mirror = None if not mirror else Mirror(mirror, keep_last=mirror_keep_last, keep_best=mirror_keep_best)
        _prepare_run_dir(self.run_dir, create=create)
        self.registry = Registry(self.run_dir, lock=lock, lock_timeout=lock_timeout)
        self.staging = Staging(_default_staging_bytes() if async_staging_bytes is None else async_staging_bytes)
        self._in_flight: SaveHandle | None = None
        self._warned_over_staging = False
        self._rejected: set[Instance] = set()  # failed validation here, even where marking them bad failed
        self.uploads: Uploads | None = None
        if self.mirror is not None:
            self.uploads = Uploads(self.mirror, self.list, self.registry.append_event)

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.run_dir)!r}, keep_last={self.keep_last}, keep_best={self.keep_best})"

    # -- saving -------------------------------------------------------------------------------------------
    @overload
    def save(
        self,
        state: TrainState | Mapping[str, Any],
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        *,
        tag: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        blocking: Literal[True] = True,
    ) -> Checkpoint: ...

    @overload
    def save(
        self,
        state: TrainState | Mapping[str, Any],
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        *,
        tag: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        blocking: Literal[False],
    ) -> SaveHandle: ...

    def save(
        self,
        state: TrainState | Mapping[str, Any],
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        *,
        tag: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        blocking: bool = True,
    ) -> Checkpoint | SaveHandle:
        """Save ``state`` and commit it; the returned checkpoint is durable and registered.

        ``state`` is a :class:`TrainState` (step and epoch default to its own) or a plain dict of tensors
        and plain values, saved as it is.

        With ``blocking=False`` this returns once the state is copied (a snapshot: what training changes
        afterwards is not saved) and a background thread persists and commits it; the returned handle's
        ``wait()`` gives the checkpoint or raises the background error. One save at a time: a save of
        either kind first waits for the one in flight (its failure stays on its handle, and is warned about).
        """
        request = self._request(state, step, epoch, metrics, tag, metadata)
        self._settle_in_flight()
        if blocking:
            checkpoint = self.format.save(request, state)
            self.upload_to_mirror(checkpoint)
            return checkpoint
        self.upload_to_mirror(None)  # failed uploads are retried at the next save
        handle = self._save_in_background(request, state)
        self._in_flight = handle
        return handle

    def upload_to_mirror(self, committed: Checkpoint | None) -> None:
        """Queue a commit (and what the mirror lacks: failed uploads, a previous task's) for the mirror's
        upload thread; returns at once. Nothing without a mirror; only rank 0 uploads (the checkpoint
        directory is on a shared filesystem)."""
        if self.uploads is not None:
            from ..distributed import world

            if world()[0] == 0:
                self.uploads.kick(committed)

    def _request(
        self,
        state: TrainState | Mapping[str, Any],
        step: int | None,
        epoch: int | None,
        metrics: Mapping[str, float] | None,
        tag: str | None,
        metadata: Mapping[str, Any] | None,
    ) -> SaveRequest:
        """The checked request for a save of ``state``; bad values raise before anything is written."""
        if isinstance(state, TrainState):
            step = state.step if step is None else step
            epoch = state.epoch if epoch is None else epoch
        elif not isinstance(state, Mapping):
            raise UsageError(f"Cannot save a {type(state).__name__}: expected a TrainState or a dict")
        request = SaveRequest(
            registry=self.registry,
            step=_whole("step", step),
            epoch=_whole("epoch", 0 if epoch is None else epoch),
            metrics=_metrics(metrics),
            retention=self._select_deletions,
            tag=tag,
            metadata={**self.metadata, **(metadata or {})},
            job=self.job,
            hparams=self.hparams,
        )
        self.format.check_save(state, tag, metadata)
        if tag is not None and (not tag or not set(tag) <= _TAG_CHARS):
            raise UsageError(f"Invalid tag {tag!r}: expected letters, digits, '_', '.' or '-', e.g. 'pre-finetune'")
        return request

    def _settle_in_flight(self) -> None:
        """Wait for the save in flight, if any: its staging buffers are about to be reused."""
        handle, self._in_flight = self._in_flight, None
        if handle is None:
            return
        try:
            handle.wait()
        except Exception as error:
            warn(f"the background save before this one failed (its handle raises it): {error}")

    def _save_in_background(self, request: SaveRequest, state: TrainState | Mapping[str, Any]) -> SaveHandle:
        """Snapshot ``state`` into the staging buffers here; persist and commit it on a thread. A format
        with its own ``save_async`` (the sharded one) does both itself."""
        save_async: Callable[..., SaveHandle] | None = getattr(self.format, "save_async", None)
        if save_async is not None:
            return save_async(request, state, self.staging)
        payload = request.payload(state)
        staged = self.staging.stage(payload)
        if staged is None:
            if not self._warned_over_staging:
                self._warned_over_staging = True
                warn(
                    f"the state is larger than async_staging_bytes={self.staging.limit}: saving it synchronously "
                    "(raise the bound to save it in the background)"
                )
            return BackgroundSave.finished(self.format.save(request, payload))
        ready, save, to_mirror = self.staging.ready, self.format.save, self.upload_to_mirror

        def persist() -> Checkpoint:
            ready()
            checkpoint = save(request, staged)
            to_mirror(checkpoint)
            return checkpoint

        return BackgroundSave.start(request.step, persist)

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

    def _select_deletions(self, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
        return to_delete(checkpoints, self.keep_last, self.keep_best)

    # -- finding ------------------------------------------------------------------------------------------
    def list(self, *, include_bad: bool = False) -> list[Checkpoint]:
        """Committed checkpoints, oldest first; those marked bad (failed validation) only with ``include_bad``."""
        listed = self.registry.checkpoints(include_bad=include_bad)
        if include_bad or not self._rejected:
            return listed
        return [c for c in listed if Instance.of(c) not in self._rejected]

    def reject(self, checkpoint: Checkpoint, reason: str) -> None:
        """Mark ``checkpoint`` bad (it failed validation, for ``reason``): never chosen again, kept on disk. Where
        the run directory cannot record it (read-only), this store still never chooses it, with a warning."""
        self._rejected.add(Instance.of(checkpoint))
        try:
            self.registry.mark_bad(checkpoint, reason)
        except (StoreError, OSError) as error:  # a full disk or quota (EDQUOT) included: review of issue 14
            warn(f"{error}; other processes may still choose it")

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
            bad = [c for c in self.list(include_bad=True) if c.step == ref or c.name == ref]
            if bad and not isinstance(ref, Checkpoint):
                raise CheckpointNotFoundError(
                    f"{what} in {self.run_dir} is marked bad (it failed validation: "
                    f"{self.registry.bad_reason(bad[-1]) or 'in this process'}); latest valid steps: {steps}"
                )
            raise CheckpointNotFoundError(f"no {what} in {self.run_dir}; latest steps available: {steps}")
        return matches[-1]

    # -- checking and loading ---------------------------------------------------------------------------
    def verify(self, ckpt: CheckpointRef = None, *, on_bytes: Callable[[int], None] | None = None) -> Checkpoint:
        """Check every file of a checkpoint against its manifest (size and checksum); ``on_bytes(n)`` is told
        of the bytes as they are read (a progress bar's ``update``).

        Raises :class:`CorruptCheckpointError` naming the file and what is wrong, and
        :class:`CheckpointNotFoundError` when the checkpoint was deleted (by retention) meanwhile.
        """
        checkpoint = ckpt if isinstance(ckpt, Checkpoint) else self._require(ckpt)
        try:
            for record in checkpoint.files:
                verify_file(checkpoint.path / record.name, record, on_bytes)
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
        reading = self.format_of(checkpoint)
        warn_other_torch(checkpoint)
        if not reading.verifies_read(mmap=mmap):
            self.verify(checkpoint)
        try:
            return reading.read(checkpoint, map_location, weights_only=not unsafe_allow_pickle, mmap=mmap)
        except (FileNotFoundError, CorruptCheckpointError):
            if checkpoint.path.exists():
                raise
            raise CheckpointNotFoundError(
                f"checkpoint {checkpoint.name} was deleted (by retention) while it was being read"
            ) from None

    def restore(
        self,
        state: TrainState,
        ckpt: CheckpointRef = None,
        options: RestoreOptions | None = None,
        map_location: Any = "cpu",
        *,
        validate: Validate | None = None,
    ) -> Checkpoint | None:
        """Load a checkpoint into ``state``. With ``ckpt`` None on a run with nothing saved yet, returns
        None and leaves ``state`` as it is (a first run starts fresh, quietly). The state is copied, not
        mapped: the objects restored into keep no checkpoint file in use.

        ``validate(state)`` checks the restored state (a forward pass on a fixed batch...), failing by raising
        or returning False: the checkpoint is then marked bad and the previous valid one restored, or, for a
        named ``ckpt`` or when none is left, :class:`ValidationFailedError` raised (:mod:`.validation`).

        With a mirror, when this run directory has no usable checkpoint (purged, a new node, or, in one
        process, every one corrupt or marked bad: with ranks that error is raised on every rank), the
        mirror's newest valid checkpoint is downloaded, verified, committed here
        and restored (an older one when it does not verify; never one whose checksum is marked bad here). A
        mirror that cannot be read raises :class:`StoreError` when nothing is here (the run never starts from
        scratch over progress the mirror may hold); a local corruption is then raised as it is."""
        from ..distributed import world

        # The ranks of a process group restore together what rank 0 chose: the sharded format's restore.
        restoring = self.format if world()[1] == 1 else FORMATS[DCP_FORMAT]
        options = options or RestoreOptions()
        check_validate(validate)  # before anything is pulled
        if ckpt is not None or self.mirror is None:
            return self._restore_with(restoring, state, ckpt, options, map_location, validate)
        if world()[1] > 1 or self.latest() is None:
            self._pull_if_empty()  # nothing here (purged, a new node): the mirror's newest valid one
        pulled_for_corruption = False
        while True:  # a pulled checkpoint that fails validation is marked bad here, and skipped by the next pull
            try:
                return self._restore_with(restoring, state, None, options, map_location, validate)
            except CorruptCheckpointError as error:
                if pulled_for_corruption or world()[1] > 1:
                    raise
                pulled_for_corruption = True
                if self._pull_from_mirror(f"every local checkpoint is corrupt ({error})") is None:
                    raise
            except ValidationFailedError:
                if world()[1] > 1 or self._pull_from_mirror("every local checkpoint failed validation") is None:
                    raise

    def _pull_if_empty(self) -> None:
        """Rank 0 pulls the mirror's newest valid checkpoint when this run directory has none usable; the
        other ranks wait for it, then all restore. A mirror that cannot be read is a :class:`StoreError` on
        every rank: with nothing here, it may be the only place the run's progress is."""
        from ..distributed import broadcast_object, world

        refused = None
        try:
            if world()[0] == 0 and self.latest() is None:
                self._pull_from_mirror("the run directory has no checkpoint", nothing_here=True)
        except Exception as error:  # review of issue 14: whatever rank 0 meets, no rank is left in the broadcast
            refused = str(error) if isinstance(error, StoreError) else describe_failure(self._mirror_url(), error)
        refused = broadcast_object(refused)  # a barrier too: the pulled checkpoint is committed before any rank lists
        if refused is not None:
            raise StoreError(refused)

    def _mirror_url(self) -> str:
        return "" if self.mirror is None else self.mirror.url

    def _pull_from_mirror(self, why: str, *, nothing_here: bool = False) -> Checkpoint | None:
        """Download the mirror's newest checkpoint that verifies (an older one when it does not) and commit
        it here; None when the mirror has none. A mirror that cannot be read is said once and gives None,
        unless ``nothing_here``: then training from scratch could discard what the mirror holds (a purged
        run directory during an outage), so it raises :class:`StoreError` instead."""
        mirror = self.mirror
        assert mirror is not None
        try:
            with Progress(None, f"download from {mirror.url}") as bar:  # which one, and its size, are not known yet
                pulled = mirror.pull_newest(self, bar, skip=self._bad_here())
        except Exception as error:  # a backend's own errors (botocore's EndpointConnectionError, NoCredentialsError)
            # are no OSError: the review of issue 14 saw them escape raw after 10 s of retries
            if nothing_here:
                raise StoreError(
                    f"{describe_failure(mirror.url, error)}; {why} and the mirror may hold the run's progress, so "
                    "the run does not start from scratch: fix the mirror (the next task tries again), or train "
                    "without it (mirror='' or HPCCKPT_MIRROR='')"
                ) from None
            # Said once (the uploads would say it again): what this task does without the mirror.
            message = f"{describe_failure(mirror.url, error)}; {why}, so nothing could be restored from the mirror"
            if self.uploads is not None:
                self.uploads.warn_once(message)
            return None
        if pulled is not None:
            log.warning("hpcckpt: %s: resuming from the mirror %s (%s)", why, mirror.url, pulled.name)
        return pulled

    def _restore_with(
        self,
        restoring: CheckpointFormat,
        state: TrainState,
        ckpt: CheckpointRef,
        options: RestoreOptions,
        map_location: Any,
        validate: Validate | None,
    ) -> Checkpoint | None:
        """``restoring``'s restore, validated when ``validate`` is given (:mod:`.validation`)."""
        from ..distributed import world

        check = check_validate(validate)
        if check is None:
            checkpoint = restoring.restore(self, state, ckpt, options, map_location)
        else:
            checkpoint = restore_validated(self, self, restoring, state, ckpt, options, map_location, check)
        if checkpoint is not None and world()[1] > 1 and checkpoint.format == DCP_FORMAT:
            warn_other_torch(checkpoint)  # one-file checkpoints were checked as they were read
        return checkpoint

    def _bad_here(self) -> set[tuple[int, str]]:
        """(step, combined checksum) of each checkpoint here that failed validation: never pulled again."""
        return {
            (c.step, c.checksum)
            for c in self.list(include_bad=True)
            if Instance.of(c) in self._rejected or self.registry.bad_reason(c) is not None
        }

    def export(
        self,
        out: str | os.PathLike[str],
        ckpt: CheckpointRef = None,
        *,
        weights_only: bool = False,
        as_: str = "torch",
    ) -> tuple[Path, Checkpoint]:
        """Write a checkpoint as one file, atomically: ``as_="torch"``, a plain ``torch.load``-able file (only
        the model's weights when ``weights_only``); ``as_="safetensors"``, the model's weights as a
        ``.safetensors`` file (tensors that shared memory are written apart). Returns the file's path and the
        checkpoint it came from."""
        if as_ not in EXPORT_FORMATS:
            raise UsageError(f"Invalid export format {as_!r}: expected one of {', '.join(EXPORT_FORMATS)}")
        target = Path(out).expanduser().absolute()
        if target.is_dir():
            raise UsageError(f"Invalid --out {str(target)!r}: it is a directory; expected a file path")
        checkpoint, state = self.load_checkpoint(ckpt)
        if weights_only or as_ == "safetensors":
            if "model" not in state:
                raise StoreError(
                    f"checkpoint {checkpoint.name} has no 'model' entry to export (its keys: "
                    f"{', '.join(sorted(map(str, state)))}); export it whole instead"
                )
            state = state["model"]
        write_export(target, state, as_=as_, source=checkpoint.name)
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


def _default_staging_bytes() -> int:
    """A quarter of this machine's memory: room for a snapshot beside the training process's own."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):
        return 4 << 30


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
