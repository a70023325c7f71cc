"""What a process learns about its Slurm job from its environment.

:func:`read_slurm_env` is a pure function of a mapping; only entry points pass ``os.environ``. The
variable names are kept in one table, so that a reader can check them against Slurm's documentation.
Nothing here writes the environment.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ..errors import UsageError

# Field name -> the Slurm variable it comes from (sbatch(1), "OUTPUT ENVIRONMENT VARIABLES").
_VARIABLES: Mapping[str, str] = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "array_task_max": "SLURM_ARRAY_TASK_MAX",
    "restart_count": "SLURM_RESTART_COUNT",
    "node_name": "SLURMD_NODENAME",
    "node_list": "SLURM_JOB_NODELIST",
    "step_node_list": "SLURM_STEP_NODELIST",  # srun(1): the nodes of this job step
    "procid": "SLURM_PROCID",
    "localid": "SLURM_LOCALID",
    "ntasks": "SLURM_NTASKS",
    "end_time": "SLURM_JOB_END_TIME",  # Unix seconds; set by Slurm >= 23.02 only
    "start_time": "SLURM_JOB_START_TIME",  # Unix seconds; set by Slurm >= 23.02 only
}
_INTEGER_FIELDS = frozenset(
    {"array_task_id", "array_task_max", "restart_count", "procid", "localid", "ntasks", "end_time", "start_time"}
)


@dataclass(frozen=True)
class SlurmEnv:
    """The Slurm facts of this process; every field is None outside a Slurm job."""

    job_id: str | None = None
    array_job_id: str | None = None
    array_task_id: int | None = None
    array_task_max: int | None = None
    restart_count: int | None = None
    node_name: str | None = None
    node_list: str | None = None
    step_node_list: str | None = None
    procid: int | None = None
    localid: int | None = None
    ntasks: int | None = None
    end_time: int | None = None
    start_time: int | None = None

    @property
    def in_job(self) -> bool:
        return self.job_id is not None

    @property
    def job_label(self) -> str:
        """How Slurm names this task: ``123_4`` for an array task, ``123`` otherwise, ``-`` outside Slurm."""
        if self.array_job_id is not None and self.array_task_id is not None:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id or "-"


def read_slurm_env(environ: Mapping[str, str], fields: Collection[str] | None = None) -> SlurmEnv:
    """Parse the ``SLURM_*`` variables of ``environ`` (only those of ``fields``, when given: the others stay
    None); a malformed number is a :class:`UsageError`."""
    values: dict[str, str | int | None] = {}
    for field, variable in _VARIABLES.items():
        raw = environ.get(variable)
        if raw is None or raw == "" or (fields is not None and field not in fields):
            values[field] = None
        elif field in _INTEGER_FIELDS:
            try:
                values[field] = int(raw)
            except ValueError:
                raise UsageError(f"Invalid {variable}={raw!r}: expected a whole number") from None
        else:
            values[field] = raw
    return SlurmEnv(**values)  # type: ignore[arg-type]


def variable(field: str) -> str:
    """The Slurm variable a :class:`SlurmEnv` field comes from, e.g. ``SLURM_NTASKS`` for ``ntasks``."""
    return _VARIABLES[field]


def is_set(environ: Mapping[str, str], field: str) -> bool:
    """Whether ``environ`` has the variable of ``field`` at all (an empty value counts as set)."""
    return environ.get(_VARIABLES[field]) is not None
