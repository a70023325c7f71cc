"""A chain on the test cluster, driven the way a user drives one: ``hpcckpt submit``, ``status --json``,
``extend``, ``cancel``; waits on the queue and the run's events, never on fixed sleeps.

The ``slurm_chain`` fixture (tests/conftest.py) gives each test one, on ``tmp_path / "chain"``; at the
test's end it cancels whatever the chain still has queued, so a failed test leaves the cluster empty for
the next one.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from harness import events, train_command, wait_for, wait_started
from slurm_cluster import SlurmCluster

# How long the CLI may take against the cluster: a submission (sbatch retries a controller that is slow)
# and every other command (status, extend, cancel), as the tests allowed before they shared this helper.
SUBMIT_TIMEOUT = 120
CLI_TIMEOUT = 60


@dataclass
class SlurmChain:
    """One run directory's chains on ``cluster``; ``jobs`` are the array jobs this object submitted."""

    cluster: SlurmCluster
    run_dir: Path
    jobs: list[str] = field(default_factory=list)

    def hpcckpt(
        self, *argv: str, env_extra: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``hpcckpt ARGV`` against the cluster, from the run directory's parent; output captured."""
        return subprocess.run(
            ["hpcckpt", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**self.cluster.env, **(env_extra or {})},
            cwd=self.run_dir.parent,
        )

    def train(self, *args: str) -> list[str]:
        """The toy training job (tests/workers/train_worker.py) on this run directory, as a command."""
        return train_command(self.run_dir, *args)

    def submit(self, *options: str, command: list[str], env_extra: dict[str, str] | None = None) -> str:
        """``hpcckpt submit --backend slurm`` with ``options``; the chain's array job id."""
        argv = ["submit", "--backend", "slurm", "--run-dir", str(self.run_dir), *options, "--", *command]
        result = self.hpcckpt(*argv, env_extra=env_extra, timeout=SUBMIT_TIMEOUT)
        assert result.returncode == 0, result.stdout + result.stderr
        job = result.stdout.split()[2].rstrip(":")  # "submitted chain 123: ..."
        assert job.isdigit(), result.stdout
        self.jobs.append(job)
        return job

    def status(self) -> dict[str, Any]:
        """``hpcckpt status RUN_DIR --json``."""
        result = self.hpcckpt("status", str(self.run_dir), "--json")
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    def wait_state(self, states: set[str], timeout: float) -> dict[str, Any]:
        """Poll the status until its state is one of ``states``; that status."""

        def reached() -> dict[str, Any] | None:
            status = self.status()
            return status if status["state"] in states else None

        return dict(wait_for(reached, timeout, f"{self.run_dir.name} to reach {states}", interval=2))

    def wait_started(self, timeout: float = 120, count: int = 1) -> list[dict[str, Any]]:
        """Wait until ``count`` tasks have started training; their Run start events."""
        return wait_started(self.run_dir, timeout, count)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return events(self.run_dir, kind)

    def assert_gone(self, *jobs: str, timeout: float = 60) -> None:
        """Wait until ``jobs`` (by default every job this chain submitted) have left the queue."""
        for job in jobs or tuple(self.jobs):
            wait_for(partial(self._gone, job), timeout, f"{job} to leave the queue")

    def _gone(self, job: str) -> bool:
        return not self.cluster.squeue_ids(job)

    def cancel_leftovers(self) -> None:
        """Cancel every array the run's events or this object know of; ended ones are no error."""
        recorded = [str(e["job"]) for e in self.events("submit") if e.get("job")]
        self.cluster.cancel(*dict.fromkeys([*self.jobs, *recorded]))
