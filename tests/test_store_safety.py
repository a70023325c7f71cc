"""Loading never runs code from a checkpoint unless the caller asked for it, and a checkpoint that cannot
be read falls back to the previous valid one (issue 11, items 1 and 2)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from hpcckpt import CheckpointStore, CorruptCheckpointError, Run, StoreError, TrainState
from hpcckpt.store.manifest import MANIFEST, FileRecord, combined_checksum, file_digest
from hpcckpt.store.registry import INDEX, HpcckptWarning


class Payload:
    """Unpickled, it creates ``marker``: the code a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def hpcckpt(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["hpcckpt", *argv], capture_output=True, text=True, timeout=120, check=False)


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()  # an optimizer with state: what a resumed run has
    return model, optimizer


def _dcp_run(run_dir: Path) -> CheckpointStore:
    """Two dcp checkpoints, at steps 1 and 2, with different weights."""
    store = CheckpointStore(run_dir, keep_last=None, format="dcp")
    model, optimizer = _model()
    state = TrainState(model=model, optimizer=optimizer)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(float(step))
        state.step = step
        store.save(state)
    return store


def _rewrite(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace one file of a committed checkpoint and recompute its checksums (manifest and index), as an
    attacker with write access would: ``verify`` passes afterwards."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    for entry in manifest["files"]:
        if entry["name"] == name:
            entry["size"], entry["digest"] = len(data), file_digest(checkpoint / name)
    records = tuple(FileRecord(f["name"], f["size"], f["digest"]) for f in manifest["files"])
    manifest["checksum"] = combined_checksum(records)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    index_path = checkpoint.parent.parent / INDEX
    index = json.loads(index_path.read_text())
    for entry in index["checkpoints"]:
        if entry["name"] == checkpoint.name:
            entry["files"], entry["checksum"] = manifest["files"], manifest["checksum"]
    index_path.write_text(json.dumps(index))


def _crafted_metadata(store: CheckpointStore, marker: Path) -> Path:
    newest = store.list()[-1].path
    _rewrite(newest, ".metadata", pickle.dumps({"metadata": Payload(marker)}))
    assert hpcckpt("verify", str(store.run_dir)).returncode == 0  # the checksums match: only reading can tell
    return newest


def _truncated_shard(store: CheckpointStore) -> Path:
    newest = store.list()[-1].path
    shard = newest / "__0_0.distcp"
    data = shard.read_bytes()
    _rewrite(newest, shard.name, data[: len(data) // 2])
    assert hpcckpt("verify", str(store.run_dir)).returncode == 0
    return newest


@pytest.fixture(params=["crafted .metadata", "truncated shard"])
def damaged(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[CheckpointStore, Path, Path]:
    """A dcp run whose newest checkpoint verifies but cannot be read safely; and the marker file that the
    crafted one creates if it is ever unpickled."""
    store = _dcp_run(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    newest = _crafted_metadata(store, marker) if request.param == "crafted .metadata" else _truncated_shard(store)
    return store, newest, marker


def test_load_falls_back_to_the_previous_checkpoint_and_runs_nothing(
    damaged: tuple[CheckpointStore, Path, Path],
) -> None:
    store, newest, marker = damaged
    with pytest.warns(HpcckptWarning, match=f"checkpoint {newest.name} is corrupt, trying an older one"):
        checkpoint, state = store.load_checkpoint()
    assert (checkpoint.step, state["step"]) == (1, 1)
    assert torch.equal(state["model"]["weight"], torch.full((2, 4), 1.0))
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"^{newest}(/\.metadata: not DCP metadata|: its shards \(__0_0\.distcp\) cannot be read)",
    ):
        store.load(2)  # asked for by step: an error, never another checkpoint
    assert not marker.exists()


def test_restore_falls_back_to_the_previous_checkpoint_and_runs_nothing(
    damaged: tuple[CheckpointStore, Path, Path],
) -> None:
    store, newest, marker = damaged
    model, optimizer = _model()
    state = TrainState(model=model, optimizer=optimizer)
    with pytest.warns(HpcckptWarning, match=f"checkpoint {newest.name} is corrupt, trying an older one"):
        restored = store.restore(state)
    assert restored is not None and restored.step == 1 and state.step == 1
    assert torch.equal(model.weight.detach(), torch.full((2, 4), 1.0))
    assert not marker.exists()


def test_export_falls_back_to_the_previous_checkpoint_and_runs_nothing(
    damaged: tuple[CheckpointStore, Path, Path], tmp_path: Path
) -> None:
    store, newest, marker = damaged
    exported = hpcckpt("export", str(store.run_dir), "--out", str(tmp_path / "out.pt"))
    assert exported.returncode == 0, exported.stderr
    assert f"checkpoint {newest.name} is corrupt, trying an older one" in exported.stderr
    assert "wrote the state of step_000000001 (step 1)" in exported.stdout
    assert torch.load(tmp_path / "out.pt", weights_only=True)["step"] == 1
    asked = hpcckpt("export", str(store.run_dir), "--step", "2", "--out", str(tmp_path / "two.pt"))
    assert asked.returncode == 1 and "Traceback" not in asked.stderr
    assert asked.stderr.startswith(f"hpcckpt export: error: {newest}")
    assert not marker.exists()


def test_a_resuming_run_falls_back_to_the_previous_checkpoint_and_runs_nothing(
    damaged: tuple[CheckpointStore, Path, Path],
) -> None:
    store, newest, marker = damaged
    model, optimizer = _model()
    state = TrainState(model=model, optimizer=optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Run(store.run_dir, state, total_steps=3, keep_last=None) as run:
            resumed_at = [step for step in run]
    assert resumed_at == [1, 2]  # resumed after step 1, not after the damaged step 2
    assert any(f"checkpoint {newest.name} is corrupt" in str(w.message) for w in caught)
    assert not marker.exists()


def test_metadata_refusal_names_the_file_and_the_refused_global(tmp_path: Path) -> None:
    store = _dcp_run(tmp_path / "run")
    newest = _crafted_metadata(store, tmp_path / "payload-ran")
    with pytest.raises(CorruptCheckpointError) as raised:
        store.load(2)
    assert str(raised.value).startswith(f"{newest / '.metadata'}: not DCP metadata (UnpicklingError: refused ")
    assert "global posix.system" in str(raised.value)
    assert not (tmp_path / "payload-ran").exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    store = _dcp_run(tmp_path / "run")
    newest = store.list()[-1].path
    from hpcckpt.store.formats.dcpread import _MetadataUnpickler

    with open(newest / ".metadata", "rb") as stream:
        metadata = _MetadataUnpickler(stream).load()
    for info in metadata.storage_data.values():
        info.relative_path = "../step_000000001/__0_0.distcp"
    _rewrite(newest, ".metadata", pickle.dumps(metadata))
    with pytest.raises(CorruptCheckpointError, match=r"points at '\.\./step_000000001/__0_0\.distcp', which is not"):
        store.load(2)


def test_a_pickled_value_in_a_shard_is_refused_unless_asked_for(tmp_path: Path) -> None:
    """DCP stores non-tensor values as pickles and reads them with weights_only=False; hpcckpt does not."""
    store = CheckpointStore(tmp_path / "run", format="dcp")
    marker = tmp_path / "payload-ran"
    model, optimizer = _model()
    store.save(TrainState(model=model, optimizer=optimizer, extra={"evil": Payload(marker)}))
    with pytest.raises(StoreError, match=r"entry 'extra\.evil': torch\.load\(weights_only=True\) refuses"):
        store.load()
    exported = hpcckpt("export", str(store.run_dir), "--out", str(tmp_path / "out.pt"))
    assert exported.returncode == 1 and "unsafe_allow_pickle=True" in exported.stderr
    assert not marker.exists()
    store.load(unsafe_allow_pickle=True)  # asked for by name: the writer is trusted
    assert marker.exists()


def test_a_pickled_value_in_a_torch_checkpoint_is_refused_by_load_restore_and_export(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    model, optimizer = _model()
    store.save(TrainState(model=model, optimizer=optimizer, extra={"evil": Payload(marker)}))
    with pytest.raises(StoreError, match="weights_only=True"):
        store.load()
    with pytest.raises(StoreError, match="weights_only=True"):
        store.restore(TrainState(model=model, optimizer=optimizer))
    exported = hpcckpt("export", str(store.run_dir), "--out", str(tmp_path / "out.pt"))
    assert exported.returncode == 1 and "unsafe_allow_pickle=True" in exported.stderr
    assert not marker.exists()


DCP_SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
import torch
from hpcckpt import CheckpointStore, StoreError, TrainState
store = CheckpointStore(sys.argv[1], keep_last=None, format="dcp")
state = TrainState(model=torch.nn.Linear(4, 4))
state.step = 1
store.save(state)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
state = TrainState(model=torch.nn.Linear(512, 512))
state.step = 2
try:
    store.save(state)
except StoreError as error:
    print(error)
"""


def test_a_failed_sharded_write_is_a_store_error_and_commits_nothing(tmp_path: Path) -> None:
    """DCP reports a failed write as CheckpointException, a BaseException: it must not escape as one."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", DCP_SAVE_UNDER_A_FILE_SIZE_LIMIT, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sharded save of step 2 failed, nothing committed: rank 0: ")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000000001"]
    assert CheckpointStore(run_dir, create=False).load()["step"] == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("damage", ["crafted .metadata", "truncated shard"])
def test_two_ranks_fall_back_together_and_run_nothing(tmp_path: Path, damage: str) -> None:
    """Every rank of a process group skips the damaged checkpoint and resumes from the same older one."""
    from test_distributed import Ranks

    run_dir = tmp_path / "run"
    first = Ranks(run_dir, 2, "--steps", "20", "--save-every", "10ba").end()
    assert [r["step"] for r in first] == [20, 20]
    store = CheckpointStore(run_dir, create=False, keep_last=None)
    assert [c.step for c in store.list()] == [10, 20]
    marker = tmp_path / "payload-ran"
    newest = _crafted_metadata(store, marker) if damage == "crafted .metadata" else _truncated_shard(store)
    store.registry.record("reopen", why="test: train on")
    ranks = Ranks(run_dir, 2, "--steps", "30")
    second = ranks.end()
    assert [(r["resumed"], r["step"]) for r in second] == [(10, 30), (10, 30)]
    assert f"checkpoint {newest.name} is corrupt, trying an older one" in ranks.stderr
    assert not marker.exists()


def test_metadata_that_would_change_an_admitted_class_is_refused(tmp_path: Path) -> None:
    """Only admitted classes are named, but a pickle can set attributes on a class itself (BUILD with slot
    state), which would change it for the whole process: refused."""
    from torch.distributed.checkpoint.metadata import Metadata

    store = _dcp_run(tmp_path / "run")
    newest = store.list()[-1].path
    module = Metadata.__module__.encode()
    # PROTO 4; GLOBAL Metadata; state (None, {"planted": "yes"}); BUILD; STOP
    crafted = b"\x80\x04c" + module + b"\nMetadata\nN}\x8c\x07planted\x8c\x03yess\x86b."
    _rewrite(newest, ".metadata", crafted)
    with pytest.raises(CorruptCheckpointError, match=r"refused to set the state of type <class '.*\.Metadata'>"):
        store.load(2)
    assert not hasattr(Metadata, "planted")
    with pytest.warns(HpcckptWarning, match=f"checkpoint {newest.name} is corrupt, trying an older one"):
        assert store.load()["step"] == 1


def test_unsafe_allow_pickle_reads_crafted_metadata_as_asked(tmp_path: Path) -> None:
    """The caller who passes unsafe_allow_pickle=True by name trusts the writer: plain pickle, as DCP does."""
    store = _dcp_run(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    _crafted_metadata(store, marker)
    with pytest.raises(CorruptCheckpointError):
        store.load(2)
    assert not marker.exists()
    with pytest.raises(StoreError):  # it is not DCP metadata after all
        store.load(2, unsafe_allow_pickle=True)
    assert marker.exists()
