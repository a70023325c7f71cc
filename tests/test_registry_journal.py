"""The registry's snapshot and journal (issue 13): readers read only what was appended, the files stay the truth.

Each test works on a real run directory; faults are what a crash or an older hpcckpt leaves on disk (a journal
line never written, half a line, an index of version 1, a link planted in place of the journal).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import store_workers
from paths import WORKERS

from hpcckpt import CheckpointStore, StoreError
from hpcckpt.store.registry import HpcckptWarning

SAVE_ONE = "import store_workers, sys; store_workers.save_steps(sys.argv[1], [int(sys.argv[2])], 4)"


def _save(run_dir: Path, *steps: int) -> CheckpointStore:
    store = CheckpointStore(run_dir, keep_last=None)
    for step in steps:
        store.save(store_workers.payload(step, 4), step=step)
    return store


def _save_in_another_process(run_dir: Path, step: int) -> None:
    subprocess.run(
        [sys.executable, "-c", SAVE_ONE, str(run_dir), str(step)],
        cwd=WORKERS,
        check=True,
        timeout=240,
    )


def _journal_lines(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "registry.journal").read_bytes().splitlines()]


def _recorded(run_dir: Path) -> list[str]:
    """The checkpoints the registry files name, read as a reader replays them: snapshot, then journal."""
    names = _indexed(run_dir)
    for record in _journal_lines(run_dir)[1:]:
        if record["op"] == "commit":
            names.append(record["checkpoint"]["name"])  # type: ignore[index]
        elif record["op"] == "delete":
            names.remove(record["name"])  # type: ignore[arg-type]
    return names


def _indexed(run_dir: Path) -> list[str]:
    return [e["name"] for e in json.loads((run_dir / "registry.json").read_text())["checkpoints"]]


def test_a_reader_sees_another_process_s_commit_from_the_journal_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    reader = _save(run_dir, *range(1, 13))  # twelve entries: one more line is no reason to compact
    assert reader.latest().step == 12  # type: ignore[union-attr]
    snapshot = (run_dir / "registry.json").read_bytes()
    _save_in_another_process(run_dir, 13)
    assert reader.latest().step == 13  # type: ignore[union-attr]
    assert [c.step for c in reader.list()] == list(range(1, 14))
    assert (run_dir / "registry.json").read_bytes() == snapshot  # the commit appended; nothing was rewritten
    records = _journal_lines(run_dir)[1:]
    assert records[-1]["op"] == "commit" and records[-1]["checkpoint"]["name"] == "step_000000013"  # type: ignore[index]


def test_a_commit_the_journal_never_recorded_is_adopted_from_its_manifest(tmp_path: Path) -> None:
    # A writer killed between its rename (the commit point) and its journal line.
    run_dir = tmp_path / "run"
    store = _save(run_dir, *range(1, 13))
    journal = run_dir / "registry.journal"
    before = journal.read_bytes()
    warm = CheckpointStore(run_dir, create=False)
    assert warm.latest().step == 12  # type: ignore[union-attr]
    _save(run_dir, 13)
    journal.write_bytes(before)  # the line for step 13 was never written
    deadline = time.monotonic() + 60  # a reader that listed checkpoints/ a moment ago lists it again soon
    while warm.latest().step != 13:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert CheckpointStore(run_dir, create=False).latest().step == 13  # type: ignore[union-attr]
    assert "step_000000013" not in _recorded(run_dir)
    store.save(store_workers.payload(14, 4), step=14)  # the next writer records what it found
    assert _recorded(run_dir)[-2:] == ["step_000000013", "step_000000014"]
    assert [c.seq for c in CheckpointStore(run_dir, create=False).list()] == list(range(1, 15))


def test_a_torn_journal_line_is_skipped_and_the_next_commit_starts_a_fresh_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = _save(run_dir, *range(1, 13))
    with (run_dir / "registry.journal").open("ab") as journal:
        journal.write(b'{"op":"commit","checkpoint":{"name":"step_0000')  # a crash in the middle of a line
    warm = CheckpointStore(run_dir, create=False)
    assert warm.latest().step == 12  # type: ignore[union-attr]
    store.save(store_workers.payload(13, 4), step=13)
    assert warm.latest().step == 13  # type: ignore[union-attr]
    fresh = CheckpointStore(run_dir, create=False)
    assert [c.step for c in fresh.list()] == list(range(1, 14))
    lines = (run_dir / "registry.journal").read_bytes().splitlines()
    assert lines.count(b'{"op":"commit","checkpoint":{"name":"step_0000') == 1  # left as it was, skipped
    assert json.loads(lines[-1])["checkpoint"]["name"] == "step_000000013"  # on a line of its own


def test_the_journal_is_compacted_into_the_snapshot_once_it_outgrows_a_quarter_of_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = _save(run_dir, *range(1, 9))
    warm = CheckpointStore(run_dir, create=False)
    assert len(warm.list()) == 8
    sizes = []
    for step in range(9, 25):
        store.save(store_workers.payload(step, 4), step=step)
        sizes.append(len(_journal_lines(run_dir)))
        assert [c.step for c in warm.list()] == list(range(1, step + 1))
    assert 1 in sizes  # compacted at least once: only the header left
    assert max(sizes) <= 1 + 24 // 4 + 1  # never more than a quarter of the snapshot (and the line that tipped it)
    assert _indexed(run_dir)[: 24 - (sizes[-1] - 1)] == [f"step_{s:09d}" for s in range(1, 25 - (sizes[-1] - 1))]


def test_registry_files_lost_or_corrupt_are_rebuilt_from_the_manifests_in_commit_order(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = _save(run_dir, 5, 3, 9)  # a rewind: the latest is the last committed, not the highest step
    (run_dir / "registry.journal").unlink()
    (run_dir / "registry.json").write_text('{"hpcckpt_registry": 2, "generation": 7')
    with pytest.warns(HpcckptWarning, match="missing or corrupt; rebuilding it from the manifests"):
        assert [(c.step, c.seq) for c in CheckpointStore(run_dir, create=False).list()] == [(5, 1), (3, 2), (9, 3)]
    assert _indexed(run_dir) == ["step_000000005", "step_000000003", "step_000000009"]
    assert len(_journal_lines(run_dir)) == 1  # a fresh journal of the new snapshot
    store.save(store_workers.payload(1, 4), step=1)
    assert [c.step for c in CheckpointStore(run_dir, create=False).list()] == [5, 3, 9, 1]


def test_a_version_1_index_is_read_and_migrated_by_the_next_writer(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _save(run_dir, 1, 2)
    entries = json.loads((run_dir / "registry.json").read_text())["checkpoints"]
    # As hpcckpt 0.1 left it: one index, no generation; a journal of some other snapshot is stale.
    (run_dir / "registry.json").write_text(json.dumps({"hpcckpt_registry": 1, "updated": 0, "checkpoints": entries}))
    (run_dir / "registry.journal").write_text(
        '{"hpcckpt_journal": 1, "generation": "0123"}\n{"op": "delete", "name": "step_000000002"}\n'
    )
    old = CheckpointStore(run_dir, create=False, keep_last=None)
    assert [c.step for c in old.list()] == [1, 2]
    old.save(store_workers.payload(3, 4), step=3)
    index = json.loads((run_dir / "registry.json").read_text())
    assert index["hpcckpt_registry"] == 2
    assert _journal_lines(run_dir)[0]["generation"] == index["generation"]
    assert [c.step for c in CheckpointStore(run_dir, create=False).list()] == [1, 2, 3]


def test_a_symlinked_journal_is_refused_and_its_target_unchanged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _save(run_dir, 1)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious\n")
    journal = run_dir / "registry.journal"
    journal.unlink()
    journal.symlink_to(target)
    with pytest.raises(StoreError, match=r"registry\.journal is a symbolic link, refused"):
        CheckpointStore(run_dir, create=False).list()
    with pytest.raises(StoreError, match=r"registry\.journal is a symbolic link, refused"):
        CheckpointStore(run_dir, create=False).save(store_workers.payload(2, 4), step=2)
    assert target.read_bytes() == b"precious\n" and journal.is_symlink()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000000001"]


def test_a_checkpoint_deleted_by_retention_is_not_reported_gone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir, keep_last=2)
    reader = CheckpointStore(run_dir, create=False)
    for step in range(1, 8):
        store.save(store_workers.payload(step, 4), step=step)
        assert [c.step for c in reader.list()] == list(range(max(1, step - 1), step + 1))  # and no warning
