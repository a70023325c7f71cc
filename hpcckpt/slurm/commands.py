"""Every call of a Slurm command goes through here: argv as a list, always a timeout, output parsed by
pure functions (tested on captured output)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import HpcckptError

DEFAULT_TIMEOUT = 30.0


class SlurmError(HpcckptError):
    """A Slurm command failed, timed out or is missing."""


# Answers of a busy or restarting controller (issue 11, item 25): asking again a moment later works.
# Anything else ("Invalid job id specified", a bad option) is definite and is not retried.
TRANSIENT = (
    "socket timed out",
    "unable to contact slurm controller",
    "connection refused",
    "slurm temporarily unable",
    "zero bytes were transmitted or received",
    "resource temporarily unavailable",
    "transport endpoint is not connected",
)
# Of those, the ones where the controller surely did not act: the only ones after which a command that
# changes something (sbatch) is sent again. After a timed out sbatch the job may well exist: a second
# array of the same chain would run its tasks alongside the first's.
NOT_REACHED = ("unable to contact slurm controller", "connection refused")
RETRIES = 3  # attempts after the first: 1 + 2 + 4 s of backoff, then the error
BACKOFF = 1.0


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    retries: int = RETRIES,
    idempotent: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Run a Slurm command and return its stdout; :class:`SlurmError` naming the command on any failure.

    A transient failure (:data:`TRANSIENT`, or no answer within ``timeout``) is retried ``retries`` times
    with doubling backoff; a command that is not ``idempotent`` only when the controller was not reached."""
    for attempt in range(retries + 1):
        try:
            return _run_once(argv, timeout=timeout, env=env)
        except _TransientError as error:
            retry = attempt < retries and (idempotent or error.not_reached)
            if not retry:
                raise SlurmError(f"{error} (after {attempt + 1} attempt(s))") from None
            sleep(BACKOFF * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


class _TransientError(SlurmError):
    def __init__(self, message: str, not_reached: bool) -> None:
        super().__init__(message)
        self.not_reached = not_reached


def _run_once(argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None) -> str:
    if not available(argv[0]):
        raise SlurmError(f"{argv[0]} is not on PATH (inside some containers Slurm's commands are missing)")
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise _TransientError(f"{' '.join(argv)} did not answer within {timeout:g} s", not_reached=False) from None
    except OSError as error:
        raise SlurmError(f"{' '.join(argv)} could not run: {error.strerror or error}") from None
    if result.returncode != 0:
        message = f"{' '.join(argv)} failed (exit {result.returncode}): {result.stderr.strip()}"
        lowered = result.stderr.lower()
        if any(text in lowered for text in TRANSIENT):
            raise _TransientError(message, not_reached=any(text in lowered for text in NOT_REACHED))
        raise SlurmError(message)
    return result.stdout


def parse_end_time(text: str) -> float | None:
    """Unix time of an EndTime as squeue (``%e``) or scontrol print it (``2026-11-21T15:40:00``, local
    time); None for ``Unknown``, ``N/A``, ``None`` or an empty answer."""
    value = text.strip()
    if value.startswith("EndTime="):
        value = value.removeprefix("EndTime=")
    if not value or value in ("Unknown", "N/A", "None", "(null)"):
        return None
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_scontrol_fields(text: str) -> dict[str, str]:
    """``Key=Value`` fields of one ``scontrol show job -o`` line (values have no spaces there, but for
    a few that may, which are not used here)."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def job_end_time(job_id: str, *, timeout: float = 10.0) -> float | None:
    """The job's real end time from squeue, else from scontrol; None when neither knows it."""
    try:
        lines = run(["squeue", "-h", "-j", job_id, "-o", "%e"], timeout=timeout, retries=1).splitlines()
        if lines:
            end = parse_end_time(lines[0])
            if end is not None:
                return end
    except SlurmError:
        pass
    try:
        output = run(["scontrol", "show", "job", "-o", job_id], timeout=timeout, retries=1)
    except SlurmError:
        return None
    return parse_end_time(parse_scontrol_fields(output.splitlines()[0] if output else "").get("EndTime", ""))


@dataclass(frozen=True)
class QueueEntry:
    """One line of squeue: a job or array task (``123_4``), or a pending range (``123_[5-8%1]``), with
    the array's job id (``123``)."""

    array_job: str
    job: str
    state: str
    reason: str

    @property
    def task_count(self) -> int:
        """How many array tasks the line stands for (``123_[5-8%1]`` is 4)."""
        return count_array_tasks(self.job)


def parse_sbatch_parsable(output: str) -> str:
    """``sbatch --parsable`` prints ``JOBID`` or ``JOBID;CLUSTER``."""
    job = output.strip().split(";", 1)[0]
    if not job.isdigit():
        raise SlurmError(f"sbatch answered {output.strip()!r}, expected a job id")
    return job


def parse_queue(output: str) -> list[QueueEntry]:
    """Lines of ``squeue -h -o %F|%i|%T|%r``."""
    entries = []
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4 and parts[0]:
            entries.append(QueueEntry(parts[0], parts[1], parts[2], parts[3]))
    return entries


def count_array_tasks(job: str) -> int:
    """Tasks in a squeue job id: ``12_3`` -> 1, ``12_[4-6,9%1]`` -> 4, ``12`` -> 1."""
    _, sep, tasks = job.partition("_")
    if not sep or not tasks.startswith("["):
        return 1
    total = 0
    for part in tasks.strip("[]").split("%")[0].split(","):
        low, dash, high = part.partition("-")
        if low.isdigit() and (not dash or high.isdigit()):
            total += int(high) - int(low) + 1 if dash else 1
    return total


def parse_partitions(output: str) -> list[str]:
    """``sinfo -h -o %P`` lines; the default partition carries a ``*``."""
    return [line.strip().rstrip("*") for line in output.splitlines() if line.strip()]


def submit(script: str, args: Sequence[str] = ()) -> str:
    return parse_sbatch_parsable(run(["sbatch", "--parsable", *args, script], timeout=60, idempotent=False))


def cancel(job_ids: Sequence[str], *, pending_only: bool = False) -> None:
    if job_ids:
        run(["scancel", *(["--state=PENDING"] if pending_only else []), *job_ids])


def queue(job_ids: Sequence[str]) -> list[QueueEntry]:
    """This user's queued jobs and tasks that belong to the arrays ``job_ids``. (``squeue -j`` fails
    outright once one of the ids has left the controller's memory, so the user's queue is filtered.)"""
    if not job_ids:
        return []
    wanted = set(job_ids)
    return [e for e in parse_queue(run(["squeue", "--me", "-h", "-o", "%F|%i|%T|%r"])) if e.array_job in wanted]


def partitions() -> list[str]:
    return parse_partitions(run(["sinfo", "-h", "-o", "%P"]))


def job_state(job_id: str, *, timeout: float = 15.0) -> str | None:
    """The job's state as squeue prints it (``RUNNING``, ``COMPLETING``...); None once squeue no longer
    lists it."""
    return run(["squeue", "-h", "-j", job_id, "-o", "%T"], timeout=timeout).strip() or None


def available(command: str) -> bool:
    """Whether the Slurm command ``command`` (``sbatch``, ``squeue``...) is on PATH: inside some
    containers and on machines without Slurm it is not."""
    return shutil.which(command) is not None
