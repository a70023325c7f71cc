"""Writing a checkpoint as one file: a ``torch.load``-able file, or the model's weights as a ``.safetensors`` file,
the layout the Hugging Face ecosystem loads.

The file is written atomically (a temporary name beside it, fsync, rename, fsync of the directory): an
interrupted export leaves no partial file under the name asked for. Writing shows its progress in bytes
(:class:`~hpcckpt.progress.Progress`: a bar on a terminal, a line per 10 % in a log, nothing when it takes
under two seconds).

The layout is written here (an 8-byte little-endian header length, a JSON header padded with spaces to
8 bytes, then each tensor's bytes, contiguous, in header order): ``safetensors`` is not needed to export.
safetensors holds no shared memory, so tensors that shared a storage (tied weights) are each written whole;
it holds only tensors, so a non-tensor value in the weights is refused with its key named.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import StoreError
from ..progress import Progress
from .fileio import SyncedWriter, fsync_dir

EXPORT_FORMATS = ("torch", "safetensors")
# torch dtype name -> safetensors dtype name (the ones safetensors.torch loads).
_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}


class Writable(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


def write_safetensors(weights: Mapping[Any, Any], out: Writable, *, source: str) -> None:
    """Write ``weights`` (a model's state dict) to ``out`` in the safetensors layout; ``source`` names the
    checkpoint in errors and in the file's ``__metadata__``."""
    import torch

    tensors = []
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "hpcckpt_checkpoint": source}}
    offset = 0
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise StoreError(
                f"checkpoint {source}: model entry {key!r} is a {type(value).__name__}; a .safetensors file holds "
                "only dense tensors under string names (export with --as torch instead)"
            )
        name = _NAMES.get(str(value.dtype).removeprefix("torch."))
        if name is None:
            raise StoreError(
                f"checkpoint {source}: model entry {key!r} has dtype {value.dtype}, which safetensors cannot hold "
                f"(it holds {', '.join(sorted(_NAMES))}); export with --as torch instead"
            )
        data = value.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        header[key] = {"dtype": name, "shape": list(value.shape), "data_offsets": [offset, offset + data.numel()]}
        offset += data.numel()
        tensors.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    out.write(struct.pack("<Q", len(text)))
    out.write(text)
    for data in tensors:
        out.write(data.numpy().data)


def write_export(target: Path, state: Any, *, as_: str, source: str) -> None:
    """Write ``state`` (the whole state, or a model's state dict for ``as_="safetensors"``) to ``target`` as
    ``as_``, atomically, showing progress; ``source`` names the checkpoint. A failed write raises
    :class:`StoreError` naming ``target`` and leaves nothing behind."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    writer = None
    try:
        writer = SyncedWriter(tmp, checksum=False)
        with Progress(_size_of(state), f"export {source} to {target}") as bar:
            counted = _Counted(writer, bar)
            if as_ == "safetensors":
                write_safetensors(state, counted, source=source)
            else:
                import torch

                torch.save(state, counted)  # type: ignore[arg-type]
            writer.close()
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as error:
        if writer is not None:
            writer.abort()
        tmp.unlink(missing_ok=True)
        failed = writer.failed if writer is not None and writer.failed is not None else error
        if isinstance(failed, OSError):
            raise StoreError(f"could not write {target}: {failed.strerror or failed}") from error
        raise


class _Counted:
    """A :class:`SyncedWriter` whose writes are counted on a progress bar."""

    def __init__(self, out: SyncedWriter, bar: Progress) -> None:
        self._out = out
        self._bar = bar

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self._out.write(data)
        self._bar.update(n)
        return n

    def flush(self) -> None:
        self._out.flush()

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._out.tell()


def _size_of(state: Any) -> int | None:
    """The bytes of the tensors in ``state`` (each storage once): what a file of it is, within its index;
    None when there are none to count (the total is then unknown, and progress shows bytes so far)."""
    import torch

    seen: set[tuple[Any, int]] = set()
    total = 0
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (value.device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total or None
