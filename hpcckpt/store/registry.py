"""The file-locked registry of a run directory: which checkpoints are committed, and what happened.

It owns three of the run directory's files (their names are :mod:`hpcckpt.rundir`'s): the index
(``registry.json``, every committed checkpoint: a cache, rebuilt from manifests when lost), the event log
(``events.jsonl``, :mod:`hpcckpt.events`), and the lock guarding both; ``checkpoints/`` holds one
directory per committed checkpoint, plus ``.tmp-*`` ones being written.

The files are the truth: a checkpoint directory with a final name and a valid manifest is committed
(the rename is the commit point), whether or not the index lists it yet. Readers compare the index with
the directory listing and reconcile when they differ, so a writer killed between its rename and its
index update still leaves its checkpoint visible.

Checkpoints are ordered by their commit sequence number (``seq``), assigned under the lock when each one
is committed and kept in its manifest (so a rebuilt index has it too): the latest is the last committed,
also after a deliberate rewind to an earlier step, whatever the clocks of the saving hosts say (issue 11:
one node an hour ahead made every later task resume from its old checkpoint). Checkpoints written before
hpcckpt numbered commits have no ``seq``: they come first, by step, then time saved.

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
from ..rundir import LOCK as LOCK
from ..rundir import SOFT_LOCK as SOFT_LOCK
from .fileio import link_refused, open_nofollow, read_nofollow, write_atomic
from .manifest import PLAIN_NAME, Checkpoint, read_manifest

INDEX_VERSION = 1
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

LockMode = Literal["auto", "fcntl", "soft"]


class LockUnavailableError(StoreError):
    """The registry's lock file cannot even be opened (a read-only run directory, permissions)."""


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
        self._lock = _make_lock(run_dir, lock, lock_timeout)
        self.host = host_identity()
        # The parsed index and the bytes it was parsed from, and each entry's JSON text with the checksum
        # and time it describes: parsing or encoding a thousand entries costs milliseconds.
        self._index_cache: tuple[tuple[int, ...], bytes, list[Checkpoint]] | None = None
        self._encoded: dict[str, tuple[str, float, int | None, str]] = {}
        # The index and directory signatures when they last agreed, and directories already warned about.
        self._agreed: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._ignored: set[str] = set()
        self._refused_index: bytes | None = None  # an index just refused (and warned about)

    # -- locking ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        import filelock

        if os.path.islink(self._lock.lock_file):
            # Refused, not waited for: a soft lock would take a link for a marker held by someone else.
            raise link_refused(self._lock.lock_file)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreError(
                f"could not lock {self._lock.lock_file} within {self.lock_timeout:g} s: another process holds "
                "it. If none does (a crash on a filesystem without fcntl locks), delete that file"
            ) from None
        except OSError as error:
            if os.path.islink(self._lock.lock_file):  # filelock opens it with O_NOFOLLOW: ELOOP
                raise link_refused(self._lock.lock_file) from None
            raise LockUnavailableError(f"cannot lock {self._lock.lock_file}: {error.strerror or error}") from None
        try:
            yield
        finally:
            self._lock.release()

    # -- reading ------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, oldest first (by the time they were saved)."""
        index_sig, dir_sig = _signature(self.index_path), _signature(self.checkpoint_dir)
        if self._agreed == (index_sig, dir_sig) and self._index_cache is not None:
            return list(self._index_cache[2])
        entries = self._read_index()
        names = self._names_on_disk()
        if entries is None and not names and not index_sig:
            return []  # a run with nothing saved yet: no need to wait for the lock
        if entries is not None and {c.name for c in entries} == names:
            self._agreed = (index_sig, dir_sig)
            return entries
        try:
            with self.locked():
                return self._reconciled()
        except LockUnavailableError:
            # A read-only run directory (another user's, a read-only mount): reconcile in memory only.
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
    def commit(
        self,
        publish: Callable[[int], Checkpoint],
        select_deletions: Callable[[list[Checkpoint]], list[Checkpoint]],
    ) -> tuple[Checkpoint, list[Checkpoint]]:
        """Under the lock: ``publish(seq)`` writes the manifest with its commit sequence number ``seq`` and
        renames a written checkpoint into place (the commit point), and returns it; then it is recorded and
        retention applied. Returns it and what retention deleted.

        Once ``publish`` has returned the checkpoint is committed: a failure to update the index or the
        log afterwards (a full disk, a refused entry) is only warned about; the files are the truth.
        """
        with self.locked():
            for path in (self.index_path, self.events_path):
                if os.path.islink(path):  # refused before anything is committed, not warned about after
                    raise link_refused(path)
            before = self._reconciled()
            checkpoint = publish(1 + max((c.seq for c in before if c.seq is not None), default=0))
            doomed: list[Checkpoint] = []
            trashed: list[Path] = []
            try:
                entries = _ordered([*(c for c in before if c.name != checkpoint.name), checkpoint])
                doomed = [c for c in select_deletions(entries) if c.name != checkpoint.name]
                doomed_names = {c.name for c in doomed}
                # The index drops the doomed first; a crash before they are moved away leaves them on disk,
                # where the next reader adopts them again: nothing is ever listed that is not there.
                self._write_index([c for c in entries if c.name not in doomed_names])
                self._append([event_log.commit(checkpoint.summary())])
                if doomed:
                    self._append([event_log.delete(c.name, c.step) for c in doomed])
                trashed = [trash for c in doomed if (trash := self._trash(c)) is not None]
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

    def _names_on_disk(self) -> set[str]:
        names: set[str] = set()
        try:
            entries = list(os.scandir(self.checkpoint_dir))
        except FileNotFoundError:
            return names
        for entry in entries:
            if entry.name.startswith(".") or entry.name in self._ignored:
                continue
            if entry.is_symlink():
                self._ignored.add(entry.name)
                warn(
                    f"{entry.path} is refused: a symbolic link in {self.checkpoint_dir} may lead outside the "
                    "run directory; checkpoints are plain directories"
                )
                continue
            if entry.is_dir(follow_symlinks=False):
                names.add(entry.name)
        return names

    def _read_index(self, *, fresh: bool = False) -> list[Checkpoint] | None:
        """The indexed checkpoints, or None when the index is missing or unusable. ``fresh`` (under the
        lock) compares the file's bytes, not its stat, with the cached parse: NFS may serve a stale stat."""
        signature = _signature(self.index_path)
        cache = self._index_cache
        if not fresh and cache is not None and cache[0] == signature:
            return list(cache[2])
        try:
            raw = read_nofollow(self.index_path)  # a link there raises StoreError: never read through
        except OSError:
            return None
        if cache is not None and cache[1] == raw:
            self._index_cache = (signature, raw, cache[2])
            return list(cache[2])
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("hpcckpt_registry") != INDEX_VERSION:
                return None
            entries = [
                Checkpoint.from_dict(e, self.resolve(str(e["name"])), source=f"{self.index_path}: entry {e['name']!r}")
                for e in data["checkpoints"]
            ]
        except StoreError as refused:
            warn(f"{refused}; rebuilding the index from the manifests")
            self._refused_index = raw
            return None
        except (ValueError, KeyError, TypeError, CorruptCheckpointError):
            return None
        self._index_cache = (signature, raw, entries)
        return list(entries)

    def _reconciled(self, committing: str | None = None, *, write: bool = True) -> list[Checkpoint]:
        """Under the lock: the index made to agree with the checkpoint directories (files win).
        ``committing`` is a checkpoint being committed right now, not to be reported as unexpected;
        without ``write`` nothing is written (a read-only run directory)."""
        on_disk = self._names_on_disk() - {committing}
        indexed = self._read_index(fresh=write)
        if indexed is None:
            already_said = self._refused_index is not None
            self._refused_index = None
            if not already_said and (on_disk or self.index_path.exists()):
                warn(f"registry index {self.index_path} is missing or corrupt; rebuilding it from the manifests")
            indexed = []
        by_name = {c.name: c for c in indexed}
        changed = False
        for gone in sorted(set(by_name) - on_disk - {committing}):
            warn(f"checkpoint {gone} is listed in {self.index_path} but gone from disk; dropping it")
            del by_name[gone]
            changed = True
        for orphan in sorted(on_disk - set(by_name)):
            try:
                by_name[orphan] = read_manifest(self.resolve(orphan))
                changed = True
            except CorruptCheckpointError as error:
                self._ignored.add(orphan)  # warned once per process, not on every lookup
                warn(f"skipping {self.checkpoint_dir / orphan}: {error}")
        entries = _ordered(list(by_name.values()))
        if write and (changed or not self.index_path.exists()):
            try:
                self._write_index(entries)
            except OSError as error:
                if committing is not None:
                    raise
                warn(f"could not rewrite {self.index_path} ({error.strerror or error}); using the files as they are")
        return entries

    def _trash(self, victim: Checkpoint) -> Path | None:
        """Move a checkpoint out of sight in one rename, so no half-deleted directory looks committed."""
        trash = self.checkpoint_dir / f"{TRASH_PREFIX}{victim.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(victim.path, trash)
        except FileNotFoundError:
            return None
        return trash

    def _write_index(self, entries: Sequence[Checkpoint]) -> None:
        encoded = {}
        for c in entries:
            known = self._encoded.get(c.name)
            if known is None or known[0] != c.checksum or known[1] != c.created or known[2] != c.seq:
                known = (c.checksum, c.created, c.seq, json.dumps(c.summary(), separators=(",", ":")))
            encoded[c.name] = known
        self._encoded = encoded
        header = f'"hpcckpt_registry":{INDEX_VERSION},"updated":{time.time()}'
        text = f'{{{header},"checkpoints":[{",".join(e[3] for e in encoded.values())}]}}'.encode()
        # Atomic but not fsynced: the index is a cache of the manifests (each checkpoint is durable on its
        # own), so after a power loss it is at worst stale or unreadable, and then rebuilt.
        write_atomic(self.index_path, text, durable=False)
        self._index_cache = (_signature(self.index_path), text, list(entries))

    def _append(self, events: Sequence[Mapping[str, Any]], *, durable: bool = False) -> None:
        """Append events. Commit and delete events need no fsync of their own: the checkpoint they
        describe is durable by itself, and its manifest says the same; run-state events pass durable."""
        lines = event_log.encode(events, time.time())
        fd = open_nofollow(self.events_path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a crash tore the last line: start on a fresh one
                lines = "\n" + lines
            os.write(fd, lines.encode())
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


def _signature(path: Path) -> tuple[int, ...]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


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


def _make_lock(run_dir: Path, mode: LockMode, timeout: float) -> Any:
    import filelock

    if mode == "soft":
        # For filesystems without working fcntl locks. filelock's marker names host and pid: a marker left
        # by a dead process on the same host is broken by the next contender, any marker after
        # SOFT_LOCK_LIFETIME. Its own file, so an fcntl lock file left behind is never taken for a marker.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the age-based expiry is chosen on purpose (see above)
            return filelock.SoftFileLock(run_dir / SOFT_LOCK, timeout=timeout, lifetime=SOFT_LOCK_LIFETIME)
    if mode in ("auto", "fcntl"):
        # auto: fcntl, falling back to the soft marker where the filesystem refuses fcntl locks.
        return filelock.FileLock(run_dir / LOCK, timeout=timeout, fallback_to_soft=mode == "auto")
    raise UsageError(f"Invalid lock mode {mode!r}: expected 'auto', 'fcntl' or 'soft'")
