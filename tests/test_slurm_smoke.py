"""The throwaway Slurm cluster does what the other Slurm tests rely on, checked on Slurm itself.

Timeouts use func_only=True: the session's first Slurm test also pays for starting the cluster (and,
on a fresh CI machine, for apt-get installing it), which is bounded by slurm_cluster.START_TIMEOUT.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster

# The low partition's GraceTime and the cluster's KillWait (tests/cluster/slurm-lab), in seconds.
GRACE_TIME = 15
KILL_WAIT = 5

Submit = Callable[..., str]


@pytest.fixture
def submit(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[Submit]:
    """sbatch a script from tmp_path; every job is cancelled, and gone from the queue, afterwards."""
    jobs: list[str] = []

    def _submit(script: str, *args: str) -> str:
        jobid = slurm_cluster.sbatch(script, *args, cwd=tmp_path)
        jobs.append(jobid)
        return jobid

    yield _submit
    slurm_cluster.cancel(*jobs)
    # A cancelled job keeps its node (COMPLETING) until its processes are gone, up to KillWait; the
    # next test must find both nodes free.
    slurm_cluster.wait_for(
        lambda: not any(slurm_cluster.squeue_ids(j) for j in jobs),
        timeout=30,
        what=f"jobs {jobs} to leave the queue",
    )


def wait_for_file(cluster: SlurmCluster, path: Path, timeout: float) -> Path:
    return cluster.wait_for(lambda: path.exists() and path, timeout, what=f"{path.name} to appear")


ARRAY_TASK = """#!/bin/bash
start=$(date +%s.%N)
sleep 2
echo "$SLURM_ARRAY_TASK_ID $start $(date +%s.%N)" >> tasks.log
"""


@pytest.mark.timeout(60, func_only=True)
def test_array_with_throttle_one_runs_tasks_one_after_another(
    slurm_cluster: SlurmCluster, submit: Submit, tmp_path: Path
) -> None:
    array = submit(ARRAY_TASK, "--array=1-3%1", "--output=/dev/null")
    slurm_cluster.wait_for(lambda: not slurm_cluster.squeue_ids(array), 45, what="the array to finish")

    runs = sorted(
        (float(start), float(end), int(task))
        for task, start, end in (line.split() for line in (tmp_path / "tasks.log").read_text().splitlines())
    )
    assert [task for _, _, task in runs] == [1, 2, 3]
    for (_, prev_end, _), (start, end, _) in itertools.pairwise(runs):
        assert start >= prev_end, f"tasks overlap: {runs}"
        assert end - start >= 2
    records = slurm_cluster.job_records(array)
    assert sorted(r["ArrayTaskId"] for r in records) == ["1", "2", "3"]
    assert {r["JobState"] for r in records} == {"COMPLETED"}


USR1_JOB = """#!/bin/bash
trap 'echo "got USR1" > marker; exit 0' USR1
touch ready  # only now is the trap in place
while true; do sleep 0.2; done
"""


@pytest.mark.timeout(45, func_only=True)
def test_scancel_signal_batch_reaches_the_batch_scripts_trap(
    slurm_cluster: SlurmCluster, submit: Submit, tmp_path: Path
) -> None:
    job = submit(USR1_JOB)
    wait_for_file(slurm_cluster, tmp_path / "ready", 30)

    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])

    slurm_cluster.wait_for(
        lambda: slurm_cluster.job_field(job, "JobState") not in {"RUNNING", "COMPLETING"},
        10,
        what="the job to end",
    )
    assert (tmp_path / "marker").read_text() == "got USR1\n"
    assert slurm_cluster.job_field(job, "JobState") == "COMPLETED"
    assert slurm_cluster.job_field(job, "ExitCode") == "0:0"


LOW_JOB = """#!/bin/bash
# Logs its TERM and keeps going, so that the SIGKILL that follows shows in the heartbeat.
trap 'echo "got TERM restart=${SLURM_RESTART_COUNT:-0} $(date +%s.%N)" >> batch.log' TERM
srun --ntasks=1 bash step.sh &
touch ready
# Written aside and renamed: the test may read it at any moment, never half-written.
while true; do date +%s.%N > heartbeat.tmp; mv heartbeat.tmp heartbeat; sleep 0.2; done
"""

STEP = """trap 'echo "got TERM $(date +%s.%N)" >> step.log' TERM
touch step-ready
while true; do sleep 0.2; done
"""

HIGH_JOB = """#!/bin/bash
echo "$(date +%s.%N) $SLURMD_NODENAME" > high.log
"""


@pytest.mark.timeout(90, func_only=True)
def test_high_partition_job_preempts_and_requeues_a_low_job(
    slurm_cluster: SlurmCluster, submit: Submit, tmp_path: Path
) -> None:
    (tmp_path / "step.sh").write_text(STEP)
    low = submit(LOW_JOB, "-w", "node1", "--exclusive", "--open-mode=append", "--output=low.out")
    wait_for_file(slurm_cluster, tmp_path / "ready", 30)
    wait_for_file(slurm_cluster, tmp_path / "step-ready", 10)

    preempted_at = time.time()
    high = submit(HIGH_JOB, "-p", "high", "-w", "node1", "--exclusive", "--output=/dev/null")
    wait_for_file(slurm_cluster, tmp_path / "high.log", GRACE_TIME + KILL_WAIT + 30)
    slurm_cluster.wait_for(
        lambda: slurm_cluster.job_field(low, "JobState") == "PENDING", 10, what="the low job to be requeued"
    )

    # Slurm 22.05: at the start of GraceTime only the job steps get SIGTERM; the batch shell gets it
    # when GraceTime runs out, and SIGKILL KillWait seconds after that.
    step_term = float((tmp_path / "step.log").read_text().split()[2])
    assert step_term - preempted_at < 5
    (batch_term_line,) = (tmp_path / "batch.log").read_text().splitlines()
    assert batch_term_line.startswith("got TERM restart=0 ")
    batch_term = float(batch_term_line.split()[-1])
    assert GRACE_TIME - 1 <= batch_term - preempted_at <= GRACE_TIME + 10
    last_beat = float((tmp_path / "heartbeat").read_text())
    assert KILL_WAIT - 2 <= last_beat - batch_term <= KILL_WAIT + 3

    high_start, high_node = (tmp_path / "high.log").read_text().split()
    assert high_node == "node1"
    assert float(high_start) >= last_beat
    # Requeued, not cancelled: pending again, held back by a BeginTime (cred_expire + 1 s: 11 s here).
    assert slurm_cluster.job_field(low, "Restarts") == "1"
    assert slurm_cluster.job_field(low, "Reason") == "BeginTime"
    assert slurm_cluster.job_field(high, "JobState") in {"RUNNING", "COMPLETING", "COMPLETED"}


SRUN_JOB = """#!/bin/bash
srun bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID'
"""


@pytest.mark.timeout(45, func_only=True)
def test_srun_places_one_task_on_each_node(slurm_cluster: SlurmCluster, submit: Submit, tmp_path: Path) -> None:
    job = submit(SRUN_JOB, "--nodes=2", "--ntasks=2", "--output=tasks.out")
    slurm_cluster.wait_for(lambda: not slurm_cluster.squeue_ids(job), 30, what="the job to finish")

    assert slurm_cluster.job_field(job, "JobState") == "COMPLETED"
    tasks = sorted(tuple(line.split()) for line in (tmp_path / "tasks.out").read_text().splitlines())
    # Block distribution: rank 0 on the first node.
    assert tasks == [("node1", "0"), ("node2", "1")]
