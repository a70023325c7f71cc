"""``result.pkl`` is unpickled only when this user's own job wrote it (issue 11, item 4)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from hpcckpt import HpcckptError
from hpcckpt.integrations.submitit import RESULT_FILE, _store_result, stored_result
from hpcckpt.store.registry import Registry


class Payload:
    """Unpickled, it creates ``marker``: the code a planted result file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _complete_run(run_dir: Path) -> Registry:
    run_dir.mkdir()
    registry = Registry(run_dir)
    registry.record("complete", step=10, checkpoint="step_000000010")
    return registry


def test_a_result_writable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _complete_run(run_dir)
    marker = tmp_path / "payload-ran"
    result = run_dir / RESULT_FILE
    result.write_bytes(pickle.dumps(Payload(marker)))
    for mode, who in ((0o666, "group and others (mode 666)"), (0o664, "its group (mode 664)")):
        os.chmod(result, mode)
        with pytest.raises(HpcckptError) as refused:
            stored_result(run_dir)
        assert str(refused.value).startswith(f"refusing to unpickle {result}: it is writable by {who}")
        assert str(refused.value).endswith(f"To use it: if no one else has written it, `chmod go-w {result}`")
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_result_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _complete_run(run_dir)
    marker = tmp_path / "payload-ran"
    result = run_dir / RESULT_FILE
    result.write_bytes(pickle.dumps(Payload(marker)))
    os.chmod(result, 0o644)
    os.chown(result, 65534, 65534)
    with pytest.raises(HpcckptError, match=rf"it is owned by uid 65534, not by you \(uid {os.getuid()}\)"):
        stored_result(run_dir)
    assert not marker.exists()


def test_a_result_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _complete_run(run_dir)
    marker = tmp_path / "payload-ran"
    elsewhere = tmp_path / "planted.pkl"
    elsewhere.write_bytes(pickle.dumps(Payload(marker)))
    os.chmod(elsewhere, 0o644)
    (run_dir / RESULT_FILE).symlink_to(elsewhere)
    with pytest.raises(HpcckptError, match=rf"refusing to unpickle {run_dir / RESULT_FILE}: it is a symbolic link"):
        stored_result(run_dir)
    assert not marker.exists()


def test_the_result_a_job_stores_is_read_back_under_a_group_writable_umask(tmp_path: Path) -> None:
    registry = _complete_run(tmp_path / "run")
    previous = os.umask(0o002)  # common on clusters with shared project directories
    try:
        _store_result(registry, {"loss": 0.25})
    finally:
        os.umask(previous)
    assert oct((tmp_path / "run" / RESULT_FILE).stat().st_mode & 0o777) == oct(0o644)
    assert stored_result(tmp_path / "run") == {"loss": 0.25}


@pytest.mark.timeout(30)
def test_a_named_pipe_at_the_result_is_refused_without_hanging(tmp_path: Path) -> None:
    # A FIFO used to block the open() before the regular-file check could refuse it: the reader hung.
    run_dir = tmp_path / "run"
    _complete_run(run_dir)
    os.mkfifo(run_dir / RESULT_FILE, 0o600)
    with pytest.raises(HpcckptError, match=rf"refusing to unpickle {run_dir / RESULT_FILE}: it is not a regular file"):
        stored_result(run_dir)
