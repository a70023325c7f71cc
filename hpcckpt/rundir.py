"""The run directory's layout: every name hpcckpt gives a file or folder in ``RUN_DIR``, declared once.

::

    RUN_DIR/
        chain.sbatch         the rendered chain script (``hpcckpt submit``)
        logs/                Slurm's stdout/stderr per task: ``<array job>_<task>.out`` and ``.err``
        registry.json        the committed checkpoints (the store's registry): a snapshot, compacted
        registry.journal     what was committed and deleted since that snapshot, one line each
        events.jsonl         the run's event log (hpcckpt.events)
        .hpcckpt.lock        the lock guarding both (``.hpcckpt.softlock`` in soft-lock mode)
        checkpoints/         one directory per checkpoint, plus temporary and trash directories
        result.pkl           a complete submitit run's return value
        .local-chain.json    the local backend's queue while a local chain runs

Readers and writers import the names from here, so a rename is one edit; the template receives
``logs`` from the chain spec.
"""

from __future__ import annotations

from pathlib import Path

SCRIPT = "chain.sbatch"
LOGS = "logs"
INDEX = "registry.json"
JOURNAL = "registry.journal"
EVENTS = "events.jsonl"
LOCK = ".hpcckpt.lock"
SOFT_LOCK = ".hpcckpt.softlock"
CHECKPOINTS = "checkpoints"
RESULT = "result.pkl"
LOCAL_QUEUE = ".local-chain.json"


def task_log(run_dir: Path | str, array_job_id: str, array_task_id: str, kind: str) -> Path:
    """Where Slurm writes task ``array_task_id`` of ``array_job_id``'s ``kind`` (``out`` or ``err``) stream:
    the chain script's ``--output``/``--error`` pattern ``logs/%A_%a.<kind>``."""
    return Path(run_dir) / LOGS / f"{array_job_id}_{array_task_id}.{kind}"
