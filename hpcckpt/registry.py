"""The file-locked registry of a run directory: which checkpoints are committed, and what happened.

Files in the run directory::

    registry.json     the index: every committed checkpoint (a cache, rebuilt from manifests when lost)
    events.jsonl      append-only log, one JSON object a line (commits, deletions, task starts and stops)
    .hpcckpt.lock     the lock guarding both
    checkpoints/      one directory per committed checkpoint, plus ``.tmp-*`` ones being written

The files are the truth: a checkpoint directory with a final name and a valid manifest is committed
(the rename is the commit point), whether or not the index lists it yet. Readers compare the index with
the directory listing and reconcile under the lock when they differ, so a writer killed between its
rename and its index update still leaves its checkpoint visible.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .checkpoint import Checkpoint, read_manifest
from .errors import CorruptCheckpointError, StoreError, UsageError
from .fileio import write_atomic

INDEX = "registry.json"
EVENTS = "events.jsonl"
LOCK = ".hpcckpt.lock"
CHECKPOINTS = "checkpoints"
INDEX_VERSION = 1
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# A temporary directory from another host cannot be checked for a live owner; after this long it is stale.
FOREIGN_TMP_STALE_SECONDS = 24 * 3600

LockMode = Literal["auto", "fcntl", "soft"]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class HpcckptWarning(UserWarning):
    """Something was repaired or skipped; training goes on."""


def warn(message: str) -> None:
    warnings.warn(message, HpcckptWarning, stacklevel=3)


class Registry:
    """The index and event log of one run directory, guarded by a file lock."""

    def __init__(self, run_dir: Path, *, lock: LockMode = "auto", lock_timeout: float = 300.0) -> None:
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / CHECKPOINTS
        self.index_path = run_dir / INDEX
        self.events_path = run_dir / EVENTS
        self.lock_timeout = lock_timeout
        self._lock = _make_lock(run_dir / LOCK, lock, lock_timeout)
        self._host = socket.gethostname()
        # The parsed index, reused while the index file is unchanged (same inode, size and mtime), and each
        # entry's JSON text: parsing or encoding a thousand entries costs milliseconds per lookup or commit.
        self._index_cache: tuple[tuple[int, ...], list[Checkpoint]] | None = None
        self._encoded: dict[str, str] = {}
        # The checkpoint directory's signature when it last agreed with the cached index.
        self._agreed: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    # -- locking ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        import filelock

        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreError(
                f"could not lock {self._lock.lock_file} within {self.lock_timeout:g} s: another process holds "
                "it. If none does (a crash on a filesystem without fcntl locks), delete that file"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    # -- reading ------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, oldest first (by step, then creation time)."""
        index_sig, dir_sig = _signature(self.index_path), _signature(self.checkpoint_dir)
        if self._agreed == (index_sig, dir_sig) and self._index_cache is not None:
            return list(self._index_cache[1])
        entries = self._read_index()
        names = self._names_on_disk()
        if entries is None and not names and not index_sig:
            return []  # a run with nothing saved yet: no need to wait for the lock
        if entries is not None and {c.name for c in entries} == names:
            self._agreed = (index_sig, dir_sig)
            return entries
        with self.locked():
            return self._reconciled()

    def resolve(self, name: str) -> Path:
        """The directory of checkpoint ``name``, refusing any name that would lead outside the run directory.

        A plain name (no separator, no leading dot) cannot leave ``checkpoints/``; symbolic links there are
        refused when the directory is listed (:meth:`_names_on_disk`).
        """
        if not _NAME.match(name):
            raise StoreError(
                f"registry entry {name!r} in {self.index_path} is refused: it points outside "
                f"{self.checkpoint_dir}; expected a plain directory name like 'step_000001200'"
            )
        return self.checkpoint_dir / name

    def events(self) -> list[dict[str, Any]]:
        """Every event, oldest first. A line torn by a crash is skipped."""
        try:
            text = self.events_path.read_text()
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    def status(self) -> dict[str, Any] | None:
        """The last run-state event (``complete`` or ``failed``), or None while the run is open."""
        for event in reversed(self.events()):
            if event.get("event") in ("complete", "failed", "reopen"):
                return None if event["event"] == "reopen" else event
        return None

    # -- writing ------------------------------------------------------------------------------------------
    def commit(
        self,
        publish: Callable[[], Checkpoint],
        select_deletions: Callable[[list[Checkpoint]], list[Checkpoint]],
    ) -> tuple[Checkpoint, list[Checkpoint]]:
        """Under the lock: ``publish()`` renames a written checkpoint into place (the commit point) and
        returns it; then it is recorded and retention applied. Returns it and what retention deleted.

        Once ``publish`` has returned the checkpoint is committed: a failure to update the index or the
        log afterwards (a full disk) is only warned about, since both are rebuilt from the files.
        """
        with self.locked():
            checkpoint = publish()
            doomed: list[Checkpoint] = []
            trashed: list[Path] = []
            try:
                entries = [c for c in self._reconciled(committing=checkpoint.name) if c.name != checkpoint.name]
                entries = _ordered([*entries, checkpoint])
                doomed = [c for c in select_deletions(entries) if c.name != checkpoint.name]
                doomed_names = {c.name for c in doomed}
                # The index drops the doomed first; a crash before they are moved away leaves them on disk,
                # where the next reader adopts them again: nothing is ever listed that is not there.
                self._write_index([c for c in entries if c.name not in doomed_names])
                self._append([{"event": "commit", **checkpoint.summary()}])
                if doomed:
                    self._append(
                        [{"event": "delete", "name": c.name, "step": c.step, "why": "retention"} for c in doomed]
                    )
                trashed = [trash for c in doomed if (trash := self._trash(c)) is not None]
            except OSError as error:
                warn(
                    f"checkpoint {checkpoint.name} is committed, but the registry could not record it ({error}); "
                    "it is rebuilt from the checkpoint files when read"
                )
        for trash in trashed:  # outside the lock: the directories are already out of sight
            shutil.rmtree(trash, ignore_errors=True)
        return checkpoint, doomed

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (task start, stop, completion...) to the log, durably."""
        entry = {"event": event, **fields}
        with self.locked():
            self._append([entry], durable=True)
        return entry

    def clean_temporaries(self) -> list[Path]:
        """Remove ``.tmp-*`` directories whose writer is gone, and leftover ``.trash-*`` ones."""
        removed = []
        try:
            children = list(self.checkpoint_dir.iterdir())
        except FileNotFoundError:
            return []
        for child in children:
            if child.name.startswith(TRASH_PREFIX) or (
                child.name.startswith(TMP_PREFIX) and not self._owner_alive(child)
            ):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed

    def temporary_name(self, step: int, token: str) -> str:
        return f"{TMP_PREFIX}{step:09d}-{self._host}-{os.getpid()}-{token}"

    # -- internals ----------------------------------------------------------------------------------------
    def _owner_alive(self, tmp: Path) -> bool:
        # .tmp-<step>-<host>-<pid>-<token>; hosts may contain '-', so split from the right.
        parts = tmp.name[len(TMP_PREFIX) :].split("-")
        try:
            host, pid = "-".join(parts[1:-2]), int(parts[-2])
        except (IndexError, ValueError):
            return False
        if host == self._host:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        try:
            return time.time() - tmp.stat().st_mtime < FOREIGN_TMP_STALE_SECONDS
        except FileNotFoundError:
            return False

    def _names_on_disk(self) -> set[str]:
        names: set[str] = set()
        try:
            entries = list(os.scandir(self.checkpoint_dir))
        except FileNotFoundError:
            return names
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                raise StoreError(
                    f"{entry.path} is refused: a symbolic link in {self.checkpoint_dir} may lead outside the "
                    "run directory; checkpoints are plain directories"
                )
            if entry.is_dir(follow_symlinks=False):
                names.add(entry.name)
        return names

    def _read_index(self) -> list[Checkpoint] | None:
        """The indexed checkpoints, or None when the index is missing or unusable."""
        signature = _signature(self.index_path)
        if self._index_cache is not None and self._index_cache[0] == signature:
            return list(self._index_cache[1])
        try:
            data = json.loads(self.index_path.read_bytes())
            if not isinstance(data, dict) or data.get("hpcckpt_registry") != INDEX_VERSION:
                return None
            entries = [Checkpoint.from_dict(e, self.resolve(str(e["name"]))) for e in data["checkpoints"]]
        except (OSError, ValueError, KeyError, TypeError, CorruptCheckpointError):
            return None
        self._index_cache = (signature, entries)
        return list(entries)

    def _reconciled(self, committing: str | None = None) -> list[Checkpoint]:
        """Under the lock: the index made to agree with the checkpoint directories (files win).
        ``committing`` is a checkpoint being committed right now, not to be reported as unexpected."""
        on_disk = self._names_on_disk() - {committing}
        indexed = self._read_index()
        if indexed is None:
            if on_disk or self.index_path.exists():
                warn(f"registry index {self.index_path} is missing or corrupt; rebuilding it from the manifests")
            indexed = []
        by_name = {c.name: c for c in indexed}
        changed = False
        for gone in sorted(set(by_name) - on_disk):
            warn(f"checkpoint {gone} is listed in {self.index_path} but gone from disk; dropping it")
            del by_name[gone]
            changed = True
        for orphan in sorted(on_disk - set(by_name)):
            try:
                by_name[orphan] = read_manifest(self.resolve(orphan))
                changed = True
            except CorruptCheckpointError as error:
                warn(f"skipping {self.checkpoint_dir / orphan}: {error}")
        entries = _ordered(list(by_name.values()))
        if changed or not self.index_path.exists():
            self._write_index(entries)
        return entries

    def _trash(self, victim: Checkpoint) -> Path | None:
        """Move a checkpoint out of sight in one rename, so no half-deleted directory looks committed."""
        trash = self.checkpoint_dir / f"{TRASH_PREFIX}{victim.name}-{os.getpid()}"
        try:
            os.rename(victim.path, trash)
        except FileNotFoundError:
            return None
        return trash

    def _write_index(self, entries: Sequence[Checkpoint]) -> None:
        encoded = {c.name: self._encoded.get(c.name) or json.dumps(c.summary(), separators=(",", ":")) for c in entries}
        self._encoded = encoded
        header = f'"hpcckpt_registry":{INDEX_VERSION},"updated":{time.time()}'
        text = f'{{{header},"checkpoints":[{",".join(encoded.values())}]}}'
        # Atomic but not fsynced: the index is a cache of the manifests (each checkpoint is durable on its
        # own), so after a power loss it is at worst stale or unreadable, and then rebuilt.
        write_atomic(self.index_path, text.encode(), durable=False)
        self._index_cache = (_signature(self.index_path), list(entries))

    def _append(self, events: Sequence[Mapping[str, Any]], *, durable: bool = False) -> None:
        """Append events. Commit and delete events need no fsync of their own: the checkpoint they
        describe is durable by itself, and its manifest says the same; run-state events pass durable."""
        now = time.time()
        lines = "".join(json.dumps({"time": now, **e}, separators=(",", ":")) + "\n" for e in events)
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:  # a crash may have torn the last line: start ours on a fresh one
                with open(self.events_path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        lines = "\n" + lines
            os.write(fd, lines.encode())
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)


def _signature(path: Path) -> tuple[int, ...]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _ordered(entries: list[Checkpoint]) -> list[Checkpoint]:
    return sorted(entries, key=lambda c: (c.step, c.created, c.name))


def _make_lock(path: Path, mode: LockMode, timeout: float) -> Any:
    import filelock

    mode = os.environ.get("HPCCKPT_LOCK", mode)  # type: ignore[assignment]
    if mode == "soft":
        # For filesystems without working fcntl locks. filelock's marker names host and pid, and a marker
        # left by a dead process on the same host is broken by the next contender.
        return filelock.SoftFileLock(path, timeout=timeout)
    if mode in ("auto", "fcntl"):
        # auto: fcntl, falling back to the soft marker where the filesystem refuses fcntl locks.
        return filelock.FileLock(path, timeout=timeout, fallback_to_soft=mode == "auto")
    raise UsageError(f"Invalid lock mode {mode!r} (argument or HPCCKPT_LOCK): expected 'auto', 'fcntl' or 'soft'")
