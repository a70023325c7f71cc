"""Every call of a Slurm command goes through here: argv as a list, always a timeout, output parsed by
pure functions (tested on captured output)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence

from .errors import HpcckptError

DEFAULT_TIMEOUT = 30.0


class SlurmError(HpcckptError):
    """A Slurm command failed, timed out or is missing."""


def run(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, env: Mapping[str, str] | None = None) -> str:
    """Run a Slurm command and return its stdout; :class:`SlurmError` naming the command on any failure."""
    if shutil.which(argv[0]) is None:
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
        raise SlurmError(f"{' '.join(argv)} did not answer within {timeout:g} s") from None
    except OSError as error:
        raise SlurmError(f"{' '.join(argv)} could not run: {error.strerror or error}") from None
    if result.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} failed (exit {result.returncode}): {result.stderr.strip()}")
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
        lines = run(["squeue", "-h", "-j", job_id, "-o", "%e"], timeout=timeout).splitlines()
        if lines:
            end = parse_end_time(lines[0])
            if end is not None:
                return end
    except SlurmError:
        pass
    try:
        output = run(["scontrol", "show", "job", "-o", job_id], timeout=timeout)
    except SlurmError:
        return None
    return parse_end_time(parse_scontrol_fields(output.splitlines()[0] if output else "").get("EndTime", ""))
