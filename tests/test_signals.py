"""The signal recorder in one process, Run's input checks, and the deadline read inside a real Slurm job."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from hpcckpt import TrainState, UsageError
from hpcckpt.run import Run
from hpcckpt.signals import SignalRecorder


def test_recorder_records_and_restores_the_previous_handlers() -> None:
    def previous(signum: int, frame: object) -> None:
        raise AssertionError("the previous handler must not run while the recorder is active")

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with SignalRecorder((signal.SIGUSR1, signal.SIGTERM)) as recorder:
            assert recorder.installed
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)  # a second one is recorded, nothing more
            time.sleep(0.05)
        assert [r.signal for r in recorder.received] == [signal.SIGUSR1, signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_recorder_is_not_installed_off_the_main_thread() -> None:
    seen: list[bool] = []

    def body() -> None:
        with SignalRecorder((signal.SIGUSR1,)) as recorder:
            seen.append(recorder.installed)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [False]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_forked_worker_neither_records_nor_dies_from_the_signal() -> None:
    with SignalRecorder((signal.SIGTERM,)) as recorder:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: like a DataLoader worker
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os.write(write_end, str(len(recorder.received)).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            recorded_in_child = pipe.read()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the worker survived the SIGTERM"
    assert recorded_in_child == "0"
    assert recorder.received == []


def test_run_needs_a_run_directory_and_a_train_state(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"pass run_dir=\.\.\. or set HPCCKPT_RUN_DIR"):
        Run(state=TrainState(), environ={})
    with pytest.raises(UsageError, match=r"needs state=TrainState\(...\), got dict"):
        Run(tmp_path, {}, environ={})  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"Invalid total_steps=-1"):
        Run(tmp_path, TrainState(), total_steps=-1, environ={})
    with pytest.raises(UsageError, match=r"Invalid interval '5'"):
        Run(tmp_path, TrainState(), save_every="5", environ={})
    with pytest.raises(UsageError, match=r"Invalid HPCCKPT_GRACE='soon': expected seconds"):
        Run(tmp_path, TrainState(), environ={"HPCCKPT_GRACE": "soon"})
    with pytest.raises(UsageError, match=r"Invalid signal 'USR9'"):
        Run(tmp_path, TrainState(), environ={"HPCCKPT_SIGNAL": "USR9"})
    with pytest.raises(UsageError, match=r"Invalid agree_every=0: expected a whole number of steps >= 1"):
        Run(tmp_path, TrainState(), agree_every=0, environ={})
    run = Run(environ={"HPCCKPT_RUN_DIR": str(tmp_path / "from-env")}, state=TrainState())
    assert run.run_dir == tmp_path / "from-env"


DEADLINE_JOB = """#!/bin/bash
exec {python} -c 'import os
from hpcckpt import read_slurm_env
from hpcckpt.budget import find_deadline
d = find_deadline(os.environ, read_slurm_env(os.environ))
print(d.at, d.source, os.environ.get("SLURM_JOB_END_TIME"), sep="|")' > deadline.txt
"""


def test_deadline_inside_a_real_slurm_job_comes_from_squeue(slurm_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = slurm_cluster.sbatch(
        DEADLINE_JOB.format(python=sys.executable), "--time=00:02:00", "--output=/dev/null", cwd=tmp_path
    )
    slurm_cluster.wait_for(
        lambda: (tmp_path / "deadline.txt").exists() and (tmp_path / "deadline.txt").read_text().endswith("\n"),
        timeout=60,
        what="the job to write its deadline",
    )
    at, source, variable = (tmp_path / "deadline.txt").read_text().strip().split("|")
    from hpcckpt.slurm.commands import parse_end_time

    # Once the job has ended Slurm rewrites its EndTime to when it really ended; the start stays.
    start = parse_end_time(slurm_cluster.job_field(job, "StartTime"))
    assert start is not None
    assert float(at) == start + 120, "the time limit's end, as the running job saw it"
    assert source.startswith("squeue/scontrol")
    assert variable == "None", "Slurm 22.05 does not set SLURM_JOB_END_TIME"


def test_nested_recorders_share_what_each_received() -> None:
    with SignalRecorder((signal.SIGUSR2, signal.SIGTERM)) as outer:
        os.kill(os.getpid(), signal.SIGUSR2)  # before the inner one: e.g. while the model is being built
        time.sleep(0.05)
        with SignalRecorder((signal.SIGUSR2,)) as inner:
            assert [r.signal for r in inner.received] == [signal.SIGUSR2]
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert len(outer.received) == 1, "only the innermost handler runs"
        assert signal.getsignal(signal.SIGUSR2) == outer._handle
        assert [r.signal for r in outer.received] == [signal.SIGUSR2, signal.SIGUSR2]
        assert outer.received[0].time <= outer.received[1].time
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
