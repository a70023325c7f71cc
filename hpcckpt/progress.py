"""How far a long transfer or a long piece of local work has got: a bar on a terminal, a line per 10 % in logs.

``with Progress(total, "upload step_000000300 to s3://b/run") as bar: bar.update(n)``. On a terminal (stderr
is a tty) it is a tqdm bar, bytes scaled, with rate and ETA. In a batch log (stderr is a file) it is one line
per step of 10 % through the ``hpcckpt`` logger, e.g. ``hpcckpt: upload step_000000300 to s3://b/run: 30%
(300.0 MiB of 1.0 GiB, 85.0 MiB/s)``, and the 100 % line exactly once when any line was written; with an
unknown total, a line every :data:`EVERY` seconds with the amount so far. Work that ends within
:data:`QUIET` seconds writes nothing, bar or line: a small checkpoint's save or upload adds no noise to a log
of thousands of them. ``HPCCKPT_PROGRESS=0`` turns it all off; ``HPCCKPT_PROGRESS=1`` shows short work too.

Invariants: :meth:`Progress.update` may be called from any thread (uploads run on a background thread;
the count and the lines are kept under one lock), and nothing here ever raises into the work it reports on:
a failure to draw or log (a closed stream, a full disk under the log) turns this reporter off and the work
goes on. When the ``hpcckpt`` logger has no handler anywhere (the ``hpcckpt`` command, which configures no
logging), the lines go to stderr directly, as they would through Run's own handler.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import IO, Any

log = logging.getLogger("hpcckpt")

QUIET = 2.0  # seconds: work that ends sooner shows nothing
EVERY = 10.0  # seconds between lines when the total is unknown
STEP = 10  # percent between lines when the total is known
VARIABLE = "HPCCKPT_PROGRESS"  # "0": nothing; "1": even short work (checked with the others in hpcckpt.environment)


def setting(environ: Mapping[str, str] | None = None) -> str:
    """``HPCCKPT_PROGRESS``: "0" off, "1" on even for work shorter than :data:`QUIET`, "" (unset) the default."""
    return (os.environ if environ is None else environ).get(VARIABLE, "")


class Progress:
    """Reports ``update(n)`` calls against ``total`` (None: unknown) for the work named ``what``.

    ``stream`` (default: ``sys.stderr`` when entered) decides between the bar (a tty) and the lines; lines
    go through the ``hpcckpt`` logger when no stream was given and the logger has a handler, else to it;
    ``clock`` is passed in so that tests move time instead of sleeping; ``quiet``: seconds of work that
    show nothing (:data:`QUIET`).
    """

    def __init__(
        self,
        total: int | None,
        what: str,
        unit: str = "B",
        *,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
        quiet: float = QUIET,
    ) -> None:
        self.total = total if total is None or total >= 0 else None
        self.what = what
        self.unit = unit
        self.done = 0
        self._stream = stream
        self._to_log = stream is None  # lines through the logger unless a stream was chosen
        self._clock = clock
        self._quiet = 0.0 if setting(environ) == "1" else quiet
        self._on = setting(environ) != "0"
        self._lock = threading.Lock()
        self._start = 0.0
        self._shown = -1  # the last percent step written as a line (-1: none yet)
        self._last_line = 0.0  # clock of the last line, for an unknown total
        self._lines = 0
        self._finished = False
        self._bar: Any = None

    def __enter__(self) -> Progress:
        self._start = self._last_line = self._clock()
        if self._on:
            self._guard(self._open)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close(failed=kind is not None)

    def update(self, n: int) -> None:
        """Count ``n`` more units done; draws or logs when a step is reached. Thread-safe, never raises."""
        with self._lock:
            self.done += n
            if self.total is not None and self.done > self.total:
                self.total = self.done  # a total that was an estimate (an export's file): never past 100 %
                if self._bar is not None:
                    self._guard(setattr, self._bar, "total", self.done)
            if self._on and not self._finished:
                self._guard(self._advance, n)

    def close(self, failed: bool = False) -> None:
        """Finish: the last line (100 %, or where it stopped when ``failed``) if any line was written."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            if self._on:
                self._guard(self._finish, failed)

    # Under the lock from here on.

    def _guard(self, action: Callable[..., None], *args: Any) -> None:
        try:
            action(*args)
        except Exception as error:  # never into the work: turn the reporter off instead
            self._on = False
            log.debug("hpcckpt: progress of %s turned off: %s", self.what, error)

    def _open(self) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        self._stream = stream
        if _isatty(stream):
            self._bar = _bar(self.total, self.what, self.unit, stream, self._quiet)

    def _advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._start < self._quiet:
            return
        if self.total is None:
            if now - self._last_line >= EVERY or not self._lines:
                self._line(now, self._amount(self.done))
            return
        percent = self._percent()
        step = percent - percent % STEP
        if step > self._shown and step > 0:
            self._shown = step
            self._line(now, f"{percent}%", self._of())

    def _finish(self, failed: bool) -> None:
        if self._bar is not None:
            self._bar.close()
            return
        if not self._lines:
            return
        now = self._clock()
        if self.total is None:
            self._line(now, f"{'stopped after' if failed else 'done,'} {self._amount(self.done)}")
        elif failed or self.done < self.total:
            self._line(now, f"stopped at {self._percent()}%", self._of())
        elif self._shown < 100:
            self._shown = 100
            self._line(now, "100%", self._of())

    def _of(self) -> str:
        return f"{self._amount(self.done)} of {self._amount(self.total or 0)}"

    def _percent(self) -> int:
        if not self.total:
            return 100
        return min(100, self.done * 100 // self.total)

    def _line(self, now: float, head: str, detail: str = "") -> None:
        """``hpcckpt: WHAT: HEAD (DETAIL, RATE)``."""
        self._last_line = now
        self._lines += 1
        rate = f"{self._amount(self.done / max(now - self._start, 1e-9))}/s"
        message = f"hpcckpt: {self.what}: {head} ({detail}{', ' if detail else ''}{rate})"
        if self._to_log and log.hasHandlers():
            log.info("%s", message)
        else:
            assert self._stream is not None
            self._stream.write(message + "\n")
            self._stream.flush()

    def _amount(self, value: float) -> str:
        if self.unit != "B":
            return f"{value:.0f} {self.unit}" if value == int(value) else f"{value:.1f} {self.unit}"
        return format_bytes(value)


def format_bytes(size: float) -> str:
    """``1.0 GiB``, ``300.0 MiB``, ``512 B``: binary units, one decimal above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _bar(total: int | None, what: str, unit: str, stream: IO[str], quiet: float) -> Any:
    from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs shipped

    class Bar(tqdm):  # type: ignore[misc]  # tqdm is untyped
        monitor_interval = 0  # no monitor thread left behind in the training process

    scaled = unit == "B"
    return Bar(
        total=total,
        desc=what,
        unit=unit,
        unit_scale=scaled,
        unit_divisor=1024 if scaled else 1000,
        file=stream,
        delay=quiet,  # nothing drawn for work that ends sooner
        leave=True,
        dynamic_ncols=True,
    )
