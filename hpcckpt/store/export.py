"""Writing a checkpoint's model weights as a ``.safetensors`` file, the layout the Hugging Face ecosystem loads.

The layout is written here (an 8-byte little-endian header length, a JSON header padded with spaces to
8 bytes, then each tensor's bytes, contiguous, in header order): ``safetensors`` is not needed to export.
safetensors holds no shared memory, so tensors that shared a storage (tied weights) are each written whole;
it holds only tensors, so a non-tensor value in the weights is refused with its key named.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from ..errors import StoreError
from .fileio import SyncedWriter

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


def write_safetensors(weights: Mapping[Any, Any], out: SyncedWriter, *, source: str) -> None:
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
