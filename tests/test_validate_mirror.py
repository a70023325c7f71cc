"""Validation with a mirror (issue 14): when every local checkpoint fails validation, the mirror's newest one
that is not known bad here is pulled and validated in turn; a pulled one that fails is never pulled again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hpcckpt import CheckpointStore, HpcckptWarning, TrainState, ValidationFailedError


def _finite(state: TrainState) -> bool:
    assert state.model is not None
    with torch.no_grad():
        return bool(torch.isfinite(state.model(torch.ones(2, 4))).all())


def test_checkpoints_failing_validation_fall_back_to_the_mirror_and_are_never_pulled_again(tmp_path: Path) -> None:
    run_dir, mirror = tmp_path / "run", tmp_path / "mirror"
    model = torch.nn.Linear(4, 1)
    store = CheckpointStore(run_dir, keep_last=None, mirror=str(mirror), mirror_keep_last=None)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step) if step < 3 else float("nan"))
        store.save(TrainState(model=model, step=step))
    assert store.uploads is not None and store.uploads.wait(120) == []
    shutil.rmtree(run_dir)  # purged: only the mirror has them

    restored = TrainState(model=torch.nn.Linear(4, 1))
    with pytest.warns(HpcckptWarning) as seen:
        chosen = CheckpointStore(run_dir, keep_last=None, mirror=str(mirror)).restore(restored, validate=_finite)
    assert chosen is not None and chosen.step == 2
    assert restored.model is not None and float(restored.model.weight.detach()[0, 0]) == 2.0
    assert any("step_000000003 (step 3) failed validation" in str(w.message) for w in seen)
    here = CheckpointStore(run_dir, keep_last=None)
    assert [c.step for c in here.list()] == [2]
    assert [c.step for c in here.list(include_bad=True)] == [3, 2]

    # Every remaining one fails: an error, and the bad ones are not pulled again.
    with pytest.warns(HpcckptWarning), pytest.raises(ValidationFailedError, match="failed validation"):
        CheckpointStore(run_dir, keep_last=None, mirror=str(mirror)).restore(
            TrainState(model=torch.nn.Linear(4, 1)), validate=lambda _state: False
        )
    steps = sorted(c.step for c in CheckpointStore(run_dir, keep_last=None).list(include_bad=True))
    assert steps == [1, 2, 3]  # step 1 pulled once, steps 2 and 3 not again


def test_the_mirror_keeps_the_manifest_s_hparams_command_and_git_and_a_pull_brings_them_back(tmp_path: Path) -> None:
    run_dir, mirror = tmp_path / "run", tmp_path / "mirror"
    store = CheckpointStore(run_dir, mirror=str(mirror), hparams={"lr": 0.001, "width": 64})
    saved = store.save({"w": torch.ones(3)}, step=5)
    assert store.uploads is not None and store.uploads.wait(120) == []
    local = json.loads((saved.path / "manifest.json").read_text())
    remote = json.loads((mirror / "checkpoints" / saved.name / "manifest.json").read_text())
    assert remote["hparams"] == {"lr": 0.001, "width": 64}
    assert (remote["command"], remote["git"]) == (local["command"], local["git"])
    shutil.rmtree(run_dir)
    chosen = CheckpointStore(run_dir, mirror=str(mirror)).restore(TrainState())  # pulls it
    assert chosen is not None and chosen.step == 5
    again = json.loads((run_dir / "checkpoints" / saved.name / "manifest.json").read_text())
    assert again["hparams"] == {"lr": 0.001, "width": 64} and again["command"] == local["command"]
