"""How a checkpoint's state is laid out in files: the formats, one module each, and the table of them.

Three formats today, named in every manifest:

- ``tensors`` (:mod:`.tensorfile`, the store's default since issue 13): one ``state.tensors`` file, a JSON
  index and raw tensor bytes, loaded without pickle (values outside its safe encoding, :mod:`.codec`, go
  through ``torch.load(weights_only=True)``'s allow-list);
- ``torch`` (:mod:`.torchfile`): one ``state.pt`` written by ``torch.save``, loadable anywhere with
  ``torch.load(path, weights_only=True)``;
- ``dcp`` (:mod:`.dcp`): a torch.distributed.checkpoint directory, one file per rank and ``.metadata``,
  saved collectively by the ranks of a process group and read without running code from it
  (:mod:`.dcpread`).

A format owns its own save and restore; it saves through one
:class:`~hpcckpt.store.transaction.SaveTransaction`, which owns the temporary directory, the manifest, the
commit and retention. The store picks a format by the name a manifest or its caller gives, through
:data:`FORMATS`, which imports a format's module only when it is first asked for: the store never imports
a format's internals, and ``import hpcckpt`` never imports one.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from ...errors import UsageError
from ..manifest import Checkpoint

if TYPE_CHECKING:
    from ...state import RestoreOptions, TrainState
    from ..transaction import SaveRequest

TENSORS_FORMAT = "tensors"
TORCH_FORMAT = "torch"
DCP_FORMAT = "dcp"

CheckpointRef: TypeAlias = Checkpoint | int | str | None  # a step number, a name; None: the newest valid


class CheckpointSource(Protocol):
    """What a format's restore asks of the store: finding checkpoints and reading them verified."""

    run_dir: Path

    def list(self) -> list[Checkpoint]: ...

    def get(self, ref: Checkpoint | int | str) -> Checkpoint: ...

    def newest_valid(self, skip: Collection[str] = ()) -> Checkpoint | None: ...

    def load_checkpoint(
        self,
        ckpt: CheckpointRef = None,
        map_location: Any = "cpu",
        *,
        unsafe_allow_pickle: bool = False,
        mmap: bool = True,
    ) -> tuple[Checkpoint, dict[str, Any]]: ...


class CheckpointFormat(Protocol):
    """A layout of a checkpoint's files, with its own save and restore."""

    name: str

    def check_save(self, state: object, tag: str | None, metadata: Mapping[str, Any] | None) -> None:
        """Refuse, with a :class:`UsageError`, what this format cannot save: called by the store after the
        step, epoch and metrics are checked and before the tag is (the order users have always seen)."""
        ...

    def save(self, request: SaveRequest, state: TrainState | Mapping[str, Any]) -> Checkpoint:
        """Write ``state`` through a save transaction for ``request`` and commit it (collective for a
        format whose files every rank writes)."""
        ...

    def read(self, checkpoint: Checkpoint, map_location: Any, *, weights_only: bool, mmap: bool) -> dict[str, Any]:
        """The whole state in this process (files verified by the store first, unless :meth:`verifies_read`
        says this read checks them itself). ``mmap``: tensors may map the files."""
        ...

    def verifies_read(self, *, mmap: bool) -> bool:
        """Whether :meth:`read` with this ``mmap`` checks every file against the manifest itself, hashing
        the bytes as it reads them (one pass: no separate verification), and hands nothing out before they
        match; the store then skips its own verification pass."""
        ...

    def restore(
        self,
        source: CheckpointSource,
        state: TrainState,
        ckpt: CheckpointRef,
        options: RestoreOptions,
        map_location: Any,
    ) -> Checkpoint | None:
        """Load ``ckpt`` (None: the newest valid) from ``source`` into ``state``; None when nothing is saved
        yet and none was asked for."""
        ...


_MODULES: Mapping[str, str] = {TENSORS_FORMAT: "tensorfile", TORCH_FORMAT: "torchfile", DCP_FORMAT: "dcp"}


class _FormatTable(Mapping[str, "CheckpointFormat"]):
    """Every format by name; a format's module is imported the first time it is looked up."""

    def __getitem__(self, name: str) -> CheckpointFormat:
        module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        return cast("CheckpointFormat", module.FORMAT)

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


FORMATS: Mapping[str, CheckpointFormat] = _FormatTable()


def writing_format(name: str, compression: str | None, compression_level: int) -> CheckpointFormat:
    """The format ``name`` as a store writes it: with ``compression`` (``"zstd"``, only for the
    ``tensors`` format) at ``compression_level``, or as it is. A :class:`UsageError` for a bad value, a
    format that cannot compress, or zstandard missing. Reading is always by the file's own layout."""
    from .zstdframes import parse

    if name not in FORMATS:
        raise UsageError(f"Invalid checkpoint format {name!r}: expected one of {sorted(FORMATS)}")
    setting = parse(compression, compression_level, name)
    if setting is None:
        return FORMATS[name]
    module = importlib.import_module(f"{__name__}.{_MODULES[TENSORS_FORMAT]}")  # as the table does: no cycle
    return cast("CheckpointFormat", module.TensorFileFormat(compression=setting))


def restore_whole(
    source: CheckpointSource, state: TrainState, ckpt: CheckpointRef, options: RestoreOptions, map_location: Any
) -> Checkpoint | None:
    """Restore in one process from the whole state, read by the checkpoint's own format and copied (the
    objects restored into keep no checkpoint file in use). With ``ckpt`` None on a run with nothing saved
    yet, None and ``state`` left as it is."""
    if ckpt is None and not source.list():
        return None
    checkpoint, payload = source.load_checkpoint(ckpt, map_location, mmap=False)
    state.load_state_dict(payload, options)
    return checkpoint
