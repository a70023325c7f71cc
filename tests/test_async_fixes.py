"""Review fixes of issue 13's async saves (Run and the store): conjugate and negative views saved in the
background hold their values, and a failed background save does not prevent the stop's own save."""

from __future__ import annotations

from pathlib import Path

import torch
from harness import events, run_with_file_size_limit

from hpcckpt import CheckpointStore, TrainState


def test_async_saves_of_conjugate_and_negative_views_hold_their_values(tmp_path: Path) -> None:
    """x.conj() and x._neg_view() are lazy views: their storage holds x, not their value. The blocking
    save resolves them; the async save wrote x's values instead (silently wrong)."""
    x = torch.tensor([1 + 2j, 3 - 1j, -2 + 0.5j])
    state = TrainState(step=3, extra={"c": x.conj(), "n": x._neg_view(), "r": torch.arange(3.0)._neg_view()})
    expected = {"c": torch.tensor([1 - 2j, 3 + 1j, -2 - 0.5j]), "n": -x, "r": torch.tensor([-0.0, -1.0, -2.0])}

    blocking = CheckpointStore(tmp_path / "sync").save(state)
    background = CheckpointStore(tmp_path / "async").save(state, blocking=False).wait()

    for where in ("sync", "async"):
        loaded = CheckpointStore(tmp_path / where).load()["extra"]
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), (where, key, loaded[key])
    assert {r.name: (background.path / r.name).read_bytes() for r in background.files} == {
        r.name: (blocking.path / r.name).read_bytes() for r in blocking.files
    }, "the same bytes as the blocking save"
    assert torch.equal(x, torch.tensor([1 + 2j, 3 - 1j, -2 + 0.5j])), "the state itself is untouched"


STOP_AFTER_FAILURE = """
import json, os, sys
import torch
import toy
from hpcckpt import Run, StoreError, TrainState

toy.deterministic()
model = toy.mlp(dropout=None)
optimizer = toy.optimizer(model)
state = TrainState(model=model, optimizer=optimizer)
x, y = toy.regression_data(64, seed=1)


class StillWriting:
    # The save's handle as seen while its write still runs when the stop comes (a slow disk): done() says
    # so until it is waited for, so that the stop, not a step boundary, collects its failure.

    def __init__(self, handle):
        self.handle = handle

    def done(self):
        return False

    def wait(self, timeout=None):
        return self.handle.wait(timeout)


try:
    with Run(sys.argv[1], state, total_steps=5, save_every="2ba", async_save=True) as run:
        save = run.store.save
        run.store.save = lambda *a, blocking=True, **k: save(*a, blocking=blocking, **k) if blocking else StillWriting(
            save(*a, blocking=False, **k)
        )
        for step in run:
            toy.train_step(model, optimizer, toy.random_batch(x, y))
            if step == 2:  # after step 2's save: the next one (step 4) no longer fits the file-size limit
                state.extra["ballast"] = torch.zeros(1 << 20)
            if step == 4:  # ... and the final save (step 5) fits again
                state.extra.pop("ballast", None)
except StoreError as error:
    print(json.dumps({"error": str(error), "step": state.step, "reason": run.stop_reason}))
"""


def test_a_failed_background_save_does_not_prevent_the_stops_save_and_is_raised_after_it(tmp_path: Path) -> None:
    """The interval save of step 4 fails in the background (a real file-size limit) while the run ends at
    step 5: the final save is committed and the run recorded complete, then the failure is raised."""

    run_dir = tmp_path / "run"
    outcome = run_with_file_size_limit(STOP_AFTER_FAILURE, run_dir)
    assert outcome["error"].startswith("the async save of step 4 failed: could not save step 4 into ")
    assert outcome["error"].endswith("checkpoint step_000000005 (step 5, saved since) is the latest")
    assert (outcome["step"], outcome["reason"]) == (5, "completed")
    store = CheckpointStore(run_dir, create=False)
    assert [c.step for c in store.list()] == [2, 5], "the stop's checkpoint is committed"
    assert store.latest().step == 5  # type: ignore[union-attr]
    assert events(run_dir, "complete")[-1]["step"] == 5 and not events(run_dir, "crash")
