"""The file-locked registry of a run directory: which checkpoints are committed, and what happened.

It owns four of the run directory's files (their names are :mod:`hpcckpt.rundir`'s): the index
(``registry.json``, a compacted snapshot) and the journal (``registry.journal``, what was committed and
deleted since, one line each; :mod:`.journal`), both caches rebuilt from the manifests when lost; the event log
(``events.jsonl``, :mod:`hpcckpt.events`); and the lock guarding them (:mod:`.runlock`). ``checkpoints/``
holds one directory per committed checkpoint, plus ``.tmp-*`` ones being written.

The files are the truth: a checkpoint directory with a final name and a valid manifest is committed
(the rename is the commit point), whether or not the journal lists it yet. Readers compare what they parsed
with the directory listing, without the lock: a directory the journal does not list is read from its
manifest, a listed one gone from disk is dropped, so a writer killed between its rename and its journal line
still leaves its checkpoint visible. The next writer records what it finds so (under the lock).

Cost (issue 13): a commit appends a line; a reader keeps what it parsed and reads only what was appended since,
and lists ``checkpoints/`` again only when that directory changed. Neither grows with the history (at 1,000
checkpoints and 8 writers, rewriting one index per commit took 1.6 s).

Checkpoints are ordered by their commit sequence number (``seq``), kept in each one's manifest (so a rebuilt
index has it too); the latest is the one with the highest. A writer reserves its number under the lock before
it writes its manifest (:meth:`Registry.reserve`), and renames its directory into place under the lock later
(:meth:`Registry.commit`). What is guaranteed: numbers are handed out in increasing order, each once; the
saves of one writer rank in the order it made them, also after a deliberate rewind to an earlier step; the
clocks of the saving hosts never matter (issue 11: one node an hour ahead made every later task resume from
its old checkpoint). Not guaranteed: that the latest is the last renamed. Two writers whose saves overlap may
commit in the other order than they reserved; the latest is then the one that reserved last. Checkpoints
written before hpcckpt numbered commits have no ``seq``: they come first, by step, then time saved.

A checkpoint that failed validation after a restore is marked bad (:meth:`Registry.mark_bad`): a journal
record naming the instance, kept in the snapshot while the checkpoint is listed. A bad checkpoint stays on disk
for inspection; :meth:`Registry.checkpoints` leaves it out (so latest, best and restore never choose it again),
retention neither counts nor deletes it, and ``checkpoints(include_bad=True)`` lists it (``hpcckpt ls``,
``status``, ``show``). A checkpoint committed again under its name is another instance: not bad.

A journal delete names the instance it deleted (its ``seq`` and time saved), so a checkpoint committed again
under a deleted name is never hidden or deleted for it, even when its own journal line never landed.

The registry reads no environment variable: its lock mode is an argument (entry points turn
``HPCCKPT_LOCK`` into one with :func:`lock_mode`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .. import events as event_log
from ..errors import CorruptCheckpointError, StoreError, UsageError

# The run directory's names, declared in hpcckpt.rundir; re-exported for the store's modules.
from ..rundir import CHECKPOINTS as CHECKPOINTS
from ..rundir import EVENTS as EVENTS
from ..rundir import INDEX as INDEX
from ..rundir import JOURNAL as JOURNAL
from ..rundir import LOCK as LOCK
from ..rundir import SOFT_LOCK as SOFT_LOCK
from .fileio import fsync_dir, link_refused, open_nofollow, read_nofollow, write_atomic
from .journal import (
    COMPACT_FRACTION,
    BadMark,
    BadSnapshotError,
    Instance,
    Record,
    bad_record,
    bad_record_of,
    commit_record,
    complete_lines,
    delete_record,
    encode_records,
    encode_snapshot,
    header_generation,
    journal_header,
    new_generation,
    parse_records,
    parse_snapshot,
)
from .journal import INDEX_VERSION as INDEX_VERSION
from .manifest import PLAIN_NAME, Checkpoint, read_manifest
from .runlock import LockTimeoutError, RunLock

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# A temporary directory before its writer holds the lock on its owner file: judged by host and pid only.
CLAIM_PREFIX = ".claim-"
OWNER = ".owner"  # inside a temporary checkpoint: locked by its writer for as long as it writes
PROBE_PREFIX = ".bandwidth-probe-"  # budget.measure_write_bandwidth's file, locked while it is written
# A probe file named by hpcckpt before its probes were locked (``.bandwidth-probe-<pid>``): a probe takes
# seconds, so one older than this is a leftover.
LEGACY_PROBE_STALE_SECONDS = 3600.0
# Where a writer's liveness cannot be checked (no fcntl locks), another host's temporary directory counts
# as abandoned after this long.
FOREIGN_TMP_STALE_SECONDS = 6 * 3600
# A soft-lock marker older than this is broken: a registry update holds the lock for milliseconds, and a
# holder killed on another node could otherwise block the run for ever.
SOFT_LOCK_LIFETIME = 120.0
# A directory changed this shortly before it was listed may change again with the same time stamp (file
# times tick with the kernel's coarse clock, and NFS servers round them): listed again on the next lookup.
RACY_SECONDS = 2.0
# A reader lists checkpoints/ at most this often while it keeps changing (see Registry._scan).
SCAN_INTERVAL = 0.5

LockMode = Literal["auto", "fcntl", "soft"]


class LockUnavailableError(StoreError):
    """The registry's lock file cannot even be opened (a read-only run directory, permissions)."""


class HpcckptWarning(UserWarning):
    """Something was repaired or skipped; training goes on."""


def warn(message: str) -> None:
    warnings.warn(message, HpcckptWarning, stacklevel=3)


class _View:
    """What one Registry has parsed: the snapshot, the journal up to an offset, the last directory scan.
    Guarded by the Registry's thread lock."""

    def __init__(self) -> None:
        self.snapshot_sig: tuple[int, ...] = ()
        self.snapshot_size = 0
        self.generation: str | None = None  # None: a version-1 index (its journal, if any, is not ours)
        self.base: dict[str, Checkpoint] = {}
        self.base_reserved = 0
        self.base_bad: dict[str, BadMark] = {}
        self.bad: dict[str, BadMark] = {}  # the snapshot's bad marks plus the journal's
        self.reserved = 0  # the highest commit sequence number handed out
        self.logged: dict[str, Checkpoint] = {}  # the snapshot plus the journal's records
        # Deleted by a journal record, and which instance of the name (maybe still on disk for a moment; a
        # directory of that name that is another instance was committed again since: adopted).
        self.deleted: dict[str, Instance] = {}
        self.journal_ino: int | None = None
        self.journal_offset = 0
        self.journal_ours = False  # its header names the snapshot's generation
        self.scan_sig: tuple[int, ...] = ()
        self.scan_time = 0.0
        self.scan_clock = 0.0  # time.monotonic() of the last listing
        self.rescan = True  # what was parsed started over: list the directory again before trusting it
        self.scan: dict[str, int] | None = None  # name -> inode of each checkpoint directory
        self.listed_key: tuple[Any, ...] | None = None
        self.listed: list[Checkpoint] = []

    def restart_journal(self, ino: int | None) -> None:
        self.logged, self.deleted, self.reserved = dict(self.base), {}, self.base_reserved
        self.bad = dict(self.base_bad)
        self.rescan = True
        self.journal_ino, self.journal_offset, self.journal_ours = ino, 0, False

    def next_seq(self) -> int:
        return 1 + max(self.reserved, max((c.seq for c in self.logged.values() if c.seq is not None), default=0))

    def commit(self, name: str, checkpoint: Checkpoint | None) -> None:
        """A commit record; ``checkpoint`` None when its entry was refused (the directory scan adopts the
        checkpoint from its manifest instead: a bad journal line never hides a checkpoint)."""
        self.deleted.pop(name, None)
        if checkpoint is None:
            self.logged.pop(name, None)
        else:
            self.logged[name] = checkpoint

    def delete(self, name: str, instance: Instance | None) -> None:
        """A delete record. One without its instance (written before deletes named it) deletes the entry
        listed under that name before it, or, when none was, nothing."""
        prior = self.logged.pop(name, None)
        if instance is None and prior is not None:
            instance = Instance.of(prior)
        if instance is not None:
            self.deleted[name] = instance


class Registry:
    """The index and event log of one run directory, guarded by a file lock."""

    def __init__(self, run_dir: Path, *, lock: LockMode = "auto", lock_timeout: float = 300.0) -> None:
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / CHECKPOINTS
        self.index_path = run_dir / INDEX
        self.journal_path = run_dir / JOURNAL
        self.events_path = run_dir / EVENTS
        self.lock_timeout = lock_timeout
        self._lock = _make_lock(run_dir, lock, lock_timeout)
        self.host = host_identity()
        # The in-process state below is shared by the threads of this process (an async save's background
        # thread commits while the main thread lists): guarded by _mutex, always taken after the file lock.
        self._mutex = threading.Lock()
        self._view = _View()
        self._encoded: dict[str, tuple[str, float, int | None, str]] = {}  # each entry's JSON, for compaction
        # Each entry's JSON text and the record built (and checked) from it: a snapshot written by another
        # process holds the entries this one already read from the journal, so re-reading it parses nothing.
        self._parsed: dict[bytes, Checkpoint] = {}
        self._manifests: dict[tuple[str, int], Checkpoint] = {}  # directories adopted from their manifests
        self._ignored: set[str] = set()  # directories already warned about
        self._warned: set[str] = set()  # journal entries and vanished checkpoints already warned about
        self._refused_index: bytes | None = None  # an index just refused (and warned about)

    @property
    def longest_lock_wait(self) -> float:
        """The longest this registry waited for its lock, in seconds (the benchmark reports it)."""
        return float(self._lock.longest_wait)

    # -- locking ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if os.path.islink(self._lock.lock_file):
            # Refused, not waited for: a soft lock would take a link for a marker held by someone else.
            raise link_refused(self._lock.lock_file)
        try:
            self._lock.acquire()
        except LockTimeoutError:
            raise StoreError(
                f"could not lock {self._lock.lock_file} within {self.lock_timeout:g} s: another process holds "
                "it. If none does (a crash on a filesystem without fcntl locks), delete that file"
            ) from None
        except OSError as error:
            if os.path.islink(self._lock.lock_file):  # opened with O_NOFOLLOW: ELOOP
                raise link_refused(self._lock.lock_file) from None
            raise LockUnavailableError(f"cannot lock {self._lock.lock_file}: {error.strerror or error}") from None
        try:
            yield
        finally:
            self._lock.release()

    # -- reading ------------------------------------------------------------------------------------------
    def checkpoints(self, *, include_bad: bool = False) -> list[Checkpoint]:
        """Committed checkpoints, oldest first (by commit sequence number), without those marked bad unless
        ``include_bad``. Without the lock, from what this registry parsed before plus what was appended
        since; the directory listing wins."""
        listed = self._all_checkpoints()
        if include_bad:
            return listed
        with self._mutex:
            return [c for c in listed if self._mark(c) is None]

    def bad_reason(self, checkpoint: Checkpoint) -> str | None:
        """Why ``checkpoint`` was marked bad, as of the last listing; None when it is not."""
        with self._mutex:
            mark = self._mark(checkpoint)
        return None if mark is None else mark.reason

    def _mark(self, checkpoint: Checkpoint) -> BadMark | None:
        mark = self._view.bad.get(checkpoint.name)
        return mark if mark is not None and mark.instance.matches(checkpoint) else None

    def _all_checkpoints(self) -> list[Checkpoint]:
        with self._mutex:
            scan = self._scan()  # before the journal: a checkpoint deleted since is then already recorded
            if self._load_snapshot():
                self._read_journal()
                if self._view.rescan:
                    scan = self._scan(fresh=True)
                return self._listing(scan)
            if not scan and not os.path.lexists(self.index_path):
                return []  # a run with nothing saved yet: no need to wait for the lock
        try:
            with self.locked(), self._mutex:
                return self._reconciled()
        except LockUnavailableError:
            # A read-only run directory (another user's, a read-only mount): reconcile in memory only.
            with self._mutex:
                return self._reconciled(write=False)

    def resolve(self, name: str) -> Path:
        """The directory of checkpoint ``name``; a name that could lead elsewhere raises :class:`StoreError`."""
        if not PLAIN_NAME.match(name):
            raise StoreError(
                f"registry entry {name!r} in {self.index_path} is refused: it points outside "
                f"{self.checkpoint_dir}; expected a plain directory name like 'step_000001200'"
            )
        return self.checkpoint_dir / name

    def events(self) -> list[dict[str, Any]]:
        """Every event, oldest first. A line torn by a crash is skipped; a field of the wrong kind is
        dropped from its event with a warning naming the line and the field (see :func:`events.parse`)."""
        try:
            text = read_nofollow(self.events_path).decode(errors="replace")
        except FileNotFoundError:
            return []
        events, problems = event_log.parse(text, str(self.events_path))
        for problem in problems:
            warn(problem)
        return events

    def status(self) -> dict[str, Any] | None:
        """The last run-state event (``complete`` or ``failed``), or None while the run is open."""
        return event_log.last_status(self.events())

    # -- writing ------------------------------------------------------------------------------------------
    def mark_bad(self, checkpoint: Checkpoint, reason: str) -> None:
        """Record durably that ``checkpoint`` failed validation after it was restored, and why: a journal
        record and a ``bad`` event. It stays on disk; no listing without ``include_bad`` shows it again, in
        any process. Raises :class:`StoreError` when the run directory cannot be written."""
        record = bad_record(checkpoint, reason)
        with self.locked():
            if os.path.islink(self.journal_path):
                raise link_refused(self.journal_path)
            with self._mutex:
                # Reconciled first (a checkpoint adopted from its manifest gets its journal line), so that the
                # next compaction, which keeps the marks of the checkpoints it lists, keeps this one.
                self._reconciled()
                try:
                    self._journal([record])
                    self._compact_if_due()
                except OSError as error:
                    raise StoreError(
                        f"could not mark checkpoint {checkpoint.name} bad in {self.journal_path}: "
                        f"{error.strerror or error}"
                    ) from None
            try:  # the event too (a quota hit on the event log, EDQUOT): one StoreError, never a raw OSError
                self._append(
                    [
                        event_log.marked_bad(
                            checkpoint.name, checkpoint.step, checkpoint.seq, checkpoint.created, record.reason
                        )
                    ],
                    durable=True,
                )
            except OSError as error:
                raise StoreError(
                    f"checkpoint {checkpoint.name} is marked bad in {self.journal_path}, but its event could not be "
                    f"added to {self.events_path}: {error.strerror or error}"
                ) from None

    def reserve(self) -> int:
        """A commit sequence number for a checkpoint about to be committed, recorded so that no other writer
        gets it: the writer writes its manifest with it (durably) before it takes the lock to commit, so
        that no fsync happens under the lock (issue 13: with 8 writers, commits queued behind each other's
        fsyncs). Numbers are handed out in order; one whose writer fails is never used. Also above the
        number of any checkpoint on disk that the journal lost (a power loss takes unsynced lines with it)."""
        with self._mutex:  # before the lock: listing a thousand directories takes milliseconds
            on_disk: list[Checkpoint] = []
            scan = self._scan()
            if self._load_snapshot():
                self._read_journal()
                on_disk = self._listing(scan)
            floor = 1 + max((c.seq for c in on_disk if c.seq is not None), default=0)
        with self.locked():
            if os.path.islink(self.journal_path):
                raise link_refused(self.journal_path)
            with self._mutex:
                if not (self._load_snapshot(fresh=True) and self._view.generation is not None):
                    self._reconciled()  # missing, unusable or of version 1: rebuilt or migrated first
                self._read_journal()
                seq = max(self._view.next_seq(), floor)
                self._journal([Record("reserve", seq=seq)])
        return seq

    def commit(
        self,
        publish: Callable[[int], Checkpoint],
        select_deletions: Callable[[list[Checkpoint]], list[Checkpoint]],
        *,
        seq: int | None = None,
    ) -> tuple[Checkpoint, list[Checkpoint]]:
        """Under the lock: ``publish(seq)`` writes the manifest with its commit sequence number ``seq`` (the
        one :meth:`reserve` gave, when passed; else the next) and renames a written checkpoint into place
        (the commit point), and returns it; then it is recorded and retention applied. Returns it and what
        retention deleted. Before anything is deleted the rename is made durable, so a power loss never
        keeps a deletion without the commit that allowed it.

        Once ``publish`` has returned the checkpoint is committed: a failure to update the index or the
        log afterwards (a full disk, a refused entry) is only warned about; the files are the truth.
        """
        with self._mutex:
            scan = dict(self._scan())  # before the lock: listing a thousand directories takes milliseconds
        with self.locked():
            for path in (self.index_path, self.journal_path, self.events_path):
                if os.path.islink(path):  # refused before anything is committed, not warned about after
                    raise link_refused(path)
            with self._mutex:
                before = self._reconciled(scan=scan)
                number = self._view.next_seq() if seq is None else seq
            checkpoint = publish(number)
            doomed: list[Checkpoint] = []
            trashed: list[Path] = []
            try:
                entries = _ordered([*(c for c in before if c.name != checkpoint.name), checkpoint])
                with self._mutex:  # a bad checkpoint is neither counted by retention nor deleted by it
                    entries = [c for c in entries if self._mark(c) is None]
                doomed = [c for c in select_deletions(entries) if c.name != checkpoint.name]
                # The journal records the deletions first; a crash before they are moved away leaves them on
                # disk, where the next writer finishes the deletion: nothing is listed that is not there.
                with self._mutex:
                    self._journal([commit_record(checkpoint.summary())])
                    if doomed:
                        self._journal([delete_record(c) for c in doomed])
                self._append([event_log.commit(checkpoint.summary())])
                if doomed:
                    self._append([event_log.delete(c.name, c.step) for c in doomed])
                    fsync_dir(self.checkpoint_dir)
                trashed = [trash for c in doomed if (trash := self._trash(c)) is not None]
                with self._mutex:
                    self._compact_if_due()
            except Exception as error:
                warn(
                    f"checkpoint {checkpoint.name} is committed, but updating the registry after it failed "
                    f"({type(error).__name__}: {error}); readers adopt it from its files"
                )
        for trash in trashed:  # outside the lock: the directories are already out of sight
            shutil.rmtree(trash, ignore_errors=True)
        return checkpoint, doomed

    def record(self, event: event_log.Kind, **fields: Any) -> dict[str, Any]:
        """Append one event of kind ``event`` (``Run``'s start, stop, completion...) to the log, durably."""
        return self.append_event({"event": event, **fields})

    def append_event(self, entry: event_log.Event) -> event_log.Event:
        """Append one event built by :mod:`hpcckpt.events` (a task's begin and end...) to the log, durably."""
        with self.locked():
            self._append([entry], durable=True)
        return entry

    def clean_temporaries(self) -> list[Path]:
        """Remove ``.tmp-*`` and ``.claim-*`` directories whose writer is gone, leftover ``.trash-*`` ones,
        bandwidth probe files of killed processes, and temporary index files of killed processes."""
        removed = []
        try:
            entries = list(os.scandir(self.checkpoint_dir))
        except FileNotFoundError:
            return []
        for entry in entries:
            child = Path(entry.path)
            if entry.is_symlink():
                continue  # never hpcckpt's own: not followed, not judged
            if (
                child.name.startswith(TRASH_PREFIX)
                or (child.name.startswith(TMP_PREFIX) and not self._writer_alive(child))
                or (child.name.startswith(CLAIM_PREFIX) and not self._writer_alive_by_name(child))
            ):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
            elif child.name.startswith(PROBE_PREFIX) and not self._prober_alive(child):
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
                removed.append(child)
        with contextlib.suppress(OSError):
            for leftover in self.run_dir.glob(f".{INDEX}.*.tmp"):
                if time.time() - leftover.stat().st_mtime > 3600:
                    leftover.unlink(missing_ok=True)
        return removed

    def temporary_name(self, step: int, token: str) -> str:
        return f"{TMP_PREFIX}{step:09d}-{self.host}-{os.getpid()}-{token}"

    # -- internals ----------------------------------------------------------------------------------------
    def _writer_alive(self, tmp: Path) -> bool:
        """Whether the process writing ``tmp`` still runs: it holds a lock on ``tmp/.owner`` while it writes.
        Where locks do not work, fall back to host, pid and age."""
        import fcntl

        if tmp.name.endswith(f"-{self.host}-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"):
            # This process's own: POSIX locks belong to the process, so testing (and closing) would
            # release the lock its writer holds.
            return True
        try:
            fd = os.open(tmp / OWNER, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            return self._writer_alive_by_name(tmp)  # killed before locking, or a writer without locks
        except OSError as error:
            if error.errno == errno.ELOOP:  # a link is no writer's lock (and its target is not ours to lock)
                return self._writer_alive_by_name(tmp)
            return True
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return True  # the lock is held: the writer is alive, wherever it runs
            return self._writer_alive_by_name(tmp)
        else:
            # Unlocked: its writer is gone. Unless the name says a live process on this host: an hpcckpt
            # older than the atomic ownership (transaction.Owner.create) locked its owner file after creating it.
            named = _host_and_pid(tmp)
            return named is not None and named[0] == self.host and self._alive_by_name(tmp, *named)
        finally:
            os.close(fd)  # releases our lock, if we got it

    def _writer_alive_by_name(self, tmp: Path) -> bool:
        named = _host_and_pid(tmp)
        return named is not None and self._alive_by_name(tmp, *named)

    def _prober_alive(self, probe: Path) -> bool:
        """Whether the process measuring bandwidth with ``probe`` still runs: it holds a lock on it."""
        import fcntl

        host, _, pid_text = probe.name[len(PROBE_PREFIX) :].rpartition("-")
        try:
            pid = int(pid_text)
        except ValueError:
            host = ""
        if not host:  # named by an hpcckpt whose probes were not locked: by age only
            try:
                return time.time() - probe.lstat().st_mtime < LEGACY_PROBE_STALE_SECONDS
            except FileNotFoundError:
                return True  # gone already: nothing to remove
        if host == self.host and pid == os.getpid():
            return True  # this process's own: testing (and closing) would release the lock it holds
        try:
            fd = os.open(probe, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return True  # gone already, or not ours to judge (another user's)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return True
            return self._alive_by_name(probe, host, pid)
        else:
            # Free: its prober is gone, or created it a moment ago and is about to lock it. On this host
            # the pid tells; a prober on another host tolerates losing its file (it only measures).
            return host == self.host and self._alive_by_name(probe, host, pid)
        finally:
            os.close(fd)

    def _alive_by_name(self, path: Path, host: str, pid: int) -> bool:
        """Liveness from the host and pid a temporary's name gives, where no lock tells."""
        try:
            age = time.time() - path.lstat().st_mtime
        except FileNotFoundError:
            return False
        if host != self.host:
            return age < FOREIGN_TMP_STALE_SECONDS
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False  # host_identity() includes the PID namespace: a pid dead here is dead
        except PermissionError:
            return True
        return True

    # -- the view: snapshot, journal, directory scan (callers hold _mutex) --------------------------------
    def _scan(self, *, fresh: bool = False) -> dict[str, int]:
        """The checkpoint directories on disk (name -> inode). Listed again only when the directory changed
        since the last listing (or changed so shortly before it that a later change could carry the same
        time stamp: file times tick coarsely), and then at most every SCAN_INTERVAL: with writers at work
        the directory changes all the time (their temporary directories), while every commit they make is
        in the journal at once. So a directory the journal does not know (a writer killed after its rename)
        shows within SCAN_INTERVAL. ``fresh`` always lists."""
        view = self._view
        signature = _signature(self.checkpoint_dir)
        racy = bool(signature) and signature[-1] >= (view.scan_time - RACY_SECONDS) * 1e9
        recent = time.monotonic() - view.scan_clock < SCAN_INTERVAL
        if (
            not fresh
            and view.scan is not None
            and not view.rescan
            and (recent or (signature == view.scan_sig and not racy))
        ):
            return view.scan
        view.scan_clock, view.rescan = time.monotonic(), False
        started = time.time()
        names: dict[str, int] = {}
        try:
            entries = list(os.scandir(self.checkpoint_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.name.startswith(".") or entry.name in self._ignored:
                continue
            if entry.is_dir(follow_symlinks=False):
                names[entry.name] = entry.inode()
            elif entry.is_symlink():
                self._ignored.add(entry.name)
                warn(
                    f"{entry.path} is refused: a symbolic link in {self.checkpoint_dir} may lead outside the "
                    "run directory; checkpoints are plain directories"
                )
        view.scan, view.scan_sig, view.scan_time = names, signature, started
        return names

    def _load_snapshot(self, *, fresh: bool = False) -> bool:
        """Parse the snapshot if it changed since it was parsed; False when it is missing or unusable.
        ``fresh`` (under the lock) takes the signature of the opened file: NFS revalidates a file it opens,
        while a plain stat may be served from its attribute cache."""
        view = self._view
        signature = _opened_signature(self.index_path) if fresh else _signature(self.index_path)
        if not signature:
            return False
        if signature == view.snapshot_sig:
            return True
        try:
            raw = read_nofollow(self.index_path)  # a link there raises StoreError: never read through
        except OSError:
            return False
        try:
            snapshot = parse_snapshot(raw)
            parsed = {}
            for text in snapshot.entries:
                checkpoint = self._parsed.get(text) or self._entry(json.loads(text), self.index_path)
                parsed[text] = checkpoint
            base = {c.name: c for c in parsed.values()}
        except StoreError as refused:
            if self._refused_index != raw:
                warn(f"{refused}; rebuilding the index from the manifests")
            self._refused_index = raw
            return False
        except (BadSnapshotError, KeyError, TypeError, ValueError):
            return False
        view.snapshot_sig, view.snapshot_size = signature, len(raw)
        view.generation, view.base, view.base_reserved = snapshot.generation, base, snapshot.reserved
        view.base_bad = dict(snapshot.bad)
        self._parsed = parsed
        view.restart_journal(None)
        view.listed_key = None
        return True

    def _read_journal(self, *, again: bool = True) -> None:
        """Apply what was appended to the journal since it was last read (nothing for a version-1 index).
        A journal of another generation than the snapshot parsed means a writer compacted in between (it
        writes the snapshot first): the snapshot is read again, then the journal."""
        view = self._view
        if view.generation is None:
            return
        try:
            fd = open_nofollow(self.journal_path, os.O_RDONLY)  # a link raises StoreError
        except FileNotFoundError:
            return
        try:
            size, ino = os.fstat(fd).st_size, os.fstat(fd).st_ino
            if ino != view.journal_ino or size < view.journal_offset:
                view.restart_journal(ino)  # a new journal (compacted): replayed from the snapshot
            if size > view.journal_offset:
                self._apply_journal(os.pread(fd, size - view.journal_offset, view.journal_offset))
        finally:
            os.close(fd)
        stale = view.journal_offset > 0 and not view.journal_ours
        if stale and again and self._load_snapshot() and view.journal_ino is None:  # a new snapshot was read
            self._read_journal(again=False)

    def _apply_journal(self, data: bytes) -> None:
        view = self._view
        lines, used = complete_lines(data)
        if view.journal_offset == 0 and lines:
            view.journal_ours = header_generation(lines[0]) == view.generation
            lines = lines[1:]
        view.journal_offset += used
        if not view.journal_ours:
            return  # a journal of an older snapshot: its records are in the snapshot already
        for record in parse_records(lines):
            self._apply(record)

    def _apply(self, record: Record) -> None:
        view = self._view
        if record.op == "reserve":
            view.reserved = max(view.reserved, record.seq)
        elif record.op == "delete":
            view.delete(record.name, record.instance)
        elif record.op == "bad":
            if record.instance is not None:
                view.bad[record.name] = BadMark(record.instance, record.reason)
        else:
            view.commit(record.name, self._journaled(record))

    def _journaled(self, record: Record) -> Checkpoint | None:
        known = self._parsed.get(record.text)
        if known is not None:
            return known
        try:
            checkpoint = self._entry(record.entry or {}, self.journal_path)
        except StoreError as refused:  # the directory scan adopts the checkpoint from its manifest instead
            if record.name not in self._warned:
                self._warned.add(record.name)
                warn(f"{refused}; reading its manifest instead")
            return None
        if record.text:
            self._parsed[record.text] = checkpoint
        return checkpoint

    def _entry(self, entry: Any, source: Path) -> Checkpoint:
        """The record of one index or journal entry, checked; :class:`StoreError` naming the bad field."""
        name = str(entry["name"])
        return Checkpoint.from_dict(entry, self.resolve(name), source=f"{source}: entry {name!r}")

    def _listing(self, scan: dict[str, int], *, again: bool = False) -> list[Checkpoint]:
        """The journal's view made to agree with the directories on disk (files win), without the lock.

        A checkpoint the journal lists that is gone from the listing ``scan`` was deleted by a commit made
        since the journal was read: the journal is read again and, once, the directory listed afresh, so a
        writer that committed and deleted twice meanwhile (keep_last=1) never leaves an empty listing."""
        view = self._view
        key = (view.snapshot_sig, view.journal_ino, view.journal_offset, view.scan_sig, id(scan))
        if key == view.listed_key:
            return list(view.listed)
        found = []
        for name, inode in scan.items():
            gone = view.deleted.get(name)
            if gone is not None:
                # None when it is the instance deleted: being moved away (or its deleter was killed: the next
                # writer finishes); another instance was committed again under the name since.
                checkpoint = self._recommitted(name, gone)
            else:
                checkpoint = view.logged.get(name) or self._adopted(name, inode)
            if checkpoint is not None:
                found.append(checkpoint)
        missing = []
        for name in view.logged.keys() - scan.keys():
            if _is_plain_dir(self.checkpoint_dir / name):
                found.append(view.logged[name])  # committed after the directory was listed
            else:
                missing.append(name)
        if missing and view.generation is not None:
            self._read_journal()  # deleted by retention since the journal was read: its line is there now
            if not again:
                return self._listing(self._scan(fresh=True), again=True)
        for name in missing:
            if name in view.logged and view.logged[name] is not None and name not in self._warned:
                self._warned.add(name)
                warn(f"checkpoint {name} is listed in {self.index_path} but gone from disk; dropping it")
        view.listed_key, view.listed = key, _extended(view.listed, found)
        return list(view.listed)

    def _adopted(self, name: str, inode: int) -> Checkpoint | None:
        """A checkpoint directory the journal does not (yet) list, from its manifest: committed by a writer
        that has not recorded it yet, or was killed before it could (the rename is the commit point)."""
        known = self._manifests.get((name, inode))
        if known is not None:
            return known
        try:
            checkpoint = read_manifest(self.resolve(name))
        except CorruptCheckpointError as error:
            self._ignored.add(name)  # warned once per process, not on every lookup
            warn(f"skipping {self.checkpoint_dir / name}: {error}")
            return None
        self._manifests[(name, inode)] = checkpoint
        return checkpoint

    def _recommitted(self, name: str, gone: Instance) -> Checkpoint | None:
        """Directory ``name``, whose name a journal record deleted, when it is another instance than the one
        deleted: committed again under that name since (a re-save of a step after a rewind) by a writer whose
        journal line never landed. None when it is the deleted one, or unreadable (then it is neither listed
        nor deleted). Its manifest is read each time, never cached by inode: the deleted directory's inode
        number is free for the new one to reuse."""
        try:
            checkpoint = read_manifest(self.resolve(name))
        except CorruptCheckpointError:
            return None  # moved away meanwhile (its deletion finished), or damaged
        return None if gone.matches(checkpoint) else checkpoint

    def _reconciled(self, *, write: bool = True, scan: dict[str, int] | None = None) -> list[Checkpoint]:
        """Under the lock: the registry made to agree with the checkpoint directories (files win) and, with
        ``write``, the journal told: adopted orphans, vanished checkpoints, deletions a killed writer left
        half done. An unusable snapshot is rebuilt from the manifests. Without ``write`` nothing is written
        (a read-only run directory). ``scan``: a listing of ``checkpoints/`` made before the lock was taken
        (a commit's: what changed since is in the journal, or adopted by the next reader)."""
        if scan is None:
            scan = self._scan(fresh=True)
        if not self._load_snapshot(fresh=write):
            return self._rebuilt(scan, write=write)
        self._read_journal()
        view = self._view
        listed = self._listing(scan)
        if not write:
            return listed
        names = {c.name for c in listed}
        fixes = [commit_record(c.summary()) for c in listed if view.logged.get(c.name) is not c]
        fixes += [delete_record(view.logged[name]) for name in view.logged.keys() - names]
        for name in sorted(view.deleted.keys() & scan.keys() - names):  # its deleter was killed before moving it
            if (gone := view.deleted.get(name)) is not None and self._is_instance(name, gone):
                self._trash_quietly(name)
        if fixes or view.generation is None or not view.journal_ours:
            try:
                self._journal(fixes)
                if view.generation is None:
                    self._compact(listed)  # a version-1 index: migrated
            except OSError as error:
                warn(f"could not update {self.journal_path} ({error.strerror or error}); using the files as they are")
        return listed

    def _is_instance(self, name: str, gone: Instance) -> bool:
        """Under the lock: whether directory ``name`` is the very instance a journal record deleted (read from
        its manifest now; an unreadable one is never taken for it)."""
        try:
            return gone.matches(read_manifest(self.resolve(name)))
        except CorruptCheckpointError:
            return False

    def _rebuilt(self, scan: dict[str, int], *, write: bool) -> list[Checkpoint]:
        """Every checkpoint read from its manifest, for a missing or unusable snapshot; written as a new
        snapshot (and an empty journal) unless ``write`` is false."""
        already_said = self._refused_index is not None
        self._refused_index = None
        if not already_said and (scan or os.path.lexists(self.index_path)):
            warn(f"registry index {self.index_path} is missing or corrupt; rebuilding it from the manifests")
        found = [c for name, inode in scan.items() if (c := self._adopted(name, inode)) is not None]
        entries = _ordered(found)
        self._view.bad.update(self._marks_from_events())  # the marks, as the event log keeps them too
        if write:
            try:
                self._compact(entries)
            except OSError as error:
                warn(f"could not rewrite {self.index_path} ({error.strerror or error}); using the files as they are")
        return entries

    def _marks_from_events(self) -> dict[str, BadMark]:
        """The bad marks the event log recorded (``bad`` events), for a snapshot rebuilt from the manifests."""
        try:
            text = read_nofollow(self.events_path).decode(errors="replace")
        except (OSError, StoreError):
            return {}
        marks = {}
        for event in event_log.of_kind(event_log.parse(text, str(self.events_path))[0], event_log.BAD):
            record = bad_record_of(event)
            if record is not None and record.instance is not None:
                marks[record.name] = BadMark(record.instance, record.reason)
        return marks

    def _journal(self, records: Sequence[Record]) -> None:
        """Under the lock: append ``records`` to the journal (one write, continued when the system writes less),
        or start a journal of the snapshot's generation with them when the one there belongs to another snapshot
        or is missing. An ``OSError`` (a full disk) leaves none of them applied, and the journal cut back."""
        view = self._view
        data = encode_records(records)
        fd = open_nofollow(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            st = os.fstat(fd)
            ours = view.generation is not None and view.journal_ours and st.st_ino == view.journal_ino
            appended = ours and st.st_size >= view.journal_offset  # else cut short behind our back: replaced
            if appended:
                if st.st_size > view.journal_offset:  # a crash tore the last line: start on a fresh one
                    data = b"\n" + data
                try:
                    _write_all(fd, data)
                except OSError:
                    # A full disk took part of it: cut back to what was there, so that no record this view has
                    # not applied stays, and keep the offset: the journal is not taken for replaced by the next
                    # append (rewriting it would drop the other writers' records). Cut or not, the next read
                    # resumes from the offset, and the next append starts on a fresh line.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, st.st_size)
                    raise
                view.journal_offset = st.st_size + len(data)
        finally:
            os.close(fd)
        if not appended:
            generation = view.generation or new_generation()
            text = journal_header(generation) + data
            write_atomic(self.journal_path, text, durable=False)
            view.journal_ino, view.journal_offset, view.journal_ours = _signature(self.journal_path)[0], len(text), True
        for record in records:
            self._apply(record)

    def _compact_if_due(self) -> None:
        view = self._view
        if view.journal_offset > COMPACT_FRACTION * view.snapshot_size:
            self._compact(_ordered(list(view.logged.values())))

    def _compact(self, entries: Sequence[Checkpoint]) -> None:
        """Under the lock: write ``entries`` as a new snapshot, then an empty journal of its generation.
        Atomic but not fsynced: both are caches of the manifests (each checkpoint is durable on its own), so
        after a power loss they are at worst stale or unreadable, and then rebuilt. A crash between the two
        leaves the old journal, whose generation no longer matches: ignored."""
        generation = new_generation()
        view = self._view
        reserved = max(view.reserved, max((c.seq for c in entries if c.seq is not None), default=0))
        bad = {c.name: mark for c in entries if (mark := self._mark(c)) is not None}  # of listed ones only
        text = encode_snapshot(generation, reserved, self._encode(entries), bad)
        write_atomic(self.index_path, text, durable=False)
        view.snapshot_sig, view.snapshot_size, view.generation = _signature(self.index_path), len(text), generation
        view.base, view.base_reserved, view.base_bad = {c.name: c for c in entries}, reserved, bad
        view.restart_journal(None)
        view.listed_key = None
        header = journal_header(generation)
        write_atomic(self.journal_path, header, durable=False)
        view.journal_ino, view.journal_offset, view.journal_ours = _signature(self.journal_path)[0], len(header), True

    def _encode(self, entries: Sequence[Checkpoint]) -> list[str]:
        encoded = {}
        for c in entries:
            known = self._encoded.get(c.name)
            if known is None or known[0] != c.checksum or known[1] != c.created or known[2] != c.seq:
                known = (c.checksum, c.created, c.seq, json.dumps(c.summary(), separators=(",", ":")))
                self._parsed[known[3].encode()] = c
            encoded[c.name] = known
        self._encoded = encoded
        return [e[3] for e in encoded.values()]

    def _trash_quietly(self, name: str) -> None:
        trash = self.checkpoint_dir / f"{TRASH_PREFIX}{name}-{os.getpid()}-{time.monotonic_ns()}"
        with contextlib.suppress(OSError):
            os.rename(self.checkpoint_dir / name, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _trash(self, victim: Checkpoint) -> Path | None:
        """Move a checkpoint out of sight in one rename, so no half-deleted directory looks committed."""
        trash = self.checkpoint_dir / f"{TRASH_PREFIX}{victim.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(victim.path, trash)
        except FileNotFoundError:
            return None
        return trash

    def _append(self, events: Sequence[Mapping[str, Any]], *, durable: bool = False) -> None:
        """Append events. Commit and delete events need no fsync of their own: the checkpoint they
        describe is durable by itself, and its manifest says the same; run-state events pass durable."""
        lines = event_log.encode(events, time.time())
        fd = open_nofollow(self.events_path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a crash tore the last line: start on a fresh one
                lines = "\n" + lines
            _write_all(fd, lines.encode())
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)


def probe_name() -> str:
    """This process's bandwidth probe file name, inside ``checkpoints/``."""
    return f"{PROBE_PREFIX}{host_identity()}-{os.getpid()}"


def host_identity() -> str:
    """The host name, plus the PID namespace when the process runs in one of its own (containers):
    two jobs on one node in separate namespaces must not take each other's pids for their own."""
    name = socket.gethostname().replace("-", "_")
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
        init = os.stat("/proc/1/ns/pid").st_ino
    except OSError:
        return name
    return name if namespace == init else f"{name}.ns{namespace}"


def _host_and_pid(tmp: Path) -> tuple[str, int] | None:
    """The writer's host and pid from ``.tmp-<step>-<host>-<pid>-<token>`` (or ``.claim-...``)."""
    parts = tmp.name.partition("-")[2].split("-")  # hosts may contain '-': split from the right
    try:
        return "-".join(parts[1:-2]), int(parts[-2])
    except (IndexError, ValueError):
        return None


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (opened with O_APPEND). ``os.write`` may write less than asked (a disk
    filling up, a signal): the rest is written after it; a write that makes no progress is a full disk."""
    rest = memoryview(data)
    while rest:
        written = os.write(fd, rest)
        if written <= 0:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a write made no progress)")
        rest = rest[written:]


def _signature(path: Path) -> tuple[int, ...]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _opened_signature(path: Path) -> tuple[int, ...]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return _signature(path)  # missing (empty), or a link: read_nofollow then says so
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _extended(before: list[Checkpoint], found: list[Checkpoint]) -> list[Checkpoint]:
    """``found`` in order; when it is ``before`` plus checkpoints that all rank after it (the usual case: new
    commits), without sorting the history again."""
    ids = {id(c) for c in found}
    if before and len(ids) >= len(before) and all(id(c) in ids for c in before):
        kept = {id(c) for c in before}
        new = _ordered([c for c in found if id(c) not in kept])
        if not new or order_key(new[0]) > order_key(before[-1]):
            return [*before, *new]
    return _ordered(found)


def _ordered(entries: list[Checkpoint]) -> list[Checkpoint]:
    return sorted(entries, key=order_key)


def order_key(checkpoint: Checkpoint) -> tuple[int, float, float, str]:
    """Oldest first: by commit sequence number; checkpoints without one (written before hpcckpt numbered
    commits) before all others, by step, then time saved. Never by a host's clock alone."""
    if checkpoint.seq is None:
        return (0, checkpoint.step, checkpoint.created, checkpoint.name)
    return (1, checkpoint.seq, 0.0, checkpoint.name)


LOCK_MODES: tuple[LockMode, ...] = ("auto", "fcntl", "soft")


def lock_mode(environ: Mapping[str, str]) -> LockMode:
    """The lock mode ``HPCCKPT_LOCK`` in ``environ`` asks for (``"auto"`` when unset or empty), for entry
    points to pass as ``lock=``: the registry itself never reads the environment. A bad value is a
    :class:`UsageError` naming it and the accepted form."""
    mode = environ.get("HPCCKPT_LOCK") or "auto"
    for known in LOCK_MODES:
        if mode == known:
            return known
    raise UsageError(f"Invalid lock mode {mode!r} (HPCCKPT_LOCK): expected 'auto', 'fcntl' or 'soft'")


def _make_lock(run_dir: Path, mode: LockMode, timeout: float) -> RunLock:
    if mode not in LOCK_MODES:
        raise UsageError(f"Invalid lock mode {mode!r}: expected 'auto', 'fcntl' or 'soft'")
    # soft: for filesystems without working fcntl locks. filelock's marker names host and pid: a marker left
    # by a dead process on the same host is broken by the next contender, any marker after
    # SOFT_LOCK_LIFETIME. Its own file, so an fcntl lock file left behind is never taken for a marker.
    # auto: fcntl, falling back to the soft marker where the filesystem refuses fcntl locks.
    return RunLock(run_dir / LOCK, run_dir / SOFT_LOCK, mode=mode, timeout=timeout, soft_lifetime=SOFT_LOCK_LIFETIME)


def _is_plain_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
