"""Run with a mirror, in real processes: the run directory deleted between two tasks resumes from the mirror
and ends bitwise identical to an uninterrupted run; wrong credentials cost nothing but one clear message."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from compare import assert_same_training
from harness import TrainWorker, clean_env, events, wait_for
from s3lab import S3Lab

from hpcckpt import CheckpointStore
from hpcckpt.store.mirror import Mirror

ARGS = ("--epochs", "4", "--workers", "0", "--save-every", "5ba", "--step-sleep", "0.1")
STEPS = 4 * 12


def _end(job: TrainWorker) -> dict[str, Any]:
    ends = job.finish(300)
    assert job.process.returncode == 0 and ends, job.stderr
    return ends[-1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_deleted_run_directory_resumes_from_the_mirror_and_ends_bitwise_identical(
    tmp_path: Path, mirror_url: str
) -> None:
    reference = _end(TrainWorker(tmp_path / "reference", *ARGS))
    assert reference["completed"] and reference["step"] == STEPS

    run_dir = tmp_path / "scratch" / "run"
    env = clean_env(HPCCKPT_MIRROR=mirror_url)
    first = TrainWorker(run_dir, *ARGS, env=env)
    first.wait_started()
    wait_for(lambda: events(run_dir, "commit"), 300, "the first interval save")
    first.send(signal.SIGUSR1)
    stopped = _end(first)
    assert not stopped["completed"] and stopped["saved"] == stopped["step"] > 0, stopped
    # The stop waited for its upload (no deadline here): the mirror holds the step it stopped at.
    remote = Mirror(mirror_url).list()
    assert remote and remote[-1].step == stopped["step"]

    shutil.rmtree(run_dir)  # scratch purged between two tasks

    second = TrainWorker(run_dir, *ARGS, env=env)
    assert second.wait_started()["step"] == stopped["step"]
    done = _end(second)
    assert done["completed"] and done["step"] == STEPS
    assert "resuming from the mirror" in second.stderr
    pulled = events(run_dir, "pulled")
    assert [e["step"] for e in pulled] == [stopped["step"]]
    assert events(run_dir, "start")[0]["resumed_step"] == stopped["step"]
    assert_same_training(
        CheckpointStore(tmp_path / "reference", create=False).load(), CheckpointStore(run_dir, create=False).load()
    )
    assert Mirror(mirror_url).list()[-1].step == STEPS  # the final checkpoint reached the mirror too


@pytest.mark.timeout(600)
def test_credentials_gone_wrong_mid_run_cost_one_clear_message_and_no_secret(
    tmp_path: Path, s3_lab: S3Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_lab.new_bucket()
    wrong = s3_lab.wrong_env()
    run_dir = tmp_path / "run"
    url = f"s3://{bucket}/r"
    first = TrainWorker(run_dir, *ARGS, env=clean_env(**s3_lab.env(), HPCCKPT_MIRROR=url))
    first.wait_started()
    wait_for(lambda: events(run_dir, "commit"), 300, "the first interval save")
    first.send(signal.SIGUSR1)
    stopped = _end(first)
    assert not stopped["completed"] and stopped["saved"] == stopped["step"]
    for key, value in s3_lab.env().items():
        monkeypatch.setenv(key, value)  # Mirror(url) below lists as the first task did
    assert Mirror(url).list()[-1].step == stopped["step"]
    # The next task's credentials have expired: it trains on locally, saying so once.
    job = TrainWorker(run_dir, *ARGS, env=clean_env(**wrong, HPCCKPT_MIRROR=url))
    done = _end(job)
    assert done["completed"], job.stderr
    stderr = job.stderr
    said = [line for line in stderr.splitlines() if "access denied" in line]
    assert len(said) == 1, stderr
    assert "training goes on" in said[0]
    assert f"mirror s3://{bucket}/r: access denied (check the credentials" in said[0]
    assert "left for the next task" in stderr  # the stop says what it did not upload
    assert [c.step for c in CheckpointStore(run_dir, create=False).list()][-1] == STEPS
    assert events(run_dir, "upload_failed")
    for secret in (wrong["AWS_SECRET_ACCESS_KEY"], s3_lab.secret_key):
        assert secret not in stderr + first.stderr
        for path in run_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


@pytest.mark.timeout(600)
def test_a_run_directory_without_checkpoints_never_starts_from_scratch_past_an_unreadable_mirror(
    tmp_path: Path, s3_lab: S3Lab
) -> None:
    url = f"s3://{s3_lab.new_bucket()}/r"
    wrong = s3_lab.wrong_env()
    run_dir = tmp_path / "run"
    job = TrainWorker(run_dir, "--epochs", "1", "--workers", "0", env=clean_env(**wrong, HPCCKPT_MIRROR=url))
    job.finish(300)
    assert job.process.returncode != 0
    assert f"mirror {url}: access denied (check the credentials" in job.stderr
    assert "the run does not start from scratch" in job.stderr
    assert not events(run_dir, "start")  # not one step trained
    assert CheckpointStore(run_dir, create=False).list() == []
    assert wrong["AWS_SECRET_ACCESS_KEY"] not in job.stderr and s3_lab.secret_key not in job.stderr
