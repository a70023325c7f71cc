"""The CLI's edges (issue 11): error prefixes, sbatch options hpcckpt manages, run directories Slurm
cannot carry, missing scripts, out-of-range values, commands on directories that are not runs, closed
pipes, broken templates, and site setup from the command line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from golden import GOLDEN, SBATCH
from harness import clean_env, events

from hpcckpt import CheckpointStore, UsageError
from hpcckpt.cli.chain import command_target
from hpcckpt.slurm.script import render
from hpcckpt.slurm.spec import chain_spec, check_directive


def hpcckpt(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["hpcckpt", *argv], capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=cwd
    )


def _fake_sbatch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH in which sbatch only records that it was called (to prove it never is)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    called = tmp_path / "sbatch-called"
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/sh\ntouch {called}\necho 4242\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, called


def _submit(
    tmp_path: Path, *options: str, command: tuple[str, ...] = ("true",), cwd: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    env, called = _fake_sbatch(tmp_path)
    argv = ["submit", "--backend", "slurm", "--run-dir", str(tmp_path / "run"), "--tasks", "2", "--time", "10"]
    result = hpcckpt(*argv, *options, "--", *command, env=env, cwd=cwd or tmp_path)
    return result, called


# -- item 14: the error prefix names the subcommand --------------------------------------------------------
@pytest.mark.parametrize("command", ["submit", "render"])
def test_errors_of_submit_and_render_start_with_the_subcommand_name(tmp_path: Path, command: str) -> None:
    result = hpcckpt(
        command, "--run-dir", str(tmp_path / "r"), "--tasks", "2", "--time", "90x", "--", "python3", "train.py"
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"hpcckpt {command}: error: Invalid time '90x': expected MM, MM:SS"), result.stderr


# -- item 5: --sbatch-arg cannot reach an option hpcckpt manages --------------------------------------------
MANAGED_SPELLINGS = [
    ("--arr=1-50", "--array", "--tasks"),
    ("--array=1-50", "--array", "--tasks"),
    ("-a1-50", "--array", "--tasks"),
    ("-a 1-50", "--array", "--tasks"),
    ("--tim=5", "--time", "--time"),
    ("--time 5", "--time", "--time"),
    ("-t5", "--time", "--time"),
    ("-Ht5", "--time", "--time"),  # --hold, then -t5: Slurm 22.05 gave this job a 5-minute limit
    ("-vvt5", "--time", "--time"),
    ("-ox", "--output", "--run-dir"),
    ("--out=x", "--output", "--run-dir"),
    ("-ex", "--error", "--run-dir"),
    ("--open=truncate", "--open-mode", "--run-dir"),
    ("-Jx", "--job-name", "--job-name"),
    ("--job=x", "--job-name", "--job-name"),
    ("--sig=USR2@9", "--signal", "--signal"),
    ("--no-req", "--no-requeue", "--no-requeue"),
    ("-pgpu", "--partition", "--partition"),
    ("--part=gpu", "--partition", "--partition"),
    ("-N2", "--nodes", "--nodes"),
    ("--nodes=2", "--nodes", "--nodes"),
    ("--ntasks-per-n=2", "--ntasks-per-node", "--ntasks-per-node"),
    ("-G1", "--gpus", "--gpus"),
    ("-c8", "--cpus-per-task", "--cpus-per-task"),
    ("--mem=4G", "--mem", "--mem"),
    ("-Cv100", "--constraint", "--constraint"),
    ("-D/elsewhere", "--chdir", "the job starts where hpcckpt submit runs: run it from that directory"),
    ("--chd=/elsewhere", "--chdir", "the job starts where hpcckpt submit runs: run it from that directory"),
]


@pytest.mark.parametrize(("directive", "option", "flag"), MANAGED_SPELLINGS, ids=[d for d, _, _ in MANAGED_SPELLINGS])
def test_extra_directives_reaching_a_managed_option_are_refused_naming_the_flag(
    directive: str, option: str, flag: str
) -> None:
    with pytest.raises(UsageError) as caught:
        check_directive(directive)
    message = str(caught.value)
    assert message.startswith(f"Invalid extra directive {directive!r}: {option} is set by hpcckpt itself")
    assert (f"use hpcckpt's own option instead: {flag}" if flag.startswith("--") else flag) in message


@pytest.mark.parametrize(
    "directive", ["--mail-type=END,FAIL", "--exclusive", "--ntasks=4", "-k", "-kt5", "-H", "--mail-t=END", "-n4"]
)
def test_other_extra_directives_pass(directive: str) -> None:
    assert check_directive(directive) == directive


def test_a_managed_extra_directive_exits_2_and_never_calls_sbatch(tmp_path: Path) -> None:
    result, called = _submit(tmp_path, "--sbatch-arg=-a1-50")
    assert result.returncode == 2
    assert result.stderr.startswith("hpcckpt submit: error: Invalid extra directive '-a1-50': --array is set")
    assert "use hpcckpt's own option instead: --tasks" in result.stderr
    assert not called.exists() and not (tmp_path / "run").exists()


# -- item 6: a run directory Slurm cannot carry ------------------------------------------------------------
def test_a_backslash_in_the_run_directory_is_refused(tmp_path: Path) -> None:
    # Measured on Slurm 22.05: slurmd drops the backslash from --output (quoted or escaped), the task
    # cannot open its log and never runs; tests/test_chain_slurm_paths.py shows it on the cluster.
    run_dir = str(tmp_path / "back\\slash")
    result, called = _submit(tmp_path, "--run-dir", run_dir)
    assert result.returncode == 2
    assert f"Invalid --run-dir {run_dir!r}: a backslash cannot appear in it" in result.stderr
    assert not called.exists() and not Path(run_dir).exists()


def test_sbatch_values_double_their_backslashes_and_keep_quotes() -> None:
    spec = chain_spec(run_dir='/r/it\'s a "run"', command=["true"], tasks=1, time="10", job_name="a\\b c")
    script = render(spec)
    assert "#SBATCH --job-name='a\\\\b c'\n" in script, "sbatch reads \\\\ as one backslash"
    assert "#SBATCH --output='/r/it'\"'\"'s a \"run\"/logs/%A_%a.out'\n" in script
    assert "export HPCCKPT_RUN_DIR='/r/it'\"'\"'s a \"run\"'\n" in script, "bash lines are plain shell quoting"


# -- item 16: the training script exists -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "target"),
    [
        (["python3", "train.py", "--lr", "1"], ("script", "train.py")),
        (["python3", "-u", "train.py"], ("script", "train.py")),
        (["python", "-W", "error", "-X", "dev", "train.py"], ("script", "train.py")),
        (["python3.11", "-uWerror", "train.py"], ("script", "train.py")),
        (["/usr/bin/python3", "-m", "pkg.train"], ("module", "pkg.train")),
        (["python3", "-um", "pkg"], ("module", "pkg")),
        (["python3", "-mpkg"], ("module", "pkg")),
        (["python3", "-c", "print(1)"], None),
        (["python3", "-"], None),
        (["torchrun", "--nproc-per-node", "2", "train.py"], ("script", "train.py")),
        (["torchrun", "--nproc_per_node=2", "--standalone", "train.py", "-x"], ("script", "train.py")),
        (["torchrun", "-m", "--nnodes", "1", "pkg.train"], ("module", "pkg.train")),
        (["torchrun", "--no-python", "./run.sh"], None),
        (["bash", "run.sh"], None),
    ],
)
def test_the_script_of_a_python_or_torchrun_command_is_found(command: list[str], target: object) -> None:
    assert command_target(command) == target


@pytest.mark.parametrize(
    "command",
    [
        ("python3", "nosuch.py"),
        ("python3", "-u", "nosuch.py"),
        ("torchrun", "--nproc-per-node", "2", "nosuch.py"),
    ],
)
def test_a_missing_training_script_exits_2_naming_the_path(tmp_path: Path, command: tuple[str, ...]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "torchbin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text("#!/bin/sh\n")
    (bin_dir / "torchrun").chmod(0o755)
    env, called = _fake_sbatch(tmp_path)
    env["PATH"] = f"{env['PATH']}{os.pathsep}{bin_dir}"
    argv = ["submit", "--backend", "slurm", "--run-dir", str(tmp_path / "run"), "--tasks", "2", "--time", "10"]
    result = hpcckpt(*argv, "--", *command, env=env, cwd=work)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the script 'nosuch.py' does not exist in the job's working directory" in result.stderr
    assert f"({work / 'nosuch.py'} is not a file)" in result.stderr
    assert not called.exists() and not (tmp_path / "run").exists()
    (work / "nosuch.py").write_text("print('here now')\n")
    ok = hpcckpt(*argv, "--", *command, env=env, cwd=work)
    assert ok.returncode == 0, ok.stderr
    assert called.exists()


def test_a_module_that_cannot_be_imported_exits_2(tmp_path: Path) -> None:
    python = sys.executable
    result, called = _submit(tmp_path, command=(python, "-m", "hpcckpt_nosuch_module.train"))
    assert result.returncode == 2
    assert "the module 'hpcckpt_nosuch_module' of -m hpcckpt_nosuch_module.train is not importable" in result.stderr
    assert not called.exists()
    (tmp_path / "localpkg").mkdir()
    (tmp_path / "localpkg" / "__init__.py").write_text("")
    ok, _ = _submit(tmp_path, command=(python, "-m", "localpkg"))  # found in the job's working directory
    assert ok.returncode == 0, ok.stderr
    assert _submit(tmp_path, command=(python, "-m", "json.tool"))[0].returncode == 0


# -- item 17: values out of range --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--time", "1:99"], "Invalid time '1:99': seconds must be below 60 (got 99); expected MM, MM:SS"),
        (["--time", "1:60:00"], "Invalid time '1:60:00': minutes must be below 60 (got 60)"),
        (["--time", "1-25"], "Invalid time '1-25': hours must be below 24 (got 25)"),
        (["--time", "400-00:00:00"], "is longer than the limit of 365 days"),
        (["--signal", ""], "Invalid --signal '': it is empty; expected NAME@SECONDS such as USR1@300"),
    ],
)
def test_out_of_range_values_exit_2(tmp_path: Path, options: list[str], message: str) -> None:
    result, called = _submit(tmp_path, *options)
    assert result.returncode == 2
    assert message in result.stderr
    assert not called.exists()


def test_task_begin_refuses_zero_max_failures(tmp_path: Path) -> None:
    run = tmp_path / "run"
    CheckpointStore(run)
    before = sorted(p.name for p in run.iterdir())
    result = hpcckpt("task-begin", "--run-dir", str(run), "--max-failures", "0")
    assert result.returncode == 2
    assert "invalid --max-failures '0': expected a whole number of tasks >= 1" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == before


# -- item 18: commands on a directory that is not a run ----------------------------------------------------
@pytest.mark.parametrize("command", ["cancel", "ls", "verify", "status"])
def test_commands_on_a_directory_that_is_not_a_run_exit_2_and_write_nothing(tmp_path: Path, command: str) -> None:
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    result = hpcckpt(command, str(other))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"hpcckpt {command}: error: Invalid run directory {str(other)!r}: it is not")
    assert "expected the --run-dir of a chain or a Run" in result.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    empty = hpcckpt(command, "", cwd=other)
    assert empty.returncode == 2
    assert f"hpcckpt {command}: error: Invalid run directory '': expected the --run-dir" in empty.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_commands_on_a_run_directory_still_work(tmp_path: Path) -> None:
    run = tmp_path / "run"
    CheckpointStore(run).save({"w": 1}, step=3)
    listed = hpcckpt("ls", str(run), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [c["step"] for c in json.loads(listed.stdout)] == [3]
    assert hpcckpt("status", str(run)).returncode == 0


# -- item 19: a reader that leaves early -------------------------------------------------------------------
def _many_checkpoints(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    store = CheckpointStore(run, keep_last=None)
    for step in range(1, 4):
        store.save({"w": step}, step=step)
    return run


@pytest.mark.parametrize("argv", [["ls", "--json"], ["ls"], ["status"], ["status", "--json"], ["verify"]])
def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path, argv: list[str]) -> None:
    run = _many_checkpoints(tmp_path)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write: every write fails with EPIPE
    try:
        result = subprocess.run(
            ["hpcckpt", argv[0], str(run), *argv[1:]], stdout=write, stderr=subprocess.PIPE, timeout=120, check=False
        )
    finally:
        os.close(write)
    assert result.stderr == b"", result.stderr.decode()
    assert result.returncode == 1  # what CPython's documentation does for EPIPE


def test_head_reads_the_first_line_and_nothing_complains(tmp_path: Path) -> None:
    run = _many_checkpoints(tmp_path)
    for command in (f"hpcckpt ls --json {run} | head -1", f"hpcckpt status {run} | head -1"):
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.stderr == "", result.stderr
        assert len(result.stdout.splitlines()) == 1


# -- item 20: templates that fail ---------------------------------------------------------------------------
def _render(tmp_path: Path, body: str, *options: str) -> subprocess.CompletedProcess[str]:
    template = tmp_path / "mine.j2"
    template.write_text(body)
    return hpcckpt(
        "render",
        "--run-dir",
        str(tmp_path / "r"),
        "--tasks",
        "1",
        "--time",
        "10",
        "--template",
        str(template),
        *options,
        "--",
        "true",
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '{% extends "chain.sbatch.j2" %}\n{% block site_setup %}\n{{ 1 // 0 }}{% endblock %}',
            "Invalid template 'mine.j2' (line 3): ZeroDivisionError: integer division or modulo by zero",
        ),
        (
            '{% extends "chain.sbatch.j2" %}{% block launch %}{{ tasks.nope() }}{% endblock %}',
            "Invalid template 'mine.j2' (line 1): UndefinedError:",
        ),
        ('{% extends "chain.sbatch.j2" %}{% block launch %}{{ "a" + 1 }}{% endblock %}', "TypeError"),
        ('{% extends "chain.sbatch.j2" %}{% block launch %}{% endfor %}', "TemplateSyntaxError"),
    ],
)
def test_a_template_failing_at_render_time_exits_2_without_a_traceback(tmp_path: Path, body: str, message: str) -> None:
    result = _render(tmp_path, body)
    assert result.returncode == 2
    assert result.stderr.startswith("hpcckpt render: error: Invalid template 'mine.j2'"), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_block_the_base_template_does_not_have_is_refused_listing_the_valid_ones(tmp_path: Path) -> None:
    result = _render(tmp_path, '{% extends "chain.sbatch.j2" %}{% block site_setpu %}module load x{% endblock %}')
    assert result.returncode == 2
    assert (
        "Invalid template 'mine.j2': it defines block(s) 'site_setpu' that 'chain.sbatch.j2' does not have, so "
        "they would never be rendered; expected one of 'launch', 'site_setup'"
    ) in result.stderr


def test_blocks_of_the_base_and_blocks_nested_in_them_render(tmp_path: Path) -> None:
    body = (
        '{% extends "chain.sbatch.j2" %}{% block site_setup %}{% block mine %}module load mine{% endblock %}'
        "{% endblock %}{% block launch %}srun true{% endblock %}"
    )
    result = _render(tmp_path, body)
    assert result.returncode == 0, result.stderr
    assert "\nmodule load mine\n" in result.stdout and "\nsrun true\n" in result.stdout


# -- item 21: site setup from the command line --------------------------------------------------------------
def test_setup_conda_and_venv_fill_the_site_setup_block() -> None:
    spec = chain_spec(
        run_dir="/scratch/hpcckpt-runs/site",
        command=["python3", "train.py"],
        tasks=4,
        time="2:00:00",
        job_name="site",
        setup=["module load cuda/12.4", 'export NCCL_DEBUG="WARN"'],
        conda="my env",
        venv="/scratch/venvs/my venv",
        python="python3",
    )
    assert spec == GOLDEN["examples/site-setup.sbatch"]
    script = render(spec)
    assert (SBATCH / "examples" / "site-setup.sbatch").read_text() == script
    assert (
        "module load cuda/12.4\n"
        'export NCCL_DEBUG="WARN"\n'
        "eval \"$(conda shell.bash hook)\" && conda activate 'my env' || "
    ) in script, "--setup lines verbatim (shell code), then conda, then the venv"
    assert "\nsource '/scratch/venvs/my venv/bin/activate' || " in script


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--setup", "module load x\nmodule load y"], "Invalid --setup 'module load x\\nmodule load y': expected"),
        (["--conda", ""], "Invalid --conda '': expected a value on one line"),
        (["--venv", "/nonexistent/venv"], "Invalid --venv '/nonexistent/venv': /nonexistent/venv/bin/activate is not"),
    ],
)
def test_bad_site_setup_exits_2(tmp_path: Path, options: list[str], message: str) -> None:
    result, called = _submit(tmp_path, *options)
    assert result.returncode == 2
    assert message in result.stderr
    assert not called.exists()


def test_a_template_replacing_site_setup_cannot_drop_setup_lines(tmp_path: Path) -> None:
    body = '{% extends "chain.sbatch.j2" %}{% block site_setup %}module load mine{% endblock %}'
    dropped = _render(tmp_path, body, "--setup", "module load cuda/12.4")
    assert dropped.returncode == 2
    assert "its site_setup block replaces what --setup/--conda/--venv give (module load cuda/12.4)" in dropped.stderr
    kept = _render(tmp_path, body.replace("module load mine", "{{ super() }}\nmodule load mine"), "--setup", "a=1")
    assert kept.returncode == 0, kept.stderr
    assert "\na=1\nmodule load mine\n" in kept.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_venv_given_to_submit_is_active_for_the_training_command(tmp_path: Path) -> None:
    venv = tmp_path / "the venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    record = tmp_path / "seen.json"
    code = (
        "import json, os, shutil; "
        "seen = [os.environ.get('VIRTUAL_ENV'), os.environ.get('SITE'), shutil.which('python')]; "
        f"json.dump(seen, open({str(record)!r}, 'w'))"
    )
    result = hpcckpt(
        "submit",
        "--backend",
        "local",
        "--run-dir",
        str(tmp_path / "run"),
        "--tasks",
        "1",
        "--time",
        "5",  # minutes: the command ends at once; a short limit would only race the imports under load
        "--venv",
        str(venv),
        "--setup",
        "export SITE='set up'",
        "--",
        "bash",
        "-c",
        'python -c "$0"',
        code,
        cwd=tmp_path,
        timeout=250,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(record.read_text()) == [str(venv), "set up", str(venv / "bin" / "python")]


@pytest.mark.parametrize("line", ["#SBATCH --array=1-50", "  #sbatch -t5", "#SBATCH"])
def test_a_setup_line_that_sbatch_would_read_as_a_directive_is_refused(tmp_path: Path, line: str) -> None:
    # The site_setup block comes before the first command, where sbatch still reads #SBATCH lines.
    result, called = _submit(tmp_path, "--setup", line)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Invalid --setup {line!r}: sbatch would read it as a directive" in result.stderr
    assert not called.exists()


@pytest.mark.parametrize("exited_at", ["1795300000.N", "", "soon"])
def test_task_end_records_the_task_when_the_exit_time_is_unreadable(tmp_path: Path, exited_at: str) -> None:
    # A `date` without %N prints "1795300000.N": the task must still be recorded, its teardown unknown.
    run = tmp_path / "run"
    CheckpointStore(run)
    env = clean_env()
    result = hpcckpt("task-end", "--run-dir", str(run), "--status", "0", "--exited-at", exited_at, env=env)
    assert result.returncode == 0, result.stderr
    [end] = events(run, "task-end")
    assert (end["status"], end["exited"]) == (0, None)
