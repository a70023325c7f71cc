"""The whole-number check every option and parameter uses, in its two forms.

A whole number is an ``int`` that is not a ``bool`` (``True`` is an ``int`` to Python, never a count to a
user) and is at least a minimum. :func:`whole_number` checks a value given to the API and raises
:class:`~hpcckpt.errors.UsageError`; :func:`whole_number_arg` is the ``type=`` of an argparse flag and
reads the text first. Both name the bad value and the accepted form, e.g. ``Invalid --tasks 0: expected
a whole number of array tasks >= 1``. Standard library only: the CLI imports this at start.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import UsageError


def is_whole(value: object, minimum: int = 0) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def expected(minimum: int | None = None, of: str = "") -> str:
    """The accepted form: ``a whole number[ of OF][ >= MINIMUM]``."""
    return f"a whole number{' of ' + of if of else ''}{'' if minimum is None else f' >= {minimum}'}"


def whole_number(value: object, name: str, *, minimum: int = 1, of: str = "", also: str = "") -> int:
    """``value`` when it is a whole number >= ``minimum``, else :class:`UsageError` naming it.

    ``name`` is a flag (``--tasks``: "Invalid --tasks 0"), a keyword (``keep_last``: "Invalid keep_last=0")
    or words ("epoch count": "Invalid epoch count 0"); ``of`` says what is counted; ``also`` ends the
    accepted form (``", or None"`` where the caller takes None too)."""
    if not is_whole(value, minimum):
        given = f"{name}={value!r}" if name.isidentifier() else f"{name} {value!r}"
        raise UsageError(f"Invalid {given}: expected {expected(minimum, of)}{also}")
    assert isinstance(value, int)  # for mypy: is_whole said so
    return value


def whole_number_arg(flag: str, *, minimum: int | None = None, of: str = "") -> Callable[[str], int]:
    """The argparse ``type=`` of a whole-number flag: its usage error reads ``invalid FLAG 'TEXT':
    expected a whole number...`` (argparse puts ``argument FLAG:`` before it)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {flag} {text!r}: expected a whole number") from None
        if minimum is not None and not is_whole(value, minimum):
            raise argparse.ArgumentTypeError(f"invalid {flag} {text!r}: expected {expected(minimum, of)}")
        return value

    return parse
