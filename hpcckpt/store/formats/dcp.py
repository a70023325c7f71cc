"""The ``dcp`` format: sharded checkpoints on ``torch.distributed.checkpoint`` (DCP), saved and restored
by every rank of a process group together.

Saving, on every rank at the same step (a collective), through one save transaction:

1. rank 0 begins the transaction (its temporary directory) and tells the others the directory's name;
2. every rank writes its part with ``dcp.save`` (DCP writes each rank's ``__R_0.distcp`` and, on the
   coordinator, ``.metadata``; files are fsynced);
3. the ranks tell each other whether they succeeded; if any failed (or died: the collective fails),
   rank 0 aborts the transaction and every rank raises -- nothing was committed;
4. rank 0 commits the transaction (checksums of the files, manifest, rename, registry) exactly as a
   one-file checkpoint is committed, then tells the others which checkpoint it committed.

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
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from ...distributed import broadcast_object, world
from ...errors import CorruptCheckpointError, HpcckptError, StoreError, UsageError
from ...state import RestoreOptions, TrainState, capture_rng, restore_rng, unwrap_model
from ..manifest import Checkpoint
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
    problems = [p for p in _gather(refused) if p]
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


def _write_and_commit(
    request: SaveRequest, state: TrainState, transaction: SaveTransaction | None, directory: str
) -> Checkpoint:
    """Every rank writes its part into ``directory``; rank 0 (which holds ``transaction``) commits."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from . import dcpread

    rank, size = world()
    step = request.step
    failure = None
    try:
        with single_process_quietly():
            dcp_save(
                payload(state, step, request.epoch),
                storage_writer=FileSystemWriter(directory, sync_files=True),
                no_dist=size == 1,
            )
    except Exception as error:  # another rank's failure surfaces here too, as a failed collective
        failure = f"rank {rank}: {type(error).__name__}: {error}"
    except CheckpointException as error:  # DCP's, a BaseException: a failed write (disk full) on some rank
        failure = dcpread.failures(error)
    try:
        failures = [f for f in _gather(failure) if f]
    except Exception as error:  # a rank died: the group is broken
        failures = [f"rank {rank}: the process group failed while saving ({error})"]
    if failures:
        if transaction is not None:
            transaction.abort()
        raise StoreError(f"sharded save of step {step} failed, nothing committed: {'; '.join(failures)}")
    committed: Checkpoint | str | None = None
    if transaction is not None:
        try:
            committed = transaction.commit(None, format=NAME)  # None: checksum what every rank wrote
        except Exception as error:
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


def _gather(value: str | None) -> list[str | None]:
    _, size = world()
    if size == 1:
        return [value]
    import torch.distributed as dist

    values: list[str | None] = [None] * size
    dist.all_gather_object(values, value)
    return values


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
