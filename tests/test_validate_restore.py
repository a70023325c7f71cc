"""Validation after a restore (issue 14): a checkpoint that fails the user's check is marked bad, kept on disk,
never chosen again by any process, and the previous valid one is restored over the whole state."""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from compare import assert_bitwise_equal

from hpcckpt import CheckpointStore, HpcckptWarning, TrainState, ValidationFailedError
from hpcckpt.errors import CheckpointNotFoundError, UsageError
from hpcckpt.store.registry import Registry
from hpcckpt.store.retention import KeepBest


def _state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler)


def _train_and_save(store: CheckpointStore, state: TrainState, steps: range) -> dict[int, dict[str, Any]]:
    """Train a step and save, for each step; what each checkpoint holds, to compare with (every state part)."""
    saved = {}
    batch = torch.randn(16, 4)
    for step in steps:
        assert state.optimizer is not None and state.model is not None and state.scheduler is not None
        state.optimizer.zero_grad()
        state.model(batch).pow(2).mean().backward()
        state.optimizer.step()
        state.scheduler.step()
        state.step, state.epoch = step, step // 3
        state.extra["note"] = f"after {step}"
        state.loader_position = {"epoch": state.epoch, "batch": step % 3, "rng": torch.get_rng_state()}
        random.seed(step)
        torch.manual_seed(1000 + step)
        saved[step] = copy.deepcopy(state.state_dict())
        store.save(state)
    return saved


def _poison(state: TrainState) -> None:
    assert state.model is not None
    with torch.no_grad():
        for parameter in state.model.parameters():
            parameter.fill_(float("nan"))


def _finite(state: TrainState) -> bool:
    assert state.model is not None
    with torch.no_grad():
        return bool(torch.isfinite(state.model(torch.ones(2, 4))).all())


def _restored_parts(state: TrainState) -> dict[str, Any]:
    return {**state.state_dict(), "python_rng": random.getstate()}


def test_a_rejected_newest_checkpoint_gives_the_previous_one_bitwise_and_is_never_chosen_again(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    state = _state()
    saved = _train_and_save(store, state, range(1, 4))
    _poison(state)
    state.step, state.extra["only_in_bad"] = 4, True
    bad = store.save(state)  # step 4: NaN weights

    # Restore 3 into a fresh state as the reference (every part: model, optimizer, scheduler, RNG, position).
    reference = _state(seed=1)
    CheckpointStore(tmp_path, keep_last=None).restore(reference, 3)
    expected = _restored_parts(reference)

    fresh = _state(seed=2)
    with pytest.warns(HpcckptWarning) as seen:
        chosen = CheckpointStore(tmp_path, keep_last=None).restore(fresh, validate=_finite)
    assert [str(w.message) for w in seen] == [
        "checkpoint step_000000004 (step 4) failed validation (validate returned False); marked bad, restoring the "
        "previous one",
        "restored checkpoint step_000000003 (step 3) after newer ones failed validation",
    ]
    assert chosen is not None and chosen.step == 3
    assert_bitwise_equal(expected, _restored_parts(fresh))
    assert "only_in_bad" not in fresh.extra  # nothing of the bad restore survives
    assert_bitwise_equal(saved[3]["model"], fresh.state_dict()["model"])

    # Kept on disk, listed as bad, never chosen again by another store (another process reads the same files).
    assert (bad.path / "manifest.json").is_file()
    other = CheckpointStore(tmp_path, keep_last=None)
    assert [c.step for c in other.list()] == [1, 2, 3]
    assert [c.step for c in other.list(include_bad=True)] == [1, 2, 3, 4]
    assert other.registry.bad_reason(other.list(include_bad=True)[-1]) == "validate returned False"
    latest = other.latest()
    assert latest is not None and latest.step == 3
    with pytest.raises(CheckpointNotFoundError, match=r"step 4 .* is marked bad .*validate returned False"):
        other.get(4)
    again = _state(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HpcckptWarning)  # no second failure: step 4 is not even tried
        chosen_again = other.restore(again, validate=_finite)
    assert chosen_again is not None and chosen_again.step == 3
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    marks = [e for e in events if e["event"] == "bad"]
    assert [(m["name"], m["step"], m["reason"]) for m in marks] == [(bad.name, 4, "validate returned False")]


def test_a_validate_function_that_raises_fails_the_checkpoint_with_its_message(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    state = _state()
    _train_and_save(store, state, range(1, 3))

    def explode(restored: TrainState) -> None:
        if restored.step == 2:
            raise RuntimeError("loss is inf on the fixed batch")

    with pytest.warns(HpcckptWarning) as seen:
        chosen = store.restore(_state(seed=5), validate=explode)
    assert "(validate raised RuntimeError: loss is inf on the fixed batch)" in str(seen[0].message)
    assert chosen is not None and chosen.step == 1
    marked = store.list(include_bad=True)[-1]
    assert store.registry.bad_reason(marked) == "validate raised RuntimeError: loss is inf on the fixed batch"


def test_every_checkpoint_failing_raises_a_clear_error_never_a_fresh_start(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    _train_and_save(store, _state(), range(1, 4))
    with (
        pytest.warns(HpcckptWarning),
        pytest.raises(ValidationFailedError, match=r"every checkpoint .* failed validation") as raised,
    ):
        store.restore(_state(seed=7), validate=lambda _state: False)
    message = str(raised.value)
    assert "step_000000003 (step 3)" in message and "step_000000001 (step 1)" in message
    assert "does not start from scratch" in message
    # A new process still refuses to start from scratch: nothing valid is left, but checkpoints existed.
    again = CheckpointStore(tmp_path, keep_last=None)
    assert again.list() == [] and len(again.list(include_bad=True)) == 3


def test_a_named_checkpoint_that_fails_validation_raises_without_fallback(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    _train_and_save(store, _state(), range(1, 3))
    with pytest.raises(
        ValidationFailedError, match=r"step_000000002 \(step 2\) .* failed validation: validate returned False"
    ):
        store.restore(_state(seed=8), 2, validate=lambda _state: False)
    assert [c.step for c in store.list()] == [1]


def test_validation_leaves_the_rng_and_module_modes_as_restored(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    _train_and_save(store, _state(), range(1, 2))
    plain = _state(seed=9)
    store.restore(plain)
    expected_draw = torch.rand(4)

    def noisy(restored: TrainState) -> bool:
        assert restored.model is not None
        restored.model.eval()
        torch.rand(100)  # a dropout-like use of the generator
        return True

    checked = _state(seed=9)
    checked_model = checked.model
    assert checked_model is not None and checked_model.training
    store.restore(checked, validate=noisy)
    assert torch.equal(torch.rand(4), expected_draw)
    assert all(module.training for module in checked_model.modules())


def test_a_bad_mark_survives_compaction_and_a_concurrent_reader_sees_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    _train_and_save(store, _state(), range(1, 4))
    reader = Registry(tmp_path)  # another reader, with its view already parsed
    assert [c.step for c in reader.checkpoints()] == [1, 2, 3]
    store.registry.mark_bad(store.list()[-1], "loss NaN on the probe batch")
    assert [c.step for c in reader.checkpoints()] == [1, 2]
    journal = (tmp_path / "registry.journal").read_text()
    assert '"op":"bad","name":"step_000000003"' in journal
    # Enough commits to compact the journal into the snapshot several times.
    _train_and_save(store, _state(seed=4), range(10, 30))
    assert '"op":"bad"' not in (tmp_path / "registry.journal").read_text()
    snapshot = json.loads((tmp_path / "registry.json").read_text())
    assert [m["name"] for m in snapshot["bad"]] == ["step_000000003"]
    assert 3 not in [c.step for c in reader.checkpoints()]
    fresh = Registry(tmp_path)
    assert 3 not in [c.step for c in fresh.checkpoints()]
    assert [c.step for c in fresh.checkpoints(include_bad=True)][:3] == [1, 2, 3]
    # A lost index is rebuilt from the manifests, and the marks from the event log.
    (tmp_path / "registry.json").unlink()
    (tmp_path / "registry.journal").unlink()
    with pytest.warns(HpcckptWarning, match="rebuilding it from the manifests"):
        rebuilt = Registry(tmp_path).checkpoints()
    assert 3 not in [c.step for c in rebuilt]


def test_a_checkpoint_saved_again_under_a_bad_ones_name_is_not_bad(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=None)
    state = _state()
    _train_and_save(store, state, range(1, 3))
    store.registry.mark_bad(store.list()[-1], "diverged")
    state.step = 2
    again = store.save(state)  # the same step, saved again after falling back: its own directory
    assert again.name != "step_000000002" and store.latest() == again
    assert (tmp_path / "checkpoints" / "step_000000002").is_dir()


def test_retention_neither_counts_nor_deletes_a_bad_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=KeepBest("loss", "min", 1))
    state = _state()
    store.save(state, step=1, metrics={"loss": 0.1})  # the best
    store.save(state, step=2, metrics={"loss": 0.5})
    store.registry.mark_bad(store.list()[0], "NaN")  # the best one turns out bad
    for step in range(3, 8):
        store.save(state, step=step, metrics={"loss": 1.0 + step})
    good = [c.step for c in store.list()]
    # keep_last=2 counts good ones only, and the best among them (step 2) is kept; the bad one stays.
    assert good == [2, 6, 7]
    assert [c.step for c in store.list(include_bad=True)] == [1, 2, 6, 7]
    best = store.best("loss")
    assert best is not None and best.step == 2


def test_validate_must_be_callable(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"Invalid validate=3: expected a function"):
        CheckpointStore(tmp_path).restore(_state(), validate=3)  # type: ignore[arg-type]


def test_a_run_with_validate_falls_back_from_a_nan_checkpoint_in_a_child_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Steps 1-3 trained, step 4's state holds NaN weights (a diverged step saved before anyone noticed).
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    store = CheckpointStore(run_dir, keep_last=None)
    for step in range(1, 5):
        if step == 4:
            _poison(state)
        store.save(state, step=step)
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys, warnings
            import torch
            from hpcckpt import Run, TrainState

            torch.manual_seed(0)
            model = torch.nn.Linear(4, 1)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            state = TrainState(model=model, optimizer=optimizer)
            batch = torch.ones(8, 4)

            def finite(restored):
                with torch.no_grad():
                    return bool(torch.isfinite(restored.model(batch)).all())

            warnings.simplefilter("always")
            with warnings.catch_warnings(record=True) as seen:
                with Run(sys.argv[1], state, total_steps=6, save_every="1ba", keep_last=None, validate=finite) as run:
                    resumed = run.resumed_from.step if run.resumed_from else None
                    for step in run:
                        optimizer.zero_grad()
                        model(batch).pow(2).mean().backward()
                        optimizer.step()
            print(json.dumps({"resumed": resumed, "warnings": [str(w.message) for w in seen]}))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), str(run_dir)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["resumed"] == 3
    assert any("step_000000004 (step 4) failed validation (validate returned False)" in w for w in result["warnings"])
    after = CheckpointStore(run_dir, keep_last=None)
    assert [c.step for c in after.list()] == [1, 2, 3, 4, 5, 6]  # step 4 trained again, saved beside the bad one
    bad = [c for c in after.list(include_bad=True) if after.registry.bad_reason(c) is not None]
    assert [(c.name, c.step) for c in bad] == [("step_000000004", 4)]
    assert (run_dir / "checkpoints" / "step_000000004").is_dir()
    final = after.load()
    assert bool(torch.isfinite(final["model"]["weight"]).all())
