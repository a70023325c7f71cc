"""hpcckpt: train PyTorch models for days on Slurm clusters whose jobs last hours.

``import hpcckpt`` stays free of torch and submitit: the CLI that renders and submits jobs runs on login
nodes and must start fast. Modules that need torch import it where they use it; the submitit integration
(``hpcckpt.integrations.submitit``) imports submitit only when a job runs or is submitted.
"""

from ._version import __version__ as __version__
from .budget import Budget as Budget
from .distributed import DistEnv as DistEnv
from .distributed import init_process_group as init_process_group
from .errors import CheckpointNotFoundError as CheckpointNotFoundError
from .errors import CorruptCheckpointError as CorruptCheckpointError
from .errors import HpcckptError as HpcckptError
from .errors import StateMismatchError as StateMismatchError
from .errors import StoreError as StoreError
from .errors import UsageError as UsageError
from .integrations.submitit import Chain as Chain
from .integrations.submitit import Resumable as Resumable
from .integrations.submitit import Unfinished as Unfinished
from .integrations.submitit import stored_result as stored_result
from .integrations.submitit import submit_chain as submit_chain
from .run import Run as Run
from .slurm.env import SlurmEnv as SlurmEnv
from .slurm.env import read_slurm_env as read_slurm_env
from .slurm.resources import template_dir as template_dir
from .state import RestoreOptions as RestoreOptions
from .state import Stateful as Stateful
from .state import TrainState as TrainState
from .store.asyncsave import SaveHandle as SaveHandle
from .store.manifest import Checkpoint as Checkpoint
from .store.mirror import Mirror as Mirror
from .store.registry import HpcckptWarning as HpcckptWarning
from .store.retention import KeepBest as KeepBest
from .store.store import CheckpointStore as CheckpointStore
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
    "Mirror",
    "RestoreOptions",
    "Resumable",
    "Run",
    "SaveHandle",
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
    "stored_result",
    "submit_chain",
    "template_dir",
    "worker_init_fn",
]
