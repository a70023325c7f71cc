"""hpcckpt ls, verify and export, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from hpcckpt import CheckpointStore


def hpcckpt(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["hpcckpt", *argv], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    for step, loss in ((100, 0.9), (200, 0.3), (300, 0.5)):
        model = {"weight": torch.full((4, 4), float(step)), "bias": torch.zeros(4)}
        store.save(
            {"model": model, "optimizer": {"lr": 0.1}},
            step=step,
            epoch=step // 100,
            metrics={"val_loss": loss},
            tag="warmup" if step == 100 else None,
        )
    return tmp_path / "run"


def test_ls_lists_checkpoints_in_a_table_and_as_json(run_dir: Path) -> None:
    table = hpcckpt("ls", str(run_dir))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "STEP", "EPOCH", "SIZE"]
    assert [line.split()[1] for line in lines[1:]] == ["100", "200", "300"]
    assert "warmup" in lines[1] and "val_loss=0.3" in lines[2]
    listed = json.loads(hpcckpt("ls", str(run_dir), "--json").stdout)
    assert [(c["step"], c["metrics"]["val_loss"], c["tag"]) for c in listed] == [
        (100, 0.9, "warmup"),
        (200, 0.3, None),
        (300, 0.5, None),
    ]


def test_verify_passes_then_names_the_corrupt_checkpoint(run_dir: Path) -> None:
    ok = hpcckpt("verify", str(run_dir))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[-1] == f"3 ok, 0 corrupt in {run_dir}"
    victim = run_dir / "checkpoints" / "step_000000200" / "state.tensors"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01
    victim.write_bytes(bytes(data))
    bad = hpcckpt("verify", str(run_dir))
    assert bad.returncode == 1
    assert f"CORRUPT  step_000000200: {victim}: checksum xxh3_64:" in bad.stdout
    assert bad.stdout.splitlines()[-1] == f"2 ok, 1 corrupt in {run_dir}"


def test_export_writes_a_plain_torch_load_file(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export" / "weights.pt"
    out.parent.mkdir()
    result = hpcckpt("export", str(run_dir), "--best", "val_loss", "--out", str(out), "--weights-only")
    assert result.returncode == 0, result.stderr
    assert "step_000000200" in result.stdout
    weights = torch.load(out, weights_only=True)
    assert set(weights) == {"weight", "bias"} and float(weights["weight"][0, 0]) == 200.0
    whole = tmp_path / "whole.pt"
    assert hpcckpt("export", str(run_dir), "--step", "100", "--out", str(whole)).returncode == 0
    state = torch.load(whole, weights_only=True)
    assert set(state) == {"model", "optimizer"} and float(state["model"]["weight"][0, 0]) == 100.0
    assert hpcckpt("export", str(run_dir), "--out", str(whole)).returncode == 0  # latest, replacing the file
    assert float(torch.load(whole, weights_only=True)["model"]["weight"][0, 0]) == 300.0
    assert sorted(p.name for p in whole.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["ls", "{missing}"], 1, "run directory {missing} does not exist"),
        (["verify", "{missing}"], 1, "run directory {missing} does not exist"),
        (["export", "{run}", "--step", "250", "--out", "{out}"], 1, "no checkpoint at step 250"),
        (["export", "{run}", "--best", "accuracy", "--out", "{out}"], 1, "recorded the metric 'accuracy'"),
        (["export", "{run}", "--step", "x", "--out", "{out}"], 2, "invalid int value: 'x'"),
        (["export", "{run}"], 2, "the following arguments are required: --out"),
    ],
)
def test_bad_input_names_the_value_and_writes_nothing(
    run_dir: Path, tmp_path: Path, argv: list[str], code: int, message: str
) -> None:
    names = {"missing": str(tmp_path / "missing"), "run": str(run_dir), "out": str(tmp_path / "never.pt")}
    result = hpcckpt(*[a.format(**names) for a in argv])
    assert result.returncode == code
    assert message.format(**names) in result.stderr
    assert not (tmp_path / "never.pt").exists()
    assert not (tmp_path / "missing").exists()
