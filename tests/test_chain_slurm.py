"""Chains on the real Slurm cluster: budget stops, real preemption, a USR1 sent with scancel, a crash loop,
completion cancelling what is left, extend and cancel. Each asserts what Slurm and the registry say."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from chains import SlurmChain
from compare import assert_same_training
from harness import clean_env, events, train_command

from hpcckpt import CheckpointStore

STEPS_PER_EPOCH = 12


def reference_run(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """The same training, uninterrupted and without Slurm, started beside the chain."""
    env = clean_env()
    return subprocess.Popen(
        train_command(tmp_path / "reference", *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish_reference(process: subprocess.Popen[str], tmp_path: Path) -> dict[str, Any]:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return CheckpointStore(tmp_path / "reference", create=False).load()


@pytest.mark.timeout(600, func_only=True)
def test_three_one_minute_tasks_stopped_by_the_budget(slurm_chain: SlurmChain, tmp_path: Path) -> None:
    args = ["--epochs", "200", "--step-sleep", "0.05", "--workers", "0"]  # ~2.3 tasks of training
    reference = reference_run(tmp_path, *args)
    run_dir = slurm_chain.run_dir
    slurm_chain.submit(
        *("--tasks", "4", "--time", "1", "--signal", "none"),
        command=slurm_chain.train(*args),
        env_extra={"HPCCKPT_MARGIN": "3"},
    )
    final = slurm_chain.wait_state({"complete", "failed", "stalled"}, timeout=480)
    assert final["state"] == "complete", final
    stops = events(run_dir, "stop")
    assert len(stops) >= 3
    assert [s["reason"] for s in stops] == ["budget"] * (len(stops) - 1) + ["completed"]
    assert all(s["saved"] and s["steps_lost"] == 0 for s in stops)
    starts = events(run_dir, "start")
    assert all("squeue/scontrol" in s["deadline_source"] for s in starts), "22.05: the deadline comes from squeue"
    assert [s["resumed_step"] for s in starts[1:]] == [s["step"] for s in stops[:-1]]
    assert all(0 < s["time_left"] < 6 for s in stops[:-1]), "each task used its minute"
    assert_same_training(finish_reference(reference, tmp_path), CheckpointStore(run_dir, create=False).load())
    slurm_chain.assert_gone()


@pytest.mark.timeout(600, func_only=True)
def test_real_preemption_saves_within_grace_and_the_chain_completes(slurm_chain: SlurmChain, tmp_path: Path) -> None:
    args = ["--epochs", "150", "--step-sleep", "0.02", "--workers", "0"]  # ~40 s of training
    reference = reference_run(tmp_path, *args)
    run_dir = slurm_chain.run_dir
    slurm_chain.submit(
        *("--tasks", "3", "--time", "3", "--sbatch-arg=--exclusive"),
        command=slurm_chain.train(*args),
    )
    slurm_chain.wait_started()
    time.sleep(5)
    cluster = slurm_chain.cluster
    high = cluster.sbatch(
        "#!/bin/bash\nsleep 5\n", "-p", "high", "-N", "2", "--exclusive", "--time=1", "--output=/dev/null", cwd=tmp_path
    )
    try:
        final = slurm_chain.wait_state({"complete", "failed"}, timeout=420)
    finally:
        cluster.cancel(high)
    assert final["state"] == "complete", final
    first = events(run_dir, "stop")[0]
    assert (first["reason"], first["cause"], first["saved"], first["steps_lost"]) == ("signal", "preemption", True, 0)
    assert events(run_dir, "start")[1]["resumed_step"] == first["step"]
    assert any(t["cause"] == "preemption" for t in final["history"])
    assert final["steps_lost_to_preemption"] == 0
    assert_same_training(finish_reference(reference, tmp_path), CheckpointStore(run_dir, create=False).load())
    slurm_chain.assert_gone()  # the requeued task and the rest were cancelled at completion


@pytest.mark.timeout(420, func_only=True)
def test_usr1_from_scancel_saves_at_the_next_step_and_the_next_task_resumes(slurm_chain: SlurmChain) -> None:
    run_dir = slurm_chain.run_dir
    args = ["--epochs", "100", "--step-sleep", "0.02", "--workers", "0"]
    job = slurm_chain.submit(*("--tasks", "3", "--time", "2"), command=slurm_chain.train(*args))
    slurm_chain.wait_started()
    time.sleep(4)
    # On 22.05 this form signals just this task yet exits 229 ("Invalid job id"); the task's own numeric
    # id would be worse: Slurm then signals every later task of the array too, 5 s after it starts.
    slurm_chain.cluster.run(["scancel", "--signal=USR1", "--batch", f"{job}_1"], check=False)
    final = slurm_chain.wait_state({"complete", "failed"}, timeout=300)
    assert final["state"] == "complete", final
    first = events(run_dir, "stop")[0]
    assert (first["reason"], first["saved"], first["steps_lost"]) == ("signal", True, 0)
    assert 0 < first["step"] < 100 * STEPS_PER_EPOCH
    assert events(run_dir, "start")[1]["resumed_step"] == first["step"]
    assert [s["reason"] for s in events(run_dir, "stop")[1:]] == ["completed"], "only the signalled task stopped"
    slurm_chain.assert_gone()


@pytest.mark.timeout(300, func_only=True)
def test_a_crash_loop_is_broken_and_the_rest_cancelled(slurm_chain: SlurmChain) -> None:
    crash = "import sys; print('RuntimeError: CUDA error: out of memory', file=sys.stderr); sys.exit(3)"
    slurm_chain.submit(*("--tasks", "5", "--time", "1", "--max-failures", "2"), command=[sys.executable, "-c", crash])
    final = slurm_chain.wait_state({"failed"}, timeout=200)
    assert final["reason"] == "2 consecutive tasks made no progress (no new checkpoint): exit 3, exit 3"
    assert "CUDA error: out of memory" in final["log_tail"]
    slurm_chain.assert_gone()
    assert len(slurm_chain.events("task-begin")) == 2
    text = slurm_chain.hpcckpt("status", str(slurm_chain.run_dir)).stdout
    assert "state    FAILED" in text and "| RuntimeError: CUDA error: out of memory" in text


@pytest.mark.timeout(300, func_only=True)
def test_completion_cancels_the_remaining_tasks(slurm_chain: SlurmChain) -> None:
    slurm_chain.submit(*("--tasks", "4", "--time", "2"), command=slurm_chain.train("--epochs", "2", "--workers", "0"))
    final = slurm_chain.wait_state({"complete", "failed"}, timeout=200)
    assert final["state"] == "complete" and final["step"] == 2 * STEPS_PER_EPOCH
    slurm_chain.assert_gone()  # tasks 2-4 never ran: cancelled while pending
    assert len(slurm_chain.events("task-begin")) == 1
    assert final["tasks_used"] == 1


@pytest.mark.timeout(300, func_only=True)
def test_extend_queues_an_array_after_the_current_one_and_cancel_removes_both(slurm_chain: SlurmChain) -> None:
    run_dir = slurm_chain.run_dir
    args = ["--epochs", "1000", "--step-sleep", "0.05", "--workers", "0"]
    job = slurm_chain.submit(*("--tasks", "1", "--time", "2"), command=slurm_chain.train(*args))
    extended = slurm_chain.hpcckpt("extend", str(run_dir), "--tasks", "2")
    assert extended.returncode == 0, extended.stderr
    second = extended.stdout.split()[1].rstrip(":")
    assert f"after {job}" in extended.stdout
    cluster = slurm_chain.cluster
    assert (
        cluster.job_field(f"{second}_1" if "_" not in second else second, "Dependency").startswith(f"afterany:{job}")
        or "afterany" in cluster.run(["scontrol", "show", "job", second]).stdout
    )
    now = slurm_chain.status()
    assert now["jobs"] == [job, second] and now["tasks_left"] == 3
    cancelled = slurm_chain.hpcckpt("cancel", str(run_dir))
    assert cancelled.returncode == 0, cancelled.stderr
    slurm_chain.assert_gone(job, second)


@pytest.mark.timeout(420, func_only=True)
def test_auto_extend_resubmits_an_unfinished_chain_once(slurm_chain: SlurmChain) -> None:
    args = ["--epochs", "100", "--step-sleep", "0.05", "--workers", "0"]  # ~65 s: more than one task
    first = slurm_chain.submit(
        *("--tasks", "1", "--time", "1", "--signal", "none", "--auto-extend", "1"),
        command=slurm_chain.train(*args),
        env_extra={"HPCCKPT_MARGIN": "3"},
    )
    final = slurm_chain.wait_state({"complete", "failed", "stalled"}, timeout=330)
    assert final["state"] == "complete", final
    submits = slurm_chain.events("submit")
    assert [s.get("auto", False) for s in submits] == [False, True]
    assert final["jobs"][0] == first and len(final["jobs"]) == 2
    assert [s["reason"] for s in slurm_chain.events("stop")] == ["budget", "completed"]
