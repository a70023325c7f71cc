"""Crafted ``state.tensors`` files are refused by the parser itself (issue 13 §1: the manifest's checksum
protects against corruption, not against a crafted file shipped with a crafted manifest)."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from hpcckpt import CheckpointStore
from hpcckpt.errors import CorruptCheckpointError
from hpcckpt.store.formats import FORMATS
from hpcckpt.store.manifest import Checkpoint, FileRecord, file_digest
from hpcckpt.store.transaction import SaveRequest, SaveTransaction

GOOD = {"storages": [[0, 16]], "tensors": [[0, "float32", [4], [1], 0]], "state": {"w": {"$tensor": 0}}}


def craft(header: Any = None, *, data: bytes = bytes(16), magic: bytes = b"HPCKTENS", version: int = 1,
          length: int | None = None, raw_header: bytes | None = None) -> bytes:  # fmt: skip
    text = raw_header if raw_header is not None else json.dumps(GOOD if header is None else header).encode()
    start = -(-(24 + len(text)) // 64) * 64
    preamble = struct.pack("<8sIIQ", magic, version, 0, len(text) if length is None else length)
    return (preamble + text).ljust(start, b"\0") + data


@pytest.fixture
def checkpoint(tmp_path: Path) -> Checkpoint:
    return CheckpointStore(tmp_path / "run").save({"w": torch.ones(4)}, step=1)


def read(checkpoint: Checkpoint, content: bytes, *, mmap: bool = True) -> dict[str, Any]:
    """Read ``content`` as the checkpoint's file: mapped, or (``mmap=False``) read into fresh memory and
    verified while read, against a manifest record crafted to match it (the checksum passes)."""
    path = checkpoint.path / "state.tensors"
    path.write_bytes(content)
    matching = dataclasses.replace(checkpoint, files=(FileRecord(path.name, len(content), file_digest(path)),))
    return FORMATS["tensors"].read(matching, "cpu", weights_only=True, mmap=mmap)


def test_the_crafting_helper_makes_a_valid_file(checkpoint: Checkpoint) -> None:
    data = struct.pack("<4f", 1, 2, 3, 4)
    assert read(checkpoint, craft(data=data))["w"].tolist() == [1.0, 2.0, 3.0, 4.0]


def with_(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


CASES = [
    ("bad magic", craft(magic=b"PK\x03\x04xxxx"), r"starts with b'PK\\x03\\x04xxxx', expected the magic"),
    ("bad version", craft(version=9), r"version 9; this hpcckpt reads version 1"),
    ("short file", b"HPCKTENS", r"8 bytes, shorter than the 24-byte preamble"),
    ("header beyond file", craft(length=1 << 40), r"header length 1099511627776 reaches beyond the file's"),
    ("not JSON", craft(raw_header=b"{nope"), r"its header is not valid JSON"),
    ("not an object", craft(raw_header=b"[1]"), r"its header is not a JSON object"),
    ("deep JSON", craft(raw_header=b"[" * 100000 + b"]" * 100000), r"its header is not valid JSON \(RecursionError"),
    ("deep state", craft(with_(state={"w": nested(100)})), r"nested deeper than 64 levels"),
    ("unknown dtype", craft(with_(tensors=[[0, "os.system", [4], [1], 0]])), r"unknown dtype 'os.system'"),
    ("storage beyond file", craft(with_(storages=[[0, 1 << 50]])), r"storage 0 ends at byte \d+, beyond the file"),
    ("overlapping storages", craft(with_(storages=[[0, 16], [0, 16]])), r"storage 1 at \[0, \+16\) overlaps"),
    ("misaligned storage", craft(with_(storages=[[8, 8]])), r"storage 0 at \[8, \+8\) overlaps, is misaligned"),
    ("negative size", craft(with_(storages=[[0, -16]])), r"storage 0 at \[0, \+-16\)"),
    ("storage not a pair", craft(with_(storages=[[0]])), r"storage 0 is \[0\], expected \[offset, nbytes\]"),
    ("shape beyond storage", craft(with_(tensors=[[0, "float32", [5], [1], 0]])), r"byte 20 of a storage of 16"),
    ("offset beyond storage", craft(with_(tensors=[[0, "float32", [1], [1], 4]])), r"reaches byte 20 of a storage"),
    ("stride beyond storage", craft(with_(tensors=[[0, "float32", [2, 2], [3, 1], 0]])), r"reaches byte 20"),
    ("negative shape", craft(with_(tensors=[[0, "float32", [-4], [1], 0]])), r"shape \[-4\].*is not sizes"),
    ("absurd shape", craft(with_(tensors=[[0, "float32", [1 << 70], [0], 0]])), r"is not sizes"),
    ("absurd numel", craft(with_(tensors=[[0, "float32", [1 << 40, 1 << 40], [0, 0], 0]])), r"is not sizes"),
    ("too many dims", craft(with_(tensors=[[0, "float32", [1] * 65, [1] * 65, 0]])), r"is not sizes"),
    ("bool as size", craft(with_(tensors=[[0, "float32", [True], [1], 0]])), r"is not sizes"),
    ("storage missing", craft(with_(tensors=[[3, "float32", [1], [1], 0]])), r"names storage 3, which this file"),
    ("tensor missing", craft(with_(state={"w": {"$tensor": 5}})), r"tensor reference 5 is not a tensor of this file"),
    ("bad entry", craft(with_(tensors=[[0, "float32"]])), r"is not \[storage, dtype, shape, stride, offset\]"),
    ("unknown tag", craft(with_(state={"w": {"$eval": "1"}})), r"\['w'\]: unknown tag '\$eval'"),
    ("huge int", craft(with_(state={"w": {"$int": "f" * 5000}})), r"malformed|at most 4096 characters"),
    ("bad float", craft(with_(state={"w": {"$float": "1e999"}})), r"expected one of \['-inf', 'inf', 'nan'\]"),
    ("bad base64", craft(with_(state={"w": {"$bytes": "%%%"}})), r"malformed \$bytes value"),
    ("pickle ref missing", craft(with_(state={"w": {"$pickle": [9, "x"]}})), r"data reference 9 is not a storage"),
    ("bad ndarray", craft(with_(state={"w": {"$ndarray": [0, "|O", [2]]}})), r"NumPy dtype '\|O' is not one of"),
    ("ndarray size", craft(with_(state={"w": {"$ndarray": [0, "<f8", [3]]}})), r"needs 24 bytes, the data has 16"),
    ("state not a dict", craft(with_(state=[1])), r"its state is a list, expected a dict"),
    (
        "integer parameter",
        craft(with_(tensors=[[0, "int32", [4], [1], 0]], state={"w": {"$param": [0, True]}})),
        r"parameter 0 cannot be made",
    ),
]


@pytest.mark.parametrize("mmap", [True, False], ids=["mapped", "read"])
@pytest.mark.parametrize(("content", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_crafted_file_is_refused_naming_the_file_and_the_fault(
    checkpoint: Checkpoint, content: bytes, message: str, mmap: bool
) -> None:
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        read(checkpoint, content, mmap=mmap)
    assert str(info.value).startswith(f"{checkpoint.path / 'state.tensors'}: ")


def test_a_crafted_file_with_a_matching_manifest_is_refused_by_the_store(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    request = SaveRequest(registry=store.registry, step=1, epoch=0, metrics={}, retention=lambda _: [])
    transaction = SaveTransaction.begin(request)
    (transaction.directory / "state.tensors").write_bytes(craft(with_(storages=[[0, 1 << 50]])))
    transaction.commit(None, format="tensors")  # its manifest's checksum is the crafted file's
    store.verify(1)
    with pytest.raises(CorruptCheckpointError, match=r"storage 0 ends at byte \d+, beyond the file"):
        store.load(1)
