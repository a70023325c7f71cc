"""Drive the throwaway Slurm cluster of tests/cluster/slurm-lab from tests.

`start_cluster` runs `slurm-lab start` and returns a `SlurmCluster` whose methods run Slurm's client
commands against that cluster only: argv lists, SLURM_CONF set, always a timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from harness import wait_for

SLURM_LAB = Path(__file__).resolve().parent.parent / "cluster" / "slurm-lab"

# slurm-lab's exit status for "Slurm cannot run here" (not root, no apt-get, install failed).
EXIT_UNAVAILABLE = 3

# Long enough for apt-get to install slurm-wlm on a fresh CI machine (one to two minutes) plus the
# script's own 60 s wait for the nodes.
START_TIMEOUT = 600
STOP_TIMEOUT = 120

T = TypeVar("T")


class SlurmUnavailableError(Exception):
    """Slurm cannot run on this machine (slurm-lab exited 3); the message says why."""


class SlurmStartError(Exception):
    """slurm-lab tried to start the cluster and failed; the message holds the daemons' log tail."""


class SlurmCommandError(subprocess.CalledProcessError):
    """A Slurm command failed; unlike CalledProcessError, str() shows what it printed on stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


def _slurm_env(base: Mapping[str, str], conf: Path) -> dict[str, str]:
    # A test run inside a real Slurm job inherits SLURM_JOB_ID and friends; srun and sbatch would then
    # act on that job, in the wrong cluster. Only SLURM_CONF may point at Slurm.
    env = {k: v for k, v in base.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    return env


_KEY_VALUE = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o` as a dict: `JobState=RUNNING Reason=None` -> {...}.

    A value runs up to the next ` Key=`, so values with spaces (Command=, Reason=) stay whole.
    """
    return {m.group(1): m.group(2) for m in _KEY_VALUE.finditer(line.strip())}


@dataclass(frozen=True)
class SlurmCluster:
    """A running slurm-lab cluster: nodes node1 and node2, partitions low (default) and high."""

    state_dir: Path
    conf: Path
    env: dict[str, str]

    def run(
        self, argv: Sequence[str], timeout: float = 30, *, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster, output captured as text.

        Raises CalledProcessError on a non-zero exit (unless check=False), TimeoutExpired after `timeout`.
        """
        proc = subprocess.run(
            list(argv),
            env=self.env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,  # srun forwards stdin to task 0; never let it read the terminal
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise SlurmCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def sbatch(self, script_text: str, *args: str, cwd: Path) -> str:
        """Submit `script_text` (written to a file in `cwd`) with `sbatch --parsable ARGS`; the job id.

        For an array this is the array's job id: its tasks are `ID_1`, `ID_2`, ...
        """
        fd, script = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=cwd)
        with os.fdopen(fd, "w") as f:
            f.write(script_text)
        out = self.run(["sbatch", "--parsable", *args, script], cwd=cwd).stdout
        # --parsable prints "jobid" or "jobid;cluster".
        return out.strip().split(";")[0]

    def job_records(self, jobid: str) -> list[dict[str, str]]:
        """`scontrol show job -o JOBID`, one dict per line: an array's id gives one line per task
        (pending tasks may share one line, ArrayTaskId=2-3%1)."""
        out = self.run(["scontrol", "show", "job", "-o", jobid]).stdout
        return [parse_scontrol_record(line) for line in out.splitlines() if line.strip()]

    def job_field(self, jobid: str, field: str) -> str:
        """One field of one job, e.g. job_field("12", "JobState") -> "RUNNING".

        For an array task pass `ARRAYID_TASKID`; an id that matches several records is an error, use
        `job_records` for those.
        """
        records = self.job_records(jobid)
        if len(records) != 1:
            ids = [r.get("JobId", "?") for r in records]
            raise ValueError(f"job {jobid} has {len(records)} records {ids}: use job_records or ID_TASK")
        return records[0][field]

    def squeue_ids(self, jobid: str) -> list[str]:
        """Ids of the job's tasks still in the queue (pending, running, completing), arrays expanded.

        Empty once the job has left the queue, including when the controller has forgotten it.
        """
        proc = self.run(["squeue", "-h", "-r", "-j", jobid, "-o", "%i"], check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return []
            raise SlurmCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc.stdout.split()

    def cancel(self, *jobids: str) -> None:
        """scancel the jobs; finished or unknown ids are not an error."""
        if jobids:
            self.run(["scancel", *jobids], check=False)

    @staticmethod
    def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.5, what: str = "condition") -> T:
        """Poll `predicate` until it returns something truthy and return that; AssertionError naming
        `what` after `timeout` seconds (runs.wait_for, as a method of the cluster)."""
        return cast(T, wait_for(predicate, timeout, what, interval))


def start_cluster(state_dir: Path) -> SlurmCluster:
    """Start (or reuse) the cluster kept in `state_dir`.

    Raises SlurmUnavailableError when Slurm cannot run here, SlurmStartError when it could but did not start.
    """
    proc = subprocess.run(
        [str(SLURM_LAB), "start", str(state_dir)], capture_output=True, text=True, timeout=START_TIMEOUT
    )
    if proc.returncode == EXIT_UNAVAILABLE:
        raise SlurmUnavailableError(proc.stderr.strip())
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("SLURM_CONF="):
        raise SlurmStartError(
            f"slurm-lab start exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    conf = Path(lines[-1].removeprefix("SLURM_CONF="))
    return SlurmCluster(state_dir=state_dir, conf=conf, env=_slurm_env(os.environ, conf))


def stop_cluster(state_dir: Path) -> None:
    """Cancel the cluster's jobs and stop its daemons (munged keeps running)."""
    subprocess.run([str(SLURM_LAB), "stop", str(state_dir)], check=True, timeout=STOP_TIMEOUT)
