"""What a checkpoint holds: the training state, gathered into one dict and restored from it.

Layout of a :class:`TrainState` checkpoint (a plain dict, loadable by ``torch.load(weights_only=True)``)::

    {"model": ..., "optimizer": ..., "scheduler": ..., "scaler": ..., "dataloader": ...,  # state_dicts
     "extra": {...},                                    # the user's values (run ids, counters)
     "loader_position": {"epoch", "batch", "rng"},      # a plain DataLoader's place (Run.batches)
     "rng": {"python": ..., "numpy": ..., "torch": ..., "cuda": [...]},
     "step": int, "epoch": int, "hpcckpt": {"layout": 1}}

Entries for objects that were not given are absent. Models wrapped by DistributedDataParallel,
DataParallel or ``torch.compile`` are saved unwrapped (no ``module.`` prefix), so the weights load into a
plain model.

A plain DataLoader resumes mid-epoch (:func:`epoch_batches`): ``loader_position`` holds the epoch, the
batches trained on and the RNG state from which the epoch's iterator drew its shuffling and worker seeds;
a resumed task rebuilds the same order from that RNG and goes on after those batches. A loader that keeps
its own state (torchdata's ``StatefulDataLoader``, given as ``TrainState(dataloader=...)``) resumes itself.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import StateMismatchError, UsageError

if TYPE_CHECKING:
    import torch

LAYOUT_VERSION = 1
log = logging.getLogger("hpcckpt")
_OBJECT_KEYS = ("model", "optimizer", "scheduler", "scaler", "dataloader")


@runtime_checkable
class Stateful(Protocol):
    """Anything that saves and restores itself through a state dict (torchtnt's ``Stateful``)."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> Any: ...


@dataclass(frozen=True)
class RestoreOptions:
    """What to restore from a checkpoint. ``RestoreOptions(optimizer=False, scheduler=False)`` restores
    the weights only, for fine-tuning. ``strict`` demands the model's keys match the checkpoint's."""

    model: bool = True
    optimizer: bool = True
    scheduler: bool = True
    scaler: bool = True
    dataloader: bool = True
    rng: bool = True
    extra: bool = True
    progress: bool = True  # step and epoch
    strict: bool = True


@dataclass
class TrainState:
    """The objects a training run needs to resume exactly, plus its progress and the user's extras."""

    model: Stateful | None = None
    optimizer: Stateful | None = None
    scheduler: Stateful | None = None
    scaler: Stateful | None = None
    dataloader: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    # Where a plain DataLoader stands within the epoch (kept by Run.batches): {"epoch", "batch", "rng"}.
    loader_position: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("model", "optimizer", "scheduler", "scaler"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, Stateful):
                raise UsageError(
                    f"TrainState({key}=...) got {type(value).__name__}: expected an object with "
                    "state_dict() and load_state_dict()"
                )

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (see the module docstring for its layout)."""
        payload: dict[str, Any] = {}
        for key in _OBJECT_KEYS:
            value = getattr(self, key)
            if key == "model" and value is not None:
                payload[key] = unwrap_model(value).state_dict()
            elif key == "dataloader":
                if isinstance(value, Stateful):
                    payload[key] = value.state_dict()
            elif value is not None:
                payload[key] = value.state_dict()
        payload["extra"] = dict(self.extra)
        if self.loader_position:
            payload["loader_position"] = dict(self.loader_position)
        payload["rng"] = capture_rng()
        payload["step"] = int(self.step)
        payload["epoch"] = int(self.epoch)
        payload["hpcckpt"] = {"layout": LAYOUT_VERSION}
        return payload

    def load_state_dict(self, payload: Mapping[str, Any], options: RestoreOptions | None = None) -> None:
        """Restore what ``options`` asks for. A strict model mismatch names the missing and extra keys."""
        options = options or RestoreOptions()
        if options.model and self.model is not None:
            if "model" not in payload:
                raise StateMismatchError("the checkpoint holds no 'model' entry; its keys: " + _keys(payload))
            load_model(self.model, payload["model"], strict=options.strict)
        for key in ("optimizer", "scheduler", "scaler", "dataloader"):
            target = getattr(self, key)
            if not getattr(options, key) or target is None or not isinstance(target, Stateful):
                continue
            if key not in payload:
                if options.strict:
                    raise StateMismatchError(
                        f"the checkpoint holds no {key!r} entry (keys: {_keys(payload)}); "
                        f"pass RestoreOptions({key}=False) to start it fresh"
                    )
                continue
            target.load_state_dict(payload[key])
        if options.extra:
            self.extra.update(payload.get("extra") or {})
        if options.dataloader:
            self.loader_position = dict(payload.get("loader_position") or {})
        if options.rng and "rng" in payload:
            restore_rng(payload["rng"])
        if options.progress:
            self.step = int(payload.get("step", self.step))
            self.epoch = int(payload.get("epoch", self.epoch))


def epoch_batches(state: TrainState, loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches for ``state``'s current epoch, after those already trained on (counted by
    :func:`batch_done`)."""
    if isinstance(loader, Stateful) and state.dataloader is loader:
        yield from loader  # a stateful loader (torchdata's StatefulDataLoader) resumes itself
        return
    import torch

    position = state.loader_position
    done = int(position.get("batch", 0)) if position.get("epoch") == state.epoch else 0
    if done == 0:
        # Record the RNG as the iterator draws its shuffling and worker seeds from it.
        state.loader_position = {"epoch": state.epoch, "batch": 0, "rng": torch.get_rng_state()}
        yield from loader
        return
    # Mid-epoch resume: rebuild the same shuffling from the epoch's starting RNG, skip the batches
    # already trained on, then put back the RNG the checkpoint saved.
    resumed_rng = torch.get_rng_state()
    torch.set_rng_state(position["rng"])
    iterator = iter(loader)
    skipped = 0
    for _ in range(done):
        try:
            next(iterator)
        except StopIteration:
            break
        skipped += 1
    torch.set_rng_state(resumed_rng)
    log.info("hpcckpt: resumed epoch %s after batch %s (%s batches skipped)", state.epoch, done, skipped)
    yield from iterator


def batch_done(state: TrainState) -> None:
    """One more batch of the epoch trained on: where :func:`epoch_batches` resumes."""
    state.loader_position["batch"] = int(state.loader_position.get("batch", 0)) + 1


def state_bytes(state: TrainState) -> int:
    """Bytes of the model's and the optimizer's tensors: what a save writes, nearly."""
    import torch

    total = 0
    for obj in (state.model, state.optimizer):
        if obj is None:
            continue
        stack: list[Any] = [obj.state_dict()]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
            elif isinstance(item, Mapping):
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                stack.extend(item)
    return total


def _keys(payload: Mapping[str, Any]) -> str:
    return ", ".join(sorted(map(str, payload))) or "none"


def unwrap_model(model: Any) -> Any:
    """The module inside DistributedDataParallel, DataParallel and ``torch.compile`` wrappers."""
    import torch

    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def load_model(model: Any, state: Mapping[str, Any], *, strict: bool) -> None:
    """Load weights into ``model`` (unwrapped), naming missing and unexpected keys on a mismatch."""
    target = unwrap_model(model)
    state = dict(state)
    expected = set(target.state_dict())
    if expected and not (expected & set(state)) and all(str(k).startswith("module.") for k in state):
        # Written by another tool from a DDP-wrapped model: drop the wrapper's prefix.
        state = {str(k).removeprefix("module."): v for k, v in state.items()}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if strict and (missing or unexpected):
        raise StateMismatchError(
            f"the checkpoint's model does not match: missing keys {_clip(missing)} (in the model, not in the "
            f"checkpoint); unexpected keys {_clip(unexpected)} (in the checkpoint, not in the model). "
            "Pass RestoreOptions(strict=False) to load the matching keys only."
        )
    target.load_state_dict(state, strict=strict)


def _clip(keys: list[str], most: int = 12) -> str:
    shown = ", ".join(keys[:most])
    return f"[{shown}{f', ... {len(keys) - most} more' if len(keys) > most else ''}]"


def capture_rng() -> dict[str, Any]:
    """Python, NumPy (when installed), torch CPU and CUDA generator states, as weights-only-safe values."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy_state = _numpy_rng_state()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    import torch

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        _set_numpy_rng_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_rng_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:
        return None
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    # weights_only loading refuses NumPy arrays: keep the key as an int64 tensor.
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_rng_state(state: Mapping[str, Any]) -> None:
    try:
        import numpy as np
    except ImportError:
        return
    keys: torch.Tensor = state["keys"]
    np.random.set_state(
        (
            state["bit_generator"],
            keys.numpy().astype(np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached_gaussian"],
        )
    )
