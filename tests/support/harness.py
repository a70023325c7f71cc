"""Running the toy training and reading its run directory, as the tests do: a clean job environment, the
worker's command and process, the run's events, waiting on a condition or for training to start.

One of each for every test file (the events reader was written out in ten), so a change to how the
event log is read, or the worker started, is one edit here.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from paths import TRAIN_WORKER

from hpcckpt import CheckpointStore
from hpcckpt.rundir import EVENTS


def events(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The run's events, oldest first, only those of ``kind`` when given; [] while it has no event log."""
    if not (run_dir / EVENTS).exists():
        return []
    log = CheckpointStore(run_dir, create=False).registry.events()
    return log if kind is None else [e for e in log if e["event"] == kind]


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; AssertionError naming
    ``what`` after ``timeout`` seconds (a condition, never a fixed sleep: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
    return value


def wait_started(run_dir: Path, timeout: float = 120, count: int = 1) -> list[dict[str, Any]]:
    """Wait until ``count`` tasks' Runs have started training in ``run_dir``; their start events."""

    def started() -> list[dict[str, Any]] | None:
        starts = events(run_dir, "start")
        return starts if len(starts) >= count else None

    starts: list[dict[str, Any]] = wait_for(started, timeout, f"training to start in {run_dir.name} ({count} task(s))")
    return starts


def clean_env(*also: str, **extra: str) -> dict[str, str]:
    """This process's environment without what tells a process it runs in a job (``SLURM_*``, ``HPCCKPT_*``
    and the prefixes in ``also``), plus ``extra``: a test's job knows only what the test gives it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCCKPT_", *also))}
    env.update(extra)
    return env


def train_command(run_dir: Path, *args: str) -> list[str]:
    """The toy training job (tests/workers/train_worker.py) on ``run_dir``, as a command line."""
    return [sys.executable, str(TRAIN_WORKER), str(run_dir), *args]


class TrainWorker:
    """tests/workers/train_worker.py in a process of its own, outside any job: its JSON lines on stdout
    (``started``, ``end``), its stderr in a file beside the run directory (a pipe nobody reads could fill
    and block it). ``deadline_in`` sets the budget's deadline counted from the built model (under load the
    imports alone once took the whole budget: item 32); ``group`` makes it lead its own process group,
    so that a signal can reach it and its DataLoader workers at once, as Slurm's does."""

    def __init__(
        self,
        run_dir: Path,
        *args: str,
        deadline_in: float | None = None,
        group: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        if deadline_in is not None:
            args = (*args, "--deadline-in", str(deadline_in))
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = open(run_dir.parent / f"{run_dir.name}-{time.monotonic_ns()}.stderr", "w+")  # noqa: SIM115
        self._stderr_text = ""
        self.process = subprocess.Popen(
            train_command(run_dir, *args),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=clean_env() if env is None else env,
            start_new_session=group,
        )

    def next_line(self, event: str) -> dict[str, Any]:
        """The next JSON line, which must be ``event``'s (stderr in the message when the process is gone)."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, self.stderr
        record = json.loads(line)
        assert record["event"] == event, record
        return dict(record)

    def wait_started(self) -> dict[str, Any]:
        return self.next_line("started")

    @property
    def stderr(self) -> str:
        if self._stderr.closed:
            return self._stderr_text
        self._stderr.seek(0)
        return self._stderr.read()

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        """Wait for the exit (its status is ``process.returncode``); the end lines it printed."""
        assert self.process.stdout is not None
        out = self.process.stdout.read()  # what readline() already buffered comes first
        self.process.wait(timeout=timeout)
        self.process.stdout.close()
        self._stderr_text = self.stderr
        self._stderr.close()
        return [json.loads(line) for line in out.splitlines() if '"end"' in line]


def run_with_file_size_limit(script: str, run_dir: Path, limit: int = 1 << 20) -> dict[str, Any]:
    """Run ``script`` (``python -c``, given ``run_dir``) in a child whose files may not grow past ``limit``
    bytes: a real write error (EFBIG) at the process edge, for saves that fail. Its JSON output, parsed."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing

    tests = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=limited,
        env=clean_env(PYTHONPATH=f"{tests / 'workers'}:{tests.parent}"),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (a process group's rendezvous, a test server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# gloo's teardown of a process group can abort a rank after its work is done (test_distributed.py).
TEARDOWN_ABORT = "terminate called without an active exception"


def run_ranks(script: Path, *args: str, count: int = 2, timeout: float = 300) -> list[dict[str, Any]]:
    """``python script ARGS`` as ``count`` ranks of a gloo process group on loopback; the JSON object each
    rank printed last, by rank. A rank still running at ``timeout`` (left waiting in a collective) is
    killed, never left behind."""
    port = str(free_port())
    processes = []
    for rank in range(count):
        env = clean_env("RANK", "WORLD_SIZE", RANK=str(rank), WORLD_SIZE=str(count), LOCAL_RANK=str(rank))
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": os.pathsep.join(sys.path)}
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    errors = "\n".join(err for _, err in outputs)
    lines = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs if out.strip()]
    assert len(lines) == count, errors[-3000:]
    assert all(p.returncode == 0 for p in processes) or TEARDOWN_ABORT in errors, errors[-3000:]
    return sorted(lines, key=lambda line: int(line["rank"]))
