"""Progress in the ``hpcckpt`` command (issue 14): ``verify`` and ``export`` write their 10 % lines to stderr
when it is not a terminal (a batch log), the command's own output unchanged on stdout.

HPCCKPT_PROGRESS=1 shows even work shorter than two seconds, so these small checkpoints show their lines
however fast the machine is; HPCCKPT_PROGRESS=0 shows nothing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from harness import clean_env

from hpcckpt import CheckpointStore

MIB = 1024 * 1024


def hpcckpt(*argv: str, progress: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["hpcckpt", *argv],
        capture_output=True,  # a pipe, not a terminal: lines, not a bar
        text=True,
        timeout=300,
        check=False,
        env=clean_env(HPCCKPT_PROGRESS=progress),
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    for step in (100, 200, 300, 400):
        generator = torch.Generator().manual_seed(step)
        model = {"weight": torch.randn(1024, 512, generator=generator), "bias": torch.zeros(512)}  # 2 MiB
        store.save({"model": model, "optimizer": {"lr": 0.1}}, step=step)
    return tmp_path / "run"


def percents(stderr: str, what: str) -> list[int]:
    return [int(p) for p in re.findall(rf"^hpcckpt: {re.escape(what)}: (\d+)% \(", stderr, re.MULTILINE)]


def test_verify_logs_its_progress_over_the_whole_run_on_stderr(run_dir: Path) -> None:
    result = hpcckpt("verify", str(run_dir), progress="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"4 ok, 0 corrupt in {run_dir}"
    seen = percents(result.stderr, f"verify {run_dir}")
    # four checkpoints of about the same size: a line at each quarter, the last one 100 % once
    assert seen == sorted(set(seen)) and seen[-1] == 100 and len(seen) >= 4, result.stderr
    total = sum(c.size for c in CheckpointStore(run_dir).list())
    last = result.stderr.splitlines()[-1]
    assert f": 100% ({total / MIB:.1f} MiB of {total / MIB:.1f} MiB, " in last, result.stderr


def test_verify_of_a_corrupt_run_still_ends_at_100_percent(run_dir: Path) -> None:
    victim = run_dir / "checkpoints" / "step_000000200" / "state.tensors"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01
    victim.write_bytes(bytes(data))
    result = hpcckpt("verify", str(run_dir), progress="1")
    assert result.returncode == 1
    assert "CORRUPT  step_000000200" in result.stdout
    assert percents(result.stderr, f"verify {run_dir}")[-1] == 100, result.stderr


@pytest.mark.parametrize("as_", ["torch", "safetensors"])
def test_export_logs_the_bytes_it_writes(run_dir: Path, tmp_path: Path, as_: str) -> None:
    out = tmp_path / f"model.{as_}"
    result = hpcckpt("export", str(run_dir), "--out", str(out), "--as", as_, "--weights-only", progress="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote the weights of step_000000400 (step 400) to {out}\n"
    what = f"export step_000000400 to {out}"
    seen = percents(result.stderr, what)
    assert seen and seen[-1] == 100 and seen.count(100) == 1, result.stderr
    size = out.stat().st_size  # what the 100 % line counts is the file written
    assert f": 100% ({size / MIB:.1f} MiB of {size / MIB:.1f} MiB, " in result.stderr, result.stderr
    if as_ == "torch":
        weights = torch.load(out, weights_only=True)
        assert torch.equal(weights["weight"], torch.randn(1024, 512, generator=torch.Generator().manual_seed(400)))


def test_hpcckpt_progress_0_keeps_stderr_clean(run_dir: Path, tmp_path: Path) -> None:
    verify = hpcckpt("verify", str(run_dir), progress="0")
    export = hpcckpt("export", str(run_dir), "--out", str(tmp_path / "state.pt"), progress="0")
    assert (verify.returncode, export.returncode) == (0, 0)
    assert (verify.stderr, export.stderr) == ("", "")
