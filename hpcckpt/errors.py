"""The errors hpcckpt raises.

One base class, :class:`HpcckptError`, and a few subclasses that say what happened. Every message names
the bad value and the accepted form. Errors cross process boundaries (submitit pickles a job's exception
back to the submitting process), so each class keeps its constructor arguments in ``args`` and pickles
through :meth:`HpcckptError.__reduce__`.
"""

from __future__ import annotations

from typing import Any


class HpcckptError(Exception):
    """Base class of every error hpcckpt raises on purpose. The CLI exits 1 on it."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


class UsageError(HpcckptError):
    """A value given by the user is not of the accepted form. The CLI exits 2 on it, before any work."""

    exit_code = 2


class StoreError(HpcckptError):
    """The checkpoint store cannot do what was asked: an unusable run directory, a failed save, a lock."""


class CheckpointNotFoundError(StoreError):
    """A checkpoint that was asked for by step or name does not exist. Never answered by a fresh start."""


class CorruptCheckpointError(StoreError):
    """A checkpoint's files do not match its manifest (size, checksum) or cannot be read."""


class StateMismatchError(HpcckptError):
    """A checkpoint's state does not fit the objects it is loaded into (missing or unexpected keys)."""


class ValidationFailedError(StoreError):
    """A restored checkpoint failed the user's ``validate`` check: a named one, or every one there was (each is
    marked bad and kept on disk). Never answered by a fresh start."""
