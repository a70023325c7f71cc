"""What a manifest records about where a checkpoint came from: the user's hyper-parameters, the command line
and the git state of the working directory.

Invariant: finding the provenance never fails or noticeably slows a save. git runs at most once per process
and working directory, with a short timeout; no git, no repository, a timeout or any error records the git
state as absent (None); git runs with ``--no-optional-locks``, so recording the commit never takes the index lock
of the user's repository (a ``git commit`` at the same moment would fail on it). Nothing is read from the
environment: the command line is ``sys.argv`` as the process was started, with the values of arguments whose
names look secret redacted (issue 14 review, item 13: the manifest is uploaded to the mirror), in the forms
``--api-key=V``, ``--api-key V`` and ``API_KEY=V`` (a Hydra-style override too); other secrets passed as
arguments would be recorded: they belong in the environment.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from .manifest import Checkpoint
from .registry import warn

GIT_TIMEOUT = 2.0  # seconds for each git command
REDACTED = "<redacted>"
# A name looks secret when one of its words (split at anything but letters and digits) ends with one of these:
# api_key, HF_TOKEN, apiKey, db.password, --basic-auth; not --tokenizer or --max-tokens (a word's end, no plural
# for key/token: those are counts and names more often than secrets).
SECRET_WORD = re.compile(r"(key|token|secrets?|passwords?|passwd|credentials?|auth|authorization)$")


def check_hparams(hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """``hparams`` as a plain dict, each value JSON-able (numbers, strings, booleans, None, lists and objects
    of them); otherwise a :class:`UsageError` naming the key."""
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping):
        raise UsageError(f"Invalid hparams={hparams!r}: expected a dict of JSON values, e.g. {{'lr': 0.001}}")
    clean = {}
    for key, value in hparams.items():
        if not isinstance(key, str) or not key:
            raise UsageError(f"Invalid hparams key {key!r}: expected a non-empty string")
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as error:
            raise UsageError(
                f"Invalid hparams[{key!r}] = {value!r:.80}: not JSON-able ({error}); expected a number, string, "
                "boolean, None, or a list or dict of them"
            ) from None
        clean[key] = value
    return clean


def command_line() -> tuple[str, ...]:
    """The command line this process ran, with secret-looking values redacted (:func:`redact_argv`)."""
    return redact_argv([str(arg) for arg in sys.argv])


def redact_argv(argv: list[str]) -> tuple[str, ...]:
    """``argv`` with the value of each argument whose name looks secret (:data:`SECRET_WORD`) replaced by
    :data:`REDACTED`: ``--api-key=V``, ``--api-key V`` (unless the next word is an option: ``--x``),
    ``API_KEY=V`` and ``+db.password=V``. The program (the first word) is kept as is."""
    out = list(argv[:1])
    hide_next = False
    for word in argv[1:]:
        if hide_next and not word.startswith("--"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        name, equals, _ = word.partition("=")
        if equals and _secret_name(name.lstrip("-+~")):
            out.append(f"{name}={REDACTED}")
        else:
            out.append(word)
            hide_next = not equals and word.startswith("-") and _secret_name(word.lstrip("-"))
    return tuple(out)


def _secret_name(name: str) -> bool:
    if not name or not re.fullmatch(r"[\w.\-]+", name):
        return False  # not a name: a path, a sentence, a value with '=' in it
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return any(SECRET_WORD.search(word) for word in words if word)


def git_state(directory: str | None = None) -> dict[str, Any] | None:
    """``{"commit": <sha>, "dirty": <bool>}`` for the git repository ``directory`` (default: the working
    directory) is in, dirty when a tracked file is modified (untracked files, such as a run directory inside
    the repository, do not count); None outside a repository or without git."""
    return _git_state(os.path.realpath(directory or os.getcwd()))


@functools.cache
def _git_state(directory: str) -> dict[str, Any] | None:
    commit = _git(directory, "rev-parse", "--verify", "HEAD")
    if commit is None:
        return None
    status = _git(directory, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def _git(directory: str, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", directory, *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except Exception:  # no git, a timeout, anything: the git state is absent, the save goes on
        return None
    return done.stdout if done.returncode == 0 else None


def warn_other_torch(checkpoint: Checkpoint) -> None:
    """Warn (:class:`HpcckptWarning`) when ``checkpoint`` was saved with another major version of torch
    than this process runs: its pickled parts and the optimizer's layout may not read back the same."""
    saved = str(checkpoint.versions.get("torch") or "")
    if not saved:
        return
    import torch

    running = str(torch.__version__)
    if _major(saved) != _major(running):
        warn(
            f"checkpoint {checkpoint.name} was saved with torch {saved}, this process runs torch {running} "
            "(another major version): check that the restored state is what you expect"
        )


def _major(version: str) -> str:
    return version.split(".", 1)[0].strip()
