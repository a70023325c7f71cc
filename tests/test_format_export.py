"""``hpcckpt export --as torch|safetensors`` (issue 13 §1): a plain torch.load file or the model's weights as
a .safetensors file that the safetensors library (what Hugging Face uses) loads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hpcckpt import CheckpointStore, TrainState
from hpcckpt.errors import StoreError, UsageError


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as language models are
        self.norm = nn.LayerNorm(4, dtype=torch.bfloat16)


def test_safetensors_export_loads_with_the_safetensors_library(tmp_path: Path) -> None:
    model = Tied()
    store = CheckpointStore(tmp_path / "run")
    store.save(TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters())), step=5)
    path, used = store.export(tmp_path / "model.safetensors", as_="safetensors")
    assert used.step == 5 and path == tmp_path / "model.safetensors"
    weights = load_file(path)
    expected = model.state_dict()
    assert set(weights) == set(expected)
    for key, value in expected.items():
        assert weights[key].dtype == value.dtype and torch.equal(weights[key], value), key
    # safetensors holds no shared memory: the tied weight is written twice, each loads on its own.
    assert weights["head.weight"].data_ptr() != weights["embed.weight"].data_ptr()


def test_torch_export_stays_the_default(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save({"model": {"w": torch.arange(3.0)}, "step": 1}, step=1)
    path, _ = store.export(tmp_path / "all.pt")
    assert torch.load(path, weights_only=True)["model"]["w"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(UsageError, match=r"Invalid export format 'onnx': expected one of torch, safetensors"):
        store.export(tmp_path / "x", as_="onnx")


def test_safetensors_export_refuses_what_the_layout_cannot_hold(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save({"model": {"w": torch.ones(2), "_extra_state": {"a": 1}}}, step=1)
    with pytest.raises(StoreError, match=r"model entry '_extra_state' is a dict; a \.safetensors file holds only"):
        store.export(tmp_path / "m.safetensors", as_="safetensors")
    store.save({"model": {"w": torch.ones(2, dtype=torch.complex128)}}, step=2)
    with pytest.raises(StoreError, match=r"model entry 'w' has dtype torch.complex128, which safetensors cannot"):
        store.export(tmp_path / "m.safetensors", as_="safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_export_as_safetensors(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save({"model": {"w": torch.full((2, 2), 3.0)}}, step=9)
    out = tmp_path / "w.safetensors"
    result = subprocess.run(
        ["hpcckpt", "export", str(tmp_path / "run"), "--as", "safetensors", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote the weights of step_000000009 (step 9) to {out}"
    assert load_file(out)["w"].tolist() == [[3.0, 3.0], [3.0, 3.0]]
