"""The run directory's names are declared once (hpcckpt.rundir): no other module spells one out, so a
rename is one edit and every reader and writer finds the same files."""

from __future__ import annotations

import ast
from pathlib import Path

import hpcckpt
from hpcckpt import rundir

NAMES = {
    rundir.SCRIPT,
    rundir.LOGS,
    rundir.INDEX,
    rundir.EVENTS,
    rundir.LOCK,
    rundir.SOFT_LOCK,
    rundir.CHECKPOINTS,
    rundir.RESULT,
    rundir.LOCAL_QUEUE,
}


def _spelled_out(path: Path) -> list[str]:
    """String constants in ``path`` equal to a run-directory name, as ``file:line 'name'``; a dictionary
    key (``data["checkpoints"]``, the index's list) names a JSON field, not a file, and is left out."""
    tree = ast.parse(path.read_text())
    keys = {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
    return [
        f"{path.name}:{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in NAMES and id(node) not in keys
    ]


def test_no_module_but_rundir_spells_out_a_run_directory_name() -> None:
    package = Path(hpcckpt.__file__).parent
    found = [hit for path in sorted(package.rglob("*.py")) if path.name != "rundir.py" for hit in _spelled_out(path)]
    assert found == []


def test_the_check_finds_a_spelled_out_name(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('SCRIPT = "chain.sbatch"\nlog = run_dir / "logs" / name\nentries = data["checkpoints"]\n')
    assert _spelled_out(module) == ["m.py:1 'chain.sbatch'", "m.py:2 'logs'"]


def test_a_task_log_is_where_the_chain_script_tells_slurm_to_write_it(tmp_path: Path) -> None:
    from hpcckpt.slurm.script import render
    from hpcckpt.slurm.spec import chain_spec

    script = render(chain_spec(run_dir=str(tmp_path), command=["true"], tasks=1, time="10"))
    # The script's --error: %A the array job, %a the task.
    assert f"#SBATCH --error={tmp_path}/{rundir.LOGS}/%A_%a.err\n" in script
    assert rundir.task_log(tmp_path, "812", "3", "err") == tmp_path / rundir.LOGS / "812_3.err"
