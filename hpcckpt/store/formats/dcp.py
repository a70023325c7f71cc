"""The ``dcp`` format: sharded checkpoints on ``torch.distributed.checkpoint`` (DCP), saved and restored
by every rank of a process group together.

Saving, on every rank at the same step (a collective), through one save transaction:

1. rank 0 begins the transaction (its temporary directory) and tells the others the directory's name;
2. every rank writes its part with ``dcp.save`` (DCP writes each rank's ``__R_0.distcp`` and, on the
   coordinator, ``.metadata``; files are fsynced), each file checksummed while it is written
   (:mod:`.dcpwrite`: one pass, no file is read back);
3. the ranks tell each other whether they succeeded, and the name, size and checksum of every file they
   wrote; if any failed (or died: the collective fails), rank 0 aborts the transaction and every rank
   raises naming the failing ranks -- nothing was committed;
4. rank 0 commits the transaction with those records (manifest, rename, registry, retention) exactly as a
   one-file checkpoint is committed, then tells the others which checkpoint it committed.

In the background (:meth:`DcpFormat.save_async`, issue 13): step 1 as above, then in step 2 each rank only
snapshots its part to CPU (DCP's stager) and ``dcp.async_save`` persists it on a thread, over a gloo group of
its own (the training thread keeps the default group). Steps 3 and 4 happen in :meth:`AsyncDcpSave.wait`,
which is COLLECTIVE: every rank calls it at the same point (the next save or the stop), so rank 0 commits
only once every rank's part is durable, and a failure anywhere is raised on every rank. Until then the
previous checkpoint stays the latest and retention does not run; a rank killed meanwhile commits nothing.

Model and optimizer go through ``get_state_dict``/``set_state_dict``, so a DDP or FSDP model saves its
parameters under their plain names and a checkpoint loads at any world size (resharding is DCP's).
What differs per rank (RNG states, a DataLoader's place) is kept per rank; resumed at another world size,
those ranks that have no entry keep their fresh RNG (exact resume needs the same world size).

Restoring, whatever the store's format when a process group runs: rank 0 picks the newest checkpoint that
verifies and tells the others, so every rank loads the same one (never each its own view of a shared
filesystem); a one-file checkpoint is loaded whole on every rank and sharded into the model. A ``dcp``
checkpoint also loads in a single process (:meth:`DcpFormat.read`, ``CheckpointStore.load``) and exports
to one ``torch.load``-able file. Nothing in its files runs code when read: see :mod:`.dcpread`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import sys
import warnings
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ...distributed import broadcast_object, gather_object, world
from ...errors import CorruptCheckpointError, HpcckptError, StoreError, UsageError
from ...state import RestoreOptions, TrainState, capture_rng, restore_rng, unwrap_model
from ..manifest import Checkpoint, FileRecord
from ..registry import warn
from ..transaction import SaveRequest, SaveTransaction
from . import DCP_FORMAT as NAME
from . import CheckpointRef, CheckpointSource, restore_whole

PER_RANK = "per_rank"
REFUSED = "a sharded (dcp) save takes a TrainState, without tag or metadata"


# -- the payload --------------------------------------------------------------------------------------------
def payload(state: TrainState, step: int, epoch: int) -> dict[str, Any]:
    """What every rank hands to ``dcp.save``: the same keys on every rank, its own values."""
    import torch

    rank, _ = world()
    content: dict[str, Any] = {}
    if state.model is not None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        content["model"] = get_model_state_dict(state.model)  # type: ignore[arg-type]
        if state.optimizer is not None:
            content["optimizer"] = get_optimizer_state_dict(state.model, state.optimizer)  # type: ignore[arg-type]
    elif state.optimizer is not None:
        content["optimizer"] = state.optimizer.state_dict()
    for key in ("scheduler", "scaler"):
        value = getattr(state, key)
        if value is not None:
            content[key] = value.state_dict()
    content["extra"] = dict(state.extra)
    own = {"rng": capture_rng(), "loader_position": dict(state.loader_position)}
    buffer = io.BytesIO()
    torch.save(own, buffer)
    content[PER_RANK] = {f"rank{rank}": buffer.getvalue()}
    content["step"], content["epoch"] = int(step), int(epoch)
    content["hpcckpt"] = {"layout": 1, "format": NAME}
    return content


def load_into(state: TrainState, checkpoint: Checkpoint, options: RestoreOptions) -> None:
    """Every rank: load ``checkpoint`` into ``state`` (collective when a process group is running)."""
    import torch
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from . import dcpread

    rank, size = world()
    single = size == 1
    target = payload(state, state.step, state.epoch)
    own_key = f"rank{rank}"
    per_rank = target.pop(PER_RANK)
    if not options.model:
        target.pop("model", None)
    for key in ("optimizer", "scheduler", "scaler"):
        if not getattr(options, key):
            target.pop(key, None)
    # The metadata is read (restricted, see dcpread) by every rank before DCP; the ranks agree on the
    # outcome, so a refused checkpoint is refused by all of them together and none waits alone.
    files = [f.name for f in checkpoint.files]
    reader: Any = None
    refused: str | None = None
    try:
        reader = dcpread.reader(checkpoint.path, files)
    except CorruptCheckpointError as error:
        refused = str(error)
    except FileNotFoundError:
        refused = "deleted"
    problems = [p for p in gather_object(refused) if p]
    if problems:
        if problems[0] == "deleted":
            raise FileNotFoundError(errno.ENOENT, "deleted while loading", str(checkpoint.path))
        raise CorruptCheckpointError(problems[0])
    try:
        partial = dcpread.planner("default", weights_only=True, allow_partial_load=not options.strict)
        with single_process_quietly(), dcpread.guarded(checkpoint.path, files):
            dcp_load(target, storage_reader=reader, planner=partial, no_dist=single)
            # Per-rank values: present only when this rank existed at save time.
            mine = {PER_RANK: dict(per_rank)}
            anything = dcpread.planner("default", weights_only=True, allow_partial_load=True)
            dcp_load(mine, storage_reader=reader, planner=anything, no_dist=single)
    except (FileNotFoundError, HpcckptError):
        raise
    except Exception as error:
        raise StoreError(f"{checkpoint.path}: loading the sharded checkpoint failed: {error}") from error
    if state.model is not None and options.model:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(state.model, target["model"], options=StateDictOptions(strict=options.strict))  # type: ignore[arg-type]
        if state.optimizer is not None and options.optimizer and "optimizer" in target:
            set_optimizer_state_dict(state.model, state.optimizer, target["optimizer"])  # type: ignore[arg-type]
    elif state.optimizer is not None and options.optimizer and "optimizer" in target:
        state.optimizer.load_state_dict(target["optimizer"])
    for key in ("scheduler", "scaler"):
        value = getattr(state, key)
        if value is not None and getattr(options, key) and key in target:
            value.load_state_dict(target[key])
    if options.extra:
        state.extra.update(target.get("extra") or {})
    blob = mine[PER_RANK].get(own_key)
    if isinstance(blob, bytes) and blob:
        own = torch.load(io.BytesIO(blob), weights_only=True)
        if options.rng:
            restore_rng(own["rng"])
        if options.dataloader:
            state.loader_position = dict(own.get("loader_position") or {})
    if options.progress:
        state.step = int(target.get("step", state.step))
        state.epoch = int(target.get("epoch", state.epoch))


def load_full_into(state: TrainState, content: Mapping[str, Any], options: RestoreOptions) -> None:
    """Every rank: a one-file checkpoint (whole tensors) into a model that may be sharded (FSDP) or
    replicated (DDP). The weights go through ``set_model_state_dict``, which shards them; the optimizer's
    state, keyed by parameter position in a one-file checkpoint, is re-keyed by parameter name first."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    rest = dict(content)
    model_state, optimizer_state = rest.pop("model", None), rest.pop("optimizer", None)
    if state.model is not None and options.model and model_state is not None:
        whole = StateDictOptions(full_state_dict=True, strict=options.strict)
        set_model_state_dict(state.model, model_state, options=whole)  # type: ignore[arg-type]
        if state.optimizer is not None and options.optimizer and optimizer_state is not None:
            names = {id(p): n for n, p in unwrap_model(state.model).named_parameters()}
            order = [names[id(p)] for group in state.optimizer.param_groups for p in group["params"]]  # type: ignore[attr-defined]
            keyed = {
                "state": {order[int(k)]: v for k, v in optimizer_state["state"].items()},
                "param_groups": [
                    {**g, "params": [order[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]
                ],
            }
            set_optimizer_state_dict(state.model, state.optimizer, keyed, options=whole)  # type: ignore[arg-type]
    partial = TrainState(scheduler=state.scheduler, scaler=state.scaler, extra=state.extra)
    partial.load_state_dict(rest, dataclasses.replace(options, model=False, optimizer=False))
    state.step, state.epoch, state.loader_position = partial.step, partial.epoch, partial.loader_position


# -- the format ----------------------------------------------------------------------------------------------
class DcpFormat:
    """A DCP directory: ``.metadata`` and one ``__R_0.distcp`` per rank."""

    name = NAME

    def check_save(self, state: object, tag: str | None, metadata: Mapping[str, Any] | None) -> None:
        """A TrainState only, without a tag or per-save metadata (every rank must save the same thing)."""
        if not isinstance(state, TrainState) or tag is not None or metadata:
            raise UsageError(REFUSED)

    def save(self, request: SaveRequest, state: TrainState | Mapping[str, Any]) -> Checkpoint:
        """Every rank, at the same step: write the parts, then rank 0 commits (see the module docstring)."""
        self.check_save(state, request.tag, None)
        assert isinstance(state, TrainState)  # check_save refused anything else
        # The step and epoch are the state's own: a sharded save ignores explicit ones (as it always has).
        return save(dataclasses.replace(request, step=int(state.step), epoch=int(state.epoch)), state)

    def save_async(
        self, request: SaveRequest, state: TrainState | Mapping[str, Any], staging: object = None
    ) -> AsyncDcpSave:
        """Every rank, at the same step: snapshot this rank's part to CPU now and persist it in the
        background; the commit happens in the handle's :meth:`~AsyncDcpSave.wait`, which every rank calls
        at the same point. ``staging`` (the store's bounded staging buffers) is not used: DCP stages
        itself, into fresh CPU tensors the size of this rank's part."""
        self.check_save(state, request.tag, None)
        assert isinstance(state, TrainState)  # check_save refused anything else
        return save_async(dataclasses.replace(request, step=int(state.step), epoch=int(state.epoch)), state)

    def verifies_read(self, *, mmap: bool) -> bool:
        """The store verifies the files before :meth:`read` (a separate pass)."""
        return False

    def read(self, checkpoint: Checkpoint, map_location: Any, *, weights_only: bool, mmap: bool) -> dict[str, Any]:
        """The whole state in this process, every shard gathered (the export and ``load`` path). Nothing in
        the files runs code: see :mod:`.dcpread`."""
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

    def restore(
        self,
        source: CheckpointSource,
        state: TrainState,
        ckpt: CheckpointRef,
        options: RestoreOptions,
        map_location: Any,
    ) -> Checkpoint | None:
        """Every rank restores the checkpoint rank 0 chose, whatever each one sees on a shared filesystem."""
        skip: list[str] = []  # found corrupt when read: the same on every rank (DCP's errors are collective)
        while True:
            chosen = choose(source, ckpt, skip)
            if chosen is None:
                if skip:
                    raise CorruptCheckpointError(f"every checkpoint in {source.run_dir} is corrupt: {skip}")
                return None
            if chosen.format != NAME:
                return _restore_one_file(source, state, chosen, options, map_location)
            try:
                load_into(state, chosen, options)
            except CorruptCheckpointError as error:
                if ckpt is not None:
                    raise
                warn(f"checkpoint {chosen.name} is corrupt, trying an older one: {error}")
                skip.append(chosen.name)
                continue
            return chosen


def _restore_one_file(
    source: CheckpointSource, state: TrainState, chosen: Checkpoint, options: RestoreOptions, map_location: Any
) -> Checkpoint | None:
    """A one-file checkpoint rank 0 chose: whole on every rank, sharded into the model in a process group."""
    if world()[1] > 1:
        checkpoint, content = source.load_checkpoint(chosen, map_location, mmap=False)
        load_full_into(state, content, options)
        return checkpoint
    return restore_whole(source, state, chosen, options, map_location)


# -- the collective save and restore ------------------------------------------------------------------------
def save(request: SaveRequest, state: TrainState) -> Checkpoint:
    """Every rank, at the same step: write the parts, then rank 0 commits (see the module docstring)."""
    rank, _ = world()
    transaction, prepared = _begin_on_rank_0(request) if rank == 0 else (None, None)
    prepared = broadcast_object(prepared)
    if prepared is None or prepared.startswith("error: "):
        raise StoreError(str(prepared)[7:])
    try:
        return _write_and_commit(request, state, transaction, prepared)
    except BaseException:  # an interrupt (KeyboardInterrupt, SystemExit) too: rank 0 leaves no temporary
        if transaction is not None:
            transaction.abort()  # nothing once committed
        raise


def save_async(request: SaveRequest, state: TrainState) -> AsyncDcpSave:
    """Every rank, at the same step: rank 0 begins the transaction, every rank snapshots its part and DCP
    persists it in the background; :meth:`AsyncDcpSave.wait` (collective) commits."""
    from . import dcpwrite

    rank, _ = world()
    transaction, prepared = _begin_on_rank_0(request) if rank == 0 else (None, None)
    prepared = broadcast_object(prepared)
    if prepared is None or prepared.startswith("error: "):
        raise StoreError(str(prepared)[7:])
    records = dcpwrite.Records()
    try:
        content = payload(state, request.step, request.epoch)
        future = _persist_in_background(content, dcpwrite.writer(prepared, records, sync_files=True))
    except Exception as error:  # told to the others at wait(), like a failed background write
        future = Future()
        future.set_exception(error)
    except BaseException:
        if transaction is not None:
            transaction.abort()
        raise
    from ..asyncsave import watch_at_exit

    handle = AsyncDcpSave(request, transaction, future, records)
    # Never waited for: in one process it is committed at exit, with ranks warned about. Held here until
    # waited for, even when the script kept neither the store nor the handle (the exit watch holds weakly).
    _UNSETTLED.add(handle)
    watch_at_exit(handle)
    return handle


class AsyncDcpSave:
    """A sharded save whose parts are being persisted in the background, one on each rank.

    :meth:`done` is this rank's view only (its own part persisted, or failed). :meth:`wait` is COLLECTIVE:
    every rank calls it at the same point (the next save, or the stop: points the ranks agree on); each
    waits for its own part, the ranks exchange their outcomes and checksums, rank 0 commits, and every rank
    returns that checkpoint, or raises the same :class:`StoreError` naming the failing ranks (rank 0 then
    removed the temporary directory: nothing was committed, the previous latest stays). Nothing is visible
    before every part is durable, and retention runs only at that commit. A ``timeout`` bounds only the wait
    for this rank's own part: on expiry ``TimeoutError`` is raised before any collective, the save stays in
    flight, and wait() may be called again (with ranks, time out on all of them or on none).

    At exit, a handle never waited for: in a single process the exit waits for it and commits (as for the
    generic async save); with ranks the wait is collective and cannot run at exit, so the process says on
    stderr that the save was not committed and why (call wait() on every rank before exiting; Run does).
    """

    def __init__(
        self, request: SaveRequest, transaction: SaveTransaction | None, future: Future[Any], records: Any
    ) -> None:
        self.step = request.step
        self._request = request
        self._transaction = transaction
        self._future = future
        self._records = records
        self._outcome: Checkpoint | StoreError | None = None
        self._ranks = world()[1]  # as at the save: at exit the process group may be gone already
        self.abandoned = False

    def abandon(self) -> None:
        """Let the process exit without this save (Run, after a crash whose wait ran out): not committed."""
        self.abandoned = True

    def settle_at_exit(self) -> None:
        """At exit (see :mod:`..asyncsave`): commit in a single process; with ranks, warn if never waited."""
        if self._outcome is not None:
            return
        if self._ranks > 1:
            _say(
                f"hpcckpt: rank {world()[0]}: the sharded async save of step {self.step} was never waited for "
                f"and is NOT committed: with {self._ranks} ranks its wait() is collective and cannot run at "
                "exit; call handle.wait() on every rank before exiting (Run does it at the stop)"
            )
            return
        try:
            self.wait()
        except Exception as error:  # nobody is left to raise it to
            _say(f"hpcckpt: the async save of step {self.step}, committed at exit, failed: {error}")

    def done(self) -> bool:
        """Whether :meth:`wait` would not wait for this rank's own part any more."""
        return self._outcome is not None or self._future.done()

    def wait(self, timeout: float | None = None) -> Checkpoint:
        """Collective: the committed checkpoint, or the save's failure raised (the same on every rank)."""
        if self._outcome is None:
            error = self._future.exception(timeout)  # TimeoutError: still in flight, nothing exchanged
            failure = None
            if error is not None:
                failure = _failure(error) or f"rank {world()[0]}: {type(error).__name__}: {error}"
            try:
                self._outcome = conclude(self._request, self._transaction, failure, self._records.files())
            except StoreError as refused:
                self._outcome = refused
            except BaseException:
                if self._transaction is not None:
                    self._transaction.abort()
                raise
            _UNSETTLED.discard(self)
        if isinstance(self._outcome, StoreError):
            raise self._outcome
        return self._outcome


_UNSETTLED: set[AsyncDcpSave] = set()  # the background saves not waited for yet


def _say(message: str) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def _persist_in_background(content: dict[str, Any], writer: Any) -> Future[Any]:
    """Snapshot ``content`` to CPU on this thread (DCP's stager: new tensors, and deep copies of every other
    value, so what the training loop changes next is not saved) and save it with DCP on another."""
    _, size = world()
    if size > 1:
        from torch.distributed.checkpoint.state_dict_saver import async_save

        started = async_save(content, storage_writer=writer, process_group=_background_group())
        return started if isinstance(started, Future) else started.upload_completion
    # One process: DCP's async_save would warn from its own thread that it assumes one process (a warning
    # filter cannot be scoped to another thread); the same stager and the same save, in a thread of ours.
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    staged = writer.stage(content)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcckpt-dcp-save")
    future = executor.submit(_save_state_dict, staged, storage_writer=writer, no_dist=True)
    executor.shutdown(wait=False)
    return future


_GROUPS: list[tuple[Any, Any]] = []  # (the default process group, the gloo group background saves use)


def _background_group() -> Any:
    """A gloo group of every rank for the background saves' collectives (collective when first made): the
    training thread keeps the default group, so the two threads never interleave collectives on one group;
    gloo, because DCP's staged parts are on the CPU whatever the training backend."""
    import torch.distributed as dist

    default = dist.group.WORLD
    for known, group in _GROUPS:
        if known is default:
            return group
    group = dist.new_group(backend="gloo", timeout=_timeout_of(default))
    _GROUPS[:] = [(default, group)]
    return group


def _timeout_of(group: Any) -> Any:
    """``group``'s collective timeout, for the background group (torch's gloo default is 30 minutes, not the
    one the user chose); None (torch's default) where torch does not tell it."""
    import torch

    try:
        return group._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # not a gloo backend, or a torch that keeps it elsewhere
        return None


def _write_and_commit(
    request: SaveRequest, state: TrainState, transaction: SaveTransaction | None, directory: str
) -> Checkpoint:
    """Every rank writes its part into ``directory``, hashed as it is written; rank 0 (which holds
    ``transaction``) commits."""
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from . import dcpwrite

    _, size = world()
    records = dcpwrite.Records()
    failure = None
    try:
        with single_process_quietly():
            dcp_save(
                payload(state, request.step, request.epoch),
                storage_writer=dcpwrite.writer(directory, records, sync_files=True),
                no_dist=size == 1,
            )
    except BaseException as error:  # DCP's CheckpointException is a BaseException: a failed write on some rank
        failure = _failure(error)
        if failure is None:
            raise
    return conclude(request, transaction, failure, records.files())


def _failure(error: BaseException) -> str | None:
    """What this rank tells the others about a failed write; None for an interrupt, which is raised."""
    from torch.distributed.checkpoint.api import CheckpointException

    from . import dcpread

    rank, _ = world()
    if isinstance(error, CheckpointException):
        return dcpread.failures(error)
    if isinstance(error, Exception):  # another rank's failure surfaces here too, as a failed collective
        return f"rank {rank}: {type(error).__name__}: {error}"
    return None


def conclude(
    request: SaveRequest, transaction: SaveTransaction | None, failure: str | None, files: list[FileRecord]
) -> Checkpoint:
    """Every rank, collective, once its own part is written (or failed): the ranks tell each other their
    outcome and the files they wrote (name, size, checksum); if any failed, rank 0 aborts and every rank
    raises naming the failing ranks; else rank 0 commits with those records (no file is read again) and
    every rank returns the checkpoint it committed."""
    from . import dcpwrite

    rank, _ = world()
    step = request.step
    try:
        outcomes = gather_object((failure, files))
    except Exception as error:  # a rank died: the group is broken
        outcomes = [(f"rank {rank}: the process group failed while saving ({error})", [])]
    failures = list(dict.fromkeys(f for f, _ in outcomes if f))  # each rank may report the same failure
    if failures:
        if transaction is not None:
            transaction.abort()
        raise StoreError(f"sharded save of step {step} failed, nothing committed: {'; '.join(failures)}")
    committed: Checkpoint | str | None = None
    if transaction is not None:
        try:
            written = dcpwrite.complete(transaction.directory, [f for _, part in outcomes for f in part])
            committed = transaction.commit(written, format=NAME)
        except Exception as error:
            transaction.abort()
            committed = f"rank 0 could not commit step {step}: {error}"
    committed = broadcast_object(committed)
    if not isinstance(committed, Checkpoint):
        raise StoreError(str(committed))
    return committed


def _begin_on_rank_0(request: SaveRequest) -> tuple[SaveTransaction | None, str]:
    """Rank 0's transaction and its directory's name for the others, or ``error: ...`` saying why not."""
    checkpoint_dir = request.registry.checkpoint_dir
    try:
        transaction = SaveTransaction.begin(request)
    except (OSError, HpcckptError) as error:
        # The reason is the OSError itself, not the StoreError the transaction made of it: said once.
        reason = error.__cause__ if isinstance(error, StoreError) and isinstance(error.__cause__, OSError) else error
        return None, f"error: cannot make a temporary directory in {checkpoint_dir}: {reason}"
    return transaction, str(transaction.directory)


def choose(source: CheckpointSource, ref: CheckpointRef = None, skip: Collection[str] = ()) -> Checkpoint | None:
    """The checkpoint every rank restores: rank 0's choice (the newest that verifies and is not named in
    ``skip``, or ``ref``)."""
    rank, _ = world()
    chosen: Checkpoint | str | None = None
    if rank == 0:
        try:
            chosen = source.get(ref) if ref is not None else source.newest_valid(skip)
        except HpcckptError as error:  # told to every rank, which raise it together (none waits alone)
            chosen = f"{type(error).__name__}: {error}"
    chosen = broadcast_object(chosen)
    if isinstance(chosen, str):
        raise StoreError(chosen)
    return chosen


@contextlib.contextmanager
def single_process_quietly() -> Iterator[None]:
    """DCP warns at every save and load without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


FORMAT = DcpFormat()
