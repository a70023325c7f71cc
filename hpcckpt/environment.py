"""Every ``HPCCKPT_*`` environment variable, in one table, with the parser that checks it.

The variables are read by entry points: ``Run`` takes ``HPCCKPT_GRACE``, ``HPCCKPT_MARGIN`` and
``HPCCKPT_SIGNAL_LEAD`` from the values :func:`check_environment` parsed, when it is built; they used to be
read where they were used, some of them only late: ``HPCCKPT_SIGNAL_LEAD=5m`` crashed ``Run`` when the
warning came, so that nothing was saved (issue 11, item 10). ``Run`` and the CLI call
:func:`check_environment` when they start, so a bad value is an error at once, naming the variable, its
value and the accepted form. An empty value counts as unset, as everywhere it is read. A ``HPCCKPT_``
name not in the table (a typo, or a variable of a newer hpcckpt) is reported, not refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UsageError
from .signals import parse_signal
from .store.locations import check_credential_free, redact
from .store.registry import LOCK_MODES

log = logging.getLogger("hpcckpt")


@dataclass(frozen=True)
class Variable:
    name: str
    accepted: str  # the accepted form, for the error message
    parse: Callable[[str], Any]  # raises ValueError (or UsageError) on a bad value
    meaning: str
    shown: Callable[[str], str] = str  # the value as an error may show it (a URL: redacted)


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def _unix_time(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(text)
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(text)
        return text

    return parse


def _path(text: str) -> str:
    return text


def _mirror(text: str) -> str:
    check_credential_free(text)
    return text


VARIABLES: tuple[Variable, ...] = (
    Variable("HPCCKPT_RUN_DIR", "a directory path", _path, "the run directory (Run, task-begin, task-end)"),
    Variable(
        "HPCCKPT_MIRROR",
        "a path, file:///path, s3://bucket/prefix or gs://bucket/prefix, without credentials",
        _mirror,
        "where Run mirrors its checkpoints (--mirror)",
        redact,
    ),
    Variable(
        "HPCCKPT_SIGNAL",
        "a signal name such as USR1, USR2, SIGUSR1, TERM, INT or HUP",
        parse_signal,
        "the time-limit warning signal Run watches (the template's --signal)",
    ),
    Variable(
        "HPCCKPT_SIGNAL_LEAD",
        "whole or decimal seconds >= 0, e.g. 90 (not 5m)",
        _seconds,
        "how long before the time limit the warning signal comes",
    ),
    Variable("HPCCKPT_GRACE", "seconds >= 0, e.g. 5 or 0.5", _seconds, "time a save may take after SIGTERM"),
    Variable("HPCCKPT_MARGIN", "seconds >= 0, e.g. 5 or 0.5", _seconds, "the budget's smallest safety margin"),
    Variable(
        "HPCCKPT_DEADLINE",
        "Unix time in seconds, e.g. 1795300000",
        _unix_time,
        "the job's end time when Slurm does not give it (local backend, tests)",
    ),
    Variable("HPCCKPT_LOCK", "'auto', 'fcntl' or 'soft'", _one_of(*LOCK_MODES), "registry lock mode"),
    Variable("HPCCKPT_MASTER_PORT", "a port number from 1 to 65535", _port, "torch.distributed's rendezvous port"),
    Variable("HPCCKPT_BACKEND", "'local' or 'slurm'", _one_of("local", "slurm"), "set by the local backend"),
    Variable(
        "HPCCKPT_PROGRESS",
        "'0' (off) or '1' (on, the default)",
        _one_of("0", "1"),
        "progress bars and 10 % lines of long transfers, export and verify",
    ),
    Variable("HPCCKPT_REQUIRE_SLURM", "'0' or '1'", _one_of("0", "1"), "the test suite: fail, not skip, without Slurm"),
)
_BY_NAME = {variable.name: variable for variable in VARIABLES}


def check_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Parse every ``HPCCKPT_*`` variable that is set: their values by name, or a :class:`UsageError`
    naming the first bad one, its value and the accepted form."""
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for name in sorted(environ):
        if not name.startswith("HPCCKPT_"):
            continue
        variable = _BY_NAME.get(name)
        if variable is None:
            unknown.append(name)
            continue
        raw = environ[name]
        if not raw:
            continue  # empty is unset
        try:
            values[name] = variable.parse(raw)
        except ValueError:
            raise UsageError(f"Invalid {name}={variable.shown(raw)!r}: expected {variable.accepted}") from None
        except UsageError as error:  # the parser's own message names the form
            raise UsageError(f"Invalid {name}={variable.shown(raw)!r} in the environment: {error}") from None
    if unknown:
        log.warning(
            "hpcckpt: ignoring unknown environment variable(s) %s; hpcckpt reads %s",
            ", ".join(unknown),
            ", ".join(_BY_NAME),
        )
    return values
