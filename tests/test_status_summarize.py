"""``hpcckpt status`` on hand-built events, checkpoints and queues: no Slurm, no training.

Each test writes the registry's events as they stand in ``events.jsonl`` (Run's start/stop, the chain's
submit and task-begin/task-end, the run's complete/failed) and checks what a user reads: the state, the
step, the rate and ETA, the tasks, the warnings, and the lines of the text form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hpcckpt.slurm.commands import QueueEntry
from hpcckpt.slurm.status import format_status, summarize
from hpcckpt.store.manifest import Checkpoint

RUN = Path("/scratch/runs/mlp")
NOW = 10_000.0


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"event": kind, **fields}


def checkpoint(step: int, *, created: float = NOW - 60, save_seconds: float | None = 0.5) -> Checkpoint:
    name = f"step-{step:08d}"
    return Checkpoint(
        name=name,
        path=RUN / "checkpoints" / name,
        step=step,
        epoch=0,
        metrics={},
        size=3 * 2**20,
        created=created,
        checksum="0" * 64,
        files=(),
        format="torch",
        save_seconds=save_seconds,
        seq=step,
    )


def task(job: str, begin: float, resumed: int, stop: dict[str, Any] | None, status: int | None) -> list[dict[str, Any]]:
    """One chain task as it stands in the log: task-begin, Run's start, Run's stop, task-end."""
    events = [
        event("task-begin", job=job, host="node1", time=begin),
        event("start", job=job, host="node1", resumed_step=resumed, total_steps=10_000, time=begin + 5),
    ]
    if stop is not None:
        events.append(event("stop", time=begin + 5 + stop.pop("seconds"), **stop))
    if status is not None:
        events.append(event("task-end", job=job, status=status, killed=False, progress=True))
    return events


def submitted(tasks: int = 3, **fields: Any) -> dict[str, Any]:
    return event("submit", job="700", tasks=tasks, time_seconds=600, lead=60, backend="slurm", **fields)


def budget_stop(steps_done: int, step: int, seconds: float) -> dict[str, Any]:
    return {"reason": "budget", "cause": "timeout", "step": step, "steps_done": steps_done, "saved": True,
            "time_left": 30.0, "steps_lost": 0, "seconds": seconds}  # fmt: skip


def queue(*lines: tuple[str, str]) -> list[QueueEntry]:
    return [QueueEntry(array_job="700", job=job, state=state, reason="None") for job, state in lines]


def test_a_complete_run_reports_its_step_rate_and_history_without_an_eta() -> None:
    events = [
        submitted(),
        *task("700_1", 1000.0, 0, budget_stop(4000, 4000, 400.0), 0),
        *task("700_2", 2000.0, 4000, {**budget_stop(6000, 10_000, 600.0), "reason": "completed", "cause": None}, 0),
        event("complete", step=10_000),
    ]
    status = summarize(RUN, events, [checkpoint(4000), checkpoint(10_000)], queue(), NOW)

    assert status.state == "complete"
    assert (status.step, status.total_steps) == (10_000, 10_000)
    assert status.steps_per_second == pytest.approx(10.0)  # 10,000 steps in 1,000 s of training
    assert status.eta_seconds is None and status.tasks_needed is None
    assert (status.tasks_used, status.tasks_left, status.tasks_running) == (2, 0, 0)
    assert status.jobs == ["700"]
    assert [(t.job, t.resumed_step, t.step, t.reason) for t in status.history] == [
        ("700_1", 0, 4000, "budget"),
        ("700_2", 4000, 10_000, "completed"),
    ]
    assert status.warnings == []
    assert status.last_checkpoint is not None and status.last_checkpoint["age_seconds"] == pytest.approx(60.0)


def test_running_and_pending_come_from_the_queue_with_array_ranges_counted_as_tasks() -> None:
    events = [submitted(tasks=5), *task("700_1", 1000.0, 0, None, None)]
    running = summarize(RUN, events, [], queue(("700_1", "RUNNING"), ("700_[2-5%1]", "PENDING")), NOW)
    assert (running.state, running.tasks_running, running.tasks_left) == ("running", 1, 5)

    pending = summarize(RUN, [submitted(tasks=5)], [], queue(("700_[1-5%1]", "PENDING")), NOW)
    assert (pending.state, pending.tasks_running, pending.tasks_left) == ("pending", 0, 5)
    assert pending.tasks_used == 0


def test_an_unreadable_queue_is_unknown_never_stalled_unless_a_task_is_open() -> None:
    ended = [submitted(), *task("700_1", 1000.0, 0, budget_stop(4000, 4000, 400.0), 0)]
    unknown = summarize(RUN, ended, [checkpoint(4000)], None, NOW)
    assert unknown.state == "unknown"
    assert unknown.tasks_left is None
    assert not any("extend" in w for w in unknown.warnings)  # item 25: never "extend" a chain maybe queued

    open_task = [*ended, *task("700_2", 2000.0, 4000, None, None)]
    assert summarize(RUN, open_task, [checkpoint(4000)], None, NOW).state == "running"


def test_an_empty_queue_before_completion_is_stalled_and_says_how_to_extend() -> None:
    events = [submitted(), *task("700_1", 1000.0, 0, budget_stop(4000, 4000, 400.0), 0)]
    status = summarize(RUN, events, [checkpoint(4000)], queue(), NOW)
    assert status.state == "stalled"
    assert status.warnings == [
        f"no task is queued and the run is not complete: `hpcckpt extend {RUN} --tasks N`",
    ]


def test_a_failed_run_shows_the_reason_and_the_tail_of_the_last_error_log(tmp_path: Path) -> None:
    log = tmp_path / "700_3.err"
    log.write_text("".join(f"line {n}\n" for n in range(1, 41)) + "RuntimeError: CUDA out of memory\n")
    reason = "3 consecutive tasks made no progress (no new checkpoint): exit 1, exit 1, exit 1"
    events = [submitted(), event("failed", reason=reason, log=str(log))]
    status = summarize(RUN, events, [], queue(), NOW)

    assert status.state == "failed"
    assert status.reason == reason
    assert status.log_tail is not None
    assert status.log_tail.splitlines() == [*(f"line {n}" for n in range(27, 41)), "RuntimeError: CUDA out of memory"]
    text = format_status(status)
    assert f"failed   {reason}" in text.splitlines()
    assert text.endswith("  | RuntimeError: CUDA out of memory")


def test_a_reopened_run_is_no_longer_failed() -> None:
    events = [submitted(), event("failed", reason="3 consecutive tasks"), event("reopen", why="hpcckpt extend")]
    status = summarize(RUN, events, [], queue(("700_[1-3%1]", "PENDING")), NOW)
    assert status.state == "pending"
    assert status.reason is None


def test_preemption_counts_the_steps_lost_and_their_time_at_that_task_s_rate() -> None:
    preempted = {**budget_stop(500, 500, 100.0), "cause": "preemption", "steps_lost": 50, "saved": False}
    events = [submitted(), *task("700_1", 1000.0, 0, preempted, 143)]
    status = summarize(RUN, events, [], queue(("700_[2-3%1]", "PENDING")), NOW)

    assert status.steps_lost_to_preemption == 50
    assert status.time_lost_to_preemption == pytest.approx(10.0)  # 50 steps at 5 steps/s
    lines = format_status(status).splitlines()
    assert "lost     50 steps, 10 s to preemption" in lines
    assert any("budget (preemption); 500 steps, NOT saved, 50 lost" in line for line in lines)


def test_the_eta_asks_for_more_tasks_than_are_queued_with_the_command_that_adds_them() -> None:
    events = [submitted(), *task("700_1", 1000.0, 0, budget_stop(1000, 1000, 100.0), 0)]
    status = summarize(RUN, events, [checkpoint(1000)], queue(("700_[2-3%1]", "PENDING")), NOW)

    assert status.steps_per_second == pytest.approx(10.0)
    assert status.eta_seconds == pytest.approx(900.0)  # 9,000 steps left at 10 steps/s
    assert status.tasks_needed == 2  # 900 s in tasks of 600 s, 90% of each used
    assert status.warnings == []  # two queued: enough

    short = summarize(RUN, events, [checkpoint(1000)], queue(("700_3", "PENDING")), NOW)
    assert short.warnings == [
        "at the current rate (10 steps/s) the run needs about 2 more task(s) of 10 min, but only 1 are queued: "
        f"`hpcckpt extend {RUN} --tasks 1`"
    ]


def test_auto_extension_left_counts_against_the_tasks_the_eta_needs() -> None:
    events = [submitted(tasks=1, max_tasks=4), *task("700_1", 1000.0, 0, budget_stop(100, 100, 100.0), 0)]
    status = summarize(RUN, events, [checkpoint(100)], queue(("700_2", "PENDING")), NOW)

    assert (status.max_tasks, status.extension_left) == (4, 3)
    assert status.tasks_needed == 19  # 9,900 steps at 1 step/s, 540 s of each task
    assert status.warnings == [
        "at the current rate (1 steps/s) the run needs about 19 more task(s) of 10 min, but only 1 are queued "
        f"and auto-extension adds at most 3: `hpcckpt extend {RUN} --tasks 15`"
    ]
    assert "auto-extension may add 3 more (--max-tasks 4)" in format_status(status)


def test_a_signal_lead_shorter_than_the_slowest_save_is_warned_about() -> None:
    events = [submitted(), *task("700_1", 1000.0, 0, budget_stop(1000, 1000, 100.0), 0)]
    slow = [checkpoint(500, save_seconds=12.0), checkpoint(1000, save_seconds=75.5)]
    status = summarize(RUN, events, slow, queue(("700_[2-3%1]", "PENDING")), NOW)
    assert status.warnings == [
        "the signal lead (60 s) is shorter than the slowest save (75.5 s): a task warned by the signal may be "
        "killed mid-save; resubmit with a longer --signal lead"
    ]


def test_tasks_that_did_not_stop_through_run_are_marked_killed_or_crashed() -> None:
    killed = [
        event("task-begin", job="700_1", host="node1"),
        event("start", job="700_1", host="node1", resumed_step=0, total_steps=10_000, time=1000.0),
        event("task-end", job="700_1", status=None, killed=True, progress=False, latest_step=None),
    ]
    crashed = [
        event("task-begin", job="700_2", host="node2"),
        event("start", job="700_2", host="node2", resumed_step=0, total_steps=10_000, time=2000.0),
        event("crash", step=3, steps_done=3, error="RuntimeError: boom"),
        event("task-end", job="700_2", status=1, killed=False, progress=False, latest_step=None),
    ]
    status = summarize(RUN, [submitted(), *killed, *crashed], [], queue(), NOW)
    assert [(t.job, t.host, t.reason, t.exit_status) for t in status.history] == [
        ("700_1", "node1", "killed", None),
        ("700_2", "node2", "crashed", 1),
    ]
    history = format_status(status).split("history\n")[1].splitlines()
    assert history[0].split() == ["700_1", "node1", "from", "0", "to", "-", "killed"]
    assert history[1].split() == ["700_2", "node2", "from", "0", "to", "-", "crashed;", "exit", "1"]


def test_a_signal_after_the_save_reads_as_a_clean_stop_not_an_exit_status() -> None:
    events = [submitted(), *task("700_1", 1000.0, 0, budget_stop(1000, 1000, 100.0), None)]
    events.append(event("task-end", job="700_1", status=143, killed=False, progress=True, ended_by="SIGTERM"))
    status = summarize(RUN, events, [checkpoint(1000)], queue(("700_[2-3%1]", "PENDING")), NOW)
    line = format_status(status).split("history\n")[1].splitlines()[0]
    assert line.endswith("budget (timeout); 1000 steps, 30 s unused, SIGTERM after the save (clean)")
    assert "exit 143" not in line


def test_the_text_form_of_a_running_run() -> None:
    events = [submitted(), *task("700_1", 1000.0, 0, budget_stop(1000, 1000, 100.0), 0)]
    events += task("700_2", 2000.0, 1000, None, None)
    status = summarize(RUN, events, [checkpoint(1000, created=NOW - 300)], queue(("700_2", "RUNNING")), NOW)
    assert format_status(status).splitlines()[:7] == [
        f"run      {RUN}",
        "state    RUNNING",
        "step     1000 of 10000",
        "latest   step-00001000 (3.0 MiB, 5 min ago, saved in 0.50 s)",
        "tasks    2 used, 1 queued (1 running); jobs 700",
        "         the ETA needs about 2 more task(s), 1 queued",
        "eta      15 min of training at 10 steps/s (queue waits not counted)",
    ]
