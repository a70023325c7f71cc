"""hpcckpt: train PyTorch models for days on Slurm clusters whose jobs last hours.

``import hpcckpt`` stays free of torch and submitit: the CLI that renders and submits jobs runs on login
nodes and must start fast. Modules that need torch import it where they use it.
"""

from ._version import __version__ as __version__
from .errors import HpcckptError as HpcckptError
from .errors import UsageError as UsageError
from .resources import template_dir as template_dir

__all__ = [
    "HpcckptError",
    "UsageError",
    "__version__",
    "template_dir",
]
