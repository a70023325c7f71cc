"""The crash-loop breaker, through ``task_begin``/``task_end`` as the chain script runs them between tasks:
a real run directory, a fake Slurm environment, ``cancel=False`` (no queue to touch), no training.

A task makes progress when it commits a checkpoint after its task-begin; ``max_failures`` tasks in a row
without progress mark the run failed, and every task after that leaves at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from harness import events

from hpcckpt import CheckpointStore
from hpcckpt.slurm.tasks import task_begin, task_end


class Chain:
    """The array tasks of one chain (job 800), run one after the other on one run directory."""

    def __init__(self, run_dir: Path, max_failures: int) -> None:
        self.run_dir = run_dir
        self.max_failures = max_failures
        self.task = 0
        self.store = CheckpointStore(run_dir, keep_last=None)

    def environ(self) -> dict[str, str]:
        return {
            "SLURM_JOB_ID": str(900 + self.task),
            "SLURM_ARRAY_JOB_ID": "800",
            "SLURM_ARRAY_TASK_ID": str(self.task),
            "SLURM_ARRAY_TASK_MAX": "20",
        }

    def begin(self) -> bool:
        self.task += 1
        return task_begin(self.run_dir, self.environ(), self.max_failures, pid=1, cancel=False)

    def end(self, exit_status: int) -> None:
        task_end(self.run_dir, self.environ(), exit_status, self.max_failures, 0, cancel=False)

    def failing_task(self, exit_status: int = 1) -> bool:
        """A task whose training exits without saving; False when the task was told to leave at once."""
        if not self.begin():
            return False
        self.end(exit_status)
        return True

    def saving_task(self, exit_status: int = 0) -> None:
        assert self.begin()
        self.store.save({"step_seen": self.task}, step=self.task)
        self.end(exit_status)

    def state(self) -> dict[str, Any] | None:
        """The run's complete/failed event, or None while it is open."""
        return self.store.registry.status()


@pytest.fixture(autouse=True)
def _no_outside_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment passed to task_begin/task_end is the only job these tests know."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "HPCCKPT_"))]:
        monkeypatch.delenv(key)


def test_max_failures_tasks_in_a_row_without_a_checkpoint_fail_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path / "run", max_failures=3)
    assert chain.failing_task(exit_status=1)
    assert chain.failing_task(exit_status=137)
    assert chain.state() is None  # two in a row: still open
    assert chain.failing_task(exit_status=1)

    state = chain.state()
    assert state is not None and state["event"] == "failed"
    reason = "3 consecutive tasks made no progress (no new checkpoint): exit 1, exit 137, exit 1"
    assert state["reason"] == reason
    assert state["log"] == str(tmp_path / "run" / "logs" / "800_3.err")  # the last task's error log
    assert f"hpcckpt: run {tmp_path / 'run'} is marked failed: {reason}. See `hpcckpt status" in capsys.readouterr().err

    # Every later task leaves at once, and says why.
    assert not chain.begin()
    assert f"run {tmp_path / 'run'} is failed: {reason}; this task has nothing to do" in capsys.readouterr().err


def test_a_task_that_commits_a_checkpoint_resets_the_count(tmp_path: Path) -> None:
    chain = Chain(tmp_path / "run", max_failures=3)
    chain.failing_task()
    chain.failing_task()
    chain.saving_task()
    chain.failing_task()
    chain.failing_task()
    assert chain.state() is None  # two failures since the last progress
    chain.failing_task()
    state = chain.state()
    assert state is not None and state["event"] == "failed"


def test_a_task_that_saves_and_still_exits_non_zero_made_progress(tmp_path: Path) -> None:
    chain = Chain(tmp_path / "run", max_failures=2)
    chain.failing_task()
    chain.saving_task(exit_status=1)  # a crash in teardown, after a new checkpoint
    chain.failing_task()
    assert chain.state() is None


def test_a_task_killed_before_its_task_end_counts_as_a_failure(tmp_path: Path) -> None:
    chain = Chain(tmp_path / "run", max_failures=2)
    assert chain.begin()  # killed at its time limit: no task-end
    assert chain.failing_task(exit_status=1)  # its begin records the killed task's end first

    state = chain.state()
    assert state is not None and state["event"] == "failed"
    assert state["reason"] == "2 consecutive tasks made no progress (no new checkpoint): killed, exit 1"


def test_the_breaker_trips_at_task_begin_when_the_killed_task_was_the_last_straw(tmp_path: Path) -> None:
    chain = Chain(tmp_path / "run", max_failures=1)
    assert chain.begin()  # killed: no task-end
    assert not chain.begin()  # the next task records the kill, trips the breaker and leaves

    state = chain.state()
    assert state is not None and state["event"] == "failed"
    assert state["reason"] == "1 consecutive tasks made no progress (no new checkpoint): killed"
    assert [e["event"] for e in events(chain.run_dir)] == ["task-begin", "task-end", "failed"]


def test_a_killed_task_that_had_saved_is_not_a_failure(tmp_path: Path) -> None:
    chain = Chain(tmp_path / "run", max_failures=1)
    assert chain.begin()
    chain.store.save({"step_seen": 1}, step=1)  # then killed before task-end
    assert chain.begin()
    assert chain.state() is None
    killed_end = events(chain.run_dir, "task-end")
    assert [(e["killed"], e["progress"], e["latest_step"]) for e in killed_end] == [(True, True, 1)]


def test_reopening_a_failed_run_starts_the_count_again(tmp_path: Path) -> None:
    chain = Chain(tmp_path / "run", max_failures=2)
    chain.failing_task()
    chain.failing_task()
    assert not chain.begin()
    chain.store.registry.record("reopen", why="hpcckpt extend")  # what `hpcckpt extend` records

    assert chain.failing_task()  # one failure since the reopen: below the limit
    assert chain.state() is None
    assert chain.failing_task()
    state = chain.state()
    assert state is not None and state["event"] == "failed"


def test_a_complete_run_sends_every_later_task_away_without_counting_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path / "run", max_failures=1)
    chain.saving_task()
    chain.store.registry.record("complete", step=1)
    before = events(chain.run_dir)

    assert not chain.begin()
    assert events(chain.run_dir) == before  # nothing recorded: not a failure, not a task
    assert f"run {tmp_path / 'run'} is complete; this task has nothing to do" in capsys.readouterr().err
