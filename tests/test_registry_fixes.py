"""Fixes after the review of the registry of issue 13: a deletion never hides a later checkpoint of the same
name, and a journal append the system cut short never costs the other writers' records.

Each test works on a real run directory; the faults are what a crash leaves on disk (a journal line that never
landed, a deleter killed before it moved the directory away) or a write the system cut short (``os.write``
faked at the process edge).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import store_workers

from hpcckpt import CheckpointStore
from hpcckpt.store import registry
from hpcckpt.store.registry import HpcckptWarning


def _save(run_dir: Path, *steps: int, keep_last: int | None = None) -> CheckpointStore:
    store = CheckpointStore(run_dir, keep_last=keep_last)
    for step in steps:
        store.save(store_workers.payload(step, 4), step=step)
    return store


def _records(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "registry.journal").read_bytes().splitlines()[1:]]


def _ops(run_dir: Path) -> list[tuple[object, object]]:
    """Each journal record's operation and the checkpoint it names."""
    named = []
    for record in _records(run_dir):
        checkpoint = record.get("checkpoint")
        named.append((record["op"], checkpoint["name"] if isinstance(checkpoint, dict) else record.get("name")))
    return named


def _steps_seen(store: CheckpointStore) -> list[tuple[int, object]]:
    """Each listed checkpoint's step and what its saved state says it is (the step it was saved from)."""
    return [(c.step, store.load(c.name)["step_seen"]) for c in store.list()]


def _history(run_dir: Path) -> None:
    """Steps 10 to 29, in a freshly compacted snapshot: the few journal lines each test adds are no reason to
    compact (a compaction would fold what the journal says into the snapshot)."""
    _save(run_dir, *range(10, 30))
    (run_dir / "registry.json").unlink()
    (run_dir / "registry.journal").unlink()
    with pytest.warns(HpcckptWarning, match="rebuilding it from the manifests"):
        assert len(CheckpointStore(run_dir, keep_last=None).list()) == 20
    assert _records(run_dir) == []


def test_a_step_saved_again_after_retention_deleted_it_survives_a_lost_journal_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _history(run_dir)
    _save(run_dir, 30, 31, keep_last=21)  # retention deletes step 10 (by seq, the oldest)
    assert _ops(run_dir)[-1] == ("delete", "step_000000010")
    journal, snapshot = run_dir / "registry.journal", (run_dir / "registry.json").read_bytes()
    before = journal.read_bytes()
    # A rewind to step 10 saves it again; the node crashes, losing the journal's unsynced lines.
    resaved = _save(run_dir, 10).latest()
    journal.write_bytes(before)
    assert (run_dir / "registry.json").read_bytes() == snapshot  # not compacted: only the journal knows
    assert resaved is not None and (run_dir / "checkpoints" / "step_000000010").is_dir()

    reader = CheckpointStore(run_dir, create=False)
    assert [c.step for c in reader.list()] == [*range(11, 32), 10]
    assert reader.latest().seq == resaved.seq  # type: ignore[union-attr]
    assert reader.load()["step_seen"] == 10

    _save(run_dir, 32)  # the next writer records it, and deletes nothing
    assert (run_dir / "checkpoints" / "step_000000010").is_dir()
    after = CheckpointStore(run_dir, create=False)
    assert _steps_seen(after) == [(s, s) for s in (*range(11, 32), 10, 32)]


def test_a_deleter_killed_before_it_moved_the_directory_away_is_still_finished(tmp_path: Path) -> None:
    # The deletion names the instance: the directory it deleted is hidden, and moved away by the next writer.
    run_dir = tmp_path / "run"
    _history(run_dir)
    victim = run_dir / "checkpoints" / "step_000000010"
    kept = tmp_path / "kept"
    shutil.copytree(victim, kept)
    _save(run_dir, 30, keep_last=20)
    assert not victim.exists() and _ops(run_dir)[-1] == ("delete", "step_000000010")
    shutil.copytree(kept, victim)  # as if its deleter was killed after the journal line, before the rename
    assert [c.step for c in CheckpointStore(run_dir, create=False).list()] == list(range(11, 31))
    _save(run_dir, 31)
    assert not victim.exists()
    assert [c.step for c in CheckpointStore(run_dir, create=False).list()] == list(range(11, 32))


def test_a_delete_record_without_its_instance_deletes_only_the_entry_listed_before_it(tmp_path: Path) -> None:
    # Journals written before deletes named their instance: {"op": "delete", "name": ...} alone.
    run_dir = tmp_path / "run"
    _history(run_dir)
    journal, snapshot = run_dir / "registry.journal", (run_dir / "registry.json").read_bytes()
    with journal.open("ab") as out:
        out.write(b'{"op":"delete","name":"step_000000010"}\n{"op":"delete","name":"step_000000011"}\n')
    shutil.rmtree(run_dir / "checkpoints" / "step_000000010")  # step 10's deletion finished; step 11's did not
    before = journal.read_bytes()
    _save(run_dir, 10)  # saved again after a rewind; its journal lines are lost
    journal.write_bytes(before)
    assert (run_dir / "registry.json").read_bytes() == snapshot

    assert [c.step for c in CheckpointStore(run_dir, create=False).list()] == [*range(12, 30), 10]
    _save(run_dir, 30)
    assert not (run_dir / "checkpoints" / "step_000000011").exists()  # the killed deleter's work, finished
    assert _steps_seen(CheckpointStore(run_dir, create=False)) == [(s, s) for s in (*range(12, 30), 10, 30)]


def test_a_commit_line_with_a_refused_entry_hides_nothing(tmp_path: Path) -> None:
    # A journal line whose entry is refused (a damaged or crafted field): the directory's manifest is read.
    run_dir = tmp_path / "run"
    _history(run_dir)
    entry = json.loads((run_dir / "checkpoints" / "step_000000029" / "manifest.json").read_text())
    entry["step"] = "twenty-nine"
    with (run_dir / "registry.journal").open("ab") as out:
        out.write(json.dumps({"op": "commit", "checkpoint": entry}).encode() + b"\n")
    with pytest.warns(HpcckptWarning, match="step_000000029.*reading its manifest instead"):
        assert CheckpointStore(run_dir, create=False).latest().step == 29  # type: ignore[union-attr]
    with pytest.warns(HpcckptWarning, match="reading its manifest instead"):
        _save(run_dir, 30)
    assert (run_dir / "checkpoints" / "step_000000029").is_dir()
    with pytest.warns(HpcckptWarning, match="reading its manifest instead"):
        assert [c.step for c in CheckpointStore(run_dir, create=False).list()] == list(range(10, 31))


class _FillingDisk:
    """``os.write`` as a filling disk does it: the first write of a journal commit line writes half its bytes;
    with ``full`` set, every write after that fails with ENOSPC until ``full`` is cleared."""

    def __init__(self, *, full: bool) -> None:
        self.real = os.write
        self.full = full
        self.cut = False

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        if not self.cut and b'"op":"commit"' in bytes(data):
            self.cut = True
            return self.real(fd, bytes(data)[: len(data) // 2])
        if self.cut and self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


def test_a_journal_append_cut_short_is_written_whole_and_keeps_the_other_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    _history(run_dir)
    _save(run_dir, 30)  # another writer's records, in the journal
    before = (run_dir / "registry.journal").read_bytes()
    assert ("commit", "step_000000030") in _ops(run_dir)
    store = CheckpointStore(run_dir, keep_last=21)
    disk = _FillingDisk(full=False)
    monkeypatch.setattr(registry.os, "write", disk)
    store.save(store_workers.payload(31, 4), step=31)  # its commit line is cut short; retention deletes step 10
    monkeypatch.undo()
    assert disk.cut
    assert (run_dir / "registry.journal").read_bytes().startswith(before)  # nothing dropped
    assert _ops(run_dir)[-2:] == [("commit", "step_000000031"), ("delete", "step_000000010")]
    assert [c.step for c in CheckpointStore(run_dir, create=False).list()] == list(range(11, 32))


def test_a_journal_append_on_a_full_disk_is_cut_back_and_the_next_append_keeps_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    _history(run_dir)
    _save(run_dir, 30)
    before = (run_dir / "registry.journal").read_bytes()
    store = CheckpointStore(run_dir, keep_last=21)
    disk = _FillingDisk(full=True)
    monkeypatch.setattr(registry.os, "write", disk)
    with pytest.warns(HpcckptWarning, match="step_000000031 is committed, but updating the registry after it failed"):
        store.save(store_workers.payload(31, 4), step=31)
    disk.full = False  # space freed
    assert disk.cut
    assert b'"op":"commit","checkpoint":{"name":"step_000000031"' not in (run_dir / "registry.journal").read_bytes()
    store.save(store_workers.payload(32, 4), step=32)
    monkeypatch.undo()
    after = (run_dir / "registry.journal").read_bytes()
    assert after.startswith(before)
    for line in after.splitlines():
        json.loads(line)  # no half line left behind
    assert [c.step for c in CheckpointStore(run_dir, create=False).list()] == list(range(11, 33))
