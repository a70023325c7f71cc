"""Restoring a live model and its AdamW optimizer, as a resumed job does: hpcckpt's ``restore()`` against
what a user would write with safetensors or ``torch.load`` (read the file, then ``load_state_dict`` into
the model and the optimizer).

The state is an MLP whose parameters take about a third of the requested size, with AdamW stepped once so
that ``exp_avg`` and ``exp_avg_sq`` exist: parameters plus both moments make the whole. Each contender
restores into the same live objects, so every copy a contender makes is counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Trainee:
    """A model, its optimizer after one step, and a batch to train it on."""

    model: Any
    optimizer: Any
    batch: Any

    def step(self) -> None:
        loss = self.model(self.batch).square().mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def state(self) -> Any:
        from ..state import TrainState

        return TrainState(model=self.model, optimizer=self.optimizer)


def trainee(state_bytes: int, *, device: str = "cpu", batch: int = 8) -> Trainee:
    """An MLP plus AdamW whose state (parameters and both moments) is about ``state_bytes``."""
    import torch
    from torch import nn

    params = max(1, state_bytes // 3 // 4)
    # Wide enough for a few dozen layers at most: hundreds of tiny layers would measure per-tensor overhead.
    width = 2048 if params >= 8 * 2048 * 2048 else 1024 if params >= 4 * 1024 * 1024 else 256
    layers = max(2, round(params / (width * width + width)))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    result = Trainee(model, optimizer, torch.randn(batch, width, device=device))
    result.step()
    return result


def state_nbytes(subject: Trainee) -> int:
    total = 0
    for tensor in _flat(subject).values():
        total += tensor.numel() * tensor.element_size()
    return total


# -- the savers (untimed: they set the stage) ---------------------------------------------------------------
def save_hpcckpt(subject: Trainee, directory: Path) -> Path:
    from ..store.store import CheckpointStore

    CheckpointStore(directory, keep_last=None).save(subject.state(), step=1)
    return directory


def save_safetensors(subject: Trainee, directory: Path) -> Path:
    """Model and optimizer tensors in one file, ``param_groups`` as JSON in its metadata: what a user
    writes to keep an optimizer in safetensors, which holds tensors only."""
    from safetensors.torch import save_file

    from .contenders import fsync_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "state.safetensors"
    groups = subject.optimizer.state_dict()["param_groups"]
    save_file(_flat(subject), str(path), metadata={"param_groups": json.dumps(groups)})
    fsync_file(path)
    return path


def save_torch(subject: Trainee, directory: Path) -> Path:
    import torch

    from .contenders import fsync_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "state.pt"
    torch.save({"model": subject.model.state_dict(), "optimizer": subject.optimizer.state_dict()}, path)
    fsync_file(path)
    return path


# -- the restores (timed) -----------------------------------------------------------------------------------
def restore_hpcckpt(subject: Trainee, directory: Path) -> None:
    from ..store.store import CheckpointStore

    restored = CheckpointStore(directory, keep_last=None, create=False).restore(subject.state())
    assert restored is not None, f"hpcckpt found nothing to restore in {directory}"


def restore_safetensors(subject: Trainee, path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    flat = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    subject.model.load_state_dict({k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    subject.optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_torch(subject: Trainee, path: Path) -> None:
    import torch

    saved = torch.load(path, weights_only=True)
    subject.model.load_state_dict(saved["model"])
    subject.optimizer.load_state_dict(saved["optimizer"])


def _flat(subject: Trainee) -> dict[str, Any]:
    flat = {f"model.{k}": v for k, v in subject.model.state_dict().items()}
    for index, entries in subject.optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            flat[f"optim.{index}.{name}"] = value
    return flat
