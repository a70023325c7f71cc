"""The package as a user installs and starts it: import cost, the console script, the wheel."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import hpcckpt
from hpcckpt.errors import HpcckptError, UsageError

REPO = Path(__file__).resolve().parent.parent


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kwargs)  # type: ignore[call-overload]


def test_import_loads_neither_torch_nor_submitit() -> None:
    # The CLI runs on login nodes; importing torch there costs seconds (click keeps the same kind of test).
    heavy = "('torch', 'submitit', 'numpy')"
    code = f"import hpcckpt, hpcckpt.submitit, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = _run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_console_script_version_and_help() -> None:
    version = _run(["hpcckpt", "--version"])
    assert version.returncode == 0
    assert version.stdout.strip() == f"hpcckpt {hpcckpt.__version__}"
    help_ = _run(["hpcckpt", "--help"])
    assert help_.returncode == 0
    assert "usage: hpcckpt" in help_.stdout
    assert "templates" in help_.stdout


@pytest.mark.parametrize(("argv", "message"), [([], "required: COMMAND"), (["nonsense"], "invalid choice")])
def test_bad_usage_exits_2(argv: list[str], message: str) -> None:
    result = _run(["hpcckpt", *argv])
    assert result.returncode == 2
    assert message in result.stderr


def test_templates_are_found_from_the_checkout() -> None:
    result = _run(["hpcckpt", "templates"])
    assert result.returncode == 0, result.stderr
    assert "chain.sbatch.j2" in result.stdout
    assert (hpcckpt.template_dir() / "chain.sbatch.j2").is_file()


@pytest.mark.parametrize("error", [HpcckptError("bad value 'x': expected y"), UsageError("bad '90x'")])
def test_errors_survive_pickling(error: HpcckptError) -> None:
    # submitit sends a job's exception back to the submitter as a pickle.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.exit_code == error.exit_code


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_in_a_fresh_venv_finds_its_templates(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)])
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("hpcckpt-*.whl")

    # System site packages lend the already-installed torch & co; --no-index proves that installing the
    # wheel downloads nothing (no CUDA wheels) when a suitable torch is present.
    env_dir = tmp_path / "venv"
    # No pip of its own: ensurepip would also bring an old setuptools that shadows the one torch requires.
    venv.create(env_dir, with_pip=False, system_site_packages=True)
    bin_dir = env_dir / "bin"
    pip = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python")]
    installed = _run([*pip, "install", "--no-index", str(wheel)])
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # Run from a directory outside the checkout, so nothing can fall back to the repository's files.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    help_ = _run([str(bin_dir / "hpcckpt"), "--help"], cwd=tmp_path, env=env)
    assert help_.returncode == 0, help_.stderr
    where = _run([str(bin_dir / "hpcckpt"), "templates", "--path"], cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr
    template_dir = Path(where.stdout.strip())
    assert template_dir.is_relative_to(env_dir), template_dir
    shipped = (template_dir / "chain.sbatch.j2").read_text()
    assert shipped == (REPO / "templates" / "chain.sbatch.j2").read_text()
    no_torch = _run(
        [str(bin_dir / "python"), "-c", "import hpcckpt, sys; assert 'torch' not in sys.modules, 'torch'"],
        cwd=tmp_path,
        env=env,
    )
    assert no_torch.returncode == 0, no_torch.stderr


def _readme_command(heading: str) -> str:
    """The single command in the fenced block under a README heading."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^#+ {re.escape(heading)}\n.*?```(?:bash|sh)\n(.+?)\n```", text, re.M | re.S)
    assert match, f"README has no command block under {heading!r}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = _readme_command("Run the tests")
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
    assert "export HPCCKPT_REQUIRE_SLURM=1" in ci_lines


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_readme_main_job_runs_a_local_chain_that_completes(tmp_path: Path) -> None:
    # The README's first command ends with the main job: a local chain of the example training.
    command = _readme_command("Install and run")
    main_job = command.split(" && ", 1)[1]
    assert main_job.startswith("hpcckpt submit --backend local --run-dir runs/mlp --tasks 5")
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    result = subprocess.run(
        main_job,
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The first task stops as its time runs out: by the budget, or by the warning signal just before.
    assert "task 1/5 ended: exit 0" in result.stdout, result.stdout
    assert "(budget)" in result.stdout or "(signal, timeout)" in result.stdout, result.stdout
    assert "run complete" in result.stdout
    status = _run(["hpcckpt", "status", str(tmp_path / "runs" / "mlp")])
    assert "state    COMPLETE" in status.stdout and "step     60000 of 60000" in status.stdout
    again = subprocess.run(main_job, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert "run is complete: the remaining 5 task(s) are cancelled" in again.stdout
