"""hpcckpt's log lines when the application configures logging after Run has started (issue 11, item 26):
the application's handlers get each record once, and hpcckpt's own stderr handler steps aside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import clean_env

SCRIPT = """
import logging, sys
from hpcckpt import Run, TrainState
state = TrainState()
with Run(sys.argv[1], state, total_steps=3) as run:
    if sys.argv[2] == "configure":
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="APP %(name)s %(message)s")
    for step in run:
        pass
"""


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / mode), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_logging_configured_after_run_started_gets_each_record_once(tmp_path: Path) -> None:
    result = _run(tmp_path, "configure")
    stops = [line for line in (result.stdout + result.stderr).splitlines() if "hpcckpt: stop (completed)" in line]
    assert stops == ["APP hpcckpt hpcckpt: stop (completed) at step 3 after 3 steps; no deadline"], (
        result.stdout,
        result.stderr,
    )


def test_without_logging_configured_hpcckpt_still_tells_its_story_on_stderr(tmp_path: Path) -> None:
    result = _run(tmp_path, "leave")
    assert result.stdout == ""
    assert sum("hpcckpt: stop (completed) at step 3" in line for line in result.stderr.splitlines()) == 1
    assert sum("resumes" in line and "from scratch (step 0)" in line for line in result.stderr.splitlines()) == 1
