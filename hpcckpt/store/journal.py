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
"reserved": <seq>, "checkpoints": [<entry>, ...]}``; version 1 (hpcckpt 0.1, no generation) is read as it is.
Journal: a header line ``{"hpcckpt_journal": 1, "generation": "<hex>"}``, then one record a line: ``{"op":
"commit", "checkpoint": <entry>}``, ``{"op": "delete", "name": "<name>", "seq": <n or null>, "created": <time>}``
``{"op": "reserve", "seq": <n>}`` (a commit sequence number handed to a writer, which writes its manifest with
it before it commits; the snapshot keeps the highest as ``reserved``) or ``{"op": "bad", "name": "<name>", "seq":
<n or null>, "created": <time>, "reason": "<text>"}`` (a checkpoint that failed validation after it was restored:
kept on disk, never chosen again; the snapshot keeps the marks of the checkpoints it lists as ``bad``). An entry
is :meth:`Checkpoint.summary`. An hpcckpt that predates a record kind skips its lines.

A delete names the instance it deleted (its ``seq`` and ``created``, as its manifest has them), not only its
name: the same name may be committed again later (a re-save of a step after a rewind), and when that commit's
line never lands (a writer killed after its rename, a full disk, a crash losing the unsynced line) the new
directory must be adopted, not taken for the deleted one. A delete without them (written by an hpcckpt before
this format) is read as deleting the entry the snapshot and journal listed under that name before it, and
nothing else (:class:`Instance`).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manifest import Checkpoint

INDEX_VERSION = 2
_ENTRIES_OPEN = b'"checkpoints":['
_COMMIT_OPEN = b'{"op":"commit","checkpoint":'
JOURNAL_VERSION = 1
# The journal is compacted into a new snapshot once it is larger than this fraction of the snapshot.
COMPACT_FRACTION = 0.25


class BadSnapshotError(ValueError):
    """The snapshot is not one this hpcckpt reads (not JSON, another format, a future version)."""


@dataclass(frozen=True)
class Snapshot:
    """A parsed snapshot: its generation (None for a version-1 index) and its entries, each as JSON text (a
    reader keeps what it built from each text, so an entry it has seen is not parsed again)."""

    generation: str | None
    entries: list[bytes]
    reserved: int = 0  # the highest commit sequence number handed out when it was written
    bad: dict[str, BadMark] = field(default_factory=dict)  # checkpoints marked bad, by name


@dataclass(frozen=True)
class Instance:
    """Which checkpoint of a name a delete record deleted: its commit sequence number (None for one written
    before hpcckpt numbered commits) and its time saved, both from its manifest. Numbers are unique, and the
    time tells apart the rare number handed out twice (a lost journal and snapshot forget what was reserved)."""

    seq: int | None
    created: float

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> Instance:
        """The instance ``checkpoint`` is."""
        return cls(checkpoint.seq, float(checkpoint.created))

    def matches(self, checkpoint: Checkpoint) -> bool:
        """Whether ``checkpoint`` (read from its manifest) is this very instance."""
        return checkpoint.seq == self.seq and float(checkpoint.created) == self.created


@dataclass(frozen=True)
class BadMark:
    """A checkpoint marked bad (it failed validation after a restore): which instance of its name, and why."""

    instance: Instance
    reason: str

    def fields(self, name: str) -> dict[str, Any]:
        return {"name": name, "seq": self.instance.seq, "created": self.instance.created, "reason": self.reason}


@dataclass(frozen=True)
class Record:
    """One journal line: a commit (with its entry, and the entry's JSON text), a delete (by name, and the
    instance deleted: None in a record written before deletes named it) or a reserved sequence number."""

    op: str
    name: str = ""
    entry: dict[str, Any] | None = None
    seq: int = 0
    text: bytes = b""
    instance: Instance | None = None
    reason: str = ""  # a bad mark's


def new_generation() -> str:
    return secrets.token_hex(8)


def parse_snapshot(raw: bytes) -> Snapshot:
    """The snapshot in ``raw``; :class:`BadSnapshotError` when it is not a version 1 or 2 index. As written
    by :func:`encode_snapshot` (one entry a line) the entries are not parsed here; any other layout (an
    edited file, version 1) is parsed whole and each entry encoded again."""
    lines = raw.split(b"\n")
    try:
        if len(lines) > 2 and lines[0].endswith(_ENTRIES_OPEN) and lines[-1] == b"]}":
            data = json.loads(lines[0] + b"]}")
            texts = [line.removesuffix(b",") for line in lines[1:-1] if line]
        else:
            data = json.loads(raw)
            texts = [json.dumps(e, separators=(",", ":")).encode() for e in data["checkpoints"]]
    except ValueError as error:
        raise BadSnapshotError(str(error)) from None
    except (TypeError, KeyError):
        raise BadSnapshotError("not an hpcckpt index") from None
    if not isinstance(data, dict):
        raise BadSnapshotError("not an hpcckpt index")
    version = data.get("hpcckpt_registry")
    if version == 1:
        return Snapshot(None, texts)
    generation = data.get("generation")
    reserved = data.get("reserved", 0)
    if version != INDEX_VERSION or not isinstance(generation, str) or not _whole(reserved):
        raise BadSnapshotError(f"index version {version!r}; expected 1 or {INDEX_VERSION}")
    return Snapshot(generation, texts, reserved, _bad_marks(data.get("bad")))


def _bad_marks(listed: object) -> dict[str, BadMark]:
    """The snapshot's ``bad`` list; a mark not of the form written is skipped (the checkpoint is chosen
    again: never worse than an hpcckpt without marks)."""
    marks = {}
    for item in listed if isinstance(listed, list) else []:
        record = bad_record_of(item) if isinstance(item, dict) else None
        if record is not None and record.instance is not None:
            marks[record.name] = BadMark(record.instance, record.reason)
    return marks


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def encode_snapshot(
    generation: str, reserved: int, encoded_entries: Iterable[str], bad: Mapping[str, BadMark] | None = None
) -> bytes:
    """The snapshot text for entries already encoded as JSON objects, and the bad marks of those entries."""
    marks = json.dumps([mark.fields(name) for name, mark in sorted((bad or {}).items())], separators=(",", ":"))
    header = (
        f'"hpcckpt_registry":{INDEX_VERSION},"generation":{json.dumps(generation)},"updated":{time.time()},'
        f'"reserved":{int(reserved)},"bad":{marks}'
    )
    body = ",\n".join(encoded_entries)
    return f'{{{header},"checkpoints":[\n{body}\n]}}'.encode()


def journal_header(generation: str) -> bytes:
    return (json.dumps({"hpcckpt_journal": JOURNAL_VERSION, "generation": generation}) + "\n").encode()


def commit_record(entry: dict[str, Any]) -> Record:
    """The journal record of a commit whose index entry is ``entry``."""
    return Record("commit", str(entry["name"]), entry, text=json.dumps(entry, separators=(",", ":")).encode())


def delete_record(checkpoint: Checkpoint) -> Record:
    """The journal record of the deletion of ``checkpoint``: this instance of its name, not a later one
    committed under the same name."""
    return Record("delete", checkpoint.name, instance=Instance.of(checkpoint))


def bad_record(checkpoint: Checkpoint, reason: str) -> Record:
    """The journal record marking ``checkpoint`` (this instance of its name) bad, for ``reason``."""
    return Record("bad", checkpoint.name, instance=Instance.of(checkpoint), reason=str(reason)[:2000])


def encode_records(records: Iterable[Record]) -> bytes:
    lines = []
    for record in records:
        if record.op == "commit":
            lines.append(_COMMIT_OPEN + record.text + b"}")
        elif record.op == "reserve":
            lines.append(json.dumps({"op": "reserve", "seq": record.seq}, separators=(",", ":")).encode())
        elif record.op == "bad" and record.instance is not None:
            mark = {"op": "bad", **BadMark(record.instance, record.reason).fields(record.name)}
            lines.append(json.dumps(mark, separators=(",", ":")).encode())
        else:
            fields: dict[str, Any] = {"op": "delete", "name": record.name}
            if record.instance is not None:
                fields.update(seq=record.instance.seq, created=record.instance.created)
            lines.append(json.dumps(fields, separators=(",", ":")).encode())
    return b"".join(line + b"\n" for line in lines)


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
                text = line[len(_COMMIT_OPEN) : -1] if line.startswith(_COMMIT_OPEN) else b""
                yield Record("commit", name, entry, text=text or json.dumps(entry, separators=(",", ":")).encode())
        elif data.get("op") == "delete" and isinstance(name := data.get("name"), str):
            yield Record("delete", name, instance=_instance(data))
        elif data.get("op") == "reserve" and _whole(seq := data.get("seq")):
            yield Record("reserve", seq=seq)  # type: ignore[arg-type]
        elif data.get("op") == "bad" and (record := bad_record_of(data)) is not None:
            yield record


def bad_record_of(data: dict[str, Any]) -> Record | None:
    """A bad mark's record from its fields (a journal line's, a snapshot's, a ``bad`` event's); None unless
    they name a checkpoint, its instance and a reason."""
    name, reason, instance = data.get("name"), data.get("reason"), _instance(data)
    if not isinstance(name, str) or not isinstance(reason, str) or instance is None:
        return None
    return Record("bad", name, instance=instance, reason=reason)


def _instance(data: dict[str, Any]) -> Instance | None:
    """The instance a delete record names; None when it names none (an older record) or names it in another
    form (the safe reading: it deletes only what the journal listed under that name before it)."""
    seq, created = data.get("seq"), data.get("created")
    if not (seq is None or _whole(seq)) or isinstance(created, bool) or not isinstance(created, (int, float)):
        return None
    return Instance(seq, float(created))
