"""The one save transaction (hpcckpt/store/transaction.py) and the format table: what a save leaves behind
when it fails inside the transaction, files that other processes wrote committed by checksum, a sharded
save recorded like a one-file one, and a one-file store that never imports the sharded format."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hpcckpt import CheckpointStore, CorruptCheckpointError, HpcckptWarning, StoreError, TrainState, UsageError
from hpcckpt.store.registry import lock_mode
from hpcckpt.store.transaction import SaveRequest, SaveTransaction


def _hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


def _request(store: CheckpointStore, step: int) -> SaveRequest:
    return SaveRequest(store.registry, step, 0, {}, retention=lambda checkpoints: [])


def test_a_transaction_left_by_an_error_commits_nothing_and_leaves_no_temporary(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save({"w": torch.ones(2)}, step=1)
    seen: list[str] = []

    def interrupted_while_writing() -> None:
        with SaveTransaction.begin(_request(store, 2)) as transaction:
            (transaction.directory / "state.pt").write_bytes(b"half")
            seen.extend(_hidden(tmp_path / "run"))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_while_writing()
    assert len(seen) == 1 and seen[0].startswith(".tmp-000000002-")
    assert _hidden(tmp_path / "run") == []
    assert [c.step for c in store.list()] == [1]


def test_a_failed_write_in_a_transaction_is_a_store_error_saying_what_stays(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save({"w": torch.ones(2)}, step=1)
    with pytest.raises(StoreError) as raised, SaveTransaction.begin(_request(store, 2)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(raised.value) == (
        f"could not save step 2 into {tmp_path / 'run' / 'checkpoints'}: No space left on device "
        "(disk full, quota or file-size limit); the previous checkpoint (step 1) is intact"
    )
    assert _hidden(tmp_path / "run") == []
    assert [c.step for c in store.list()] == [1]


def test_files_another_process_wrote_are_checksummed_and_committed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    transaction = SaveTransaction.begin(_request(store, 7))
    torch.save({"w": torch.full((3,), 7.0)}, transaction.directory / "state.pt")  # as a rank would, outside
    checkpoint = transaction.commit(None, format="torch")
    assert checkpoint.name == "step_000000007" and [f.name for f in checkpoint.files] == ["state.pt"]
    assert store.verify(checkpoint) == checkpoint
    assert store.load(7)["w"].tolist() == [7.0, 7.0, 7.0]
    assert _hidden(tmp_path / "run") == []  # neither the temporary nor its owner file is left
    assert not (checkpoint.path / ".owner").exists()


def test_a_sharded_save_records_what_a_one_file_save_records(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None, format="dcp", metadata={"lr": 0.1})
    checkpoint = store.save(TrainState(model=nn.Linear(2, 2), step=3), metrics={"loss": 0.5})
    manifest = json.loads((checkpoint.path / "manifest.json").read_text())
    assert (manifest["format"], manifest["step"], manifest["tag"]) == ("dcp", 3, None)
    assert manifest["metrics"] == {"loss": 0.5}
    assert manifest["metadata"] == {"lr": 0.1}
    assert store.load(3)["step"] == 3
    with pytest.raises(UsageError, match=r"^a sharded \(dcp\) save takes a TrainState, without tag or metadata$"):
        store.save({"w": torch.ones(1)}, step=4)
    assert [c.step for c in store.list()] == [3]


ONE_FILE = """
import sys, torch
from hpcckpt import CheckpointStore, TrainState
store = CheckpointStore(sys.argv[1], keep_last=1)
for step in (1, 2):
    store.save({"w": torch.ones(2) * step}, step=step)
state = TrainState(extra={})
store.restore(state)
store.load()
print(sorted(m for m in sys.modules if m.startswith("hpcckpt.store.formats")))
"""


def test_a_one_file_store_never_imports_the_sharded_format(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", ONE_FILE, str(tmp_path / "run")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == (
        "['hpcckpt.store.formats', 'hpcckpt.store.formats.codec', 'hpcckpt.store.formats.tensorfile', "
        "'hpcckpt.store.formats.zstdframes']"
    )


@pytest.mark.parametrize(
    ("value", "mode"), [(None, "auto"), ("", "auto"), ("auto", "auto"), ("fcntl", "fcntl"), ("soft", "soft")]
)
def test_the_lock_mode_comes_from_the_variable_entry_points_pass(value: str | None, mode: str) -> None:
    assert lock_mode({} if value is None else {"HPCCKPT_LOCK": value}) == mode


def test_a_bad_lock_mode_variable_names_the_value_and_the_accepted_form() -> None:
    with pytest.raises(UsageError, match=r"Invalid lock mode 'nfs' \(HPCCKPT_LOCK\): expected 'auto', 'fcntl'"):
        lock_mode({"HPCCKPT_LOCK": "nfs"})


def test_a_manifest_naming_an_unknown_format_imports_nothing_and_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    checkpoint = store.save({"w": torch.ones(2)}, step=1)
    manifest = json.loads((checkpoint.path / "manifest.json").read_text())
    manifest["format"] = "subprocess"  # a module name: the table maps names to its own modules only
    (checkpoint.path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "run" / "registry.json").unlink()
    fresh = CheckpointStore(tmp_path / "run", keep_last=None)
    with pytest.warns(HpcckptWarning, match="rebuilding it from the manifests"):
        listed = fresh.list()
    assert [c.format for c in listed] == ["subprocess"]
    with pytest.raises(CorruptCheckpointError, match=r"format 'subprocess' is unknown to hpcckpt"):
        fresh.load(1)
    assert "hpcckpt.store.formats.subprocess" not in sys.modules
