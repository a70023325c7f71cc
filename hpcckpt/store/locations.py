"""Where a mirror keeps its copies: a second POSIX filesystem or an object store, behind one small interface.

:func:`open_location` turns a URL into a :class:`Location`: ``s3://bucket/prefix``, ``gs://bucket/prefix`` or
any other fsspec protocol (:class:`FsspecLocation`), ``file:///abs/path`` or a plain path (:class:`PosixLocation`).

What every location promises (issue 14; Composer PR #3376 uploaded a "latest" link before its files, and
pytorch #183878 lost data that was written without a flush):

- :meth:`Location.put_file` returns only once the whole file is stored: on POSIX it is written under a
  temporary name, fsynced, renamed and its directory fsynced; on an object store the client's upload has
  completed (``put_file`` raises on a failed part or a failed completion) and the stored object's size has
  been read back. So a caller that writes a manifest after its files never publishes a manifest whose files
  are missing;
- :meth:`Location.put_bytes` replaces an object whole (one PUT; an atomic rename on POSIX): readers see the
  old content, the new one, or nothing;
- nothing that names a location carries a secret: credentials come from the backend's own environment and
  configuration only; a URL with credentials in it (``user:secret@``, ``?secret=...``) is refused with a
  :class:`~hpcckpt.errors.UsageError` that shows it redacted, and backend errors are passed through
  :func:`scrub` before they are shown.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..errors import UsageError
from .fileio import fsync_dir

# Query parameters that carry credentials in the URLs of fsspec backends and cloud consoles.
_SECRET_PARAMS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "access_key",
        "secret_key",
        "access_key_id",
        "secret_access_key",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "credentials",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
    }
)
# The extra that brings each protocol's fsspec backend.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# Environment variables whose values are secrets, hidden from every message shown (see scrub).
_SECRET_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|PRIVATE)", re.IGNORECASE)
CHUNK = 8 << 20


class Advance(Protocol):
    """A progress bar as transfers drive it (:class:`hpcckpt.progress.Progress` is one)."""

    def update(self, n: int) -> object: ...


class Location(Protocol):
    """A root directory of files addressed by ``/``-separated relative names.

    ``url`` is the location as shown everywhere (credential-free); ``root`` is its path, as a
    :class:`~pathlib.Path` for the records that hold one (``bucket/prefix`` for an object store).
    """

    url: str
    root: Path

    def put_file(self, local: Path, name: str, progress: Advance | None = None) -> int:
        """Store the local file under ``name``, completely, before returning its stored size."""

    def put_bytes(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` whole, replacing what was there."""

    def get_bytes(self, name: str) -> bytes:
        """The content of ``name``; ``FileNotFoundError`` when absent."""

    def open_read(self, name: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """``name`` opened for reading, as a context manager; ``FileNotFoundError`` when absent."""

    def children(self, name: str) -> list[str]:
        """The names directly under directory ``name`` (no path), sorted; [] when it does not exist."""

    def entries(self, name: str) -> dict[str, Entry]:
        """The files and directories directly under directory ``name`` with their sizes (None for a
        directory) and modification times (None where the backend gives none); {} when it does not exist."""

    def modified(self, name: str) -> float | None:
        """When directory ``name`` itself last changed (POSIX), or None (an object store has no directories)."""

    def remove(self, name: str) -> bool:
        """Remove the file ``name``; nothing when it is already gone. False when it was left in place (a
        symbolic link on the way, on POSIX)."""

    def remove_tree(self, name: str) -> bool:
        """Remove directory ``name`` and everything under it; nothing when it is already gone. False when it
        was left in place (it or a directory above it is a symbolic link, on POSIX)."""


class Entry(NamedTuple):
    """A file or directory as a listing shows it."""

    size: int | None  # None: a directory
    modified: float | None  # seconds since the epoch; None: unknown


def open_location(url: str | os.PathLike[str]) -> Location:
    """The location ``url`` names; :class:`UsageError` for a URL with credentials, an unknown protocol or a
    backend that is not installed (naming the extra to install)."""
    text = os.fspath(url)
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"Invalid mirror {text!r}: expected a path, file:///path, s3://bucket/prefix or gs://...")
    check_credential_free(text)
    parts = urlsplit(text)
    if "://" not in text or parts.scheme in ("", "file"):
        path = parts.path if parts.scheme == "file" else text
        if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
            raise UsageError(f"Invalid mirror {text!r}: a file URL names no host; expected file:///absolute/path")
        return PosixLocation(Path(path).expanduser().absolute())
    return FsspecLocation.open(text, parts.scheme)


def check_credential_free(url: str) -> None:
    """Raise :class:`UsageError`, showing ``url`` redacted, when it carries credentials."""
    parts = urlsplit(url)
    # Not parts.netloc alone: a secret with a "/" (AWS secret keys have them) ends the netloc before the "@".
    has_userinfo = "://" in url and "@" in url.partition("://")[2].partition("?")[0]
    has_secret_param = any(key.lower() in _SECRET_PARAMS for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    if has_userinfo or has_secret_param:
        raise UsageError(
            f"Invalid mirror {redact(url)!r}: credentials do not belong in the URL (they would end up in scripts, "
            "logs and manifests); expected e.g. s3://bucket/prefix, with credentials from the backend's own "
            "environment or configuration (AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3, "
            "GOOGLE_APPLICATION_CREDENTIALS for gs)"
        )


def redact(url: str) -> str:
    """``url`` with its user information and every query value hidden: safe to show."""
    if "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    before_query = rest.partition("?")[0]
    if "@" in before_query:  # user:secret@, whatever "/" the secret holds
        url = f"{scheme}://***@{rest[len(before_query.rpartition('@')[0]) + 1 :]}"
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(f"{key}=***" for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def scrub(text: str) -> str:
    """``text`` (a backend's error message) with the value of every secret-looking environment variable
    (``AWS_SECRET_ACCESS_KEY``, ``*_TOKEN``...) replaced by ``***``: botocore does not echo secrets, but
    other backends and proxies might, and the message goes into logs and the event log."""
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_ENV.search(name) and value in text:
            text = text.replace(value, "***")
    return text


class PosixLocation:
    """A directory on a (second) POSIX filesystem, written durably with hpcckpt's own file I/O."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)
        self._links_seen: set[Path] = set()

    def __repr__(self) -> str:
        return f"PosixLocation({self.url!r})"

    def put_file(self, local: Path, name: str, progress: Advance | None = None) -> int:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            with open(local, "rb") as source, open(tmp, "xb", buffering=0) as copy:
                _copy_contents(source, copy, progress)
                os.fsync(copy.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return target.stat().st_size

    def put_bytes(self, name: str, data: bytes) -> None:
        from .fileio import write_atomic

        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data)

    def get_bytes(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def open_read(self, name: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return open(self._path(name), "rb")

    def children(self, name: str) -> list[str]:
        return sorted(self.entries(name))

    def entries(self, name: str) -> dict[str, Entry]:
        """Symbolic links are never followed: a linked entry is left out, with a warning (once per path),
        and a directory reached through one lists nothing."""
        directory = self._path(name)
        if self._linked(name):
            return {}
        found: dict[str, Entry] = {}
        try:
            listing = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        for entry in listing:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile
            if stat.S_ISLNK(info.st_mode):
                self._warn_link(directory / entry.name)
                continue
            size = None if stat.S_ISDIR(info.st_mode) else info.st_size
            found[entry.name] = Entry(size, info.st_mtime)
        return found

    def modified(self, name: str) -> float | None:
        try:
            return os.lstat(self._path(name)).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def remove(self, name: str) -> bool:
        target = self._path(name)
        if self._linked(str(Path(name).parent)):
            return False
        target.unlink(missing_ok=True)  # a link itself is removed, never what it points to
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(target.parent)
        return True

    def remove_tree(self, name: str) -> bool:
        target = self._path(name)
        if self._linked(name):
            return False
        for _ in range(3):  # a file that vanished meanwhile (another deleter) stops rmtree: go again
            try:
                shutil.rmtree(target)  # unlinks links inside, never follows them
                break
            except FileNotFoundError:
                continue
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(target.parent)
        return True

    def _linked(self, name: str) -> bool:
        """Whether ``name`` or a directory between the root and it is a symbolic link (warned about)."""
        path = self.root
        for part in Path(name).parts:
            path = path / part
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    self._warn_link(path)
                    return True
            except (FileNotFoundError, NotADirectoryError):
                return False
        return False

    def _warn_link(self, path: Path) -> None:
        if path not in self._links_seen:
            self._links_seen.add(path)
            warnings.warn(
                f"mirror {self.url}: {path} is a symbolic link; a mirror never follows one (nothing behind it is "
                "listed or deleted); expected real directories and files, remove the link",
                UserWarning,
                stacklevel=3,
            )

    def _path(self, name: str) -> Path:
        return self.root / name


class FsspecLocation:
    """A prefix in an object store (or any fsspec filesystem), through the backend's real client.

    The filesystem is built once per location, never from fsspec's instance cache (credentials are read
    from the environment when it is built: a cached client would keep old ones), with the backend's
    default credential chain.
    """

    def __init__(self, url: str, fs: Any, root: str) -> None:
        self.url = url
        self.fs = fs
        self._root = root.rstrip("/")
        self.root = Path(self._root)

    def __repr__(self) -> str:
        return f"FsspecLocation({self.url!r})"

    @classmethod
    def open(cls, url: str, protocol: str) -> FsspecLocation:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'hpcckpt[{extra}]'" if extra else "install the fsspec backend for it"
        try:
            import fsspec
        except ImportError:
            raise UsageError(f"Mirror {redact(url)!r} needs fsspec and its {protocol} backend: {hint}") from None
        try:
            filesystem = fsspec.get_filesystem_class(protocol)
        except ImportError:
            raise UsageError(f"Mirror {redact(url)!r} needs the {protocol} backend of fsspec: {hint}") from None
        except ValueError:
            raise UsageError(
                f"Invalid mirror {redact(url)!r}: protocol {protocol!r} is unknown to fsspec; expected a path, "
                "file:///path, s3://bucket/prefix, gs://bucket/prefix or another fsspec protocol"
            ) from None
        root = filesystem._strip_protocol(url)
        if not root.strip("/"):
            raise UsageError(f"Invalid mirror {redact(url)!r}: expected a bucket (and a prefix), e.g. s3://bucket/run")
        return cls(url.rstrip("/"), filesystem(skip_instance_cache=True), root)

    def put_file(self, local: Path, name: str, progress: Advance | None = None) -> int:
        target = self._path(name)
        callback = None if progress is None else _relay(progress)
        kwargs = {} if callback is None else {"callback": callback}
        # put_file raises when a part or the completion of a multipart upload fails; the size read back
        # afterwards (not from the listing cache) makes the completion certain before a manifest may follow.
        self.fs.put_file(str(local), target, **kwargs)
        self.fs.invalidate_cache(target)
        size = int(self.fs.info(target)["size"])
        if callback is not None:
            callback.value = size
            callback.call()
        return size

    def put_bytes(self, name: str, data: bytes) -> None:
        target = self._path(name)
        self.fs.pipe_file(target, data)
        self.fs.invalidate_cache(target)

    def get_bytes(self, name: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(name)))

    def open_read(self, name: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return self._opened(self._path(name))

    @contextlib.contextmanager
    def _opened(self, path: str) -> Iterator[IO[bytes]]:
        with self.fs.open(path, "rb", block_size=CHUNK, cache_type="none") as handle:
            yield handle

    def children(self, name: str) -> list[str]:
        directory = self._path(name)
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache(directory)  # see entries()
        return sorted({str(entry).rstrip("/").rpartition("/")[2] for entry in entries} - {""})

    def entries(self, name: str) -> dict[str, Entry]:
        directory = self._path(name)
        self.fs.invalidate_cache(directory)
        try:
            listing = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return {}
        finally:
            # Not kept: s3fs answers a later read of a file the cached listing lacks (a manifest written
            # since, by another process) with FileNotFoundError.
            self.fs.invalidate_cache(directory)
        found: dict[str, Entry] = {}
        for info in listing:
            child = str(info.get("name", "")).rstrip("/").rpartition("/")[2]
            if child:
                size = None if info.get("type") == "directory" else int(info.get("size") or 0)
                found[child] = Entry(size, _timestamp(info))
        return found

    def modified(self, name: str) -> float | None:
        return None

    def remove(self, name: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))
        return True

    def remove_tree(self, name: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(name), recursive=True)
        self.fs.invalidate_cache(self._path(name))
        return True

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}"


def _timestamp(info: dict[str, Any]) -> float | None:
    """An fsspec listing entry's modification time (s3fs ``LastModified``, gcsfs ``updated``, local
    ``mtime``...), or None."""
    for key in ("LastModified", "mtime", "updated", "last_modified", "modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _relay(progress: Advance) -> Any:
    """An fsspec transfer callback that drives ``progress`` by the bytes sent."""
    from fsspec.callbacks import Callback

    class Relay(Callback):  # type: ignore[misc]
        sent = 0

        def call(self, *args: Any, **kwargs: Any) -> None:
            value = int(self.value)
            if value > self.sent:
                progress.update(value - self.sent)
                self.sent = value

    return Relay()


def _copy_contents(source: IO[bytes], copy: IO[bytes], progress: Advance | None) -> None:
    """Copy ``source`` into ``copy`` in the kernel (``copy_file_range``: no pass through this process's
    memory, 4x a read/write loop on the test machine, ``hpcckpt bench store --only mirror``), chunk by chunk
    for the progress; by reads and writes where the kernel or the filesystems cannot."""
    copied = 0
    try:
        while n := os.copy_file_range(source.fileno(), copy.fileno(), CHUNK):
            copied += n
            if progress is not None:
                progress.update(n)
        return
    except (AttributeError, OSError) as error:
        if copied or (isinstance(error, OSError) and error.errno not in _NO_KERNEL_COPY):
            raise
    while chunk := source.read(CHUNK):
        copy.write(chunk)
        if progress is not None:
            progress.update(len(chunk))


# copy_file_range refused as such (not a failing disk): no syscall, across filesystems on older kernels,
# a filesystem without it.
_NO_KERNEL_COPY = frozenset({errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF})
