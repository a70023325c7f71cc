"""hpcckpt: train PyTorch models for days on Slurm clusters whose jobs last hours.

``import hpcckpt`` stays free of torch and submitit: the CLI that renders and submits jobs runs on login
nodes and must start fast. Modules that need torch import it where they use it; ``hpcckpt.submitit``
imports submitit only when a job runs or is submitted.
"""

from ._version import __version__ as __version__
from .budget import Budget as Budget
from .checkpoint import Checkpoint as Checkpoint
from .distributed import DistEnv as DistEnv
from .distributed import init_process_group as init_process_group
from .errors import CheckpointNotFoundError as CheckpointNotFoundError
from .errors import CorruptCheckpointError as CorruptCheckpointError
from .errors import HpcckptError as HpcckptError
from .errors import StateMismatchError as StateMismatchError
from .errors import StoreError as StoreError
from .errors import UsageError as UsageError
from .registry import HpcckptWarning as HpcckptWarning
from .resources import template_dir as template_dir
from .retention import KeepBest as KeepBest
from .run import Run as Run
from .slurmenv import SlurmEnv as SlurmEnv
from .slurmenv import read_slurm_env as read_slurm_env
from .state import RestoreOptions as RestoreOptions
from .state import Stateful as Stateful
from .state import TrainState as TrainState
from .store import CheckpointStore as CheckpointStore
from .submitit import Chain as Chain
from .submitit import Resumable as Resumable
from .submitit import Unfinished as Unfinished
from .submitit import submit_chain as submit_chain
from .timespec import Interval as Interval
from .workers import worker_init_fn as worker_init_fn

__all__ = [
    "Budget",
    "Chain",
    "Checkpoint",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "CorruptCheckpointError",
    "DistEnv",
    "HpcckptError",
    "HpcckptWarning",
    "Interval",
    "KeepBest",
    "RestoreOptions",
    "Resumable",
    "Run",
    "SlurmEnv",
    "StateMismatchError",
    "Stateful",
    "StoreError",
    "TrainState",
    "Unfinished",
    "UsageError",
    "__version__",
    "init_process_group",
    "read_slurm_env",
    "submit_chain",
    "template_dir",
    "worker_init_fn",
]
