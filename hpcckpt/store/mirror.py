"""A run's checkpoints copied to a second place (object storage, another filesystem), and back.

The remote layout mirrors the local one, so a POSIX mirror reads by eye::

    <url>/checkpoints/<name>/<data files>
    <url>/checkpoints/<name>/manifest.json      (written last)

Invariants (issue 14; Composer PR #3376 published a "latest" link before the files it pointed to):

- a remote checkpoint exists when its ``manifest.json`` does: :meth:`Mirror.upload` stores every data file
  completely (each verified against the manifest's checksum while it is sent, its stored size read back
  after) and only then the manifest, in one whole-object write. A directory without a manifest is
  invisible to every reader, and swept by a retention pass once nothing in it changed for ``grace``
  seconds (younger, it may be an upload in progress in another process);
- a complete remote checkpoint is never overwritten in place: a checkpoint whose name is taken on the
  mirror by a different one (the same step saved again after a fallback) is stored as ``<name>.1``,
  ``<name>.2``...; the same checkpoint (same step and combined checksum) is never stored twice;
- the manifest's ``seq`` on the mirror is the mirror's own upload order (the local one restarts when a run
  directory is purged); :meth:`Mirror.list` is oldest first by commit (the manifest's ``created``, then
  step, then ``seq``), so checkpoints pushed late never pass for the newest;
- deleting (retention) removes the manifest first, then the files, so a half-deleted checkpoint is
  invisible; the newest complete remote checkpoint, and the newest one whose files are all there, are
  never deleted; a path mirror never follows a symbolic link (see :class:`~.locations.PosixLocation`);
- a download is written through a save transaction of the local store, every file's checksum verified
  while it is written, and committed through the registry like any save (a ``pulled`` event says so).
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import re
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from .. import events as event_log
from ..errors import CorruptCheckpointError, UsageError
from ..rundir import CHECKPOINTS
from .fileio import SyncedWriter, format_digest, new_digest
from .locations import CHUNK, Advance, Location, open_location, scrub
from .manifest import (
    MANIFEST,
    MANIFEST_VERSION,
    PLAIN_NAME,
    Checkpoint,
    FileRecord,
    combined_checksum,
    documented,
    verify_file,
)
from .registry import Registry, warn
from .retention import KeepBest, check_keep_last, to_delete
from .transaction import JobIds, Owner, SaveRequest, SaveTransaction

PREFIX = CHECKPOINTS  # the remote layout is the run directory's
DEFAULT_KEEP_LAST = 3
# How long a directory without a manifest, or a temporary file, is left alone by retention: it may be an
# upload in progress in another process (a single file of a large checkpoint takes minutes to send).
DEFAULT_GRACE = 3600.0
_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]+\.tmp$")  # PosixLocation.put_file's .NAME.PID.RAND.tmp


class _Sink(Protocol):
    def write(self, data: bytes) -> object: ...


class Mirror:
    """The copies of a run's checkpoints at ``url`` (a path, ``file://``, ``s3://``, ``gs://``...).

    ``keep_last`` (default 3; None keeps all) and ``keep_best`` (like the store's) are the mirror's own
    retention, applied by :meth:`retain`; the newest complete remote checkpoint is never deleted.
    ``grace`` (seconds, default an hour) is how old a directory without a manifest or a temporary file
    must be before retention sweeps it (younger, it may be another process's upload in progress).
    """

    def __init__(
        self,
        url: str,
        keep_last: int | None = DEFAULT_KEEP_LAST,
        keep_best: KeepBest | tuple[str, str, int] | None = None,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
            raise UsageError(f"Invalid grace={grace!r}: expected seconds >= 0, e.g. 3600")
        self.grace = float(grace)
        self.location: Location = open_location(url)
        self.url = self.location.url
        self.keep_last = check_keep_last(keep_last)
        self.keep_best = KeepBest.parse(keep_best)

    def __repr__(self) -> str:
        return f"Mirror({self.url!r}, keep_last={self.keep_last}, keep_best={self.keep_best})"

    # -- reading ------------------------------------------------------------------------------------------
    def list(self) -> list[Checkpoint]:
        """Complete remote checkpoints, oldest first in the order they were committed (their manifest's
        ``created``, then step, then the mirror's upload order): a late upload of older checkpoints
        (``hpcckpt push``) never makes them the newest. A directory with an unreadable manifest is skipped."""
        found = []
        for name in self.location.children(PREFIX):
            if PLAIN_NAME.match(name):
                try:
                    found.append(self._manifest(name))
                except FileNotFoundError:
                    continue  # files without a manifest: incomplete, invisible
                except CorruptCheckpointError:
                    continue
        return sorted(found, key=_commit_order)

    def find(self, checkpoint: Checkpoint, remote: Sequence[Checkpoint] | None = None) -> Checkpoint | None:
        """The remote copy of ``checkpoint`` (same step and combined checksum), or None."""
        listed = self.list() if remote is None else remote
        return next((c for c in listed if c.step == checkpoint.step and c.checksum == checkpoint.checksum), None)

    def where(self, checkpoint: Checkpoint) -> str:
        """The URL of a remote checkpoint, as messages show it."""
        return f"{self.url}/{PREFIX}/{checkpoint.name}"

    def verify(self, checkpoint: Checkpoint) -> Checkpoint:
        """Read every file of a remote checkpoint back and check its size and checksum against its manifest;
        :class:`CorruptCheckpointError` names the file and what is wrong."""
        for record in checkpoint.files:
            self._read_file(checkpoint, record, sink=None)
        return checkpoint

    def newest_valid(self) -> Checkpoint | None:
        """The newest remote checkpoint whose files verify (a corrupt one is warned about and skipped), or
        None when the mirror has none."""
        for checkpoint in reversed(self.list()):
            try:
                return self.verify(checkpoint)
            except (CorruptCheckpointError, FileNotFoundError) as error:
                _warn(f"mirror {self.where(checkpoint)} is unusable, trying an older one: {error}")
        return None

    # -- uploading ----------------------------------------------------------------------------------------
    def upload(self, checkpoint: Checkpoint, progress: Advance | None = None) -> Checkpoint:
        """Copy a committed local checkpoint to the mirror: every data file first, each verified against its
        manifest checksum, then ``manifest.json``. Returns the remote checkpoint (the existing one when the
        mirror already holds this checkpoint). :class:`CorruptCheckpointError` when a local file does not
        match its manifest (nothing is published); backend errors (``OSError``, ``PermissionError``...)
        propagate, with nothing published."""
        return self.push(checkpoint, progress)[0]

    def push(
        self, checkpoint: Checkpoint, progress: Advance | None = None, remote: Sequence[Checkpoint] | None = None
    ) -> tuple[Checkpoint, bool]:
        """:meth:`upload`, also saying whether anything was sent (False: the mirror already held it).
        ``remote`` is the mirror's listing when the caller has one."""
        listed = self.list() if remote is None else list(remote)
        existing = self.find(checkpoint, listed)
        if existing is not None:
            return existing, False
        name = _free_name(checkpoint.name, {c.name for c in listed})
        seq = 1 + max((c.seq or 0 for c in listed), default=0)
        directory = f"{PREFIX}/{name}"
        for record in checkpoint.files:
            local = checkpoint.path / record.name
            # What is sent is what the manifest describes: the file is hashed on a thread of its own while it
            # is sent (both read it from the page cache; xxh3 releases the GIL), so the check costs no time of
            # its own, and a mismatch raises before the manifest could make the copy visible.
            with ThreadPoolExecutor(1, thread_name_prefix="hpcckpt-verify") as pool:
                checked = pool.submit(verify_file, local, record)
                try:
                    stored = self.location.put_file(local, f"{directory}/{record.name}", progress)
                finally:
                    checked.result()
            if stored != record.size:
                raise OSError(f"{self.url}/{directory}/{record.name}: stored {stored} bytes of {record.size}")
        # The manifest as written locally: the registry's listing lacks the hparams, command and git state.
        published = dataclasses.replace(documented(checkpoint), name=name, seq=seq, path=self.location.root / directory)
        self.location.put_bytes(f"{directory}/{MANIFEST}", _manifest_bytes(published))
        return published, True

    # -- downloading --------------------------------------------------------------------------------------
    def download(
        self,
        checkpoint: Checkpoint,
        store: Any,
        progress: Advance | None = None,
    ) -> Checkpoint:
        """Download a remote checkpoint into ``store``'s run directory (a :class:`CheckpointStore`), every
        file's checksum verified while it is written, and commit it through the registry (the store's
        retention applies; a ``pulled`` event is recorded). Returns the local checkpoint.
        :class:`CorruptCheckpointError` names the remote file that does not match; nothing is committed."""
        registry: Registry = store.registry
        keep_last, keep_best = store.keep_last, store.keep_best
        request = SaveRequest(
            registry=registry,
            step=checkpoint.step,
            epoch=checkpoint.epoch,
            metrics=dict(checkpoint.metrics),
            retention=lambda entries: to_delete(entries, keep_last, keep_best),
            tag=checkpoint.tag,
            metadata=dict(checkpoint.metadata),
            job=_job(store),
        )
        with SaveTransaction.begin(request) as transaction:
            for record in checkpoint.files:
                self._download_file(checkpoint, record, transaction.directory / record.name, progress)
            final = registry.checkpoint_dir / f"step_{checkpoint.step:09d}"
            # A fresh creation time: the local commit is new (a local copy of the same name, corrupt, may
            # still be there; the commit then takes the next free name).
            draft = dataclasses.replace(checkpoint, name=final.name, path=final, seq=None, created=time.time())
            local = transaction.record(draft)
        Owner.forget(local.path)
        registry.append_event(
            event_log.pulled(name=local.name, step=local.step, url=self.where(checkpoint), mirror=self.url)
        )
        return local

    def pull_newest(
        self, store: Any, progress: Advance | None = None, skip: Collection[tuple[int, str]] = ()
    ) -> Checkpoint | None:
        """Download the newest remote checkpoint whose files verify into ``store`` (an older one when the
        newest does not verify); None when the mirror has none that does. Remote checkpoints whose (step,
        combined checksum) is in ``skip`` (found bad here) are passed over."""
        for checkpoint in reversed(self.list()):
            if (checkpoint.step, checkpoint.checksum) in skip:
                continue
            try:
                return self.download(checkpoint, store, progress)
            except CorruptCheckpointError as error:
                _warn(f"mirror checkpoint {self.where(checkpoint)} does not verify, trying an older one: {error}")
        return None

    # -- retention ----------------------------------------------------------------------------------------
    def retain(self) -> builtins.list[str]:
        """Apply the mirror's retention. Returns the names removed (a temporary file as ``<dir>/<file>``).

        - ``keep_last``/``keep_best`` over the complete checkpoints in commit order; never deleted: the
          newest complete one, and the newest one whose files are all there with their sizes (a manifest
          whose data went missing does not count as the checkpoint to resume from);
        - a directory without a manifest (an interrupted upload or deletion) is swept once nothing in it
          changed for ``grace`` seconds: a younger one may be an upload in progress in another process;
        - a leftover temporary file of a path mirror (``.NAME.PID.RAND.tmp``, an upload killed mid-copy)
          is removed from the kept directories once as old.
        """
        complete = self.list()
        if not complete:
            spared: set[str] = set()
        else:
            spared = {complete[-1].name}
            present = self._newest_present(complete)
            if present is not None:
                spared.add(present.name)
        doomed = [c for c in to_delete(complete, self.keep_last, self.keep_best) if c.name not in spared]
        removed = [c.name for c in doomed if self.delete(c)]
        listed = {c.name for c in complete}
        gone = set(removed)
        cutoff = time.time() - self.grace
        for name in self.location.children(PREFIX):
            if name in gone or not PLAIN_NAME.match(name):
                continue
            directory = f"{PREFIX}/{name}"
            entries = self.location.entries(directory)
            if name not in listed and MANIFEST not in entries:
                times = [e.modified for e in entries.values()] + [self.location.modified(directory)]
                known = [t for t in times if t is not None]
                if known and max(known) <= cutoff and self.location.remove_tree(directory):
                    removed.append(name)
                continue
            for file, entry in entries.items():
                old = entry.modified is not None and entry.modified <= cutoff
                if _TEMPORARY.match(file) and old and self.location.remove(f"{directory}/{file}"):
                    removed.append(f"{name}/{file}")
        return removed

    def _newest_present(self, complete: Sequence[Checkpoint]) -> Checkpoint | None:
        """The newest complete checkpoint whose files are all listed with their manifest's sizes."""
        for checkpoint in reversed(complete):
            entries = self.location.entries(f"{PREFIX}/{checkpoint.name}")
            if all(record.name in entries and entries[record.name].size == record.size for record in checkpoint.files):
                return checkpoint
        return None

    def delete(self, checkpoint: Checkpoint) -> bool:
        """Delete a remote checkpoint: its manifest first (it is invisible from then on), then its files.
        False when the location left it in place (a symbolic link on a path mirror, warned about)."""
        directory = f"{PREFIX}/{checkpoint.name}"
        return self.location.remove(f"{directory}/{MANIFEST}") and self.location.remove_tree(directory)

    # -- helpers ------------------------------------------------------------------------------------------
    def _manifest(self, name: str) -> Checkpoint:
        source = f"{self.url}/{PREFIX}/{name}/{MANIFEST}"
        try:
            data = json.loads(self.location.get_bytes(f"{PREFIX}/{name}/{MANIFEST}"))
        except ValueError as error:
            raise CorruptCheckpointError(f"{source}: unreadable manifest ({error})") from None
        if not isinstance(data, dict) or data.get("hpcckpt_manifest") != MANIFEST_VERSION:
            raise CorruptCheckpointError(f"{source}: not an hpcckpt manifest of version {MANIFEST_VERSION}")
        checkpoint = Checkpoint.from_dict(data, self.location.root / PREFIX / name, source=source)
        if checkpoint.name != name:
            raise CorruptCheckpointError(f"{source}: names checkpoint {checkpoint.name!r} but lies in {name!r}")
        if combined_checksum(checkpoint.files) != checkpoint.checksum:
            raise CorruptCheckpointError(f"{source}: its file list does not match its checksum {checkpoint.checksum}")
        return checkpoint

    def _has_manifest(self, name: str) -> bool:
        return MANIFEST in self.location.children(f"{PREFIX}/{name}")

    def _read_file(self, checkpoint: Checkpoint, record: FileRecord, sink: _Sink | None) -> None:
        """Stream one remote file (into ``sink``), checking its size and checksum against ``record``."""
        where = f"{self.where(checkpoint)}/{record.name}"
        hasher = new_digest()
        size = 0
        try:
            with self.location.open_read(f"{PREFIX}/{checkpoint.name}/{record.name}") as source:
                # Never past one byte more than the manifest says: a remote file larger than its record is
                # corrupt, and must not fill the local disk on its way to being found so.
                while chunk := source.read(min(CHUNK, record.size + 1 - size)):
                    hasher.update(chunk)
                    size += len(chunk)
                    if sink is not None:
                        sink.write(chunk)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where}: missing (the manifest lists it)") from None
        if size != record.size:
            state = "truncated" if size < record.size else "longer"
            raise CorruptCheckpointError(f"{where}: size {size} bytes, the manifest says {record.size} ({state})")
        digest = format_digest(hasher)
        if digest != record.digest:
            raise CorruptCheckpointError(f"{where}: checksum {digest}, the manifest says {record.digest}")

    def _download_file(
        self, checkpoint: Checkpoint, record: FileRecord, target: Path, progress: Advance | None
    ) -> None:
        writer = SyncedWriter(target, checksum=False)
        try:
            self._read_file(checkpoint, record, _Counting(writer, progress))
            writer.close()
        except BaseException:
            writer.abort()
            raise


class _Counting:
    """A writer that also advances a progress bar."""

    def __init__(self, writer: SyncedWriter, progress: Advance | None) -> None:
        self.writer = writer
        self.progress = progress

    def write(self, data: bytes) -> object:
        written = self.writer.write(data)
        if self.progress is not None:
            self.progress.update(len(data))
        return written


def _commit_order(checkpoint: Checkpoint) -> tuple[float, int, int, str]:
    return checkpoint.created, checkpoint.step, checkpoint.seq or 0, checkpoint.name


def _free_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name.1``, ``name.2``... the first not taken by a complete remote checkpoint."""
    if name not in taken:
        return name
    suffix = 1
    while f"{name}.{suffix}" in taken:
        suffix += 1
    return f"{name}.{suffix}"


def _manifest_bytes(checkpoint: Checkpoint) -> bytes:
    return json.dumps(checkpoint.manifest(), indent=1, default=str).encode()


def _job(store: Any) -> JobIds | None:
    job: JobIds | None = getattr(store, "job", None)
    return job


def describe_failure(url: str, error: BaseException) -> str:
    """One line saying why a transfer with the mirror at ``url`` failed, with what to check; no secret."""
    reason = scrub(f"{type(error).__name__}: {error}")
    if isinstance(error, PermissionError):
        hint = "access denied (check the credentials: AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3)"
    elif isinstance(error, CorruptCheckpointError):
        hint = "a local file does not match its manifest"
    elif isinstance(error, ConnectionError | TimeoutError) or "connect" in reason.lower():
        hint = "the storage cannot be reached (server down or network)"
    elif isinstance(error, OSError):
        hint = "the storage refused the write"
    else:
        hint = "the upload failed"
    return f"mirror {url}: {hint}: {reason}"


def _warn(message: str) -> None:
    warn(message)
