"""The background uploads of one store to its mirror: one thread, commit order, never in training's way.

Invariants (issue 14; Megatron-LM #1435: a transient save failure must not kill training):

- a training step never waits for an upload: :meth:`Uploads.kick` only notes the commit and wakes the
  thread; nothing here raises into the caller but :meth:`Uploads.wait`'s timeout running out (it returns);
- the thread uploads what the store lists (committed, not marked bad) and the mirror lacks, oldest first,
  at most the mirror's ``keep_last`` newest (older ones its retention would delete at once); a checkpoint
  deleted locally before its turn (retention after a newer commit) is superseded, never an error;
- a failed upload (storage down, wrong credentials) is logged once per store, clearly (the URL, the reason,
  what to check), recorded as an ``upload_failed`` event, and left for the next kick: the next save, or the
  next task's start (:meth:`CheckpointStore`'s owner kicks then);
- retention on the mirror runs in this thread, after the uploads of a pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .. import events as event_log
from ..progress import Progress
from .manifest import Checkpoint
from .mirror import Mirror, describe_failure

log = logging.getLogger("hpcckpt")


class Uploads:
    """The upload thread of one store: ``listed`` gives the store's committed checkpoints (oldest first),
    ``record`` appends an event to its log."""

    def __init__(
        self,
        mirror: Mirror,
        listed: Callable[[], list[Checkpoint]],
        record: Callable[[event_log.Event], object],
    ) -> None:
        self.mirror = mirror
        self._listed = listed
        self._record = record
        self._cond = threading.Condition()
        self._wanted = False  # a pass is asked for
        self._busy = False  # a pass runs
        self._queued: dict[str, Checkpoint] = {}  # noted or found to upload, not yet done
        self._failed: dict[str, str] = {}  # name -> why its last upload failed
        self._on_mirror: set[tuple[int, str]] = set()  # (step, checksum) known to be complete remotely
        self._remote_known = False
        self._warned = False
        self._thread: threading.Thread | None = None
        self.longest = 0.0  # seconds the longest upload of this process took (a stop's wait without deadline)

    # -- the caller's side --------------------------------------------------------------------------------
    def kick(self, committed: Checkpoint | None = None) -> None:
        """Note a new commit (if given) and ask for a pass: it uploads what the mirror lacks, failed ones
        included. Returns at once."""
        with self._cond:
            if committed is not None and _key(committed) not in self._on_mirror:
                self._queued[committed.name] = committed
            self._wanted = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="hpcckpt-uploads", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> list[str]:
        """Names of checkpoints queued or being uploaded, oldest first (failed ones are in :meth:`failed`)."""
        with self._cond:
            return [name for name in self._queued if name not in self._failed]

    def failed(self) -> dict[str, str]:
        """Checkpoints whose last upload failed, and why (retried at the next kick)."""
        with self._cond:
            return dict(self._failed)

    def wait(self, timeout: float | None = None) -> list[str]:
        """Wait for the uploads asked for so far to end, at most ``timeout`` seconds (None: until they do);
        returns the names still not on the mirror (queued, in flight or failed), oldest first."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._wanted or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return list(self._queued)

    def warn_once(self, message: str) -> None:
        """Log ``message`` (a failure to reach the mirror) unless a failure was logged already."""
        with self._cond:
            warned, self._warned = self._warned, True
        if not warned:
            log.warning("hpcckpt: %s; training goes on, uploads are retried at the next save (logged once)", message)

    # -- the thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._wanted:
                    self._cond.wait()
                self._wanted, self._busy = False, True
            try:
                self._pass()
            except Exception as error:  # never let the thread die: the next kick tries again
                self._failure(None, error)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _pass(self) -> None:
        todo = self._todo()
        if not todo:
            return
        remote = None
        if not self._remote_known:
            remote = self.mirror.list()
            self._remote_known = True
            with self._cond:
                self._on_mirror.update(_key(c) for c in remote)
        sent = False
        for checkpoint in todo:
            if _key(checkpoint) in self._on_mirror:
                self._done(checkpoint)
                continue
            if not self._upload(checkpoint, remote):
                return  # the storage failed: the others wait for the next kick
            remote, sent = None, True
        if sent:
            self._retain()

    def _todo(self) -> list[Checkpoint]:
        """What to upload now: the store's checkpoints the mirror lacks, oldest first; forgets queued ones
        the store no longer lists (deleted locally, or marked bad)."""
        local = self._listed()
        if self.mirror.keep_last is not None:
            local = local[-self.mirror.keep_last :]
        with self._cond:
            todo = [c for c in local if _key(c) not in self._on_mirror]
            wanted = {c.name for c in todo}
            for name in [n for n in self._queued if n not in wanted]:
                self._queued.pop(name)
                self._failed.pop(name, None)
            for checkpoint in todo:
                self._queued.setdefault(checkpoint.name, checkpoint)
        return todo

    def _upload(self, checkpoint: Checkpoint, remote: list[Checkpoint] | None) -> bool:
        started = time.monotonic()
        try:
            with Progress(checkpoint.size, f"upload {checkpoint.name} to {self.mirror.url}") as bar:
                copy, _ = self.mirror.push(checkpoint, bar, remote=remote)
        except Exception as error:
            if not checkpoint.path.exists():
                self._done(checkpoint)  # deleted locally meanwhile: superseded by a newer commit
                return True
            self._failure(checkpoint, error)
            return False
        seconds = time.monotonic() - started
        self.longest = max(self.longest, seconds)
        self._done(checkpoint)
        if self._warned and not self._failed:
            log.warning("hpcckpt: mirror %s: uploads work again (%s uploaded)", self.mirror.url, checkpoint.name)
        self._event(
            event_log.uploaded(
                checkpoint.name,
                checkpoint.step,
                self.mirror.where(copy),
                checkpoint.size,
                seconds,
                mirror=self.mirror.url,
            )
        )
        return True

    def _done(self, checkpoint: Checkpoint) -> None:
        with self._cond:
            self._on_mirror.add(_key(checkpoint))
            self._queued.pop(checkpoint.name, None)
            self._failed.pop(checkpoint.name, None)

    def _failure(self, checkpoint: Checkpoint | None, error: BaseException) -> None:
        message = describe_failure(self.mirror.url, error)
        self._remote_known = False  # list again next time: the failure may have been half way
        with self._cond:
            failing = [checkpoint] if checkpoint is not None else list(self._queued.values())
            for each in failing:
                self._failed[each.name] = message
        if not self._warned:
            self._warned = True
            log.warning("hpcckpt: %s; training goes on, the upload is retried at the next save (logged once)", message)
        for each in failing:
            self._event(event_log.upload_failed(each.name, each.step, self.mirror.url, message))

    def _retain(self) -> None:
        try:
            self.mirror.retain()
        except Exception as error:
            log.warning("hpcckpt: %s", describe_failure(self.mirror.url, error).replace("upload", "retention"))

    def _event(self, event: event_log.Event) -> None:
        try:
            self._record(event)
        except Exception as error:  # the log is the record, not the upload: never a reason to stop
            log.debug("hpcckpt: could not record %s: %s", event.get("event"), error)


def _key(checkpoint: Checkpoint) -> tuple[int, str]:
    return checkpoint.step, checkpoint.checksum
