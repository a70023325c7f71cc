"""The chain's options declared once (issue 12): the flags, the builder, the template's variables and the
docs' table all follow hpcckpt/slurm/spec.py; one whole-number check speaks for every option."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcckpt import UsageError
from hpcckpt.checks import whole_number, whole_number_arg
from hpcckpt.cli.chain import configure_chain
from hpcckpt.cli.main import main
from hpcckpt.rundir import LOGS
from hpcckpt.slurm.resources import template_dir
from hpcckpt.slurm.script import TASK_GO_ON, TASK_LEAVE, TEMPLATE, render, template_variables
from hpcckpt.slurm.spec import DEFAULT_MAX_FAILURES, ChainSpec, chain_spec, options

REPO = Path(__file__).resolve().parent.parent
FLAGS = [o.flag for o in options() if o.flag is not None and o.flag.startswith("--")]


def _help(submitting: bool) -> str:
    parser = argparse.ArgumentParser(prog="hpcckpt submit")
    configure_chain(parser, submitting=submitting)
    return parser.format_help()


def test_every_declared_option_is_a_flag_of_submit_and_render_in_declaration_order() -> None:
    assert FLAGS[:3] == ["--run-dir", "--tasks", "--time"]
    for submitting in (True, False):
        text = _help(submitting)
        places = [text.index(f"\n  {flag}") for flag in FLAGS]
        assert places == sorted(places), text
    # Each option's help text is the one declared with it.
    for declared in options():
        if declared.help is not None:
            assert declared.help.replace("%%", "%") in " ".join(_help(False).split()), declared.flag
    assert "--dry-run" in _help(True) and "--dry-run" not in _help(False)


def test_the_flags_render_the_same_script_as_the_keywords(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--run-dir=/scratch/r", "--tasks=3", "--time=2:00:00", "--signal=USR2@60", "--partition=gpu",
        "--account=a", "--qos=q", "--nodes=2", "--ntasks-per-node=4", "--gpus=a100:4", "--gres=g",
        "--cpus-per-task=8", "--mem=64G", "--constraint=c", "--job-name=j", "--no-requeue",
        "--sbatch-arg=--mail-type=END", "--setup=module load x", "--conda=e", "--venv=/v", "--max-failures=5",
        "--auto-extend=2", "--", "python3", "t.py", "a b",
    ]  # fmt: skip
    assert main(["render", *argv]) == 0
    from_flags = capsys.readouterr().out
    from_keywords = chain_spec(
        run_dir="/scratch/r", tasks=3, time="2:00:00", signal="USR2@60", partition="gpu", account="a", qos="q",
        nodes=2, ntasks_per_node=4, gpus="a100:4", gres="g", cpus_per_task=8, mem="64G", constraint="c",
        job_name="j", requeue=False, extra_directives=["--mail-type=END"], setup=["module load x"], conda="e",
        venv="/v", max_failures=5, auto_extend=2, command=["python3", "t.py", "a b"],
    )  # fmt: skip
    assert from_flags == render(from_keywords)
    assert "#SBATCH --no-requeue\n" in from_flags and "--max-failures 5 --auto-extend 2\n" in from_flags
    assert (from_keywords.time_seconds, from_keywords.signal_name, from_keywords.signal_lead) == (7200, "USR2", 60)
    assert from_keywords.launcher.startswith("srun "), "8 ranks launch through srun"
    assert from_keywords.max_failures == 5 and from_keywords.requeue is False


def test_defaults_come_from_the_declarations() -> None:
    spec = chain_spec(run_dir="/scratch/r", command=["true"], tasks=1, time="10")
    assert spec.max_failures == DEFAULT_MAX_FAILURES == 3
    assert (spec.auto_extend, spec.requeue, spec.extra_directives, spec.setup) == (0, True, (), ())
    assert spec.job_name == "hpcckpt-r" and spec.python == sys.executable and spec.launcher == ""


def test_an_unknown_or_missing_keyword_is_named() -> None:
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['task'\] and lacks required keyword\(s\) \['tasks'\]"):
        chain_spec(run_dir="/r", command=["true"], task=1, time="10")


def test_the_template_uses_only_the_variables_the_spec_gives() -> None:
    import jinja2
    import jinja2.meta

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir())), autoescape=False)
    environment.filters.update(q=str, sq=str)  # the filters render() adds
    source = (template_dir() / TEMPLATE).read_text()
    used = jinja2.meta.find_undeclared_variables(environment.parse(source))
    variables = template_variables(chain_spec(run_dir="/r", command=["true"], tasks=1, time="10"))
    assert used <= set(variables), used - set(variables)
    # Every field reaches a user's template, under its own name.
    assert {f.name for f in dataclasses.fields(ChainSpec)} <= set(variables)


def test_the_script_shares_task_begin_s_statuses_and_the_logs_name() -> None:
    script = render(chain_spec(run_dir="/scratch/r", command=["true"], tasks=1, time="10"))
    assert f"\n    {TASK_GO_ON}) ;;\n    {TASK_LEAVE}) exit 0 ;;\n" in script
    assert f"#SBATCH --output=/scratch/r/{LOGS}/%A_%a.out\n" in script
    assert f"--max-failures {DEFAULT_MAX_FAILURES}\n" in script


def test_a_run_that_is_complete_makes_task_begin_leave_with_the_status_the_script_reads(tmp_path: Path) -> None:
    from hpcckpt.store.registry import Registry

    Registry(tmp_path).record("complete", step=10)
    result = subprocess.run(
        [sys.executable, "-m", "hpcckpt", "task-begin", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith(("HPCCKPT_", "SLURM_"))},
    )
    assert result.returncode == TASK_LEAVE, result.stderr


def test_the_docs_table_lists_every_option_with_its_declared_default() -> None:
    text = (REPO / "docs" / "chain.md").read_text()
    table = text[text.index("| option | default | what it does |") :].split("\n\n")[0]
    rows = [[cell.strip() for cell in row.strip("|").split("|")] for row in table.splitlines()[2:]]
    first = " ".join(row[0] for row in rows)
    documented = re.findall(r"`(--[a-z-]+)", first)
    assert [flag for flag in documented if flag in FLAGS] == FLAGS
    for declared in options():
        if isinstance(declared.default, int) and not isinstance(declared.default, bool):
            (row,) = [row for row in rows if row[0].startswith(f"`{declared.flag} ")]
            assert row[1] == str(declared.default), row


@pytest.mark.parametrize(
    ("value", "name", "keywords", "message"),
    [
        (0, "--tasks", {"of": "array tasks"}, "Invalid --tasks 0: expected a whole number of array tasks >= 1"),
        (True, "max_failures", {}, "Invalid max_failures=True: expected a whole number >= 1"),
        (2.0, "epoch count", {}, "Invalid epoch count 2.0: expected a whole number >= 1"),
        ("3", "keep_last", {"also": ", or None"}, "Invalid keep_last='3': expected a whole number >= 1, or None"),
        (-1, "--auto-extend", {"minimum": 0, "of": "arrays"}, "Invalid --auto-extend -1: expected a whole number of"
         " arrays >= 0"),
    ],
)  # fmt: skip
def test_one_whole_number_check_names_the_value_and_the_form(
    value: object, name: str, keywords: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError) as caught:
        whole_number(value, name, **keywords)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_the_whole_number_flag_type_reads_text_first() -> None:
    parse = whole_number_arg("--max-failures", minimum=1, of="tasks")
    assert parse("4") == 4
    for text, message in [
        ("x", "invalid --max-failures 'x': expected a whole number"),
        ("0", "invalid --max-failures '0': expected a whole number of tasks >= 1"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(text)


def test_hpcckpt_help_imports_neither_jinja_nor_torch() -> None:
    code = (
        "import sys; from hpcckpt.cli.main import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('jinja2', 'torch', 'numpy', 'submitit', 'hpcckpt.slurm.script') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
