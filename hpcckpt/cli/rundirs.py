"""Opening an existing run directory for the commands that read it: one place, shared by the chain's
commands and the mirror's (``push``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..rundir import CHECKPOINTS, EVENTS, INDEX, JOURNAL, LOCK, SOFT_LOCK


def open_run(text: str) -> Any:
    """The store of an existing run directory, for commands that read it (and ``cancel``, which records
    in it). A directory that holds none of a run's files is refused before anything is written there:
    ``cancel`` used to leave a lock and an event log in whatever directory it was given (issue 11)."""
    from ..store.store import CheckpointStore

    if not text.strip():
        raise UsageError(f"Invalid run directory {text!r}: expected the --run-dir of a chain or a Run")
    run_dir = Path(text).expanduser()
    if run_dir.is_dir() and not any((run_dir / name).exists() for name in (CHECKPOINTS, INDEX, EVENTS)):
        raise UsageError(
            f"Invalid run directory {text!r}: it is not a run directory (no {CHECKPOINTS}/, {INDEX} or "
            f"{EVENTS} in it); expected the --run-dir of a chain or a Run (a mirror on a filesystem is "
            "named by its URL: file:///abs/path)"
        )
    if run_dir.is_dir() and not any((run_dir / name).exists() for name in (INDEX, JOURNAL, EVENTS, LOCK, SOFT_LOCK)):
        # A mirror on a filesystem has the same checkpoints/ layout but no registry and no lock: opening it
        # as a run would write a registry into the mirror (issue 14).
        raise UsageError(
            f"Invalid run directory {text!r}: it has {CHECKPOINTS}/ but no registry, as a mirror has; a mirror "
            f"is named by its URL (file://{run_dir.absolute()}); expected the --run-dir of a chain or a Run"
        )
    return CheckpointStore(run_dir, keep_last=None, create=False)
