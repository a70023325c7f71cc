"""Issue 14's "Done when": a chain on the real test cluster with ``--mirror s3://...`` survives its run
directory being deleted between two tasks and finishes bitwise identical to an uninterrupted run; no
credential appears in the rendered script, the events, the manifests or the task logs.

The S3 server is the tests' moto server on loopback (both test nodes reach it); the Slurm jobs inherit the
AWS_* variables from the submitting environment, as they would a user's. The deletion falls between two
tasks for certain: the array's pending tasks are held (``scontrol hold``) while the first one trains,
the run directory is deleted once that task has ended, and the tasks are released.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from chains import SlurmChain
from compare import assert_same_training
from harness import clean_env, events, train_command, wait_for
from s3lab import S3Lab

from hpcckpt import CheckpointStore


def reference_run(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """The same training, uninterrupted, without Slurm and without a mirror, started beside the chain."""
    return subprocess.Popen(
        train_command(tmp_path / "reference", *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )


def finish_reference(process: subprocess.Popen[str], tmp_path: Path) -> dict[str, Any]:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return CheckpointStore(tmp_path / "reference", create=False).load()


def _files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()]


@pytest.mark.timeout(900, func_only=True)
def test_a_mirrored_chain_survives_its_run_directory_deleted_between_tasks(
    slurm_chain: SlurmChain, s3_env: S3Lab, tmp_path: Path
) -> None:
    url = f"s3://{s3_env.new_bucket()}/runs/chain"
    args = ["--epochs", "200", "--step-sleep", "0.05", "--workers", "0"]  # ~2.3 tasks of training
    reference = reference_run(tmp_path, *args)
    run_dir, cluster = slurm_chain.run_dir, slurm_chain.cluster
    logs = run_dir.parent / f"{run_dir.name}.logs"
    job = slurm_chain.submit(
        *("--tasks", "5", "--time", "1", "--signal", "none", "--mirror", url),
        command=slurm_chain.train(*args),
        env_extra={"HPCCKPT_MARGIN": "3", **s3_env.env()},
    )
    rendered = (run_dir / "chain.sbatch").read_text()
    assert f"export HPCCKPT_MIRROR={url}\n" in rendered
    slurm_chain.wait_started()
    cluster.run(["scontrol", "hold", job])  # the pending tasks wait while the first one trains
    wait_for(lambda: events(run_dir, "task-end"), 240, "the first task to end")
    (uploaded, *_) = events(run_dir, "uploaded") or [None]
    assert uploaded is not None and uploaded["url"].startswith(url), events(run_dir)
    first_stop = events(run_dir, "stop")[-1]
    assert first_stop["reason"] == "budget" and first_stop["saved"], first_stop

    shutil.rmtree(run_dir)  # scratch purged between two tasks
    released = cluster.run(["scontrol", "release", job], check=False)  # "1_1: Job has already finished"
    assert f"{job}_2-5: No error" in released.stderr, released.stderr
    wait_for(lambda: events(run_dir, "start") if run_dir.exists() else None, 240, "a task to start again")
    final = slurm_chain.wait_state({"complete", "failed", "stalled"}, timeout=480)
    assert final["state"] == "complete", final

    # The task after the purge made the directory again, knew its chain, and resumed from the mirror.
    (submit,) = events(run_dir, "submit")
    assert submit["job"] == job
    (pulled, *_) = events(run_dir, "pulled")
    assert pulled["url"].startswith(f"{url}/") and pulled["step"] == first_stop["step"]
    assert events(run_dir, "start")[0]["resumed_step"] == first_stop["step"]
    assert (run_dir / "chain.sbatch").read_text() == rendered
    assert final["mirror"]["url"] == url and final["mirror"]["newest"]["step"] == final["step"]
    assert_same_training(finish_reference(reference, tmp_path), CheckpointStore(run_dir, create=False).load())
    slurm_chain.assert_gone()

    # No credential anywhere the chain wrote: its script, events, manifests, task logs.
    written = _files_under(run_dir, logs)
    assert any(p.name == "manifest.json" for p in written) and any(p.suffix == ".err" for p in written)
    leaked = [str(p) for p in written if s3_env.secret_key.encode() in p.read_bytes()]
    assert leaked == []
