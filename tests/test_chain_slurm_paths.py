"""Run directories and names with awkward characters, on the real Slurm cluster (issue 11, item 6): where
the logs land, and why a backslash is refused."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from chains import SUBMIT_TIMEOUT, SlurmChain
from slurm_cluster import SlurmCluster

# Under load a one-task chain starts in seconds; the queue is polled, so this only bounds a failure.
QUEUE_TIMEOUT = 240


def test_logs_land_in_a_run_directory_with_a_space_and_quotes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    chain = SlurmChain(slurm_cluster, tmp_path / 'it\'s a "run"')
    venv = tmp_path / "a venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    show = "import os; print('hello from the task', os.environ['VIRTUAL_ENV'], os.environ['SITE'], sep='|')"
    try:
        job = chain.submit(
            *("--tasks", "1", "--time", "2", "--job-name", "back\\slash name"),
            *("--setup", "export SITE='set up'", "--venv", str(venv)),
            command=[sys.executable, "-c", show],
        )
        # The backslash reaches Slurm: doubled in the #SBATCH line, which sbatch reads as one.
        assert slurm_cluster.job_records(job)[0]["JobName"] == "back\\slash name"
        chain.assert_gone(timeout=QUEUE_TIMEOUT)
    finally:
        chain.cancel_leftovers()
    log = chain.run_dir / "logs" / f"{job}_1.out"
    assert log.is_file(), sorted(str(p) for p in tmp_path.rglob("*.out"))
    assert f"hello from the task|{venv}|set up\n" in log.read_text(), "--setup ran and --venv is active"


def test_slurm_drops_a_backslash_from_the_log_path_so_hpcckpt_refuses_it(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    # What Slurm 22.05 does with a backslash in --output, quoted as a shell would (and escaped for
    # sbatch's parser): slurmd removes it, cannot open the log, and the task never runs.
    chain = SlurmChain(slurm_cluster, tmp_path / "back\\slash")
    (chain.run_dir / "logs").mkdir(parents=True)
    marker = tmp_path / "ran"
    for directive in (shlex.quote, lambda s: shlex.quote(s).replace("\\", "\\\\")):
        output = directive(str(chain.run_dir / "logs" / "%A_%a.out"))
        script = f"#!/bin/bash\n#SBATCH --output={output}\n#SBATCH --array=1-1\n#SBATCH --time=1\ntouch {marker}\n"
        job = slurm_cluster.sbatch(script, cwd=tmp_path)
        chain.assert_gone(job, timeout=QUEUE_TIMEOUT)
        assert list((chain.run_dir / "logs").iterdir()) == [], "the log did not land in the run directory"
        assert not marker.exists(), "the task did not run"
    submit = ["submit", "--backend", "slurm", "--run-dir", str(chain.run_dir), "--tasks", "1", "--time", "2"]
    refused = chain.hpcckpt(*submit, "--", sys.executable, "-c", "pass", timeout=SUBMIT_TIMEOUT)
    assert refused.returncode == 2
    assert f"Invalid --run-dir {str(chain.run_dir)!r}: a backslash cannot appear in it" in refused.stderr
