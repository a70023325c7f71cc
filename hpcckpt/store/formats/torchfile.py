"""The ``torch`` format: one ``state.pt`` written by ``torch.save``, loadable anywhere with
``torch.load(path, weights_only=True)``.

The file is written through :class:`~hpcckpt.store.fileio.SyncedWriter` (checksummed while written,
fsynced before the commit) inside a save transaction; a failed write surfaces as the ``OSError`` under
``torch.save``'s own error, which the transaction turns into a :class:`StoreError` that says what stays.
Reading never unpickles arbitrary objects unless the caller passes ``weights_only=False``.
"""

from __future__ import annotations

import errno
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import CorruptCheckpointError, StoreError
from ...state import TrainState
from ..fileio import SyncedWriter
from ..manifest import Checkpoint, FileRecord
from ..transaction import SaveRequest, SaveTransaction
from . import TORCH_FORMAT, CheckpointRef, CheckpointSource, restore_whole

if TYPE_CHECKING:
    from ...state import RestoreOptions


class TorchFileFormat:
    """One ``state.pt`` file written by ``torch.save``."""

    name = TORCH_FORMAT
    filename = "state.pt"

    def __init__(self, *, checksum: bool = True) -> None:
        self.checksum = checksum

    def check_save(self, state: object, tag: str | None, metadata: Mapping[str, Any] | None) -> None:
        """A state dict or a TrainState, with a tag and metadata: everything the store takes."""

    def save(self, request: SaveRequest, state: TrainState | Mapping[str, Any]) -> Checkpoint:
        """Write ``state`` (a :class:`TrainState`'s state dict with the request's step and epoch, or a plain
        dict as it is) and commit it."""
        payload = request.payload(state)
        with SaveTransaction.begin(request) as transaction:
            return transaction.commit(self.write(payload, transaction.directory), format=self.name)

    def write(self, state: Mapping[str, Any], directory: Path) -> list[FileRecord]:
        """Write ``state`` into ``directory``; the file is fsynced when this returns."""
        import torch

        path = directory / self.filename
        out = SyncedWriter(path, checksum=self.checksum)
        try:
            torch.save(dict(state), out)  # type: ignore[arg-type]
            out.close()
        except BaseException as error:
            out.abort()
            # torch.save turns a failed write (ENOSPC, EDQUOT, EFBIG) into a RuntimeError about zip
            # positions; the OSError underneath is what the user needs to see.
            if out.failed is not None and not isinstance(error, OSError):
                raise out.failed from error
            raise
        return [FileRecord(self.filename, out.size, out.digest)]

    def verifies_read(self, *, mmap: bool) -> bool:
        """The store verifies the files before :meth:`read` (a separate pass)."""
        return False

    def read(self, checkpoint: Checkpoint, map_location: Any, *, weights_only: bool, mmap: bool) -> dict[str, Any]:
        import torch

        path = checkpoint.path / self.filename
        try:
            # With mmap, tensors are views of the page cache that verify_file just filled: nothing is copied,
            # but they keep the file mapped for as long as they live.
            state = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as error:
            if not weights_only:
                raise
            # The file is intact (its checksum matched) but holds objects other than tensors and containers.
            refused = next((ln.strip() for ln in str(error).splitlines() if "Unsupported global" in ln), "")
            raise StoreError(
                f"{path}: torch.load(weights_only=True) refuses its content ({refused or 'arbitrary objects'}). "
                "Load it with unsafe_allow_pickle=True only if you trust who wrote it: unpickling runs code"
            ) from None
        except Exception as error:
            if not path.exists():  # deleted (by retention) since it was verified; torch says RuntimeError
                raise FileNotFoundError(errno.ENOENT, "deleted while loading", str(path)) from error
            # Its checksum matched, so the file is not the problem: out of memory, a map_location this node
            # cannot honour... Not a reason to fall back to an older checkpoint.
            raise StoreError(f"{path}: torch.load(map_location={map_location!r}) failed: {error}") from error
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{path}: holds a {type(state).__name__}, expected a dict")
        return state

    def restore(
        self,
        source: CheckpointSource,
        state: TrainState,
        ckpt: CheckpointRef,
        options: RestoreOptions,
        map_location: Any,
    ) -> Checkpoint | None:
        """In one process: the whole state, copied into ``state``."""
        return restore_whole(source, state, ckpt, options, map_location)


FORMAT = TorchFileFormat()
