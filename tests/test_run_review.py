"""Review fixes of issue 14 (items 8, 11, 13 and the git nit): a stop's wait for uploads is bounded (the SIGTERM
grace window, the budget, or a finite default) and a crash does not wait; the mirror events name their mirror
(status reads it, even when the mirror's URL has a /checkpoints/ segment); the manifest's command line hides
secret-looking values; recording the git commit never takes the user's index lock."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import clean_env
from test_show_manifest import _git, _save_in_child

from hpcckpt import CheckpointStore, Run, TrainState
from hpcckpt import events as event_log
from hpcckpt.run import upload_wait
from hpcckpt.slurm.status import mirror_url, summarize_mirror
from hpcckpt.store import locations
from hpcckpt.store.mirror import Mirror
from hpcckpt.store.provenance import REDACTED, git_state, redact_argv


# -- item 8: the stop's wait for uploads -------------------------------------------------------------------
class StalledCopy:
    """The mirror's copy blocks (a blackholed endpoint, a hung NFS mount) until the test releases it; at most
    ``SAFETY`` seconds, so that a stop that waits for it fails the test instead of hanging it."""

    SAFETY = 60.0

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.copying = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        original = locations._copy_contents

        def stalled(*args: Any, **kwargs: Any) -> Any:
            self.copying.set()
            self.release.wait(self.SAFETY)
            try:
                return original(*args, **kwargs)
            finally:
                self.finished.set()

        monkeypatch.setattr(locations, "_copy_contents", stalled)


@pytest.fixture
def stalled(monkeypatch: pytest.MonkeyPatch) -> Iterator[StalledCopy]:
    copy = StalledCopy(monkeypatch)
    yield copy
    copy.release.set()


def _run(tmp_path: Path, **kwargs: Any) -> Run:
    env = clean_env(HPCCKPT_GRACE="2")
    state = TrainState(extra={})
    return Run(tmp_path / "run", state, mirror=str(tmp_path / "mirror"), environ=env, save_every="2ba", **kwargs)


def _drain(run: Run) -> None:
    assert run.store.uploads is not None
    run.store.uploads.wait(StalledCopy.SAFETY)


def test_a_sigterm_stop_leaves_a_stalled_upload_within_the_grace_window(
    tmp_path: Path, stalled: StalledCopy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hpcckpt")
    run = _run(tmp_path, total_steps=1000, grace=2)
    with run:
        for step in run:
            if step == 5:
                assert stalled.copying.wait(30), "the first upload never started"
                os.kill(os.getpid(), signal.SIGTERM)  # preemption: SIGKILL follows 2 s later
    # __exit__ returned while the mirror still held the upload: it did not outlive the grace window.
    assert not stalled.finished.is_set()
    assert run.stop_reason == "signal"
    left = [r.getMessage() for r in caplog.records if "not uploaded" in r.getMessage()]
    assert len(left) == 1, caplog.text
    assert "step_000000002" in left[0] and "the 2 s grace window after SIGTERM ran out" in left[0]
    assert f"hpcckpt push {tmp_path / 'run'} " in left[0]
    stalled.release.set()
    _drain(run)


@pytest.mark.parametrize("error", [RuntimeError("loss is NaN"), KeyboardInterrupt()])
def test_a_crash_or_ctrl_c_does_not_wait_for_uploads_and_says_what_it_left(
    tmp_path: Path, stalled: StalledCopy, caplog: pytest.LogCaptureFixture, error: BaseException
) -> None:
    caplog.set_level(logging.WARNING, logger="hpcckpt")
    run = _run(tmp_path, total_steps=1000)
    with pytest.raises(type(error)):
        _crash_at_step_3(run, stalled, error)
    assert not stalled.finished.is_set()  # the exception reached the caller while the upload was stalled
    left = [r.getMessage() for r in caplog.records if "not uploaded" in r.getMessage()]
    assert len(left) == 1, caplog.text
    assert "step_000000002" in left[0] and "leaves after an exception without waiting" in left[0]
    stalled.release.set()
    _drain(run)
    assert [c.step for c in Mirror(tmp_path / "mirror").list()] == [2]  # the thread was left alone, not killed


def _crash_at_step_3(run: Run, stalled: StalledCopy, error: BaseException) -> None:
    with run:
        for step in run:
            if step == 3:
                assert stalled.copying.wait(30), "the first upload never started"
                raise error


def test_the_upload_wait_is_bounded_by_the_grace_window_the_budget_or_a_finite_default() -> None:
    def wait(**kwargs: Any) -> tuple[float, str]:
        given = {"now": 100.0, "budget_left": None, "margin": 0.5, "sigterm_at": None, "grace": 30.0}
        return upload_wait(**{**given, "longest_upload": 0.0, **kwargs})

    # SIGTERM 10 s ago, 30 s of grace: 20 s left, less the margin; the budget's hour does not matter.
    assert wait(sigterm_at=90.0, budget_left=3600.0) == (19.5, "the 30 s grace window after SIGTERM ran out")
    assert wait(sigterm_at=50.0)[0] == 0.0  # the window is over: no wait at all
    assert wait(budget_left=12.0) == (11.5, "no time left in the budget")
    assert wait(budget_left=12.0, sigterm_at=99.0)[0] == 11.5  # the nearer of the two
    seconds, why = wait()  # no deadline, no signal: 60 s, or twice the longest upload
    assert seconds == 60.0 and "no deadline" in why
    assert wait(longest_upload=45.0)[0] == 90.0


# -- item 11: the mirror events name their mirror ------------------------------------------------------------
def test_status_finds_a_mirror_whose_url_has_a_checkpoints_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None, mirror=tmp_path / "lab" / "checkpoints" / "run42")
    assert store.mirror is not None and store.uploads is not None
    url = store.mirror.url
    store.save({"w": [1]}, step=1)
    assert store.uploads.wait(60) == []

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")  # the mirror's storage refuses the copy

    monkeypatch.setattr(locations, "_copy_contents", refused)
    store.save({"w": [2]}, step=2)
    assert store.uploads.wait(60) == ["step_000000002"]

    events = store.registry.events()
    assert [e.get("mirror") for e in events if e["event"] in ("uploaded", "upload_failed")] == [url, url]
    assert mirror_url(events) == url  # not <tmp>/lab: the newest event is the failure, url = the mirror's
    status = summarize_mirror(url, events, store.list(), None, "--offline", 1e12)
    assert status.newest is not None and status.newest["name"] == "step_000000001"
    assert status.failed is not None and status.failed["failures"] == 1
    assert status.pending == ["step_000000002"]


def test_mirror_events_written_before_the_mirror_field_still_read() -> None:
    mirror = "s3://lab/checkpoints/run42"
    old_upload = {"event": "uploaded", "name": "step_1", "step": 1, "url": f"{mirror}/checkpoints/step_1"}
    old_failure = {"event": "upload_failed", "name": "step_2", "step": 2, "url": mirror, "error": "down"}
    old_pull = {"event": "pulled", "name": "step_1.1", "step": 1, "url": f"{mirror}/checkpoints/step_1"}
    assert [event_log.mirror_of(e) for e in (old_upload, old_failure, old_pull)] == [mirror] * 3
    assert mirror_url([old_upload, old_failure]) == mirror
    new = event_log.pulled("step_1", 1, f"{mirror}/checkpoints/step_1", mirror=mirror)
    assert new["mirror"] == mirror and event_log.mirror_of({"event": "commit", "url": mirror}) is None


# -- item 13: secrets on the command line -------------------------------------------------------------------
def test_secret_looking_arguments_are_redacted_in_every_form() -> None:
    argv = ["train.py", "--api-key=sk-1", "--hf_token", "hf_2", "--tokenizer", "gpt2", "--max-tokens", "512"]
    argv += ["WANDB_API_KEY=w3", "+db.password=p4", "--auth", "--verbose", "lr=0.1", "--apiKey", "a5"]
    argv += ["--client-secret", "-s6", "--credentials=c7", "model.passwd=p8", "--epochs", "3"]
    assert redact_argv(argv) == (
        "train.py",
        f"--api-key={REDACTED}",
        "--hf_token",
        REDACTED,
        "--tokenizer",
        "gpt2",
        "--max-tokens",
        "512",
        f"WANDB_API_KEY={REDACTED}",
        f"+db.password={REDACTED}",
        "--auth",  # a flag: the next word is an option, kept
        "--verbose",
        "lr=0.1",
        "--apiKey",
        REDACTED,
        "--client-secret",
        REDACTED,  # a value may start with '-'
        f"--credentials={REDACTED}",
        f"model.passwd={REDACTED}",
        "--epochs",
        "3",
    )


def test_the_manifest_and_its_mirror_copy_never_hold_a_token_given_on_the_command_line(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    manifest = _save_in_child(work, tmp_path / "run", "--lr", "0.1", "--hf-token", "hf_SECRET", "API_KEY=SECRET2")
    assert manifest["command"] == [
        "save.py",
        str(tmp_path / "run"),
        "--lr",
        "0.1",
        "--hf-token",
        REDACTED,
        f"API_KEY={REDACTED}",
    ]
    text = (tmp_path / "run" / "checkpoints" / "step_000000007" / "manifest.json").read_text()
    assert "SECRET" not in text


# -- nit: git never takes the user's index lock --------------------------------------------------------------
@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_recording_the_git_commit_leaves_the_users_index_untouched(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("print(1)\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "first")
    # Same content, another mtime: a plain `git status` refreshes the index, taking index.lock to rewrite it.
    stamp = (repo / "train.py").stat().st_mtime - 100
    os.utime(repo / "train.py", (stamp, stamp))
    index = (repo / ".git" / "index").read_bytes()
    state = git_state(str(repo))
    assert state is not None and state["dirty"] is False
    assert (repo / ".git" / "index").read_bytes() == index
    subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, check=True)
    assert (repo / ".git" / "index").read_bytes() != index  # what the test would see without the option
