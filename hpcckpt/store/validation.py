"""Validation after a restore (issue 14): the user's check of a restored state, and the way out of a bad
checkpoint.

Invariant: a checkpoint that failed validation is never restored again, in this process or any other, and a
run that had checkpoints never starts from scratch because of them. After a checkpoint is restored into the
state, ``validate(state)`` runs on every rank (a forward pass on a fixed batch, a finite-loss check); it fails
by raising or by returning False, on any rank. The checkpoint is then marked bad in the registry (kept on disk
for inspection; :meth:`~hpcckpt.store.registry.Registry.mark_bad`), a warning names it and the reason, and the
previous valid one is restored over the whole state (model, optimizer, scheduler, scaler, loader position,
RNG, step, epoch, extras: the parts the bad restore changed are first put back as they were before it) and
validated in turn. A checkpoint asked for by step or name that fails raises; so does a run whose every
checkpoint fails (:class:`ValidationFailedError`, listing each one and why).

Peers restarted from the same bad checkpoint for dozens of tasks (Megatron-LM #5281): here the next task
skips it, and a chain whose every checkpoint is bad stops with that error instead of looping.

The check itself does not disturb training: the RNG states, each module's train/eval mode and the model's
buffers (BatchNorm's running statistics, which a forward pass in train mode updates even under no_grad) are
put back after it, so a run resumed with validation is bitwise the run resumed without. The parameters, the
optimizer and the rest are not copied (a copy of a large model could exhaust the accelerator's memory):
``validate`` must not train.

Where the bad mark cannot be recorded (a full disk or quota), the checkpoint is still skipped by this process,
with a warning, and the fallback goes on; any other failure while marking is raised on every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..distributed import broadcast_object, gather_object, world
from ..errors import StoreError, UsageError, ValidationFailedError
from ..state import RestoreOptions, TrainState, capture_rng, restore_rng
from .formats import CheckpointFormat, CheckpointRef
from .manifest import Checkpoint
from .registry import warn

if TYPE_CHECKING:
    from .formats import CheckpointSource

Validate = Callable[[TrainState], Any]  # fails by raising or returning False


class Rejecting(Protocol):
    """The store, as the loop needs it: it restores from it and marks what fails bad."""

    def reject(self, checkpoint: Checkpoint, reason: str) -> None: ...


def check_validate(validate: object) -> Validate | None:
    """``validate`` when it is None or callable; otherwise a :class:`UsageError`."""
    if validate is not None and not callable(validate):
        raise UsageError(
            f"Invalid validate={validate!r}: expected a function taking the TrainState and returning "
            "True (or None) when it is usable, False or raising when not"
        )
    return validate


def restore_validated(
    source: CheckpointSource,
    store: Rejecting,
    restoring: CheckpointFormat,
    state: TrainState,
    ckpt: CheckpointRef,
    options: RestoreOptions,
    map_location: Any,
    validate: Validate,
) -> Checkpoint | None:
    """Restore ``ckpt`` (None: the newest valid) into ``state`` with ``restoring``'s restore, then validate;
    see the module docstring. None when nothing was saved yet and nothing was asked for."""
    before = _Before.take(state)
    tried: list[str] = []
    while True:
        checkpoint = restoring.restore(source, state, ckpt, options, map_location)
        if checkpoint is None:
            if tried:
                before.put_back(state)
                raise ValidationFailedError(
                    f"every checkpoint in {source.run_dir} failed validation, newest first: {'; '.join(tried)}. "
                    "They are marked bad and kept on disk (hpcckpt ls shows them); training does not start from "
                    "scratch over them: fix the validate function or the checkpoints, or use a new run directory"
                )
            return None
        reason = _verdict(validate, state)
        if reason is None:
            if tried:
                warn(
                    f"restored checkpoint {checkpoint.name} (step {checkpoint.step}) after newer ones failed validation"
                )
            return checkpoint
        tried.append(f"{checkpoint.name} (step {checkpoint.step}): {reason}")
        failure = _mark_bad(store, checkpoint, reason)
        if failure is not None:
            before.put_back(state)
            raise StoreError(failure)
        if ckpt is not None:
            raise ValidationFailedError(
                f"checkpoint {checkpoint.name} (step {checkpoint.step}) in {source.run_dir} failed validation: "
                f"{reason}; it is marked bad and kept on disk. Restore another one, or none to take the newest valid"
            )
        warn(
            f"checkpoint {checkpoint.name} (step {checkpoint.step}) failed validation ({reason}); marked bad, "
            "restoring the previous one"
        )
        before.put_back(state)


def _mark_bad(store: Rejecting, checkpoint: Checkpoint, reason: str) -> str | None:
    """Rank 0 marks ``checkpoint`` bad while the others wait for it; why that failed, on every rank, or None.
    The store warns and goes on where the mark cannot be written (a full disk: it still skips the checkpoint);
    whatever else goes wrong on rank 0 reaches every rank instead of leaving them in the broadcast (review of
    issue 14: rank 0 raised before it, the others hung)."""
    failure = None
    if world()[0] == 0:
        try:
            store.reject(checkpoint, reason)
        except Exception as error:
            failure = f"could not mark checkpoint {checkpoint.name} bad after it failed validation ({reason}): {error}"
    return broadcast_object(failure)  # type: ignore[no-any-return]


def _verdict(validate: Validate, state: TrainState) -> str | None:
    """Why the restored ``state`` failed validation on any rank (every rank's reason, by rank), or None."""
    mine = _check(validate, state)
    rank_count = world()[1]
    if rank_count == 1:
        return mine
    reasons = gather_object(mine)
    failed = [f"rank {rank}: {reason}" for rank, reason in enumerate(reasons) if reason is not None]
    return "; ".join(failed) or None


def _check(validate: Validate, state: TrainState) -> str | None:
    """Run ``validate`` on this rank; the reason it failed, or None. The RNG states and the modules'
    train/eval modes are put back afterwards."""
    rng = capture_rng()
    modes = _modes(state)
    buffers = _buffers(state)
    try:
        result = validate(state)
    except Exception as error:
        return f"validate raised {type(error).__name__}: {error}"[:1000]
    finally:
        restore_rng(rng)
        for module, training in modes:
            module.training = training
        _put_back_buffers(buffers)
    if result is False:
        return "validate returned False"
    return None


def _modes(state: TrainState) -> list[tuple[Any, bool]]:
    modules = getattr(state.model, "modules", None)
    if not callable(modules):
        return []
    return [(module, bool(module.training)) for module in modules()]


def _buffers(state: TrainState) -> list[tuple[Any, str, Any, Any]]:
    """(module, name, buffer, copy) of every buffer of the model's modules: a forward pass in train mode
    updates some (BatchNorm's running statistics), even under ``torch.no_grad`` (review of issue 14)."""
    modules = getattr(state.model, "modules", None)
    if not callable(modules):
        return []
    return [
        (module, name, buffer, buffer.detach().clone())
        for module in modules()
        for name, buffer in module.named_buffers(recurse=False)
    ]


def _put_back_buffers(buffers: list[tuple[Any, str, Any, Any]]) -> None:
    """The buffers as :func:`_buffers` saw them: the same tensors (a module that replaced one gets it back)
    holding the same values, bitwise."""
    if not buffers:
        return
    import torch

    with torch.no_grad():
        for module, name, buffer, saved in buffers:
            module._buffers[name] = buffer
            buffer.copy_(saved)


class _Before:
    """The parts of a state a restore replaces only where the checkpoint has them (extras, loader position,
    step, epoch, RNG), as they were before the first restore: put back before an older checkpoint is
    restored, so nothing of a bad one survives. The model, optimizer, scheduler and scaler are overwritten
    whole by every restore (a non-strict model restore keeps the bad one's values for keys the older lacks)."""

    def __init__(self, extra: dict[str, Any], position: dict[str, Any], step: int, epoch: int, rng: Any) -> None:
        self.extra, self.position, self.step, self.epoch, self.rng = extra, position, step, epoch, rng

    @classmethod
    def take(cls, state: TrainState) -> _Before:
        return cls(dict(state.extra), copy.copy(state.loader_position), state.step, state.epoch, capture_rng())

    def put_back(self, state: TrainState) -> None:
        state.extra.clear()
        state.extra.update(self.extra)
        state.loader_position = copy.copy(self.position)
        state.step, state.epoch = self.step, self.epoch
        restore_rng(self.rng)
