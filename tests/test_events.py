"""The event log's module (hpcckpt.events): its records are the ones hpcckpt has always written, and its
readers answer the chain's questions (is a task open, is the run settled, which jobs are the chain's) from
logs written by hand as older hpcckpt versions wrote them, torn by a crash, or holding a newer kind."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import hpcckpt.events as ev
from hpcckpt.slurm.status import summarize
from hpcckpt.slurm.tasks import extension_size
from hpcckpt.store.registry import HpcckptWarning, Registry

# A chain's log as hpcckpt wrote it before hpcckpt.events existed (each line as its raw dicts gave it):
# submitted with --max-tasks 6, task 1 saved and stopped at its budget, task 2 is running.
OLD_LOG = "\n".join(
    [
        '{"time":100.0,"event":"submit","job":"812","tasks":2,"time_seconds":600,"signal":"USR1","lead":60,'
        '"backend":"slurm","script":"/runs/a/chain.sbatch","command":["python","train.py"],"max_tasks":6}',
        '{"time":110.0,"event":"task-begin","job":"812_1","array_job":"812","task":1,"restart":0,"host":"n1",'
        '"pid":4242,"latest":null,"latest_step":null,"latest_created":null,"latest_seq":null}',
        '{"time":111.0,"event":"start","job":"812_1","host":"n1","pid":4243,"resumed_step":0,"total_steps":1000}',
        '{"time":400.0,"event":"commit","name":"step_000000300","step":300,"created":399.0,"seq":1}',
        '{"time":650.0,"event":"stop","reason":"budget","cause":"timeout","step":500,"steps_done":500,'
        '"saved":true,"time_left":20.0,"steps_lost":0}',
        '{"time":651.0,"event":"task-end","job":"812_1","status":0,"killed":false,"progress":true,'
        '"latest_step":500,"clean":true,"ended_by":null,"exited":650.5,"log":"/runs/a/logs/812_1.err"}',
        '{"time":700.0,"event":"task-begin","job":"812_2","array_job":"812","task":2,"restart":0,"host":"n2",'
        '"pid":5151,"latest":"step_000000500","latest_step":500,"latest_created":649.0,"latest_seq":2}',
    ]
)


def _log(tmp_path: Path, text: str) -> Registry:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ev.FILE).write_text(text)
    return Registry(run_dir)


@dataclass(frozen=True)
class _Latest:
    name: str
    step: int
    created: float
    seq: int | None


def test_the_constructors_write_the_lines_older_hpcckpt_wrote(tmp_path: Path) -> None:
    old = [json.loads(line) for line in OLD_LOG.splitlines()]
    settings = ev.ChainSettings(600, "USR1", 60, "/runs/a/chain.sbatch", ["python", "train.py"])
    submit = ev.chain_submitted(job="812", tasks=2, backend="slurm", settings=settings, max_tasks=6)
    begin = ev.task_begin(job="812_2", array_job="812", task=2, restart=0, host="n2", pid=5151, latest=None)
    latest = _Latest("step_000000500", 500, 649.0, 2)
    begin_after = ev.task_begin(job="812_2", array_job="812", task=2, restart=0, host="n2", pid=5151, latest=latest)
    end = ev.task_end(
        job="812_1", status=0, progress=True, latest_step=500, clean=True, ended_by=None, exited=650.5,
        log="/runs/a/logs/812_1.err",
    )  # fmt: skip
    assert ev.encode([submit], 100.0) == OLD_LOG.splitlines()[0] + "\n"  # byte for byte, key order included
    assert ev.encode([end], 651.0) == OLD_LOG.splitlines()[5] + "\n"
    assert ev.encode([begin_after], 700.0) == OLD_LOG.splitlines()[6] + "\n"
    assert ["time", *begin] == list(old[6])  # same fields, same order, for a task that began with nothing saved
    assert begin["latest"] is None and begin["latest_seq"] is None


@pytest.mark.parametrize(
    ("built", "as_old_code_wrote"),
    [
        (ev.task_killed(job="812_1", progress=False, latest_step=None),
         {"event": "task-end", "job": "812_1", "status": None, "killed": True, "progress": False, "latest_step": None}),
        (ev.submitted(job="900", tasks=2, auto=True, backend="slurm", script="r/s"),
         {"event": "submit", "job": "900", "tasks": 2, "auto": True, "backend": "slurm", "script": "r/s"}),
        (ev.submitted(job="17", tasks=3, auto=True, backend="local"),
         {"event": "submit", "job": "17", "tasks": 3, "auto": True, "backend": "local"}),
        (ev.submitted(job="901", tasks=4, extend=True, backend="slurm", script="r/s"),
         {"event": "submit", "job": "901", "tasks": 4, "extend": True, "backend": "slurm", "script": "r/s"}),
        (ev.submitted(job="18", tasks=1, extend=True, backend="local",
                      settings=ev.ChainSettings(60, None, None, "r/s", ["python", "t.py"])),
         {"event": "submit", "job": "18", "tasks": 1, "extend": True, "backend": "local", "time_seconds": 60,
          "signal": None, "lead": None, "script": "r/s", "command": ["python", "t.py"]}),
        (ev.submitted(job="55", tasks=8, backend="submitit", folder="/f"),
         {"event": "submit", "job": "55", "tasks": 8, "backend": "submitit", "folder": "/f"}),
        (ev.submitted(job=None, task=2, tasks=8, backend="submitit-local"),
         {"event": "submit", "job": None, "task": 2, "tasks": 8, "backend": "submitit-local"}),
        (ev.cancel(jobs=["812"]), {"event": "cancel", "jobs": ["812"]}),
        (ev.cancel(jobs=["17"], why="SIGINT to the local chain"),
         {"event": "cancel", "jobs": ["17"], "why": "SIGINT to the local chain"}),
        (ev.failed(reason="3 consecutive tasks made no progress", log=None),
         {"event": "failed", "reason": "3 consecutive tasks made no progress", "log": None}),
        (ev.reopen(why="hpcckpt extend"), {"event": "reopen", "why": "hpcckpt extend"}),
        (ev.result(type_name="dict", size=12), {"event": "result", "type": "dict", "bytes": 12}),
        (ev.result_error(error="x" * 600), {"event": "result-error", "error": "x" * 500}),
        (ev.delete("step_1", 100), {"event": "delete", "name": "step_1", "step": 100, "why": "retention"}),
        (ev.commit({"name": "step_1", "step": 100}), {"event": "commit", "name": "step_1", "step": 100}),
        (ev.start(job="812_3", host="n1", pid=7, resumed_step=200, resumed_from="step_200", deadline=9.5,
                  deadline_source="scontrol", signal="SIGUSR1", teardown=0.5, total_steps=1000, world_size=1),
         {"event": "start", "job": "812_3", "host": "n1", "pid": 7, "resumed_step": 200, "resumed_from": "step_200",
          "deadline": 9.5, "deadline_source": "scontrol", "signal": "SIGUSR1", "teardown": 0.5, "total_steps": 1000,
          "world_size": 1}),
        (ev.stop(reason="budget", cause="timeout", signal=None, step=300, steps_done=100, saved=True,
                 checkpoint="step_300", save_seconds=0.2, time_left=3.0, steps_lost=0),
         {"event": "stop", "reason": "budget", "cause": "timeout", "signal": None, "step": 300, "steps_done": 100,
          "saved": True, "checkpoint": "step_300", "save_seconds": 0.2, "time_left": 3.0, "steps_lost": 0}),
        (ev.crash(step=5, steps_done=5, error="ValueError: " + "y" * 600),
         {"event": "crash", "step": 5, "steps_done": 5, "error": ("ValueError: " + "y" * 600)[:500]}),
        (ev.complete(step=1000, epoch=3, checkpoint="step_1000"),
         {"event": "complete", "step": 1000, "epoch": 3, "checkpoint": "step_1000"}),
    ],
)  # fmt: skip
def test_each_record_round_trips_through_the_log_as_the_old_raw_dict(
    tmp_path: Path, built: ev.Event, as_old_code_wrote: ev.Event
) -> None:
    assert list(built.items()) == list(as_old_code_wrote.items())
    registry = Registry(tmp_path)
    registry.append_event(built)
    [read] = registry.events()
    assert isinstance(read.pop("time"), float)
    assert read == as_old_code_wrote


def test_the_readers_answer_from_a_log_written_by_older_hpcckpt(tmp_path: Path) -> None:
    registry = _log(tmp_path, OLD_LOG + "\n")
    events = registry.events()
    assert ev.open_task(events) == json.loads(OLD_LOG.splitlines()[6])  # task 2 began and has not ended
    assert ev.training_open(events)
    assert registry.status() is None and ev.last_status(events) is None
    assert ev.chain_jobs(events) == ["812"]
    assert (ev.tasks_submitted(events), ev.max_tasks(events)) == (2, 6)
    assert not ev.cancelled(events)
    assert extension_size(events) == 2  # the last task to end made progress; 6 - 2 submitted leaves room
    status = summarize(registry.run_dir, events, [], None, now=800.0)
    assert (status.state, status.tasks_used, status.jobs, status.max_tasks) == ("running", 2, ["812"], 6)
    assert [(t.job, t.reason, t.steps_done, t.exit_status) for t in status.history] == [
        ("812_1", "budget", 500, 0),
        ("812_2", None, None, None),
    ]


def test_a_chain_whose_tasks_ended_has_no_open_task_and_a_settled_run_has_a_status(tmp_path: Path) -> None:
    ended = ev.task_killed(job="812_2", progress=False, latest_step=500)
    complete = {"event": "complete", "step": 1000, "checkpoint": "step_000001000"}
    registry = _log(tmp_path, OLD_LOG + "\n" + ev.encode([ended, complete], 900.0))
    events = registry.events()
    assert ev.open_task(events) is None and not ev.training_open(events)
    assert registry.status() == {"time": 900.0, **complete}
    assert summarize(registry.run_dir, events, [], None, now=901.0).state == "complete"
    assert extension_size(events) == 0


def test_a_reopened_run_is_open_again_and_a_cancel_stops_auto_extension(tmp_path: Path) -> None:
    events = [
        ev.chain_submitted(
            job="1", tasks=1, backend="slurm", settings=ev.ChainSettings(60, None, None, "s", ["c"]), max_tasks=4
        ),
        ev.failed(reason="3 consecutive tasks made no progress", log=None),
    ]
    assert ev.last_status(events) == events[1]
    events.append(ev.reopen(why="hpcckpt extend"))
    assert ev.last_status(events) is None
    events.append(ev.cancel(jobs=["1"]))
    assert ev.cancelled(events)
    events.append(ev.submitted(job="2", tasks=1, extend=True, backend="slurm", script="s"))
    assert not ev.cancelled(events) and ev.chain_jobs(events) == ["1", "2"]


def test_a_torn_last_line_is_skipped_and_the_next_event_starts_on_a_fresh_line(tmp_path: Path) -> None:
    torn = OLD_LOG + "\n" + '{"time":900.0,"event":"task-end","job":"812_2","sta'
    registry = _log(tmp_path, torn)
    assert [e["event"] for e in registry.events()][-1] == "task-begin"  # the torn task-end is not there
    assert ev.open_task(registry.events()) is not None
    registry.append_event(ev.task_killed(job="812_2", progress=False, latest_step=500))
    events = registry.events()
    assert events[-1]["event"] == "task-end" and events[-1]["killed"] is True
    assert ev.open_task(events) is None
    assert (registry.run_dir / ev.FILE).read_text().splitlines()[-2].endswith('"sta')  # kept, never rewritten


def test_an_event_of_a_kind_from_a_newer_hpcckpt_is_kept_and_ignored_by_the_readers(tmp_path: Path) -> None:
    newer = '{"time":720.0,"event":"checkpoint-verified","name":"step_000000500","tasks":"all"}'
    # a newer writer's fields of known names keep their kinds; one that does not is dropped with a warning
    with pytest.warns(HpcckptWarning, match=r"line 8: field 'tasks' is \"all\"; expected a whole number or null"):
        events = _log(tmp_path, OLD_LOG + "\n" + newer + "\n").events()
    assert events[-1] == {"time": 720.0, "event": "checkpoint-verified", "name": "step_000000500"}
    assert ev.open_task(events) is not None and ev.training_open(events)  # task 2 is still the open one
    assert ev.last_status(events) is None
    assert (ev.chain_jobs(events), ev.tasks_submitted(events)) == (["812"], 2)
    assert summarize(tmp_path / "run", events, [], None, now=800.0).tasks_used == 2


def test_parse_names_the_line_and_field_of_a_value_of_the_wrong_kind() -> None:
    text = '{"time":1.0,"event":"submit","job":"7","lead":"soon"}\n[1,2]\nnot json\n'
    events, problems = ev.parse(text, "RUN/events.jsonl")
    assert events == [{"time": 1.0, "event": "submit", "job": "7"}]  # the list and the garbage are skipped
    assert problems == [
        "RUN/events.jsonl, line 1: field 'lead' is \"soon\"; expected a number or null; ignoring that field"
    ]


def test_the_event_module_stays_low_in_the_import_graph() -> None:
    tree = ast.parse(Path(ev.__file__).read_text())
    imported = {
        (node.level, node.module or "", alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    own = {(module, name) for level, module, name in imported if level > 0}
    assert own <= {("", "rundir"), ("", "errors")}, own
    code = "import sys, hpcckpt.events; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
