"""Of several bad chain options, the one reported first is the one reported before the options were
declared once (issue 12 is a refactor: no change of behaviour). The expected messages were computed once
from the code before the redesign (commit 298c970, ``chain_spec`` in ``hpcckpt/slurm/chain.py``) and are
written here literally; each input has two or more bad values, in orders that differ from --help's."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

import pytest

from hpcckpt import UsageError
from hpcckpt.cli.main import main
from hpcckpt.slurm.spec import CHECK_ORDER, ChainSpec, chain_spec, options

RENDER = "hpcckpt render: error: "
SIGNAL_FORMS = "expected NAME@SECONDS such as USR1@300 (lead before the time limit), NAME alone, or none"
TIME_FORMS = "expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 30, 0:20, 4:00:00, 2-00:00:00)"
SETUP_IS_A_DIRECTIVE = (
    "sbatch would read it as a directive; expected a shell command "
    "(give Slurm options with hpcckpt's flags or --sbatch-arg)"
)
PERCENT_IN_RUN_DIR = (
    "newlines and '%' cannot appear in it (Slurm expands % in output file names); expected an ordinary path"
)

BASE: dict[str, Any] = {"run_dir": "runs/r", "command": ["python", "train.py"], "tasks": 3, "time": "1:00:00"}

# (the bad values over BASE, the first error the code before the redesign reported)
API_CASES: list[tuple[dict[str, Any], str]] = [
    (
        dict(signal="bogus", command=[]),
        "Invalid --signal 'bogus': unknown signal 'bogus'; " + SIGNAL_FORMS,
    ),
    (
        dict(time="10", signal="USR1@9999", partition=""),
        "Invalid --signal 'USR1@9999': its lead (9999 s) must be shorter than the time limit (00:10:00); "
        + SIGNAL_FORMS,
    ),
    (dict(tasks=0, time="bogus"), "Invalid --tasks 0: expected a whole number of array tasks >= 1"),
    (
        dict(time="bogus", signal="bogus"),
        "Invalid time 'bogus': " + TIME_FORMS,
    ),
    (dict(command=[], nodes=0), "Missing command: expected the training command after --, e.g. -- python train.py"),
    (
        dict(nodes=0, ntasks_per_node=0, cpus_per_task=0, max_failures=0),
        "Invalid --nodes 0: expected a whole number >= 1",
    ),
    (dict(cpus_per_task=0, max_failures=0), "Invalid --cpus-per-task 0: expected a whole number >= 1"),
    (dict(max_failures=0, auto_extend=-1), "Invalid --max-failures 0: expected a whole number of tasks >= 1"),
    (dict(auto_extend=-1, partition=""), "Invalid --auto-extend -1: expected a whole number of arrays >= 0"),
    (dict(conda="", setup=["#SBATCH --exclusive"]), "Invalid --conda '': expected a value on one line"),
    (dict(job_name="", mem="a\nb"), "Invalid --mem 'a\\nb': expected a value on one line"),
    (
        dict(setup=["#SBATCH --exclusive"], run_dir="runs/a%b"),
        "Invalid --setup '#SBATCH --exclusive': " + SETUP_IS_A_DIRECTIVE,
    ),
    (
        dict(run_dir="runs/a%b", venv=""),
        "Invalid --run-dir 'runs/a%b': " + PERCENT_IN_RUN_DIR,
    ),
    (
        dict(venv="", extra_directives=["--time=5"]),
        "Invalid --venv '': expected the directory of a virtual environment",
    ),
    (dict(partition="", run_dir="runs/a\\b"), "Invalid --partition '': expected a value on one line"),
    (
        dict(extra_directives=["--time=5"], setup=["#SBATCH --exclusive"]),
        "Invalid --setup '#SBATCH --exclusive': " + SETUP_IS_A_DIRECTIVE,
    ),
    (dict(qos="x\ny", nodes=0), "Invalid --nodes 0: expected a whole number >= 1"),
    (dict(max_failures=0, partition=""), "Invalid --max-failures 0: expected a whole number of tasks >= 1"),
    (
        dict(tasks=0, run_dir="runs/a%b", signal="bogus"),
        "Invalid --tasks 0: expected a whole number of array tasks >= 1",
    ),
    (dict(tasks=200000, time="0"), "Invalid --tasks 200000: expected at most 100000 (Slurm's MaxArraySize is lower)"),
    (
        dict(signal="KILL", command=[""], gres=""),
        "Invalid --signal 'KILL': unknown signal 'KILL'; " + SIGNAL_FORMS,
    ),
    (dict(gpus="", gres="", constraint="a\rb", conda="x\0"), "Invalid --gpus '': expected a value on one line"),
]

# (hpcckpt render's arguments, as the shell splits them, its error line from the code before the redesign)
CLI_CASES: list[tuple[str, str]] = [
    (
        "--run-dir runs/a%b --tasks 0 --time 10 --signal bogus -- python x",
        RENDER + "Invalid --tasks 0: expected a whole number of array tasks >= 1\n",
    ),
    (
        "--run-dir runs/r --tasks 2 --time 10 --signal USR1@9999 --partition '' -- python x",
        RENDER
        + "Invalid --signal 'USR1@9999': its lead (9999 s) must be shorter than the time limit (00:10:00); "
        + SIGNAL_FORMS
        + "\n",
    ),
    (
        "--run-dir runs/r --tasks 2 --time 1:00:00 --signal bogus",
        RENDER + "Invalid --signal 'bogus': unknown signal 'bogus'; " + SIGNAL_FORMS + "\n",
    ),
    (
        "--run-dir runs/r --tasks 2 --time 1:00:00 --venv '' --sbatch-arg=--time=5 -- python x",
        RENDER + "Invalid --venv '': expected the directory of a virtual environment\n",
    ),
    (
        "--run-dir runs/r --tasks 2 --time 1:00:00 --conda '' --setup '#SBATCH --exclusive' -- python x",
        RENDER + "Invalid --conda '': expected a value on one line\n",
    ),
    (
        "--run-dir 'runs/a\\b' --tasks 2 --time 1:00:00 --partition '' -- python x",
        RENDER + "Invalid --partition '': expected a value on one line\n",
    ),
    (
        "--run-dir runs/r --tasks 2 --time 1:00:00 --sbatch-arg=--time=5 --setup '#SBATCH --x' -- python x",
        RENDER + "Invalid --setup '#SBATCH --x': " + SETUP_IS_A_DIRECTIVE + "\n",
    ),
    ("--run-dir runs/a%b --tasks 2 --time bogus -- python x", RENDER + "Invalid time 'bogus': " + TIME_FORMS + "\n"),
    (
        "--run-dir runs/r --tasks 2 --time 1:00:00 --qos '' --max-failures 0 -- python x",
        RENDER + "Invalid --max-failures 0: expected a whole number of tasks >= 1\n",
    ),
]


def test_check_order_names_every_checked_field_exactly_once() -> None:
    declared = [f.name for f in dataclasses.fields(ChainSpec) if "option" in f.metadata]
    checked = {
        f.name
        for f in dataclasses.fields(ChainSpec)
        if "option" in f.metadata and f.metadata["option"].check is not None
    }
    assert len(CHECK_ORDER) == len(set(CHECK_ORDER)), CHECK_ORDER
    assert set(CHECK_ORDER) <= set(declared)
    # The signal has no check of its own: it is parsed against the time limit, in its place in CHECK_ORDER.
    assert set(CHECK_ORDER) == checked | {"signal_name"}


def test_check_order_puts_the_time_limit_before_the_signal_it_bounds() -> None:
    assert CHECK_ORDER.index("time_seconds") < CHECK_ORDER.index("signal_name")


def test_help_order_stays_the_declaration_order() -> None:
    # --help's order (the fields' declaration order), unchanged by the check order.
    assert [o.flag for o in options() if o.flag is not None] == [
        "--run-dir", "--tasks", "--time", "--signal", "--partition", "--account", "--qos", "--nodes",
        "--ntasks-per-node", "--gpus", "--gres", "--cpus-per-task", "--mem", "--constraint", "--job-name",
        "--srun", "--no-requeue", "--sbatch-arg", "--template", "--setup", "--conda", "--venv",
        "--max-failures", "--auto-extend", "--mirror", "command",
    ]  # fmt: skip


@pytest.mark.parametrize(("bad", "expected"), API_CASES)
def test_chain_spec_reports_the_same_first_error_as_before(bad: dict[str, Any], expected: str) -> None:
    with pytest.raises(UsageError) as raised:
        chain_spec(**{**BASE, **bad})
    assert str(raised.value) == expected


@pytest.mark.parametrize(("argv", "expected"), CLI_CASES)
def test_render_reports_the_same_first_error_as_before(
    argv: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["render", *shlex.split(argv)]) == 2
    assert capsys.readouterr().err == expected
