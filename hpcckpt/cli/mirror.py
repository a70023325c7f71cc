"""The mirror's commands: ``hpcckpt pull URL RUN_DIR``, ``push RUN_DIR URL``, ``ls URL``, ``verify URL``,
and the check ``hpcckpt submit --mirror URL`` makes before it submits anything.

How a location is told from a run directory (``ls`` and ``verify`` take either): a URL has a scheme
(``s3://``, ``gs://``, ``file://``); anything else is a run directory, which has a registry. A mirror on a
second filesystem is therefore named ``file:///abs/path`` for ``ls`` and ``verify``; ``pull`` and ``push``
know which argument is the location by its place, so a plain path works there too.

Every failure of the remote store (no such bucket, refused credentials, the server down) is one line that
names the location by its credential-free URL, the reason, and exit status 1; an unknown scheme, a
missing backend package or a URL that carries credentials is bad usage (exit 2), before anything is done.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, HpcckptError, UsageError
from ..slurm.spec import check_mirror, has_scheme, redact_url
from .rundirs import open_run

T = TypeVar("T")


def is_location(text: str) -> bool:
    """Whether a command's argument names a location (it has a scheme) rather than a run directory."""
    return has_scheme(text)


class RemoteError(HpcckptError):
    """The location failed: the message names its URL and the reason, without credentials."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"mirror {url}: {reason}")
        self.args = (url, reason)  # pickles through HpcckptError.__reduce__
        self.url = url
        self.reason = reason


@contextlib.contextmanager
def remote(url: str) -> Iterator[None]:
    """Turn the backend's own exceptions into a :class:`RemoteError` naming ``url``, in the mirror's words
    (access denied, unreachable, refused), secrets scrubbed; hpcckpt's own errors (corrupt, not found, bad
    usage) pass as they are."""
    from ..store.mirror import describe_failure

    try:
        yield
    except HpcckptError:
        raise
    except Exception as error:  # s3fs, botocore, aiohttp, gcsfs: each backend has its own classes
        reason = describe_failure(url, error).removeprefix(f"mirror {url}: ").removeprefix("the upload failed: ")
        raise RemoteError(url, " ".join(reason.split())) from None  # one line, whatever the backend said


def open_mirror(url: str) -> Any:
    """The :class:`~hpcckpt.store.mirror.Mirror` at ``url``, without retention: these commands never delete."""
    from ..store.mirror import Mirror

    check_mirror(url)  # credentials in it are refused before any backend sees (or echoes) the URL
    with remote(redact_url(url)):
        return Mirror(url, keep_last=None)


def _call(mirror: Any, fn: Callable[[], T]) -> T:
    with remote(mirror.url):
        return fn()


# -- ls URL, verify URL -----------------------------------------------------------------------------------
def list_remote(url: str) -> list[Any]:
    """The complete checkpoints at ``url``, oldest first. An empty answer from a bucket or directory
    that does not exist is an error: the backends list nothing there rather than fail."""
    return _listing(open_mirror(url))


def _listing(mirror: Any) -> list[Any]:
    listed = list(_call(mirror, mirror.list))
    if not listed:
        _call(mirror, functools.partial(_check_exists, mirror))
    return listed


def _check_exists(mirror: Any) -> None:
    location = mirror.location
    filesystem = getattr(location, "fs", None)  # an fsspec location: its bucket must exist
    if filesystem is not None:
        bucket = location.root.parts[0] if location.root.parts else ""
        if bucket and not filesystem.exists(bucket):
            raise RemoteError(mirror.url, f"no such bucket: {bucket}")
    elif not location.root.is_dir():
        raise RemoteError(mirror.url, f"no such directory: {location.root}")


def verify_remote(url: str, line: Callable[[str], None], size: Callable[[int], str]) -> int:
    """``hpcckpt verify URL``: every complete remote checkpoint against its manifest's digests."""
    mirror = open_mirror(url)
    checkpoints = _listing(mirror)
    corrupt = gone = 0
    for checkpoint in checkpoints:
        try:
            present = _call(mirror, functools.partial(_verified, mirror, checkpoint))
        except CorruptCheckpointError as error:
            corrupt += 1
            line(f"CORRUPT  {checkpoint.name}: {error}")
        else:
            if present:
                line(f"ok       {checkpoint.name}  step {checkpoint.step}  {size(checkpoint.size)}")
            else:
                gone += 1
                line(f"gone     {checkpoint.name} (deleted while verifying: the mirror's retention)")
    line(f"{len(checkpoints) - corrupt - gone} ok, {corrupt} corrupt at {mirror.url}")
    return 1 if corrupt else 0


def _verified(mirror: Any, checkpoint: Any) -> bool:
    """Whether ``checkpoint`` is still there and verifies; :class:`CorruptCheckpointError` when it does not."""
    try:
        mirror.verify(checkpoint)
    except FileNotFoundError:
        return False
    return True


# -- pull, push -------------------------------------------------------------------------------------------
def configure_pull(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the location: s3://bucket/prefix, gs://..., file:///path or a path")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (made when missing)")
    parser.add_argument(
        "--step", type=int, default=None, help="the checkpoint at this step (default: the newest valid)"
    )


def run_pull(args: argparse.Namespace) -> int:
    """Copy the newest valid remote checkpoint (or ``--step``'s) into RUN_DIR, verified while written,
    committed through its registry; a checkpoint already there (same step and checksum) is left as it is, and
    one marked bad there (it failed validation) is never pulled: ``--step`` of one is refused, naming why."""
    from ..store.store import CheckpointStore

    mirror = open_mirror(args.url)
    listed = _listing(mirror)
    store = CheckpointStore(args.run_dir, keep_last=None)
    bad = _bad_marks(store)
    if args.step is None:
        if not listed:
            raise CheckpointNotFoundError(f"no complete checkpoint at {mirror.url}")
        usable = [c for c in listed if (c.step, c.checksum) not in bad]
        if not usable:
            raise CheckpointNotFoundError(
                f"every checkpoint at {mirror.url} is marked bad in {store.run_dir} (it failed validation there): "
                "nothing to pull"
            )
        wanted = usable[-1]
    else:
        wanted = _at_step(mirror, listed, args.step)
        if (wanted.step, wanted.checksum) in bad:
            raise CheckpointNotFoundError(
                f"checkpoint {wanted.name} (step {wanted.step}) at {mirror.url} is marked bad in {store.run_dir} "
                f"(it failed validation: {bad[wanted.step, wanted.checksum]}): not pulled; pull another --step, or "
                "none for the newest valid"
            )
    here = next((c for c in store.list() if (c.step, c.checksum) == (wanted.step, wanted.checksum)), None)
    if here is not None:
        print(f"{wanted.name} (step {wanted.step}) is already in {store.run_dir} as {here.name}: nothing to pull")
        return 0
    with _progress(wanted, "pull") as bar:
        if args.step is None:  # the newest that verifies: an older one when the newest does not
            local = _call(mirror, functools.partial(mirror.pull_newest, store, bar, skip=set(bad)))
        else:
            local = _call(mirror, functools.partial(mirror.download, wanted, store, bar))
    if local is None:
        raise CheckpointNotFoundError(f"no checkpoint at {mirror.url} verifies against its checksums")
    print(f"pulled {local.name} (step {local.step}, {local.size} bytes, verified) from {mirror.url}")
    print(f"  into {store.run_dir}")
    newer = [c for c in store.list() if c.step > local.step]
    if newer:
        print(
            f"  it is the run's newest commit, so a resume of this run starts from it (step {local.step}), "
            f"not from {newer[-1].name}"
        )
    return 0


def configure_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("url", metavar="URL", help="the location: s3://bucket/prefix, gs://..., file:///path or a path")
    parser.add_argument(
        "--step", type=int, default=None, help="only the checkpoint at this step (default: every one not yet there)"
    )


def run_push(args: argparse.Namespace) -> int:
    """Upload RUN_DIR's committed checkpoints that are not complete at URL (files first, the manifest
    last); complete remote ones are never overwritten, and nothing is deleted. A checkpoint committed
    before the mirror's newest is published all the same (an archive's older steps are worth keeping) and
    said to be older: the mirror orders by commit time, so it never becomes the one a resume takes."""
    store = open_run(args.run_dir)
    local = store.list()
    if args.step is not None:
        local = [c for c in local if c.step == args.step]
        if not local:
            raise CheckpointNotFoundError(f"no committed checkpoint at step {args.step} in {store.run_dir}")
    mirror = open_mirror(args.url)
    remote_now = _call(mirror, mirror.list)
    newest = remote_now[-1] if remote_now else None
    pushed = 0
    for checkpoint in local:
        there = mirror.find(checkpoint, remote_now)
        if there is not None:
            print(f"there    {checkpoint.name} (complete at {mirror.where(there)})")
            continue
        with _progress(checkpoint, "push") as bar:
            uploaded = _call(mirror, functools.partial(mirror.upload, checkpoint, bar))
        pushed += 1
        print(f"pushed   {checkpoint.name}  step {uploaded.step}  {uploaded.size} bytes  to {mirror.where(uploaded)}")
        if newest is not None and (uploaded.created, uploaded.step) < (newest.created, newest.step):
            # The mirror orders by commit, not by upload: an older checkpoint pushed late stays older.
            print(
                f"  older than the mirror's newest ({newest.name}, step {newest.step}): a resume from the mirror "
                "still takes that one, and a run's mirror retention (mirror_keep_last) may delete this one"
            )
    print(f"{pushed} pushed, {len(local) - pushed} already there, to {mirror.url}")
    return 0


def _bad_marks(store: Any) -> dict[tuple[int, str], str]:
    """The reason each checkpoint of ``store`` marked bad failed validation, by (step, combined checksum): a
    pull never brings one back under a new name, unmarked (review of issue 14; the store's own restore skips
    them the same way)."""
    return {
        (c.step, c.checksum): reason
        for c in store.list(include_bad=True)
        if (reason := store.registry.bad_reason(c)) is not None
    }


def _at_step(mirror: Any, listed: list[Any], step: int) -> Any:
    found = [c for c in listed if c.step == step]
    if not found:
        steps = ", ".join(str(c.step) for c in listed) or "none"
        raise CheckpointNotFoundError(f"no checkpoint at step {step} at {mirror.url}; its steps: {steps}")
    return found[-1]


def _progress(checkpoint: Any, verb: str) -> Any:
    """A bar on a terminal, a line per 10 % in a batch log, for one checkpoint's transfer."""
    from ..progress import Progress

    return Progress(checkpoint.size, f"{verb} {checkpoint.name}")


# -- submit --mirror --------------------------------------------------------------------------------------
def check_writable(url: str) -> None:
    """Before ``hpcckpt submit`` submits a mirrored chain: the backend is installed, the location answers
    and takes a write. A tiny probe object is written, read back and removed; any failure is a
    :class:`UsageError` naming the URL and the reason, and nothing is submitted."""
    from ..store.locations import open_location

    shown = redact_url(url)
    check_mirror(url)
    location = open_location(url)  # UsageError: unknown scheme, missing extra, credentials in the URL
    name = f".hpcckpt-probe-{uuid.uuid4().hex}"
    payload = b"hpcckpt probe\n"
    try:
        with remote(shown):
            location.put_bytes(name, payload)
            try:
                back = location.get_bytes(name)
            finally:
                location.remove(name)
    except RemoteError as error:
        raise UsageError(
            f"Invalid --mirror {shown!r}: it cannot be written ({error.reason}); expected a location this "
            "machine reaches and may write, with the credentials in the backend's environment or config"
        ) from None
    if back != payload:
        raise UsageError(f"Invalid --mirror {shown!r}: a probe written there read back different bytes")
