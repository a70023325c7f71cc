"""Sharded background saves with two gloo ranks (issue 13, "Sharded runs"): DCP persists each rank's part in the
background, and rank 0 commits only at the collective ``wait()``, after every rank's part is durable. A write
that fails on one rank, or a rank killed with SIGKILL while its part is being written, commits nothing and
leaves the previous latest checkpoint intact. The ranks are tests/workers/dcp_async_worker.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from compare import assert_bitwise_equal
from harness import clean_env, free_port, wait_for
from paths import WORKERS

from hpcckpt import CheckpointStore
from hpcckpt.store.manifest import file_digest

WORKER = WORKERS / "dcp_async_worker.py"
DATA = {".metadata", "__0_0.distcp", "__1_0.distcp"}


def start(run_dir: Path, mode: str, *args: str) -> list[subprocess.Popen[str]]:
    """Two ranks of the worker, with torchrun's variables."""
    port = str(free_port())
    ranks = []
    for rank in range(2):
        variables = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        env = clean_env("RANK", "WORLD_SIZE", **variables, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        argv = [sys.executable, str(WORKER), str(run_dir), mode, *args]
        ranks.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return ranks


def lines(ranks: list[subprocess.Popen[str]], timeout: float = 240) -> tuple[dict[int, dict[str, Any]], str]:
    """Each rank's JSON line by rank (a killed rank has none), and the tail of their stderr."""
    found: dict[int, dict[str, Any]] = {}
    errors = []
    for process in ranks:
        out, err = process.communicate(timeout=timeout)
        errors.append(err)
        for line in out.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                found[record["rank"]] = record
    return found, "\n".join(errors)[-3000:]


def assert_only_first(run_dir: Path) -> None:
    """The first checkpoint is the latest, verifies, and nothing else is committed."""
    store = CheckpointStore(run_dir, create=False)
    assert [c.name for c in store.list()] == ["step_000000001"]
    first = store.verify(store.list()[0])
    assert {f.name for f in first.files} == DATA


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_save_in_the_background_and_rank_0_commits_one_checkpoint_that_restores_bitwise(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    found, stderr = lines(start(run_dir, "commit"))
    assert sorted(found) == [0, 1], stderr
    assert [found[r].get("committed") for r in (0, 1)] == ["step_000000002"] * 2, found
    assert found[0]["done"] and found[1]["done"]
    store = CheckpointStore(run_dir, create=False)
    assert [c.name for c in store.list()] == ["step_000000001", "step_000000002"]
    committed = store.verify(store.list()[-1])
    assert {f.name for f in committed.files} == DATA
    for record in committed.files:
        assert record.digest == file_digest(committed.path / record.name), record
    # The checkpoint holds what was snapshotted at save_async, not what training made of it afterwards.
    expected = torch.load(tmp_path / "expected-rank0.pt", weights_only=True)
    saved = store.load(committed)
    assert saved["step"] == expected["step"] == 2
    assert_bitwise_equal(expected["model"], saved["model"], "model")
    for name, moments in expected["moments"].items():
        assert_bitwise_equal(moments, saved["optimizer"]["state"][name], f"optimizer.{name}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_write_failing_on_one_rank_raises_at_wait_on_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    found, stderr = lines(start(run_dir, "fail", "--victim", "1"))
    assert sorted(found) == [0, 1], stderr
    for rank in (0, 1):
        error = found[rank].get("error", "")
        assert "sharded save of step 2 failed, nothing committed" in error, found
        assert "rank 1: OSError: [Errno 28] No space left on device" in error, found
    assert_only_first(run_dir)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "rank 0 removed the temporary directory"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", [0, 1])
def test_a_rank_killed_while_its_part_is_written_in_the_background_leaves_the_previous_latest(
    tmp_path: Path, victim: int
) -> None:
    run_dir = tmp_path / "run"
    marker = tmp_path / "writing"
    ranks = start(run_dir, "hang", "--victim", str(victim), "--marker", str(marker))
    wait_for(marker.exists, 120, "the victim's background write to start", interval=0.05)
    ranks[victim].send_signal(signal.SIGKILL)
    found, stderr = lines(ranks)
    survivor = 1 - victim
    assert "nothing committed" in found[survivor].get("error", ""), (found, stderr)
    assert ranks[victim].returncode == -signal.SIGKILL
    assert_only_first(run_dir)
    # What the dead save left (rank 0's temporary, when rank 0 died) is cleaned by the next save.
    store = CheckpointStore(run_dir, create=False)
    store.save({"x": torch.ones(2)}, step=3)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000000001", "step_000000003"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_ranks_saving_in_the_background_resume_exactly(tmp_path: Path) -> None:
    # Uninterrupted: 12 steps, a background save every 3. Interrupted: stopped at step 8 (the save of step 6
    # waited for at the stop), then resumed from step 6 to 12. Same weights and optimizer state, bitwise.
    reference, stderr = lines(start(tmp_path / "reference", "train", "--final", str(tmp_path / "reference")))
    assert [reference[r]["step"] for r in (0, 1)] == [12, 12], stderr
    first, stderr = lines(start(tmp_path / "run", "train", "--stop-at", "8", "--final", str(tmp_path / "first")))
    assert [first[r]["step"] for r in (0, 1)] == [8, 8], stderr
    assert [c.step for c in CheckpointStore(tmp_path / "run", create=False).list()] == [3, 6]
    second, stderr = lines(start(tmp_path / "run", "train", "--final", str(tmp_path / "resumed")))
    assert [(second[r]["resumed"], second[r]["step"]) for r in (0, 1)] == [(6, 12), (6, 12)], stderr
    for rank in (0, 1):
        expected = torch.load(tmp_path / f"reference-rank{rank}.pt", weights_only=True)
        got = torch.load(tmp_path / f"resumed-rank{rank}.pt", weights_only=True)
        assert_bitwise_equal(expected, got, f"rank {rank}")
    assert [c.step for c in CheckpointStore(tmp_path / "run", create=False).list()] == [3, 6, 9, 12]
