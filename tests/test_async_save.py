"""Async saves of the store (``save(..., blocking=False)``): a snapshot, then a background persist and
commit through the same transaction. Single process; faults come from a real file-size limit."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import wait_for
from torch import nn

from hpcckpt import CheckpointStore, HpcckptWarning, TrainState


def model_with_everything() -> nn.Module:
    """Tied weights, a parameter-free buffer of another dtype, and a registered view."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight  # tied: one storage, two keys
    model.register_buffer("mask", torch.rand(4, 4) > 0.5)
    model.register_buffer("bf16", torch.randn(3, 5, dtype=torch.bfloat16))
    return model


def odd_tensors() -> dict[str, Any]:
    base = torch.arange(24, dtype=torch.float32)
    return {
        "base": base,
        "slice": base[3:9],  # a view at an offset
        "transposed": base.view(4, 6).t(),  # non-contiguous
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "complex": torch.randn(3, dtype=torch.complex64),
        "values": [1, "two", {"three": 3.0}, (torch.ones(2),)],
    }


def checkpoint_bytes(checkpoint: Any) -> dict[str, bytes]:
    return {record.name: (checkpoint.path / record.name).read_bytes() for record in checkpoint.files}


def test_an_async_save_writes_the_same_bytes_as_a_blocking_save_of_the_same_state(tmp_path: Path) -> None:
    model = model_with_everything()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    state = TrainState(model=model, optimizer=optimizer, step=5, extra=odd_tensors())

    blocking = CheckpointStore(tmp_path / "sync").save(state)
    handle = CheckpointStore(tmp_path / "async").save(state, blocking=False)
    background = handle.wait()

    assert background.step == blocking.step == 5
    assert checkpoint_bytes(background) == checkpoint_bytes(blocking)
    loaded = CheckpointStore(tmp_path / "async").load()
    embedding, linear = loaded["model"]["0.weight"], loaded["model"]["1.weight"]
    assert embedding.untyped_storage().data_ptr() == linear.untyped_storage().data_ptr(), "still tied"
    assert torch.equal(loaded["extra"]["transposed"], state.extra["transposed"])
    values = loaded["extra"]["values"]
    assert values[:3] == [1, "two", {"three": 3.0}] and torch.equal(values[3][0], torch.ones(2))


def test_what_training_changes_after_save_returns_is_not_in_the_checkpoint(tmp_path: Path) -> None:
    weights = torch.zeros(4 << 20)  # 16 MiB: the write takes long enough for the change to land during it
    counters = {"seen": [1, 2]}
    store = CheckpointStore(tmp_path / "run")
    handle = store.save({"w": weights, "counters": counters}, step=1, blocking=False)
    weights.add_(1.0)  # an optimizer step, in place
    counters["seen"].append(3)
    checkpoint = handle.wait()

    loaded = store.load(checkpoint)
    assert float(loaded["w"].abs().max()) == 0.0, "the checkpoint holds the weights as they were at save()"
    assert loaded["counters"] == {"seen": [1, 2]}


def test_staging_is_reused_and_holds_one_state_at_most(tmp_path: Path) -> None:
    shared = torch.randn(1000)
    state = {"a": shared, "b": shared[10:20], "c": torch.randn(50, dtype=torch.float64)}
    store = CheckpointStore(tmp_path / "run")
    store.save(state, step=1, blocking=False).wait()
    first = [b.data_ptr() for b in store.staging._buffers]
    shared.mul_(2)
    second = store.save(state, step=2, blocking=False).wait()

    assert [b.data_ptr() for b in store.staging._buffers] == first, "the same buffers, refilled"
    assert store.staging.nbytes == 1000 * 4 + 50 * 8, "one copy of each storage: the state's size, no more"
    assert torch.equal(store.load(second)["a"], shared)


def test_a_state_over_the_staging_bound_is_saved_synchronously_with_one_warning(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", async_staging_bytes=1000)
    big = {"w": torch.ones(1000)}  # 4000 bytes
    with pytest.warns(HpcckptWarning, match=r"larger than async_staging_bytes=1000: saving it synchronously"):
        handle = store.save(big, step=1, blocking=False)
    assert handle.done(), "saved on the calling thread"
    assert handle.wait().step == 1 and [c.step for c in store.list()] == [1]
    assert store.staging.nbytes == 0
    second = store.save(big, step=2, blocking=False)  # warned once: a second warning would fail this test
    assert second.wait().step == 2
    small = store.save({"w": torch.ones(10)}, step=3, blocking=False)
    assert small.wait().step == 3 and store.staging.nbytes == 40


def test_a_save_while_one_is_in_flight_waits_for_it_first(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    first = store.save({"w": torch.zeros(4 << 20)}, step=1, blocking=False)
    second = store.save({"w": torch.ones(4)}, step=2)  # blocking: after the first is committed
    assert first.done() and first.wait().step == 1
    assert [c.step for c in store.list()] == [1, second.step]
    assert [c.seq for c in store.list()] == [1, 2], "committed in the order they were asked for"


HOLD_LOCK = """
import sys
from collections.abc import Iterator
from pathlib import Path
from hpcckpt.store.registry import Registry, lock_mode
import os
registry = Registry(Path(sys.argv[1]), lock=lock_mode(os.environ))
with registry.locked():
    print("locked", flush=True)
    sys.stdin.readline()
"""


@contextlib.contextmanager
def lock_held(run_dir: Path) -> Iterator[None]:
    """Another process holds the run's registry lock until the block ends: a save can write, not commit."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.stdin.write("go\n")
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()


def test_retention_keeps_the_only_durable_checkpoint_while_its_successor_is_in_flight(tmp_path: Path) -> None:
    """keep_last=1 (Megatron-Bridge #4678, #5184 lost runs here): while step 2 is written and waits to
    commit, step 1 stays, listed and loadable; retention deletes it only at step 2's commit."""
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir, keep_last=1)
    store.save({"w": torch.full((1000,), 1.0)}, step=1)
    with lock_held(run_dir):
        handle = store.save({"w": torch.full((1000,), 2.0)}, step=2, blocking=False)
        temporaries = run_dir / "checkpoints"
        wait_for(
            lambda: any((p / "state.tensors").exists() for p in temporaries.glob(".tmp-*")),
            60,
            "step 2's file being written in its temporary directory",
            interval=0.02,
        )
        assert not handle.done(), "it cannot commit while the lock is held"
        assert [c.step for c in store.list()] == [1]
        assert float(store.load()["w"][0]) == 1.0, "the durable checkpoint is still there to resume from"
    assert handle.wait().step == 2
    assert [c.step for c in store.list()] == [2]
    assert not (temporaries / "step_000000001").exists(), "deleted by retention once step 2 was durable"


FULL_DISK = """
import json, sys
import torch
from hpcckpt import CheckpointStore, StoreError
store = CheckpointStore(sys.argv[1], keep_last=None)
store.save({"w": torch.ones(16)}, step=1)
handle = store.save({"w": torch.ones(1 << 20)}, step=2, blocking=False)  # 4 MiB under a 1 MiB limit
errors = []
for _ in range(2):
    try:
        handle.wait()
    except StoreError as error:
        errors.append(str(error))
print(json.dumps({"errors": errors, "done": handle.done(), "steps": [c.step for c in store.list()]}))
"""


def test_a_background_failure_is_raised_by_every_wait_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A real failed write (a file-size limit: EFBIG) in the background thread."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=limit,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["done"] and outcome["steps"] == [1]
    assert len(outcome["errors"]) == 2, "asked twice, raised twice"
    for error in outcome["errors"]:
        assert error.startswith("could not save step 2 into ")
        assert "File too large (disk full, quota or file-size limit)" in error
        assert error.endswith("the previous checkpoint (step 1) is intact")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000000001"], "no temporary left"
    assert float(CheckpointStore(run_dir).load()["w"][0]) == 1.0


def test_a_script_that_ends_right_after_an_async_save_still_commits_it(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, torch
        from hpcckpt import CheckpointStore
        CheckpointStore(sys.argv[1]).save({"w": torch.full((4 << 20,), 3.0)}, step=9, blocking=False)
        """
    )
    for attempt in range(3):  # the writer's end raced the interpreter's (SIGABRT) in 7 of 12 runs before
        run_dir = tmp_path / f"run-{attempt}"
        subprocess.run([sys.executable, "-c", script, str(run_dir)], check=True, timeout=120)
        store = CheckpointStore(run_dir)
        assert [c.step for c in store.list()] == [9]
        assert float(store.load()["w"][-1]) == 3.0


def test_wait_with_a_timeout_says_the_save_is_still_running(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir)
    with lock_held(run_dir):
        handle = store.save({"w": torch.ones(4)}, step=3, blocking=False)
        with pytest.raises(TimeoutError, match=r"the save of step 3 is still running after 0.01 s"):
            handle.wait(timeout=0.01)
        assert not handle.done()
    assert handle.wait().step == 3
    assert os.path.isdir(run_dir / "checkpoints" / "step_000000003")


ABANDON = """
import sys, torch
from hpcckpt import CheckpointStore
handle = CheckpointStore(sys.argv[1]).save({"w": torch.ones(1 << 20)}, step=1, blocking=False)
handle.abandon()  # as Run does after a crash whose wait ran out
raise RuntimeError("diverged")
"""


def test_a_process_leaving_an_abandoned_save_exits_at_once_and_the_next_save_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir)
    with store.registry.locked():  # the abandoned save can write, never commit
        result = subprocess.run(
            [sys.executable, "-c", ABANDON, str(run_dir)], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.rstrip().endswith("RuntimeError: diverged")
    assert store.list() == [], "nothing of the abandoned save is visible"
    store.save({"w": torch.zeros(2)}, step=2)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000000002"]
