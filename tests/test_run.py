"""Run in real processes: budget stops, real signals at random moments, completion, and exact resume."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from compare import assert_same_training
from harness import TrainWorker, events

from hpcckpt import CheckpointStore

STEPS_PER_EPOCH = 12  # 96 samples, batches of 8


class Job(TrainWorker):
    """One training process: started, optionally signalled, then read to its end line."""

    def end(self, timeout: float = 120) -> dict[str, Any]:
        ends = self.finish(timeout)
        err = self.stderr
        if self.process.returncode in (-signal.SIGUSR1, -signal.SIGTERM) and ends:
            # The signal came after Run had finished (completed, or stopped and saved) and restored the
            # previous handlers, here the default ones: only the script's tail was cut short.
            assert ends[-1]["completed"] or ends[-1]["saved"] == ends[-1]["step"], ends[-1]
            return ends[-1]
        assert self.process.returncode == 0, err
        assert ends, err
        return ends[-1]


def final_state(run_dir: Path) -> dict[str, Any]:
    return CheckpointStore(run_dir, create=False).load()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_training_ends_bitwise_identical_to_an_uninterrupted_one(tmp_path: Path) -> None:
    """The acceptance test: budget stops, USR1 and TERM at random moments, mid-epoch included, with a
    shuffling DataLoader (one worker process, random augmentation) and dropout."""
    # 144 steps of at least 0.03 s: however fast the machine, the first five interruptions (a budget stop
    # lasts 1.6 s at most, a signal comes 0.3 s after the start at most) leave steps to train.
    args = ("--epochs", "12", "--workers", "1", "--step-sleep", "0.03")
    reference = Job(tmp_path / "reference", *args).end()
    assert reference["completed"] and reference["step"] == 12 * STEPS_PER_EPOCH

    run_dir = tmp_path / "interrupted"
    rng = random.Random(7)
    plan = ["budget", "usr1", "term", "budget", "usr1", "term", "usr1", "budget"]
    interruptions: list[str] = []
    for attempt in range(40):
        mode = plan[attempt % len(plan)] if len(interruptions) < len(plan) else "none"
        if mode == "budget":
            job = Job(run_dir, *args, deadline_in=rng.uniform(1.0, 1.6))  # from the built model
            job.wait_started()
        else:
            job = Job(run_dir, *args)
            job.wait_started()
            if mode != "none":
                time.sleep(rng.uniform(0.05, 0.3))
                job.send(signal.SIGUSR1 if mode == "usr1" else signal.SIGTERM)
        end = job.end()
        if end["completed"]:
            break
        assert end["reason"] == ("budget" if mode == "budget" else "signal"), (mode, end, job.stderr)
        assert end["saved"] == end["step"], "a budget or signal stop saves the step it stopped at"
        interruptions.append(mode)
    else:
        pytest.fail(f"the run never completed; interruptions: {interruptions}")

    assert len(interruptions) >= 5, interruptions
    assert {"budget", "usr1", "term"} <= set(interruptions)
    stopped_at = [e["step"] for e in events(run_dir, "stop") if e["reason"] != "completed"]
    assert any(step % STEPS_PER_EPOCH for step in stopped_at), f"no stop fell mid-epoch: {stopped_at}"
    assert all(e["steps_lost"] == 0 for e in events(run_dir, "stop")), "a stop lost steps"

    assert_same_training(final_state(tmp_path / "reference"), final_state(run_dir))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_signals_at_random_moments_before_during_and_after_saves(tmp_path: Path) -> None:
    """Saves take tens of milliseconds (32 MiB of state) and happen every 3 steps; USR1 or TERM (sometimes
    twice) lands anywhere. Every stop saves the step it stopped at, and nothing half-written remains."""
    run_dir = tmp_path / "run"
    args = ("--steps", "100000", "--save-every", "3ba", "--numel", str(8 << 20), "--workers", "0")
    rng = random.Random(11)
    last_step = 0
    for round_ in range(8):
        job = Job(run_dir, *args)
        started = job.wait_started()
        assert started["step"] == last_step, "resumed exactly where the last task stopped"
        time.sleep(rng.uniform(0.05, 0.6))
        first = rng.choice([signal.SIGUSR1, signal.SIGTERM])
        job.send(first)
        if round_ % 3 == 2:
            time.sleep(rng.uniform(0, 0.05))
            job.send(rng.choice([signal.SIGUSR1, signal.SIGTERM]))  # a second signal changes nothing
        end = job.end()
        assert end["reason"] == "signal", end
        assert end["saved"] == end["step"] > last_step, (end, job.stderr)
        last_step = end["step"]
        store = CheckpointStore(run_dir, keep_last=None, create=False)
        latest = store.latest()
        assert latest is not None and latest.step == last_step
        for checkpoint in store.list():
            store.verify(checkpoint)
        assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_term_with_a_tiny_grace_window_leaves_at_once_with_the_last_checkpoint_intact(tmp_path: Path) -> None:
    args = (
        "--steps",
        "100000",
        "--save-every",
        "20ba",
        "--numel",
        str(8 << 20),
        "--workers",
        "0",
        "--step-sleep",
        "0.01",
        "--grace",
        "0",
    )
    # A TERM that lands while the periodic save of the current step is being written (under load these
    # 32-MiB saves take much of the time) stops at a step that is saved already: nothing to show there.
    # Such a stop must still be a clean signal stop; the test then tries again at another moment.
    for attempt in range(6):
        run_dir = tmp_path / f"run{attempt}"
        job = Job(run_dir, *args)
        job.wait_started()
        time.sleep(1.0 + 0.13 * attempt)
        job.send(signal.SIGTERM)
        end = job.end()
        assert (end["reason"], end["cause"]) == ("signal", "unknown")
        if end["step"] != end["saved"]:
            break
    else:
        pytest.fail("every TERM came during the periodic save of the step it stopped at")
    assert end["step"] > end["saved"], "with no grace left, the stop step is not saved"
    assert "does not fit the 0.0 s left of the grace window" in job.stderr
    store = CheckpointStore(run_dir, create=False)
    latest = store.latest()
    assert latest is not None and latest.step == end["saved"] and latest.step % 20 == 0
    store.verify(latest)
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")] == []
    (stop,) = events(run_dir, "stop")
    assert stop["steps_lost"] == end["step"] - end["saved"] and stop["saved"] is False
    resumed = Job(run_dir, *args)
    assert resumed.wait_started()["step"] == end["saved"]
    resumed.send(signal.SIGUSR1)
    resumed.end()


@pytest.mark.slow
def test_completion_makes_the_next_task_a_no_op(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = Job(run_dir, "--epochs", "1", "--workers", "0").end()
    assert first["completed"] and first["step"] == STEPS_PER_EPOCH
    events_before = events(run_dir)
    started = time.monotonic()
    again = Job(run_dir, "--epochs", "1", "--workers", "0")
    assert again.wait_started()["step"] == STEPS_PER_EPOCH
    end = again.end()
    assert time.monotonic() - started < 30
    assert (end["completed"], end["reason"], end["step"]) == (True, "completed", STEPS_PER_EPOCH)
    assert "already complete at step 12; nothing to do" in again.stderr
    events_after = events(run_dir)
    assert events_after == events_before, "a no-op task records nothing and trains nothing"


@pytest.mark.slow
def test_a_budget_stop_loses_no_step_and_records_the_task(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ("--steps", "100000", "--workers", "0", "--step-sleep", "0.01")
    end = Job(run_dir, *args, deadline_in=4.0).end()
    assert (end["reason"], end["saved"]) == ("budget", end["step"])
    start = events(run_dir, "start")[0]
    stop = events(run_dir, "stop")[0]
    assert start["resumed_step"] == 0 and start["deadline_source"] == "HPCCKPT_DEADLINE"
    assert stop["steps_done"] == end["step"] and stop["steps_lost"] == 0
    assert 0 < stop["time_left"] < 1.5, "stopped close to the deadline, with the save done"
    nxt = Job(run_dir, *args, deadline_in=3.0)
    assert nxt.wait_started()["step"] == end["step"]
    nxt.end()


@pytest.mark.slow
def test_sigterm_well_before_the_deadline_is_a_preemption_and_at_it_a_timeout(tmp_path: Path) -> None:
    args = ("--steps", "100000", "--workers", "0", "--step-sleep", "0.01")
    early = Job(tmp_path / "early", *args, deadline_in=3600.0)
    early.wait_started()
    early.send(signal.SIGTERM)
    assert early.end()["cause"] == "preemption", "an hour before the end time: Slurm's preemption"
    late = Job(tmp_path / "late", *args, deadline_in=20.0)
    late.wait_started()
    late.send(signal.SIGTERM)
    assert late.end()["cause"] == "timeout", "seconds before the end time: the time limit's own SIGTERM"
