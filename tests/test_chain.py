"""Chain scripts: rendering, validation before anything is submitted, and whole chains on the local backend."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from compare import assert_same_training
from golden import GOLDEN, SBATCH
from harness import events, train_command

from hpcckpt import CheckpointStore
from hpcckpt.slurm.script import render
from hpcckpt.slurm.spec import chain_spec, default_lead


def hpcckpt(*argv: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["hpcckpt", *argv], capture_output=True, text=True, timeout=timeout, check=False, env=env)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_sbatch_scripts_are_the_template_s_output(name: str) -> None:
    assert (SBATCH / name).read_text() == render(GOLDEN[name]), (
        "run `python tests/support/golden.py` after a template change"
    )
    result = subprocess.run(["bash", "-n", str(SBATCH / name)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


def test_default_signal_lead_suits_the_time_limit() -> None:
    assert default_lead(4 * 3600) == 300  # jobs of hours: five minutes
    assert default_lead(60) == 10  # shrinks for short limits instead of being rejected
    assert default_lead(20) == 3
    spec = chain_spec(run_dir="/tmp/x", command=["true"], tasks=2, time="0:20")
    assert spec.signal_directive == "B:USR1@3"
    assert (
        chain_spec(
            run_dir="/tmp/x", command=["true"], tasks=2, time="1:00:00", srun=True, signal="USR2@120"
        ).signal_directive
        == "USR2@120"
    )
    assert chain_spec(run_dir="/tmp/x", command=["true"], tasks=2, time="10", signal="none").signal_directive == ""


def test_more_than_one_rank_launches_through_srun_with_the_signal_to_the_steps() -> None:
    spec = chain_spec(
        run_dir="/tmp/x", command=["python3", "t.py"], tasks=2, time="1:00:00", nodes=2, ntasks_per_node=1
    )
    script = render(spec)
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n" in script
    assert "#SBATCH --signal=USR1@300\n" in script, "to the job steps (every rank), not B: the batch shell"
    assert "\nsrun --kill-on-bad-exit=1 python3 t.py &\n" in script
    one = render(chain_spec(run_dir="/tmp/x", command=["python3", "t.py"], tasks=2, time="1:00:00", nodes=1))
    assert "\npython3 t.py &\n" in one and "--signal=B:USR1@300" in one


def _fake_sbatch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH in which sbatch only records that it was called (to prove it never is)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "sbatch-called"
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/sh\ntouch {called}\necho 4242\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, called


BAD_INPUT = [
    (["--time", "90x"], "Invalid time '90x': expected MM, MM:SS, HH:MM:SS, D-HH"),
    (["--time", "0"], "Invalid time '0': it must be longer than zero"),
    (["--tasks", "0"], "Invalid --tasks 0: expected a whole number of array tasks >= 1"),
    (["--tasks", "three"], "invalid --tasks 'three': expected a whole number"),
    (["--signal", "USR9"], "Invalid --signal 'USR9': unknown signal 'USR9'; expected NAME@SECONDS"),
    (["--signal", "USR1@600", "--time", "10"], "its lead (600 s) must be shorter than the time limit (00:10:00)"),
    (["--signal", "USR1@600", "--time", "5:00"], "its lead (600 s) must be shorter than the time limit (00:05:00)"),
    (["--signal", "USR1@soon"], "the lead must be whole seconds >= 1"),
    (["--sbatch-arg", "--comment=a\n#SBATCH --exclusive"], "Invalid extra directive"),
    (["--sbatch-arg", "--comment=$(reboot)"], "without spaces, quotes or shell characters"),
    (["--sbatch-arg", "--time=10"], "--time is set by hpcckpt itself"),
    (["--max-failures", "0"], "Invalid --max-failures 0"),
    (["--template", "/nonexistent/t.j2"], "Invalid --template '/nonexistent/t.j2': no such file"),
    (["--run-dir", "/tmp/run%j"], "Invalid --run-dir '/tmp/run%j': newlines and '%' cannot appear"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUT, ids=[m[:30] for _, m in BAD_INPUT])
def test_bad_input_exits_2_naming_value_and_form_and_never_calls_sbatch(
    tmp_path: Path, change: list[str], message: str
) -> None:
    env, called = _fake_sbatch(tmp_path)
    options = {"--run-dir": str(tmp_path / "run"), "--tasks": "3", "--time": "1:00:00"}
    extra: list[str] = []
    for i in range(0, len(change), 2):
        if change[i] in options:
            options[change[i]] = change[i + 1]
        else:
            extra.append(f"{change[i]}={change[i + 1]}")  # --sbatch-arg=--x=y: the value starts with --
    argv = ["submit", "--backend", "slurm", *[x for kv in options.items() for x in kv], *extra, "--", "python3", "t.py"]
    result = hpcckpt(*argv, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert not called.exists()
    assert not (tmp_path / "run").exists()


def test_missing_or_unknown_command_exits_2(tmp_path: Path) -> None:
    env, called = _fake_sbatch(tmp_path)
    base = ["submit", "--backend", "slurm", "--run-dir", str(tmp_path / "run"), "--tasks", "2", "--time", "10"]
    missing = hpcckpt(*base, env=env)
    assert missing.returncode == 2
    assert "Missing command: expected the training command after --" in missing.stderr
    unknown = hpcckpt(*base, "--", "pythn3", "train.py", env=env)
    assert unknown.returncode == 2
    assert "Invalid command 'pythn3': not found on PATH" in unknown.stderr
    assert not called.exists()


def test_template_errors_exit_2(tmp_path: Path) -> None:
    template = tmp_path / "mine.j2"
    template.write_text('{% extends "chain.sbatch.j2" %}{% block site_setup %}{{ no_such_value }}{% endblock %}')
    result = hpcckpt(
        "render", "--run-dir", str(tmp_path), "--tasks", "1", "--time", "10", "--template", str(template), "--", "true"
    )
    assert result.returncode == 2
    assert "Invalid template 'mine.j2'" in result.stderr and "no_such_value" in result.stderr


def test_a_user_template_overrides_site_setup_by_inheritance(tmp_path: Path) -> None:
    template = tmp_path / "site.j2"
    template.write_text(
        '{% extends "chain.sbatch.j2" %}\n{% block site_setup %}module load cuda/12.4\n'
        "source ~/venvs/train/bin/activate{% endblock %}\n"
    )
    result = hpcckpt(
        "render",
        "--run-dir",
        str(tmp_path / "r"),
        "--tasks",
        "2",
        "--time",
        "30",
        "--template",
        str(template),
        "--",
        "python3",
        "train.py",
    )
    assert result.returncode == 0, result.stderr
    assert "module load cuda/12.4\nsource ~/venvs/train/bin/activate\n" in result.stdout
    assert "#SBATCH --array=1-2%1" in result.stdout


def test_awkward_paths_and_arguments_render_and_run_unchanged(tmp_path: Path) -> None:
    run_dir = tmp_path / "it's a run dir" / 'with "quotes" & $(spaces)'
    record = tmp_path / "argv.json"
    args = ["plain", "with space", "it's", 'say "hi"', "$(touch /tmp/pwned)", "`id`", "a;b|c&d", "*", ""]
    code = f"import json, sys; json.dump(sys.argv[1:], open({str(record)!r}, 'w'))"
    result = hpcckpt(
        "submit",
        "--backend",
        "local",
        "--run-dir",
        str(run_dir),
        "--tasks",
        "1",
        "--time",
        "0:30",
        "--",
        sys.executable,
        "-c",
        code,
        *args,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    script = run_dir / "chain.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30, check=False).returncode == 0
    assert json.loads(record.read_text()) == args
    assert (run_dir / "logs").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_chain_stopped_by_the_budget_each_time_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    # Epoch mode: Run.batches keeps the DataLoader's place, so the chain can match the reference bitwise.
    args = ["--epochs", "60", "--step-sleep", "0.02", "--workers", "0"]
    launched = time.time()
    reference = subprocess.run(
        train_command(tmp_path / "reference", *args),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert reference.returncode == 0, reference.stderr
    # The tasks' length follows this machine's measured start-up (process start to the first step): about 5 s
    # of 14.4 s of training per task, so the run needs three or four of its six tasks however busy the machine
    # is (with a fixed 7 s, start-up under load left almost nothing and the six tasks did not suffice).
    startup = events(tmp_path / "reference", "start")[0]["time"] - launched
    task = math.ceil(startup + 8)
    run_dir = tmp_path / "chain"
    result = hpcckpt(
        "submit",
        "--backend",
        "local",
        "--run-dir",
        str(run_dir),
        "--tasks",
        "6",
        "--time",
        f"{task // 60}:{task % 60:02d}",
        "--signal",
        "none",
        "--",
        *train_command(run_dir, *args),
        timeout=500,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stops = events(run_dir, "stop")
    assert len(stops) >= 3, result.stdout
    assert [s["reason"] for s in stops[:-1]] == ["budget"] * (len(stops) - 1)
    assert stops[-1]["reason"] == "completed"
    assert all(s["steps_lost"] == 0 and s["saved"] for s in stops)
    starts = events(run_dir, "start")
    assert [s["resumed_step"] for s in starts[1:]] == [s["step"] for s in stops[:-1]], "each task resumed exactly"
    assert_same_training(
        CheckpointStore(tmp_path / "reference", create=False).load(), CheckpointStore(run_dir, create=False).load()
    )
    assert "the remaining" in result.stdout  # completion cancelled the tasks left
    status = json.loads(hpcckpt("status", str(run_dir), "--json").stdout)
    assert status["state"] == "complete" and status["step"] == 60 * 12


def _startup_seconds(tmp_path: Path) -> float:
    """How long the training worker takes here and now from launch to its first step (imports, Run's start)."""
    probe = tmp_path / "startup-probe"
    launched = time.time()
    started = subprocess.run(
        train_command(probe, "--steps", "1", "--workers", "0"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    return float(events(probe, "start")[0]["time"]) - launched


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_chain_warning_signal_saves_and_the_next_task_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "chain"
    # The warning must come after Run has started (a warning during the imports kills Python before it has
    # a handler, a hazard of tasks shorter than the start-up plus the lead): the task's length follows the
    # start-up measured now, which took more than the 4 s of a fixed 12-s task under load (item 32).
    lead = 8
    task = max(12, math.ceil(1.5 * _startup_seconds(tmp_path)) + 2 + lead)
    steps = math.ceil(1.3 * task / 0.02)  # more than the first task trains: at least one resume
    result = hpcckpt(
        "submit",
        "--backend",
        "local",
        "--run-dir",
        str(run_dir),
        "--tasks",
        "8",
        "--time",
        f"{task // 60}:{task % 60:02d}",
        "--signal",
        f"USR1@{lead}",
        "--",
        *train_command(run_dir, "--steps", str(steps), "--step-sleep", "0.02", "--workers", "0"),
        timeout=250,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first = events(run_dir, "stop")[0]
    # 8 s before the end of the task: the time limit's warning, not a preemption; the budget knows when
    # to stop, so the task trains on until it says so (issue 11, item 27), and then saves.
    assert (first["reason"], first["saved"], first["steps_lost"]) == ("budget", True, 0)
    assert (first["cause"], first["signal"]) == ("timeout", "SIGUSR1")
    assert events(run_dir, "start")[1]["resumed_step"] == first["step"]
    assert "(sent USR1)" in result.stdout
    assert events(run_dir, "complete")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_crash_loop_is_broken_after_max_failures(tmp_path: Path) -> None:
    run_dir = tmp_path / "chain"
    crash = "import sys; print('CUDA error: an illegal memory access', file=sys.stderr); sys.exit(3)"
    result = hpcckpt(
        "submit",
        "--backend",
        "local",
        "--run-dir",
        str(run_dir),
        "--tasks",
        "5",
        "--time",
        "0:30",
        "--max-failures",
        "2",
        "--",
        sys.executable,
        "-c",
        crash,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(events(run_dir, "task-begin")) == 2
    assert "the remaining 3 task(s) are cancelled" in result.stdout
    status = hpcckpt("status", str(run_dir))
    assert "state    FAILED" in status.stdout
    assert "2 consecutive tasks made no progress (no new checkpoint): exit 3, exit 3" in status.stdout
    assert "| CUDA error: an illegal memory access" in status.stdout
    again = hpcckpt(
        "submit",
        "--backend",
        "local",
        "--run-dir",
        str(run_dir),
        "--tasks",
        "2",
        "--time",
        "0:30",
        "--",
        sys.executable,
        "-c",
        crash,
    )
    assert len(events(run_dir, "task-begin")) == 2, "a failed run starts no more tasks"
    assert again.returncode == 1
