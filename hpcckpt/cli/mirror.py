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
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, HpcckptError, UsageError
from ..slurm.spec import has_scheme, redact_url
from .rundirs import open_run

T = TypeVar("T")


def is_location(text: str) -> bool:
    """Whether a command's argument names a location (it has a scheme) rather than a run directory."""
    return has_scheme(text)


class RemoteError(HpcckptError):
    """The location failed: the message names its URL and the reason, without credentials."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.args = (url, reason)  # pickles through HpcckptError.__reduce__
        self.url = url
        self.reason = reason


def reason(error: BaseException) -> str:
    """One line for what went wrong with a location: the exception's class and first line, with any
    URL in it redacted. botocore's refusals say what the server said (InvalidAccessKeyId,
    SignatureDoesNotMatch, NoSuchBucket), which is what a user acts on."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    words = [redact_url(w) if has_scheme(w) else w for w in text.split(" ")]
    return f"{type(error).__name__}: {' '.join(words)}" if text else type(error).__name__


@contextlib.contextmanager
def remote(url: str) -> Iterator[None]:
    """Turn the backend's own exceptions into a :class:`RemoteError` naming ``url``; hpcckpt's own errors
    (corrupt, not found, bad usage) pass as they are."""
    try:
        yield
    except HpcckptError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as error:  # s3fs, botocore, aiohttp, gcsfs: each backend has its own classes
        raise RemoteError(url, reason(error)) from None


def open_mirror(url: str) -> Any:
    """The :class:`~hpcckpt.store.mirror.Mirror` at ``url``, without retention: these commands never delete."""
    from ..store.mirror import Mirror

    with remote(redact_url(url)):
        return Mirror(url)


def _call(mirror: Any, fn: Callable[[], T]) -> T:
    with remote(mirror.url):
        return fn()


# -- ls URL, verify URL -----------------------------------------------------------------------------------
def list_remote(url: str) -> list[Any]:
    mirror = open_mirror(url)
    return list(_call(mirror, mirror.list))


def verify_remote(url: str, line: Callable[[str], None], size: Callable[[int], str]) -> int:
    """``hpcckpt verify URL``: every complete remote checkpoint against its manifest's digests."""
    mirror = open_mirror(url)
    checkpoints = _call(mirror, mirror.list)
    corrupt = 0
    for checkpoint in checkpoints:
        try:
            _call(mirror, functools.partial(mirror.verify, checkpoint))
        except CheckpointNotFoundError:
            line(f"gone     {checkpoint.name} (deleted while verifying)")
        except CorruptCheckpointError as error:
            corrupt += 1
            line(f"CORRUPT  {checkpoint.name}: {error}")
        else:
            line(f"ok       {checkpoint.name}  step {checkpoint.step}  {size(checkpoint.size)}")
    line(f"{len(checkpoints) - corrupt} ok, {corrupt} corrupt at {mirror.url}")
    return 1 if corrupt else 0


# -- pull, push -------------------------------------------------------------------------------------------
def configure_pull(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the location: s3://bucket/prefix, gs://..., file:///path or a path")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (made when missing)")
    parser.add_argument(
        "--step", type=int, default=None, help="the checkpoint at this step (default: the newest valid)"
    )


def run_pull(args: argparse.Namespace) -> int:
    """Copy the newest valid remote checkpoint (or ``--step``'s) into RUN_DIR, verified, committed
    through its registry; a checkpoint already there is left as it is."""
    from ..store.store import CheckpointStore

    mirror = open_mirror(args.url)
    if args.step is None:
        chosen = _call(mirror, mirror.newest_valid)
        if chosen is None:
            raise CheckpointNotFoundError(f"no valid checkpoint at {mirror.url}")
    else:
        chosen = _at_step(mirror, args.step)
    store = CheckpointStore(args.run_dir, keep_last=None)
    if any(c.name == chosen.name for c in store.list()):
        print(f"{chosen.name} (step {chosen.step}) is already in {store.run_dir}: nothing to pull")
        return 0
    local = _call(mirror, lambda: mirror.download(chosen, store, progress=_progress()))
    print(f"pulled {local.name} (step {local.step}, {local.size} bytes, verified) from {mirror.url}")
    print(f"  into {store.run_dir}")
    return 0


def configure_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("url", metavar="URL", help="the location: s3://bucket/prefix, gs://..., file:///path or a path")
    parser.add_argument(
        "--step", type=int, default=None, help="only the checkpoint at this step (default: every one not yet there)"
    )


def run_push(args: argparse.Namespace) -> int:
    """Upload RUN_DIR's committed checkpoints that are not complete at URL (files first, the manifest
    last); complete remote ones are never overwritten, and nothing is deleted."""
    store = open_run(args.run_dir)
    local = store.list()
    if args.step is not None:
        local = [c for c in local if c.step == args.step]
        if not local:
            raise CheckpointNotFoundError(f"no committed checkpoint at step {args.step} in {store.run_dir}")
    mirror = open_mirror(args.url)
    there = {c.name for c in _call(mirror, mirror.list)}
    todo = [c for c in local if c.name not in there]
    for checkpoint in local:
        if checkpoint.name in there:
            print(f"complete {checkpoint.name} (already at {mirror.url})")
    for checkpoint in todo:
        uploaded = _call(mirror, functools.partial(mirror.upload, checkpoint, progress=_progress()))
        print(f"pushed   {uploaded.name}  step {uploaded.step}  {uploaded.size} bytes")
    print(f"{len(todo)} pushed, {len(local) - len(todo)} already there, to {mirror.url}")
    return 0


def _at_step(mirror: Any, step: int) -> Any:
    checkpoints = _call(mirror, mirror.list)
    found = [c for c in checkpoints if c.step == step]
    if not found:
        steps = ", ".join(str(c.step) for c in checkpoints) or "none"
        raise CheckpointNotFoundError(f"no checkpoint at step {step} at {mirror.url}; its steps: {steps}")
    return _call(mirror, lambda: mirror.verify(found[-1]))


def _progress() -> Any:
    """What the transfers report their bytes to: a bar on a terminal, a line per 10 % in a batch log."""
    from ..progress import Progress

    return Progress


# -- submit --mirror --------------------------------------------------------------------------------------
def check_writable(url: str) -> None:
    """Before ``hpcckpt submit`` submits a mirrored chain: the backend is installed, the location answers
    and takes a write. A tiny probe object is written, read back and removed; any failure is a
    :class:`UsageError` naming the URL and the reason, and nothing is submitted."""
    from ..store.locations import open_location

    shown = redact_url(url)
    location = open_location(url)  # UsageError: unknown scheme, missing extra, credentials in the URL
    name = f".hpcckpt-probe-{uuid.uuid4().hex}"
    payload = b"hpcckpt probe\n"
    try:
        with remote(shown):
            location.write_bytes(name, payload)
            try:
                back = location.read_bytes(name)
            finally:
                location.remove(name)
    except RemoteError as error:
        raise UsageError(
            f"Invalid --mirror {shown!r}: it cannot be written ({error.reason}); expected a location this "
            "machine reaches and may write, with the credentials in the backend's environment or config"
        ) from None
    if back != payload:
        raise UsageError(f"Invalid --mirror {shown!r}: a probe written there read back different bytes")


def dumps(checkpoints: list[Any]) -> str:
    return json.dumps([c.summary() for c in checkpoints], indent=1)
