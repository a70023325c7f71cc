"""The package as a user installs and starts it: import cost, the console script, the wheel."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pickle
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path
from types import ModuleType

import pytest
from load import busy_processes

import hpcckpt
from hpcckpt.errors import HpcckptError, UsageError

REPO = Path(__file__).resolve().parent.parent


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kwargs)  # type: ignore[call-overload]


def test_import_loads_neither_torch_nor_submitit() -> None:
    # The CLI runs on login nodes; importing torch there costs seconds (click keeps the same kind of test).
    heavy = "('torch', 'submitit', 'numpy')"
    code = f"import hpcckpt, hpcckpt.integrations.submitit, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
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
    # When the tests themselves run in a virtual environment (CI makes a fresh one), "system" site packages
    # are the base interpreter's, which lack torch: lend this environment's too. A .pth file adds the
    # directories only; the .pth files inside them (this checkout's editable install) are not run.
    lent = env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (lent / "lent-site-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
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


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_command(heading: str) -> str:
    """The single command under a README heading, found the way CI finds it (.ci/readme_command.py)."""
    command: str = _load_module(REPO / ".ci" / "readme_command.py").readme_command(heading)
    return command


def _example_steps() -> int:
    """The example's default --steps, as its argument parser declares it."""
    match = re.search(r'"--steps", type=int, default=([\d_]+)\)', (REPO / "examples" / "train_mlp.py").read_text())
    assert match, "examples/train_mlp.py declares no default --steps"
    return int(match.group(1))


def test_ci_runs_the_readme_commands_in_a_fresh_venv_and_the_linters() -> None:
    # Issue 11, items 29 and 31: CI reads both setup commands from the README (so they cannot drift),
    # runs them inside a virtual environment it creates, then ruff and mypy, then the tests.
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert 'install_and_run=$(readme_command "Install and run")' in ci
    assert 'run_tests=$(readme_command "Run the tests")' in ci
    assert "export HPCCKPT_REQUIRE_SLURM=1" in ci
    venv_line = ci.index('python3 -m venv "$work/venv"')
    assert ci.index('export VIRTUAL_ENV="$work/venv" PATH="$work/venv/bin:$PATH"') == venv_line + 1
    order = [ci.index(line) for line in ('bash -c "$install_and_run" | tee "$work/demo.log"', "ruff check .")]
    order += [ci.index(line) for line in ("ruff format --check .", "mypy", 'bash -c "$run_tests"')]
    assert venv_line < order[0] and order == sorted(order)
    assert _readme_command("Run the tests") == (
        "python3 -m pip install -c constraints/cpu.txt -e '.[test]' && python3 -m pytest"
    )


def test_readme_command_finder_refuses_a_missing_or_multi_line_block() -> None:
    finder = _load_module(REPO / ".ci" / "readme_command.py").readme_command
    with pytest.raises(ValueError, match="no ```bash block under a heading 'Nope'"):
        finder("Nope", "# Title\n### Other\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="must hold one command"):
        finder("Setup", "### Setup\n```bash\nls\nrm -rf x\n```\n")


def test_installed_distribution_requires_numpy() -> None:
    # Item 29: torch imported without numpy warns, and warnings are errors in the tests, so a fresh venv
    # from the README's commands must get numpy from hpcckpt's own requirements.
    requirements = importlib.metadata.requires("hpcckpt") or []
    assert any(re.match(r"numpy\b", requirement) for requirement in requirements), requirements
    clean = _run([sys.executable, "-W", "error", "-c", "import torch, hpcckpt.run, hpcckpt.state"])
    assert clean.returncode == 0, clean.stderr


@pytest.mark.parametrize(
    ("environ", "threads"), [({}, 1), ({"SLURM_CPUS_PER_TASK": "6"}, 6), ({"SLURM_CPUS_PER_TASK": "x"}, 1)]
)
def test_example_takes_torch_threads_from_the_allocation(environ: dict[str, str], threads: int) -> None:
    # Item 30: torch's default of a thread per core halves this tiny model's speed on a busy machine.
    example = _load_module(REPO / "examples" / "train_mlp.py")
    assert example.torch_threads(environ) == threads


def _run_readme_main_job(tmp_path: Path, timeout: float) -> tuple[str, subprocess.CompletedProcess[str]]:
    command = _readme_command("Install and run")
    main_job = command.split(" && ", 1)[1]
    assert main_job.startswith("hpcckpt submit --backend local --run-dir runs/mlp --tasks 6")
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    result = subprocess.run(
        main_job, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, check=False
    )
    return main_job, result


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_readme_main_job_runs_a_local_chain_that_completes(tmp_path: Path) -> None:
    # The README's first command ends with the main job: a local chain of the example training.
    main_job, result = _run_readme_main_job(tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    # The first task stops as its time runs out: by the budget (after the time limit's warning, which no longer
    # stops it by itself: "budget, timeout"), or by a warning that came when the budget could not tell.
    stops = r"\((budget|budget, timeout|signal, timeout)\)"
    assert re.search(rf"task 1/6 ended: exit 0 .*stopped at step \d+ {stops}", result.stdout), result.stdout
    assert "run complete" in result.stdout
    steps = _example_steps()
    status = _run(["hpcckpt", "status", str(tmp_path / "runs" / "mlp")])
    assert "state    COMPLETE" in status.stdout and f"step     {steps} of {steps}" in status.stdout, status.stdout
    again = subprocess.run(main_job, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert "run is complete: the remaining 6 task(s) are cancelled" in again.stdout


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_readme_main_job_completes_with_two_other_busy_processes(tmp_path: Path) -> None:
    # Item 30: on a 2-core machine with two busy processes the demo used all its tasks and did not finish.
    # The demo is sized so that this needs about four of its six tasks; each task must still train.
    with busy_processes(2):
        _, result = _run_readme_main_job(tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run complete" in result.stdout, result.stdout
    ended = re.findall(r"task (\d)/6 ended: exit (\d+)", result.stdout)
    assert 1 <= len(ended) <= 6, result.stdout
    stops = [int(step) for step in re.findall(r"stopped at step (\d+)", result.stdout)]
    assert stops == sorted(stops) and stops[-1] == _example_steps(), result.stdout
