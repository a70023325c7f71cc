"""The store reads no environment variable; the entry points read them and pass them on: ``HPCCKPT_LOCK``
reaches the registry of a ``Run`` and of the ``hpcckpt`` command, and a ``Run`` inside a Slurm job records
the job's ids in its manifests.

The lock mode shows in what a user notices: a process holds the fcntl lock of the run directory for the
whole test, so a process that waits for the fcntl lock would wait for 300 s; with ``HPCCKPT_LOCK=soft`` it
takes the marker file instead and finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hpcckpt import CheckpointStore

HOLD_FCNTL_LOCK = """
import sys, time
from pathlib import Path
from hpcckpt.store.registry import Registry
with Registry(Path(sys.argv[1]), lock="fcntl").locked():
    print("locked", flush=True)
    time.sleep(600)
"""

TRAIN = """
import sys, torch
from hpcckpt import Run, TrainState
state = TrainState(model=torch.nn.Linear(2, 2))
with Run(sys.argv[1], state, total_steps=2) as run:
    for _ in run:
        pass
print(run.last_checkpoint.name, flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCCKPT_", "SLURM_"))}
    return {**env, **extra}


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    """A run directory whose fcntl registry lock another process holds."""
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir, keep_last=None)
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_FCNTL_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True, env=_env()
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            yield run_dir
        finally:
            holder.kill()


def test_a_run_takes_the_lock_mode_and_the_job_ids_from_its_environment(held: Path) -> None:
    env = _env(
        HPCCKPT_LOCK="soft",
        SLURM_JOB_ID="4242",
        SLURM_ARRAY_JOB_ID="4240",
        SLURM_ARRAY_TASK_ID="3",
        SLURM_JOB_END_TIME=str(int(time.time()) + 3600),
    )
    result = subprocess.run(
        [sys.executable, "-c", TRAIN, str(held)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["step_000000002"]
    manifest = json.loads((held / "checkpoints" / "step_000000002" / "manifest.json").read_text())
    assert (manifest["job_id"], manifest["array_job_id"], manifest["array_task_id"]) == ("4242", "4240", 3)


def test_the_hpcckpt_command_takes_the_lock_mode_from_its_environment(held: Path) -> None:
    CheckpointStore(held, keep_last=None, lock="soft").save({"w": torch.ones(2)}, step=5)
    (held / "registry.json").unlink()  # the next reader rebuilds it, under the lock
    result = subprocess.run(
        [sys.executable, "-m", "hpcckpt", "verify", str(held)],
        env=_env(HPCCKPT_LOCK="soft"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "1 ok, 0 corrupt" in result.stdout
    assert json.loads((held / "registry.json").read_text())["checkpoints"][0]["name"] == "step_000000005"


OWN_STORE = """
import sys, torch
from hpcckpt import CheckpointStore, read_slurm_env
store = CheckpointStore(sys.argv[1], keep_last=None)
print(store.save({"w": torch.ones(2)}, step=7).name, flush=True)
print(CheckpointStore(sys.argv[1], keep_last=None, job=read_slurm_env({})).save({"w": torch.ones(2)}, step=8).name)
"""


def test_a_store_a_user_makes_follows_the_environment_for_what_it_is_not_given(held: Path) -> None:
    """A user's own script (an evaluation next to a running chain) is an entry point: left out, the lock
    mode and the job's ids come from its environment, as they did before the store stopped reading it."""
    env = _env(HPCCKPT_LOCK="soft", SLURM_JOB_ID="77", SLURM_ARRAY_JOB_ID="70", SLURM_ARRAY_TASK_ID="2")
    result = subprocess.run(
        [sys.executable, "-c", OWN_STORE, str(held)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["step_000000007", "step_000000008"]
    ids = [
        json.loads((held / "checkpoints" / name / "manifest.json").read_text())
        for name in ("step_000000007", "step_000000008")
    ]
    assert [(m["job_id"], m["array_job_id"], m["array_task_id"]) for m in ids] == [("77", "70", 2), (None, None, None)]
