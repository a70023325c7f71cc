"""A checkpoint documents itself (issue 14): hparams, the command line and the git state in its manifest,
``hpcckpt show``, and the warning for a checkpoint saved with another major torch version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from hpcckpt import CheckpointStore, HpcckptWarning, Run, TrainState
from hpcckpt.errors import UsageError
from hpcckpt.store.manifest import combined_checksum, read_manifest

GIT = shutil.which("git")


def hpcckpt(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["hpcckpt", *argv], capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@x"
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip()


def _save_in_child(cwd: Path, run_dir: Path, *argv: str) -> dict[str, Any]:
    """Save one checkpoint from a script run in ``cwd`` with ``argv``; its manifest."""
    script = cwd / "save.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import torch
            from hpcckpt import CheckpointStore
            store = CheckpointStore(sys.argv[1], hparams={"lr": 0.001, "layers": [4, 8], "optimizer": "adamw"})
            store.save({"model": {"w": torch.zeros(3)}}, step=7, metrics={"loss": 0.25})
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "save.py", str(run_dir), *argv], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads((run_dir / "checkpoints" / "step_000000007" / "manifest.json").read_text()))


@pytest.mark.skipif(GIT is None, reason="needs the git command")
def test_the_manifest_records_hparams_the_command_line_and_the_git_commit(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.cfg").write_text("lr=0.001\n")
    _git(repo, "add", "train.cfg")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")

    clean = _save_in_child(repo, tmp_path / "clean", "--lr", "0.001")
    assert clean["hparams"] == {"lr": 0.001, "layers": [4, 8], "optimizer": "adamw"}
    assert clean["command"] == ["save.py", str(tmp_path / "clean"), "--lr", "0.001"]
    # The run directory is not in the repository here; an untracked file does not make it dirty anyway.
    (repo / "notes.txt").write_text("untracked")
    assert _save_in_child(repo, tmp_path / "untracked")["git"] == {"commit": head, "dirty": False}
    assert clean["git"] == {"commit": head, "dirty": False}

    (repo / "train.cfg").write_text("lr=0.1\n")  # a tracked file modified
    dirty = _save_in_child(repo, tmp_path / "dirty")
    assert dirty["git"] == {"commit": head, "dirty": True}

    # Read back into the Checkpoint record.
    checkpoint = read_manifest(tmp_path / "dirty" / "checkpoints" / "step_000000007")
    assert checkpoint.hparams["layers"] == [4, 8]
    assert checkpoint.git == {"commit": head, "dirty": True}
    assert checkpoint.command is not None and checkpoint.command[0] == "save.py"


def test_outside_a_repository_the_git_state_is_absent(tmp_path: Path) -> None:
    outside = tmp_path / "plain"
    outside.mkdir()
    manifest = _save_in_child(outside, tmp_path / "run")
    assert manifest["git"] is None
    assert manifest["versions"]["torch"] == torch.__version__


def test_an_old_manifest_without_the_new_fields_still_loads(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    saved = store.save({"w": torch.arange(3.0)}, step=1)
    path = saved.path / "manifest.json"
    data = json.loads(path.read_text())
    for key in ("hparams", "command", "git"):
        del data[key]
    path.write_text(json.dumps(data))
    checkpoint = read_manifest(saved.path)
    assert checkpoint.hparams == {} and checkpoint.command is None and checkpoint.git is None
    assert torch.equal(CheckpointStore(tmp_path, keep_last=None).load()["w"], torch.arange(3.0))


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"lr": 0.1, "model": torch.nn.Linear(1, 1)}, r"Invalid hparams\['model'\] = Linear.*not JSON-able"),
        ({"lr": 0.1, "sched": {"gamma": object()}}, r"Invalid hparams\['sched'\]"),
        ({3: 0.1}, r"Invalid hparams key 3: expected a non-empty string"),
        ([("lr", 0.1)], r"Invalid hparams=.*expected a dict"),
    ],
)
def test_hparams_that_are_not_json_are_refused_naming_the_key(tmp_path: Path, hparams: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        CheckpointStore(tmp_path, hparams=hparams)
    with pytest.raises(UsageError, match=message):
        Run(tmp_path, TrainState(), hparams=hparams)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    store = CheckpointStore(tmp_path / "run", keep_last=None, hparams={"lr": 0.001, "width": 512})
    for step in (100, 200, 300):
        store.save(
            {"model": {"w": torch.full((8,), float(step))}}, step=step, epoch=step // 100, metrics={"loss": 1 / step}
        )
    return tmp_path / "run"


def test_show_prints_the_latest_checkpoint_readably(run_dir: Path) -> None:
    shown = hpcckpt("show", str(run_dir))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    manifest = json.loads((run_dir / "checkpoints" / "step_000000300" / "manifest.json").read_text())
    assert text.splitlines()[0] == f"checkpoint step_000000300 in {run_dir.absolute()}"
    assert "  step:      300   epoch: 3   commit: 3" in text
    assert "    lr: 0.001" in text and "    width: 512" in text
    assert "  metrics:   loss=0.00333333" in text
    assert f"torch {torch.__version__}" in text
    assert f"  checksum:  {manifest['checksum']}" in text
    (record,) = manifest["files"]
    assert f"    {record['name']}" in text and record["digest"] in text
    assert "  slurm:     (not saved in a Slurm job)" in text
    assert "BAD" not in text


def test_show_a_step_as_json_and_a_bad_one_with_its_reason(run_dir: Path) -> None:
    raw = hpcckpt("show", f"{run_dir}:200", "--json")
    assert raw.returncode == 0, raw.stderr
    on_disk = json.loads((run_dir / "checkpoints" / "step_000000200" / "manifest.json").read_text())
    assert json.loads(raw.stdout) == on_disk
    store = CheckpointStore(run_dir, keep_last=None)
    store.registry.mark_bad(store.get(200), "loss NaN on the probe batch")
    shown = hpcckpt("show", f"{run_dir}:200")
    assert "  BAD:       failed validation, never restored again: loss NaN on the probe batch" in shown.stdout
    listed = hpcckpt("ls", str(run_dir))
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith("step_000000200")]
    assert "BAD (loss NaN on the probe batch)" in row
    as_json = json.loads(hpcckpt("ls", str(run_dir), "--json").stdout)
    assert [c["bad"] for c in as_json] == [None, "loss NaN on the probe batch", None]
    status = hpcckpt("status", str(run_dir))
    assert "checkpoint step_000000200 (step 200) is BAD: loss NaN on the probe batch" in status.stdout


def test_show_an_unknown_step_names_the_available_ones(run_dir: Path) -> None:
    shown = hpcckpt("show", f"{run_dir}:250")
    assert shown.returncode == 1
    assert f"no checkpoint at step 250 in {run_dir.absolute()}; steps available: 100, 200, 300" in shown.stderr
    odd = hpcckpt("show", f"{run_dir}:latest")
    assert odd.returncode == 2
    assert "expected RUN_DIR or RUN_DIR:STEP" in odd.stderr


def _claim_torch(checkpoint_dir: Path, version: str) -> None:
    """Rewrite a checkpoint's manifest as if saved with torch ``version``; the registry's caches of it are
    removed, so readers rebuild them from the manifest (with a warning saying so)."""
    path = checkpoint_dir / "manifest.json"
    data = json.loads(path.read_text())
    data["versions"]["torch"] = version
    assert data["checksum"] == combined_checksum(read_manifest(checkpoint_dir).files)
    path.write_text(json.dumps(data))
    run_dir = checkpoint_dir.parent.parent
    (run_dir / "registry.json").unlink()
    (run_dir / "registry.journal").unlink()


def test_loading_a_checkpoint_of_another_torch_major_warns_once_with_both_versions(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    model = torch.nn.Linear(2, 1)
    saved = store.save(TrainState(model=model, step=1))
    _claim_torch(saved.path, "1.13.1")
    fresh = CheckpointStore(tmp_path, keep_last=None)  # reads the manifest anew
    with pytest.warns(HpcckptWarning) as seen:
        fresh.load()
    messages = [str(w.message) for w in seen if "torch" in str(w.message)]
    assert messages == [
        f"checkpoint {saved.name} was saved with torch 1.13.1, this process runs torch {torch.__version__} "
        "(another major version): check that the restored state is what you expect"
    ]
    with pytest.warns(HpcckptWarning) as restoring:
        CheckpointStore(tmp_path, keep_last=None).restore(TrainState(model=model), 1)
    assert len([w for w in restoring if "torch 1.13.1" in str(w.message)]) == 1


def test_loading_a_checkpoint_of_the_same_torch_major_is_quiet(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    saved = store.save({"w": torch.ones(2)}, step=1)
    _claim_torch(saved.path, f"{torch.__version__.split('.')[0]}.0.0")
    with pytest.warns(HpcckptWarning) as seen:
        CheckpointStore(tmp_path, keep_last=None).load()
    assert [str(w.message) for w in seen if "torch" in str(w.message)] == []
