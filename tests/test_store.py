"""The checkpoint store: commit protocol, lookups, retention, integrity, state round trips, bad input."""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from unprivileged import as_nobody

from hpcckpt import (
    CheckpointNotFoundError,
    CheckpointStore,
    CorruptCheckpointError,
    HpcckptWarning,
    RestoreOptions,
    StateMismatchError,
    StoreError,
    TrainState,
    UsageError,
)


def make_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, extra={"wandb_id": "abc123"})


def train(state: TrainState, steps: int) -> None:
    assert state.model is not None and state.optimizer is not None and state.scheduler is not None
    for _ in range(steps):
        x = torch.randn(4, 8)
        loss = state.model(x).pow(2).mean()  # type: ignore[operator]
        state.optimizer.zero_grad()  # type: ignore[attr-defined]
        loss.backward()
        state.optimizer.step()  # type: ignore[attr-defined]
        state.scheduler.step()  # type: ignore[attr-defined]
        state.step += 1


def weights(state: TrainState) -> dict[str, torch.Tensor]:
    assert state.model is not None
    return {k: v.clone() for k, v in state.model.state_dict().items()}


def test_first_run_has_nothing_and_says_so_quietly(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    assert store.latest() is None
    assert store.list() == []
    assert store.best("loss") is None
    assert store.restore(make_state()) is None
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint in .* yet"):
        store.load()


def test_save_then_resume_continues_bitwise(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    reference = make_state()
    train(reference, 5)
    store.save(reference, epoch=1, metrics={"loss": 0.5})
    train(reference, 5)  # the uninterrupted run goes on with the same RNG stream

    resumed = make_state(seed=99)  # different init and RNG: everything must come from the checkpoint
    used = store.restore(resumed)
    assert used is not None and used.step == 5 and used.epoch == 1
    assert resumed.step == 5 and resumed.epoch == 1 and resumed.extra == {"wandb_id": "abc123"}
    train(resumed, 5)
    for key, value in weights(reference).items():
        assert torch.equal(value, weights(resumed)[key]), key
    assert resumed.scheduler.get_last_lr() == reference.scheduler.get_last_lr()  # type: ignore[union-attr]


def test_checkpoint_record_and_manifest_carry_what_users_need(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    store = CheckpointStore(tmp_path / "run", metadata={"lr": 0.01, "git_commit": "deadbeef"})
    state = make_state()
    state.step = 1200
    ckpt = store.save(state, epoch=3, metrics={"val_loss": 0.41}, metadata={"note": "first"})
    assert (ckpt.step, ckpt.epoch, dict(ckpt.metrics)) == (1200, 3, {"val_loss": 0.41})
    assert (ckpt.job_id, ckpt.array_job_id, ckpt.array_task_id) == ("4242", "4240", 3)
    assert ckpt.path == tmp_path / "run" / "checkpoints" / "step_000001200"
    assert ckpt.size == (ckpt.path / "state.tensors").stat().st_size > 0
    assert ckpt.checksum.startswith("xxh3_64:") and ckpt.save_seconds is not None and ckpt.save_seconds > 0
    manifest = json.loads((ckpt.path / "manifest.json").read_text())
    assert manifest["metadata"] == {"lr": 0.01, "git_commit": "deadbeef", "note": "first"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["format"] == "tensors"
    assert manifest["files"] == [{"name": "state.tensors", "size": ckpt.size, "digest": ckpt.files[0].digest}]
    assert store.latest() == ckpt


def test_single_file_loads_with_plain_torch_load(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", format="torch")
    state = make_state()
    train(state, 2)
    ckpt = store.save(state)
    payload = torch.load(ckpt.path / "state.pt", weights_only=True)
    assert set(payload) == {"model", "optimizer", "scheduler", "extra", "rng", "step", "epoch", "hpcckpt"}
    assert set(payload["rng"]) >= {"python", "torch", "numpy"}
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    plain.load_state_dict(payload["model"])
    assert torch.equal(plain[0].weight, state.model[0].weight)  # type: ignore[index]


def test_ddp_wrapped_model_saves_without_module_prefix(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        state = make_state()
        state.model = nn.parallel.DistributedDataParallel(state.model)  # type: ignore[arg-type]
        ckpt = CheckpointStore(tmp_path / "run").save(state)
    finally:
        dist.destroy_process_group()
    payload = CheckpointStore(tmp_path / "run").load(ckpt)
    assert not any(key.startswith("module.") for key in payload["model"])
    plain = make_state(seed=5)
    CheckpointStore(tmp_path / "run").restore(plain)
    assert torch.equal(plain.model[0].weight, state.model.module[0].weight)  # type: ignore[index]


def test_weights_only_restore_for_fine_tuning(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    trained = make_state()
    train(trained, 4)
    store.save(trained)
    fresh = make_state(seed=1)
    store.restore(fresh, options=RestoreOptions(optimizer=False, scheduler=False, progress=False))
    assert torch.equal(fresh.model[0].weight, trained.model[0].weight)  # type: ignore[index]
    assert fresh.optimizer.state_dict()["state"] == {}  # type: ignore[union-attr]
    assert fresh.scheduler.last_epoch == 0 and fresh.step == 0  # type: ignore[union-attr]


def test_strict_mismatch_names_missing_and_extra_keys(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save(make_state())
    other = TrainState(model=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2), nn.Linear(2, 2)))
    with pytest.raises(StateMismatchError, match=r"missing keys \[3.bias, 3.weight\].*unexpected keys \[\]"):
        store.restore(other)
    store.restore(other, options=RestoreOptions(strict=False))  # lenient: loads the matching keys
    assert torch.equal(other.model[0].weight, store.load()["model"]["0.weight"])  # type: ignore[index]


class _Custom:
    def __init__(self) -> None:
        self.value = 7


def test_loading_never_unpickles_code_unless_asked_by_name(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save({"weights": torch.ones(2), "custom": _Custom()}, step=1)
    with pytest.raises(StoreError, match=r"weights_only=True\) refuses .*_Custom.*unsafe_allow_pickle=True"):
        store.load()
    assert store.load(unsafe_allow_pickle=True)["custom"].value == 7


def test_retention_keeps_last_best_newest_and_tagged(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=2, keep_best=("val_loss", "min", 1))
    losses = [0.9, 0.2, 0.7, 0.8, 0.6, 0.5]
    for step, loss in enumerate(losses, start=1):
        store.save(
            {"w": torch.full((3,), float(step))},
            step=step,
            metrics={"val_loss": loss},
            tag="pre-finetune" if step == 1 else None,
        )
    kept = [c.step for c in store.list()]
    assert kept == [1, 2, 5, 6]  # 1: tagged, 2: best, 5 and 6: last two
    on_disk = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert on_disk == ["step_000000001", "step_000000002", "step_000000005", "step_000000006"]
    best = store.best("val_loss")
    assert best is not None and best.step == 2
    assert store.best("val_loss", mode="max").step == 1  # type: ignore[union-attr]
    deletions = [e["step"] for e in store.registry.events() if e["event"] == "delete"]
    assert sorted(deletions) == [3, 4]


def test_explicit_missing_step_is_an_error_never_a_fresh_start(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save({"w": torch.zeros(1)}, step=10)
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at step 11 .*available: 10"):
        store.load(11)
    with pytest.raises(CheckpointNotFoundError):
        store.restore(make_state(), ckpt=11)


def test_byte_flip_is_detected_and_latest_falls_back(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save({"w": torch.full((1000,), 1.0)}, step=1)
    newest = store.save({"w": torch.full((1000,), 2.0)}, step=2)
    data = newest.path / "state.tensors"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))

    with pytest.raises(
        CorruptCheckpointError, match=r"state\.tensors: checksum xxh3_64:[0-9a-f]{16}, the manifest says xxh3_64:"
    ):
        store.verify(newest)
    with pytest.warns(HpcckptWarning, match="step_000000002 is corrupt"):
        used, state = store.load_checkpoint()
    assert used.step == 1 and float(state["w"][0]) == 1.0
    with pytest.raises(CorruptCheckpointError):
        store.load(2)  # asked for by step: no silent substitute


def test_truncation_is_detected(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save({"w": torch.zeros(100)}, step=1)
    newest = store.save({"w": torch.ones(100)}, step=2)
    with open(newest.path / "state.tensors", "r+b") as f:
        f.truncate(50)
    with pytest.raises(CorruptCheckpointError, match=r"size 50 bytes, the manifest says \d+"):
        store.verify(2)
    with pytest.warns(HpcckptWarning, match="step_000000002 is unusable"):
        assert store.latest().step == 1  # type: ignore[union-attr]


def test_lost_or_corrupt_index_is_rebuilt_from_manifests(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    for step in (1, 2, 3):
        store.save({"w": torch.zeros(1)}, step=step, metrics={"loss": 1.0 / step})
    before = store.list()
    index = tmp_path / "run" / "registry.json"
    index.write_text("{ not json")
    with pytest.warns(HpcckptWarning, match="rebuilding it from the manifests"):
        assert store.list() == before
    index.unlink()
    with pytest.warns(HpcckptWarning, match="rebuilding"):
        assert [c.step for c in CheckpointStore(tmp_path / "run").list()] == [1, 2, 3]
    assert json.loads(index.read_text())["checkpoints"][2]["metrics"] == {"loss": pytest.approx(1 / 3)}


def test_commit_after_rename_is_adopted_when_index_update_was_lost(tmp_path: Path) -> None:
    # A writer killed between its rename (the commit point) and its index update.
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save({"w": torch.zeros(1)}, step=1)
    index = tmp_path / "run" / "registry.json"
    old_index = index.read_bytes()
    store.save({"w": torch.ones(1)}, step=2)
    index.write_bytes(old_index)
    assert store.latest().step == 2  # type: ignore[union-attr]


def test_registry_entry_pointing_outside_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save({"w": torch.zeros(1)}, step=1)
    index = tmp_path / "run" / "registry.json"
    data = json.loads(index.read_text())
    data["checkpoints"][0]["name"] = "../../../etc"
    index.write_text(json.dumps(data))
    fresh = CheckpointStore(tmp_path / "run")
    with pytest.warns(HpcckptWarning, match=r"registry entry '\.\./\.\./\.\./etc' .* is refused.*rebuilding"):
        assert [c.path for c in fresh.list()] == [tmp_path / "run" / "checkpoints" / "step_000000001"]
    assert "etc" not in index.read_text()


def test_symlinked_checkpoint_leading_outside_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.save({"w": torch.zeros(1)}, step=1)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "run" / "checkpoints" / "step_000000009").symlink_to(outside)
    with pytest.warns(HpcckptWarning, match="step_000000009 is refused: a symbolic link"):
        assert [c.step for c in store.list()] == [1]
    latest = store.save({"w": torch.ones(1)}, step=2)  # the link neither blocks saving nor is followed
    assert store.latest() == latest


def test_file_names_in_a_manifest_cannot_leave_the_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save({"w": torch.zeros(1)}, step=1)
    bad = store.save({"w": torch.ones(1)}, step=2)
    manifest = json.loads((bad.path / "manifest.json").read_text())
    manifest["files"][0]["name"] = "../../../secret"
    (bad.path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "run" / "registry.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [c.step for c in CheckpointStore(tmp_path / "run").list()] == [1]
    messages = [str(w.message) for w in caught]
    assert any("rebuilding it from the manifests" in m for m in messages)
    assert any("lists file '../../../secret'" in m and "refused" in m for m in messages)


def test_latest_is_the_newest_save_also_after_a_rewind(tmp_path: Path) -> None:
    # A user restores step 50 after a loss spike and trains on: the next task resumes the new branch.
    store = CheckpointStore(tmp_path / "run", keep_last=3)
    for step in (50, 100):
        store.save({"w": torch.full((1,), float(step))}, step=step)
    for step in (60, 70, 80):
        store.save({"w": torch.full((1,), float(step) + 0.5)}, step=step)
    assert [c.step for c in store.list()] == [60, 70, 80]
    assert float(store.load()["w"][0]) == 80.5


def test_non_finite_metrics_are_left_out_and_do_not_stop_the_save(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_best=("loss", "min", 1))
    with pytest.warns(HpcckptWarning, match="metric loss=nan is not finite; saved without it"):
        ckpt = store.save({"w": torch.zeros(1)}, step=1, metrics={"loss": float("nan"), "acc": 0.5})
    assert dict(ckpt.metrics) == {"acc": 0.5}
    json.loads((tmp_path / "run" / "registry.json").read_text())  # strict JSON: no NaN


def test_a_load_failure_that_is_not_corruption_does_not_fall_back(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None, format="torch")
    store.save({"w": torch.zeros(1)}, step=1)
    store.save({"w": torch.ones(1)}, step=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "corrupt, trying an older one"
        with pytest.raises(StoreError, match=r"step_000000002/state\.pt: torch\.load\(map_location='nowhere:0'\)"):
            store.load(map_location="nowhere:0")


def test_index_cache_never_serves_the_record_of_a_deleted_namesake(tmp_path: Path) -> None:
    # Two processes' views: A caches the record of step_100; B deletes it and saves step 100 anew.
    a = CheckpointStore(tmp_path / "run", keep_last=None)
    a.save({"w": torch.zeros(1)}, step=100, metrics={"loss": 1.0})
    b = CheckpointStore(tmp_path / "run", keep_last=None)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000000100")
    with pytest.warns(HpcckptWarning, match="gone from disk"):
        b.save({"w": torch.ones(1)}, step=100, metrics={"loss": 0.5})
    a.save({"w": torch.ones(1)}, step=101)
    fresh = CheckpointStore(tmp_path / "run", keep_last=None)
    (again,) = [c for c in fresh.list() if c.step == 100]
    assert dict(again.metrics) == {"loss": 0.5}
    fresh.verify(again)


def test_a_save_is_committed_when_only_the_registry_update_fails(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save({"w": torch.zeros(1)}, step=1)
    events = tmp_path / "run" / "events.jsonl"
    events.unlink()
    events.mkdir()  # appending to the log now fails
    with pytest.warns(HpcckptWarning, match="step_000000002 is committed, but updating the registry"):
        ckpt = store.save({"w": torch.ones(1)}, step=2)
    assert store.latest() == ckpt
    assert float(store.load()["w"][0]) == 1.0


def test_export_names_the_checkpoint_it_really_wrote(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save({"w": torch.zeros(100)}, step=1)
    newest = store.save({"w": torch.ones(100)}, step=2)
    data = bytearray((newest.path / "state.tensors").read_bytes())
    data[-200] ^= 0xFF
    (newest.path / "state.tensors").write_bytes(bytes(data))
    with pytest.warns(HpcckptWarning, match="step_000000002 is corrupt"):
        path, used = store.export(tmp_path / "out.pt")
    assert used.step == 1
    assert float(torch.load(path, weights_only=True)["w"][0]) == 0.0


def test_missing_run_directory_for_reading_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"run directory .*nowhere does not exist"):
        CheckpointStore(tmp_path / "nowhere", create=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=r"cannot create run directory .*Not a directory"):
        CheckpointStore(blocker / "run")


def test_unwritable_run_directory_is_a_clear_error() -> None:
    # root writes anywhere: a forked child drops to an unprivileged user first (no exec, so the
    # interpreter under root's home need not be readable by that user). pytest's tmp_path is private
    # to root, so the directory is made where that user can reach it.
    with tempfile.TemporaryDirectory() as parent:
        Path(parent).chmod(0o755)
        run_dir = Path(parent) / "readonly"
        run_dir.mkdir(mode=0o555)
        _check_unwritable(run_dir)


def _check_unwritable(run_dir: Path) -> None:
    ok, said = as_nobody(lambda: str(CheckpointStore(run_dir)))
    assert not ok
    assert said == f"StoreError: run directory {run_dir} is not writable: Permission denied"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, r"Invalid keep_last=0: expected a whole number >= 1, or None"),
        ({"keep_best": ("loss", "lowest", 1)}, r"Invalid keep_best=.*'min' or 'max'"),
        ({"format": "zip"}, r"Invalid checkpoint format 'zip': expected one of \['dcp', 'tensors', 'torch'\]"),
        ({"lock": "nfs"}, r"Invalid lock mode 'nfs'.*expected 'auto', 'fcntl' or 'soft'"),
    ],
)
def test_bad_options_are_refused_with_the_accepted_form(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        CheckpointStore(tmp_path / "run", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": -1}, r"Invalid step=-1: expected a whole number >= 0"),
        ({"step": 1, "metrics": {"loss": "low"}}, r"Invalid metric loss='low': expected a number"),
        ({"step": 1, "tag": "a b"}, r"Invalid tag 'a b'"),
    ],
)
def test_bad_save_arguments_write_nothing(tmp_path: Path, kwargs: dict, message: str) -> None:
    store = CheckpointStore(tmp_path / "run")
    with pytest.raises(UsageError, match=message):
        store.save({"w": torch.zeros(1)}, **kwargs)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_same_step_saved_twice_keeps_both(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    first = store.save({"w": torch.zeros(1)}, step=5)
    second = store.save({"w": torch.ones(1)}, step=5, tag="again")
    assert (first.name, second.name) == ("step_000000005", "step_000000005.1")
    assert float(store.load(5)["w"][0]) == 1.0  # the newer of the two


def test_errors_pickle_with_their_message(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    with pytest.raises(CheckpointNotFoundError) as info:
        store.load(3)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is CheckpointNotFoundError and str(copy) == str(info.value)
