"""The pieces Run is made of, each in the module of its concept (issue 12): when a save is due
(``Interval.due``), why a signal came (``signals.stop_cause``), the mid-epoch loader resume
(``state.epoch_batches``), the ranks from the job environment (``distributed.dist_env``), the stop
signals a worker ignores, and a constructor whose every parameter is documented."""

from __future__ import annotations

import inspect
import re
import signal
from typing import Any

import pytest

from hpcckpt import Interval, Run, TrainState, UsageError, read_slurm_env
from hpcckpt.distributed import dist_env
from hpcckpt.signals import Received, stop_cause
from hpcckpt.state import batch_done, epoch_batches
from hpcckpt.workers import stop_signals


def never() -> float:
    raise AssertionError("a clock read for an interval that is not wall time")


# -- Interval.due: the one switch on the interval's unit --------------------------------------------------
def test_a_step_interval_is_due_at_its_multiples_and_never_by_epoch_or_clock() -> None:
    every = Interval.parse("500ba")
    assert [every.due(step=s, elapsed=never) for s in (499, 500, 501, 1000)] == [False, True, False, True]
    assert not every.due(epoch=500), "an epoch count is not a step count"


def test_an_epoch_interval_is_due_at_the_end_of_its_multiples_only() -> None:
    every = Interval.parse("2ep")
    assert [every.due(epoch=e) for e in (1, 2, 3, 4)] == [False, True, False, True]
    assert not every.due(step=2, elapsed=never), "not at a step boundary"


def test_a_wall_time_interval_is_due_once_its_seconds_have_passed() -> None:
    every = Interval.parse("30s")
    assert not every.due(elapsed=lambda: 29.9)
    assert every.due(elapsed=lambda: 30.0) and every.due(elapsed=lambda: 31.0)
    assert not every.due(step=30, epoch=30), "without a clock, never"


# -- stop_cause: timeout or preemption, from the job's end --------------------------------------------------
END = 10_000.0
START = END - 3600


@pytest.mark.parametrize(
    ("sig", "before_end", "lead", "cause"),
    [
        (signal.SIGTERM, 0.0, 0.0, "timeout"),  # Slurm's own, at the end time
        (signal.SIGTERM, 30.0, 90.0, "timeout"),  # within 30 s: clocks and squeue rounding
        (signal.SIGTERM, 31.0, 90.0, "preemption"),
        (signal.SIGUSR1, 100.0, 90.0, "timeout"),  # where Slurm sends the warning for a 90 s lead
        (signal.SIGUSR1, 1800.0, 90.0, "preemption"),  # half an hour early: a preemption or a user
        (signal.SIGUSR1, 600.0, 0.0, "timeout"),  # lead unknown: the last 10 minutes
        (signal.SIGUSR1, 601.0, 0.0, "preemption"),
    ],
)
def test_stop_cause(sig: signal.Signals, before_end: float, lead: float, cause: str) -> None:
    assert stop_cause(Received(sig, END - before_end), END, lead, START) == cause


def test_stop_cause_without_a_deadline_is_unknown() -> None:
    assert stop_cause(Received(signal.SIGTERM, END), None, 90.0, START) == "unknown"


# -- epoch_batches: a plain DataLoader resumes mid-epoch in the same order ----------------------------------
def test_a_resumed_epoch_goes_on_after_the_batches_done_in_the_same_order() -> None:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(20)), batch_size=2, shuffle=True)
    torch.manual_seed(7)
    first = TrainState(epoch=3)
    uninterrupted: list[list[int]] = []
    for batch in epoch_batches(first, loader):
        uninterrupted.append(batch.tolist())
        batch_done(first)
        if len(uninterrupted) == 4:
            saved = {**first.loader_position}  # what a checkpoint holds after four batches
    assert first.loader_position["batch"] == 10 and first.loader_position["epoch"] == 3

    torch.manual_seed(12345)  # the resumed task's RNG, as its checkpoint restored it
    expected_rng = torch.get_rng_state()
    resumed = TrainState(epoch=3, loader_position=saved)
    rest = [batch.tolist() for batch in epoch_batches(resumed, loader)]
    assert rest == uninterrupted[4:]
    assert torch.equal(torch.get_rng_state(), expected_rng), "the checkpoint's RNG is put back"


def test_another_epochs_position_starts_the_epoch_over() -> None:
    import torch

    torch.manual_seed(0)
    state = TrainState(epoch=2, loader_position={"epoch": 1, "batch": 3, "rng": torch.get_rng_state()})
    assert list(epoch_batches(state, [10, 11, 12])) == [10, 11, 12]
    assert state.loader_position["epoch"] == 2 and state.loader_position["batch"] == 0


# -- dist_env: Slurm's ranks through the one table of variable names -----------------------------------------
def test_the_step_node_list_is_in_the_slurm_table() -> None:
    env = {"SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[01-08]"}
    assert read_slurm_env(env).step_node_list == "gpu[07-08]"
    assert read_slurm_env({}).step_node_list is None


def test_srun_ranks_rendezvous_on_the_jobs_first_node_without_a_step_list() -> None:
    env = dist_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[3-4]", "SLURM_JOB_ID": "7"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (1, 2, 0, "n3", 20007)
    assert env.launcher == "srun"


def test_srun_without_a_node_list_or_with_a_bad_job_id_is_a_clear_error() -> None:
    with pytest.raises(UsageError, match=r"Invalid SLURM_STEP_NODELIST/SLURM_JOB_NODELIST='': expected e.g."):
        dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    with pytest.raises(UsageError, match=r"Invalid SLURM_JOB_ID='abc': expected a whole number"):
        dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "abc"})


def test_srun_ranks_read_only_what_the_rendezvous_needs_and_refuse_an_empty_count() -> None:
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[3-4]", "SLURM_JOB_ID": "7"}
    # Another Slurm variable, even malformed, is not the rendezvous's business (as before issue 12).
    env = dist_env({**srun, "SLURM_JOB_END_TIME": "soon", "SLURM_ARRAY_TASK_ID": "x"})
    assert (env.rank, env.world_size, env.master_addr) == (1, 2, "n3")
    # srun set the count but left it empty: an error, not a world of one whose ranks all write as rank 0.
    with pytest.raises(UsageError, match=r"^SLURM_NTASKS is not set: expected a whole number$"):
        dist_env({**srun, "SLURM_NTASKS": ""})
    with pytest.raises(UsageError, match=r"^SLURM_PROCID is not set: expected a whole number$"):
        dist_env({**srun, "SLURM_PROCID": ""})


# -- workers: the signals a worker ignores are given, not read ---------------------------------------------
def test_stop_signals_are_sigterm_and_the_given_warning_once_each() -> None:
    assert stop_signals(signal.SIGUSR2) == (signal.SIGTERM, signal.SIGUSR2)
    assert stop_signals(signal.SIGTERM) == (signal.SIGTERM,)


# -- Run: every constructor parameter is documented; no dead surface -----------------------------------------
def test_every_run_parameter_is_documented_in_its_docstring() -> None:
    documented = set(re.findall(r"^\s*- ``(\w+)``:", Run.__doc__ or "", re.MULTILINE))
    parameters = [name for name in inspect.signature(Run).parameters if name != "self"]
    assert len(parameters) == 19  # issue 13: async_save, async_staging_bytes; issue 14: mirror, mirror_keep_last
    assert documented == set(parameters)


def test_run_has_no_exit_code_that_is_always_zero() -> None:
    attributes: dict[str, Any] = vars(Run)
    assert "exit_code" not in attributes
