"""``Run(compression="zstd")`` end to end (issue 14): a job stopped by a signal and resumed from its
compressed checkpoints ends bitwise identical to an uninterrupted, uncompressed run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from compare import assert_same_training
from harness import TrainWorker, events

from hpcckpt import CheckpointStore, Run, TrainState
from hpcckpt.errors import UsageError

STEPS = 3 * 12  # train_worker.py: 96 samples, batches of 8, three epochs


def end_of(job: TrainWorker) -> dict[str, object]:
    ends = job.finish(timeout=180)
    assert ends, job.stderr
    return dict(ends[-1])


@pytest.mark.timeout(600)
def test_a_compressed_run_stopped_and_resumed_ends_bitwise_identical_to_a_plain_one(tmp_path: Path) -> None:
    args = ("--epochs", "3", "--workers", "0", "--step-sleep", "0.03")  # 36 steps of at least 0.03 s
    reference = TrainWorker(tmp_path / "reference", *args)
    reference.wait_started()
    assert end_of(reference)["step"] == STEPS

    run_dir = tmp_path / "compressed"
    compressed = (*args, "--save-every", "5ba", "--compression", "zstd")
    first = TrainWorker(run_dir, *compressed)
    first.wait_started()
    first.send(signal.SIGUSR1)  # at once: the stop comes long before the 36th step
    stopped = end_of(first)
    assert stopped["reason"] == "signal" and stopped["saved"] == stopped["step"], (stopped, first.stderr)
    assert isinstance(stopped["step"], int) and stopped["step"] < STEPS

    second = TrainWorker(run_dir, *compressed)
    assert second.wait_started()["step"] == stopped["step"], "resumed from the compressed checkpoint"
    assert end_of(second)["completed"]

    checkpoints = CheckpointStore(run_dir, create=False).list()
    assert checkpoints and all(c.compression == {"codec": "zstd", "level": 3} for c in checkpoints)
    assert len(events(run_dir, "commit")) >= 3
    assert_same_training(
        CheckpointStore(tmp_path / "reference", create=False).load(), CheckpointStore(run_dir, create=False).load()
    )


def test_run_refuses_a_bad_compression_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"Invalid compression_level=99: expected a whole number from 1 to 22"):
        Run(tmp_path / "run", TrainState(), compression="zstd", compression_level=99)
    assert not (tmp_path / "run").exists()
