"""Two extra busy processes, as the brief asks the suite to survive: `with busy_processes(2): ...`.

Each is a plain Python spin loop that ends by itself after `limit` seconds, so a test killed by its timeout
cannot leave load behind for the rest of the suite.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def busy_processes(count: int, limit: float = 600.0) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start `count` processes that each keep one core busy until the block ends (or `limit` s pass)."""
    spinners = [subprocess.Popen([sys.executable, "-c", _SPIN, str(limit)]) for _ in range(count)]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
