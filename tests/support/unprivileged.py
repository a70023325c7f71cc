"""Run a check as an unprivileged user: root writes anywhere, so permission tests drop privileges first.

The child is forked, not executed, so the interpreter under root's home need not be readable by that
user; the paths it touches must be (pytest's tmp_path is private to root).
"""

from __future__ import annotations

import os
from collections.abc import Callable

NOBODY = 65534


def as_nobody(check: Callable[[], str]) -> tuple[bool, str]:
    """(True, what ``check`` returned) or (False, the exception it raised, as ``Type: message``)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read_end)
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            os.write(write_end, check().encode())
            code = 0
        except BaseException as error:
            os.write(write_end, f"{type(error).__name__}: {error}".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        said = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0, said
