"""Progress (issue 14): a line per 10 % in batch logs, nothing for short work, the 100 % line once, thread-safe,
a tqdm bar on a terminal, off with HPCCKPT_PROGRESS=0, and never an error in the work it reports on.

Time is a fake clock passed in: no test sleeps to make work look long.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import re
import struct
import subprocess
import sys
import termios
import threading

import pytest
from harness import clean_env

from hpcckpt.environment import check_environment
from hpcckpt.errors import UsageError
from hpcckpt.progress import EVERY, QUIET, Progress

MIB = 1024 * 1024


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def percents(text: str) -> list[str]:
    return re.findall(r": (\d+%|stopped at \d+%)", text)


def test_a_long_transfer_logs_one_line_per_ten_percent_with_sizes_and_rate() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress(1024 * MIB, "upload step_000000300 to s3://b/run", stream=out, clock=clock) as bar:
        for _ in range(100):
            clock.now += 0.4  # 40 s for 1 GiB: 25.6 MiB/s
            bar.update(1024 * MIB // 100 + 1)
    lines = out.getvalue().splitlines()
    assert percents(out.getvalue()) == [f"{p}%" for p in range(10, 101, 10)]
    assert lines[2] == "hpcckpt: upload step_000000300 to s3://b/run: 30% (307.2 MiB of 1.0 GiB, 25.6 MiB/s)"
    assert lines[-1].startswith("hpcckpt: upload step_000000300 to s3://b/run: 100% (1.0 GiB of 1.0 GiB, ")


def test_work_that_ends_within_the_quiet_time_writes_nothing_even_at_100_percent() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress(10 * MIB, "export step_000000010", stream=out, clock=clock) as bar:
        for _ in range(10):
            clock.now += QUIET / 20
            bar.update(MIB)
    assert bar.done == 10 * MIB
    assert out.getvalue() == ""


def test_the_first_line_after_the_quiet_time_is_the_step_reached_then_100_percent_exactly_once() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress(100, "verify run", unit="B", stream=out, clock=clock) as bar:
        bar.update(45)  # within the quiet time: no line
        clock.now += QUIET + 1
        bar.update(5)  # 50 %: the first line
        bar.update(50)  # 100 %
        bar.update(0)
    assert percents(out.getvalue()) == ["50%", "100%"]


def test_the_100_percent_line_comes_at_the_end_when_the_last_update_did_not_reach_a_new_step() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress(1000, "verify run", stream=out, clock=clock) as bar:
        clock.now += QUIET + 1
        bar.update(995)  # 99 %: the line of the 90 % step says where it is
        bar.update(5)  # 100 %: its line
    assert percents(out.getvalue()) == ["99%", "100%"]
    out2 = io.StringIO()
    with Progress(1000, "verify run", stream=out2, clock=clock) as bar2:
        clock.now += QUIET + 1
        bar2.update(950)
        bar2.total = 950  # the work turned out smaller than announced (a file shrank): still one 100 % line
    assert percents(out2.getvalue()) == ["95%", "100%"]


def test_work_that_fails_after_lines_ends_with_where_it_stopped() -> None:
    clock, out = Clock(), io.StringIO()

    def upload() -> None:
        with Progress(100 * MIB, "upload step_000000007 to s3://b/run", stream=out, clock=clock) as bar:
            clock.now += QUIET + 1
            bar.update(47 * MIB)
            raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        upload()
    assert percents(out.getvalue()) == ["47%", "stopped at 47%"]
    assert "(47.0 MiB of 100.0 MiB, " in out.getvalue().splitlines()[-1]


def test_an_unknown_total_logs_the_amount_so_far_every_few_seconds() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress(None, "download from s3://b/run", stream=out, clock=clock) as bar:
        for _ in range(30):
            clock.now += 1.0
            bar.update(MIB)
    lines = out.getvalue().splitlines()
    # the first line once the quiet time is over, then one every EVERY seconds, then the total
    assert len(lines) == 1 + int((30 - QUIET) // EVERY) + 1
    assert lines[0] == "hpcckpt: download from s3://b/run: 2.0 MiB (1.0 MiB/s)"
    assert lines[-1] == "hpcckpt: download from s3://b/run: done, 30.0 MiB (1.0 MiB/s)"


def test_counts_other_than_bytes_are_shown_as_counts() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress(20, "verify run", unit="checkpoints", stream=out, clock=clock) as bar:
        clock.now += 4
        bar.update(2)
    assert (
        out.getvalue().splitlines()[0]
        == "hpcckpt: verify run: 10% (2 checkpoints of 20 checkpoints, 0.5 checkpoints/s)"
    )


def test_two_threads_updating_at_once_count_every_unit_and_write_each_step_once() -> None:
    clock, out = Clock(), io.StringIO()
    per_thread = 20_000
    with Progress(2 * per_thread, "upload step_000000001 to s3://b/run", stream=out, clock=clock) as bar:
        clock.now += QUIET + 1  # every update is past the quiet time: each one may write a line
        start = threading.Barrier(2)

        def work() -> None:
            start.wait()
            for _ in range(per_thread):
                bar.update(1)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert bar.done == 2 * per_thread
    assert percents(out.getvalue()) == [f"{p}%" for p in range(10, 101, 10)]


def test_hpcckpt_progress_0_silences_it() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress(100, "upload", stream=out, clock=clock, environ={"HPCCKPT_PROGRESS": "0"}) as bar:
        clock.now += 100
        bar.update(100)
    assert bar.done == 100
    assert out.getvalue() == ""


def test_hpcckpt_progress_is_a_checked_variable() -> None:
    assert check_environment({"HPCCKPT_PROGRESS": "0"}) == {"HPCCKPT_PROGRESS": "0"}
    with pytest.raises(UsageError, match=r"Invalid HPCCKPT_PROGRESS='off': expected '0' \(off\) or '1'"):
        check_environment({"HPCCKPT_PROGRESS": "off"})


def test_lines_go_through_the_hpcckpt_logger_when_logging_is_configured(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="hpcckpt"), Progress(10, "upload", clock=clock) as bar:
        clock.now += 5
        bar.update(10)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("hpcckpt", "hpcckpt: upload: 100% (10 B of 10 B, 2 B/s)")
    ]


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_stream_that_fails_never_fails_the_work() -> None:
    clock = Clock()
    with Progress(100, "upload", stream=BrokenStream(), clock=clock) as bar:
        clock.now += 5
        for _ in range(100):
            bar.update(1)
    assert bar.done == 100


CHILD = """
import sys
from hpcckpt.progress import Progress
with Progress(64 * 1024 * 1024, "upload step_000000005 to s3://bucket/run", quiet=0) as bar:
    for _ in range(64):
        bar.update(1024 * 1024)
print("finished", flush=True)
"""


def _terminal() -> tuple[int, int]:
    """A pseudo-terminal of 24 rows and 120 columns, as a user's (a new pty has 0 columns)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    return master, slave


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its end and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_terminal_gets_a_tqdm_bar_with_scaled_bytes() -> None:
    master, slave = _terminal()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=slave, env=clean_env(), text=True
        )
        os.close(slave)
        terminal = _read_all(master).decode(errors="replace")
        stdout, _ = child.communicate(timeout=120)
    finally:
        os.close(master)
    assert child.returncode == 0, terminal
    assert stdout == "finished\n"
    assert "upload step_000000005 to s3://bucket/run: 100%|" in terminal
    assert "64.0M/64.0M" in terminal  # bytes scaled by 1024
    assert "hpcckpt: upload" not in terminal  # a bar, not log lines


def test_a_terminal_with_hpcckpt_progress_0_gets_nothing() -> None:
    master, slave = _terminal()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdout=subprocess.PIPE,
            stderr=slave,
            env=clean_env(HPCCKPT_PROGRESS="0"),
            text=True,
        )
        os.close(slave)
        terminal = _read_all(master).decode(errors="replace")
        stdout, _ = child.communicate(timeout=120)
    finally:
        os.close(master)
    assert child.returncode == 0, terminal
    assert stdout == "finished\n"
    assert terminal == ""
