"""``Run(async_save=True)``: interval saves in the background, stops that wait for them, failures raised
at the next step boundary, a budget that counts the save in flight, and exact resume."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import toy
from compare import assert_same_training
from harness import TrainWorker, events, run_with_file_size_limit

from hpcckpt import CheckpointStore, Run, TrainState
from hpcckpt.budget import Budget, Deadline

STEPS_PER_EPOCH = 12  # train_worker.py: 96 samples, batches of 8


def toy_state() -> TrainState:
    toy.deterministic()
    model = toy.mlp(dropout=None)
    return TrainState(model=model, optimizer=toy.optimizer(model))


def train(run: Run, state: TrainState, x: torch.Tensor, y: torch.Tensor) -> None:
    model, optimizer = state.model, state.optimizer
    assert isinstance(model, torch.nn.Module) and isinstance(optimizer, torch.optim.Optimizer)
    for _ in run:
        toy.train_step(model, optimizer, toy.random_batch(x, y))


def save_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hpcckpt-save")]


def test_every_due_save_is_committed_in_order_and_the_last_step_is_saved(tmp_path: Path) -> None:
    """save_every=1ba: each save comes due while the previous may be in flight; it waits, never skips."""
    x, y = toy.regression_data(64, seed=1)
    state = toy_state()
    with Run(tmp_path / "run", state, total_steps=8, save_every="1ba", keep_last=None, async_save=True) as run:
        train(run, state, x, y)
    assert run.completed and run.last_checkpoint is not None and run.last_checkpoint.step == 8
    store = CheckpointStore(tmp_path / "run", create=False)
    assert [c.step for c in store.list()] == list(range(1, 9))
    assert [c.seq for c in store.list()] == list(range(1, 9))
    assert save_threads() == [], "no writer left running"
    final = store.load()
    assert torch.equal(final["model"]["0.weight"], state.model.state_dict()["0.weight"])  # type: ignore[union-attr]


def test_async_checkpoints_hold_the_state_of_their_step(tmp_path: Path) -> None:
    """Each interval checkpoint equals a blocking run's checkpoint of the same step, byte for byte:
    training's next steps, which ran while it was written, are not in it."""
    x, y = toy.regression_data(64, seed=1)
    files = {}
    for mode in (False, True):
        state = toy_state()
        run_dir = tmp_path / f"async-{mode}"
        with Run(run_dir, state, total_steps=6, save_every="2ba", keep_last=None, async_save=mode) as run:
            train(run, state, x, y)
        store = CheckpointStore(run_dir, create=False)
        files[mode] = {c.step: (c.path / c.files[0].name).read_bytes() for c in store.list()}
    assert sorted(files[True]) == [2, 4, 6]
    for step in (2, 4, 6):
        # Identical but for the manifest's record of the run: the state files match.
        assert files[True][step] == files[False][step], f"step {step}"


def test_a_crash_waits_for_the_save_in_flight_and_leaves_no_writer(tmp_path: Path) -> None:
    x, y = toy.regression_data(64, seed=1)
    state = toy_state()

    def diverge_after_3_steps() -> None:
        with Run(tmp_path / "run", state, total_steps=100, save_every="3ba", async_save=True) as run:
            for step in run:
                toy.train_step(state.model, state.optimizer, toy.random_batch(x, y))  # type: ignore[arg-type]
                if step == 3:  # step 3's save (after 3 steps) was taken at the last boundary
                    raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        diverge_after_3_steps()
    store = CheckpointStore(tmp_path / "run", create=False)
    assert [c.step for c in store.list()] == [3], "the save in flight was waited for, then the crash went on"
    assert save_threads() == []
    assert [e["event"] for e in events(tmp_path / "run")][-1] == "crash"


def test_the_budget_counts_the_save_in_flight() -> None:
    now = [1000.0]
    budget = Budget(1010.0, clock=lambda: now[0], margin_floor=0.5)
    budget.observe_step(1.0)
    budget.observe_save(4.0)  # margin: half the save, 2 s
    assert budget.room_for_step(), "1 + 4 + 2 = 7 s of the 10 left"
    budget.save_started()
    assert budget.in_flight_left() == 4.0
    assert not budget.room_for_step(), "plus the 4 s the save in flight still needs: 11 s"
    assert not budget.save_fits_in(8.0) and budget.save_fits_in(8.5)
    now[0] += 3.0
    assert budget.in_flight_left() == 1.0
    assert not budget.room_for_step(), "1 + 1 + 4 + 2 = 8 s of the 7 left"
    budget.save_settled()
    assert budget.in_flight_left() == 0.0
    assert budget.room_for_step(), "without it: 1 + 4 + 2 = 7 s of the 7 left"
    assert budget.save_fits_in(4.5)


FAILING_RUN = """
import json, sys
import torch
import toy
from hpcckpt import Run, StoreError, TrainState

toy.deterministic()
model = toy.mlp(dropout=None)
optimizer = toy.optimizer(model)
state = TrainState(model=model, optimizer=optimizer)
x, y = toy.regression_data(64, seed=1)
try:
    with Run(sys.argv[1], state, total_steps=50, save_every="2ba", async_save=True) as run:
        for step in run:
            toy.train_step(model, optimizer, toy.random_batch(x, y))
            if step == 2:  # after step 2's save: the next one (step 4) no longer fits the file-size limit
                state.extra["ballast"] = torch.zeros(1 << 20)
except StoreError as error:
    print(json.dumps({"error": str(error), "step": state.step}))
"""


def test_a_background_failure_is_raised_at_the_next_step_boundary_naming_what_stays(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    outcome = run_with_file_size_limit(FAILING_RUN, run_dir)
    assert outcome["error"].startswith("the async save of step 4 failed: could not save step 4 into ")
    assert "File too large (disk full, quota or file-size limit)" in outcome["error"]
    assert outcome["error"].endswith("checkpoint step_000000002 (step 2) stays the latest")
    assert 4 <= outcome["step"] < 50, "raised at a step boundary after the save began, long before the end"
    store = CheckpointStore(run_dir, create=False)
    assert [c.step for c in store.list()] == [2]
    assert events(run_dir, "crash")[-1]["step"] == outcome["step"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_training_with_async_saves_ends_bitwise_identical_to_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    """The acceptance test of Run (tests/test_run.py), with async interval saves every 5 steps: budget
    stops, USR1 and TERM at random moments, mid-epoch included; the reference saves synchronously."""
    # 96 steps of at least 0.03 s: however fast the machine, the first budget stop (1.6 s at most) and the
    # two signals (0.3 s after the start at most) leave steps to train, so all three interruptions happen.
    args = ("--epochs", "8", "--workers", "1", "--step-sleep", "0.03")
    reference = Job(tmp_path / "reference", *args).end()
    assert reference["completed"] and reference["step"] == 8 * STEPS_PER_EPOCH

    run_dir = tmp_path / "interrupted"
    # Every 5 steps: not at the last step (96), whose interval save would record epoch 7 where the
    # completion's own save records 8 (so it is with blocking saves too).
    interrupted = (*args, "--save-every", "5ba", "--async-save")
    rng = random.Random(13)
    plan = ["budget", "usr1", "term", "budget", "usr1", "term"]
    interruptions: list[str] = []
    for attempt in range(40):
        mode = plan[attempt % len(plan)] if len(interruptions) < len(plan) else "none"
        if mode == "budget":
            job = Job(run_dir, *interrupted, deadline_in=rng.uniform(1.0, 1.6))
            job.wait_started()
        else:
            job = Job(run_dir, *interrupted)
            job.wait_started()
            if mode != "none":
                time.sleep(rng.uniform(0.05, 0.3))  # a random moment, not a synchronisation
                job.send(signal.SIGUSR1 if mode == "usr1" else signal.SIGTERM)
        end = job.end()
        if end["completed"]:
            break
        assert end["reason"] == ("budget" if mode == "budget" else "signal"), (mode, end, job.stderr)
        assert end["saved"] == end["step"], "a budget or signal stop saves the step it stopped at"
        interruptions.append(mode)
    else:
        pytest.fail(f"the run never completed; interruptions: {interruptions}")

    assert len(interruptions) >= 3 and {"budget", "usr1", "term"} <= set(interruptions), interruptions
    assert all(e["steps_lost"] == 0 for e in events(run_dir, "stop")), "a stop lost steps"
    assert len(events(run_dir, "commit")) > len(interruptions) + 1, "interval saves happened too"
    assert_same_training(
        CheckpointStore(tmp_path / "reference", create=False).load(), CheckpointStore(run_dir, create=False).load()
    )


class Job(TrainWorker):
    def end(self, timeout: float = 120) -> dict[str, object]:
        ends = self.finish(timeout)
        if self.process.returncode in (-signal.SIGUSR1, -signal.SIGTERM) and ends:
            assert ends[-1]["completed"] or ends[-1]["saved"] == ends[-1]["step"], ends[-1]
            return dict(ends[-1])
        assert self.process.returncode == 0, self.stderr
        assert ends, self.stderr
        return dict(ends[-1])


HOLD_LOCK = """
import os, sys
from pathlib import Path
from hpcckpt.store.registry import Registry, lock_mode
with Registry(Path(sys.argv[1]), lock=lock_mode(os.environ)).locked():
    print("locked", flush=True)
    sys.stdin.readline()
"""


class _ReleaseOnAbandon(logging.Handler):
    """Lets the lock holder go once Run says it abandoned the save (which then commits meanwhile)."""

    def __init__(self, holder: subprocess.Popen[str]) -> None:
        super().__init__()
        self.holder = holder
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if "abandoned" in self.messages[-1] and self.holder.stdin is not None and not self.holder.stdin.closed:
            self.holder.stdin.write("go\n")
            self.holder.stdin.close()

    def close_holder(self) -> None:
        assert self.holder.stdin is not None and self.holder.stdout is not None
        if not self.holder.stdin.closed:
            self.holder.stdin.close()
        self.holder.wait(timeout=60)
        self.holder.stdout.close()


def test_a_crash_past_the_deadline_abandons_the_save_in_flight(tmp_path: Path) -> None:
    """The save in flight cannot commit (another process holds the registry lock) and the deadline has
    passed when training crashes: Run does not wait for it; it says so, and the crash goes on."""
    run_dir = tmp_path / "run"
    x, y = toy.regression_data(64, seed=1)
    state = toy_state()
    offset = [0.0]
    deadline = Deadline(time.time() + 3600, "test")
    clock = lambda: time.time() + offset[0]  # noqa: E731
    run = Run(run_dir, state, total_steps=100, save_every="1ba", async_save=True, deadline=deadline, clock=clock)
    held: list[_ReleaseOnAbandon] = []

    def take_lock() -> None:  # once Run has recorded its start, which needs the lock too
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        held.append(_ReleaseOnAbandon(holder))
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        logging.getLogger("hpcckpt").addHandler(held[0])

    try:
        with pytest.raises(RuntimeError, match="diverged"):
            _crash_with_step_1_in_flight(run, take_lock, x, y, offset)
    finally:
        for handler in held:
            logging.getLogger("hpcckpt").removeHandler(handler)
            handler.close_holder()
    assert any("async save of step 1 is still running at the deadline; abandoned" in m for m in held[0].messages)
    assert run.last_checkpoint is None, "an abandoned save is not taken for saved"
    for thread in save_threads():
        thread.join(timeout=120)  # the process lives on here, so the abandoned save commits: it was whole
    assert [c.step for c in CheckpointStore(run_dir, create=False).list()] in ([], [1])


def _crash_with_step_1_in_flight(
    run: Run, take_lock: Callable[[], None], x: torch.Tensor, y: torch.Tensor, offset: list[float]
) -> None:
    with run:
        take_lock()
        for step in run:
            toy.train_step(run.state.model, run.state.optimizer, toy.random_batch(x, y))  # type: ignore[arg-type]
            if step == 1:  # step 1's save was taken at the last boundary and waits for the lock
                offset[0] = 10**6  # past the deadline
                raise RuntimeError("diverged")
