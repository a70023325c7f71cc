"""Manifest, index and event fields are type-checked when read: a bad one is named (file and field) and
the rest of the run stays usable in `hpcckpt ls` and `hpcckpt status` (issue 11, item 13)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hpcckpt import CheckpointStore


def hpcckpt(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["hpcckpt", *argv], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    for step in (100, 200, 300):
        store.save({"model": {"weight": torch.full((2, 2), float(step))}}, step=step)
    return store.run_dir


def _listed_steps(ls: subprocess.CompletedProcess[str]) -> list[str]:
    assert ls.returncode == 0, ls.stderr
    assert "Traceback" not in ls.stderr
    return [line.split()[1] for line in ls.stdout.splitlines()[1:]]


def _edit_json(path: Path, edit: dict[str, object], name: str | None = None) -> None:
    data = json.loads(path.read_text())
    entries = data["checkpoints"] if name is not None else [data]
    for entry in entries:
        if name is None or entry["name"] == name:
            entry.update(edit)
    path.write_text(json.dumps(data))


def test_a_manifest_with_a_bad_field_is_skipped_by_ls_and_status_with_a_warning(run_dir: Path) -> None:
    victim = run_dir / "checkpoints" / "step_000000200"
    _edit_json(victim / "manifest.json", {"tag": 5})
    (run_dir / "registry.json").unlink()  # rebuilt from the manifests, as after a lost index
    said = f"skipping {victim}: {victim / 'manifest.json'}: field 'tag' is 5; expected a string or null"
    ls = hpcckpt("ls", str(run_dir))
    assert _listed_steps(ls) == ["100", "300"]
    assert said in ls.stderr
    listed = hpcckpt("ls", str(run_dir), "--json")
    assert listed.returncode == 0 and [c["step"] for c in json.loads(listed.stdout)] == [100, 300]
    status = hpcckpt("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert "latest   step_000000300" in status.stdout and said in status.stderr


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ({"save_seconds": "slow"}, "field 'save_seconds' is \"slow\"; expected a number or null"),
        ({"step": "200"}, "field 'step' is \"200\"; expected a whole number >= 0"),
        ({"metrics": {"loss": "low"}}, 'field \'metrics\' is {"loss": "low"}; expected an object of numbers or null'),
        ({"created": None}, "field 'created' is missing; expected a number"),
    ],
)
def test_a_bad_index_field_is_named_and_the_index_rebuilt_from_the_manifests(
    run_dir: Path, edit: dict[str, object], said: str
) -> None:
    _edit_json(run_dir / "registry.json", edit, name="step_000000200")
    ls = hpcckpt("ls", str(run_dir))
    assert _listed_steps(ls) == ["100", "200", "300"]
    assert f"{run_dir / 'registry.json'}: entry 'step_000000200': {said}; rebuilding the index" in ls.stderr
    save_column = [line.split()[6] for line in ls.stdout.splitlines()[1:]]
    assert all(re.fullmatch(r"\d+\.\d\ds", cell) for cell in save_column), ls.stdout
    again = hpcckpt("ls", str(run_dir))  # the rebuilt index is clean
    assert _listed_steps(again) == ["100", "200", "300"] and "registry.json" not in again.stderr


def test_status_names_a_bad_event_field_and_shows_the_rest(run_dir: Path) -> None:
    events = run_dir / "events.jsonl"
    now = time.time()
    lines = [
        {"time": now - 50, "event": "submit", "job": "17", "backend": "local", "tasks": 3, "time_seconds": 60,
         "lead": "soon"},
        {"time": now - 40, "event": "start", "host": "node1", "resumed_step": 0, "total_steps": 1000},
        {"time": now - 10, "event": "stop", "reason": "budget", "step": 300, "steps_done": "many",
         "saved": True, "time_left": 2.5},
    ]  # fmt: skip
    with events.open("a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    first = len(events.read_text().splitlines()) - 2
    status = hpcckpt("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert "Traceback" not in status.stderr
    assert (
        f"{events}, line {first}: field 'lead' is \"soon\"; expected a number or null; ignoring that field"
        in status.stderr
    )
    assert (
        f"{events}, line {first + 2}: field 'steps_done' is \"many\"; expected a whole number or null; "
        "ignoring that field" in status.stderr
    )
    assert "step     300 of 1000" in status.stdout
    assert re.search(r"node1 +from +0 to +300 +budget", status.stdout), status.stdout
    as_json = hpcckpt("status", str(run_dir), "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["history"][0]["steps_done"] is None


def test_status_names_a_bad_max_tasks_of_a_submission_and_shows_the_rest(run_dir: Path) -> None:
    # The auto-extension cap is read as a whole number by status and task-end: a bad one crashed status.
    events = run_dir / "events.jsonl"
    submit = {"time": time.time(), "event": "submit", "job": "42", "tasks": 2, "max_tasks": "lots"}
    events.write_text(events.read_text() + json.dumps(submit) + "\n")
    status = hpcckpt("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert "Traceback" not in status.stderr
    assert "field 'max_tasks' is \"lots\"; expected a whole number or null" in status.stderr
    assert "step     300" in status.stdout
