"""The registry's two files: a compacted snapshot (the index) and the append-only journal since it.

Invariant: the snapshot plus the journal records of the same generation describe every committed checkpoint a
writer has recorded; both are caches of the manifests, so either may be lost, torn or stale and the registry is
rebuilt from the files. A journal whose first line names another generation than the snapshot describes an
older snapshot: it is ignored (the snapshot already holds its records).

Why two files (issue 13): rewriting one index per commit made commit and lookup cost grow with the history
(1.6 s at 1,000 checkpoints and 8 writers). A commit appends one line; a reader keeps what it parsed and reads
only the bytes appended since. The snapshot is rewritten (compacted) once the journal has grown past a quarter
of it, so the rewriting costs a constant factor per commit and a fresh reader parses at most 1.25 snapshots.

Snapshot (``registry.json``): ``{"hpcckpt_registry": 2, "generation": "<hex>", "updated": <time>,
"checkpoints": [<entry>, ...]}``; version 1 (hpcckpt 0.1, no generation) is read as it is. Journal: a header
line ``{"hpcckpt_journal": 1, "generation": "<hex>"}``, then one record a line: ``{"op": "commit",
"checkpoint": <entry>}`` or ``{"op": "delete", "name": "<name>"}``. An entry is :meth:`Checkpoint.summary`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

INDEX_VERSION = 2
JOURNAL_VERSION = 1
# The journal is compacted into a new snapshot once it is larger than this fraction of the snapshot.
COMPACT_FRACTION = 0.25


class BadSnapshotError(ValueError):
    """The snapshot is not one this hpcckpt reads (not JSON, another format, a future version)."""


@dataclass(frozen=True)
class Snapshot:
    """A parsed snapshot: its generation (None for a version-1 index) and its raw entries."""

    generation: str | None
    entries: list[dict[str, Any]]


@dataclass(frozen=True)
class Record:
    """One journal line: a commit (with its entry) or a delete (by name)."""

    op: str
    name: str
    entry: dict[str, Any] | None = None


def new_generation() -> str:
    return secrets.token_hex(8)


def parse_snapshot(raw: bytes) -> Snapshot:
    """The snapshot in ``raw``; :class:`BadSnapshotError` when it is not a version 1 or 2 index."""
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise BadSnapshotError(str(error)) from None
    try:
        entries = data["checkpoints"]
    except (TypeError, KeyError):
        raise BadSnapshotError("not an hpcckpt index") from None
    if not isinstance(entries, list):
        raise BadSnapshotError("not an hpcckpt index")
    version = data.get("hpcckpt_registry")
    if version == 1:
        return Snapshot(None, entries)
    generation = data.get("generation")
    if version != INDEX_VERSION or not isinstance(generation, str):
        raise BadSnapshotError(f"index version {version!r}; expected 1 or {INDEX_VERSION}")
    return Snapshot(generation, entries)


def encode_snapshot(generation: str, encoded_entries: Iterable[str]) -> bytes:
    """The snapshot text for entries already encoded as JSON objects."""
    header = f'"hpcckpt_registry":{INDEX_VERSION},"generation":{json.dumps(generation)},"updated":{time.time()}'
    return f'{{{header},"checkpoints":[{",".join(encoded_entries)}]}}'.encode()


def journal_header(generation: str) -> bytes:
    return (json.dumps({"hpcckpt_journal": JOURNAL_VERSION, "generation": generation}) + "\n").encode()


def encode_records(records: Iterable[Record]) -> bytes:
    lines = []
    for record in records:
        if record.op == "commit":
            lines.append(json.dumps({"op": "commit", "checkpoint": record.entry}, separators=(",", ":")))
        else:
            lines.append(json.dumps({"op": "delete", "name": record.name}, separators=(",", ":")))
    return "".join(line + "\n" for line in lines).encode()


def complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """The complete lines of ``data`` and the number of bytes they span: a last line without its newline is
    being appended (or was torn by a crash) and is left for the next read."""
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), end


def header_generation(line: bytes) -> str | None:
    """The generation a journal's first line names, or None when it is no header of ours."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("hpcckpt_journal") != JOURNAL_VERSION:
        return None
    generation = data.get("generation")
    return generation if isinstance(generation, str) else None


def parse_records(lines: Iterable[bytes]) -> Iterator[Record]:
    """The records of journal ``lines``; a line torn by a crash or not of this format is skipped (the
    directory scan finds what it described)."""
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        if data.get("op") == "commit" and isinstance(entry := data.get("checkpoint"), dict):
            if isinstance(name := entry.get("name"), str):
                yield Record("commit", name, entry)
        elif data.get("op") == "delete" and isinstance(name := data.get("name"), str):
            yield Record("delete", name)
