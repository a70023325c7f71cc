"""The ``tensors`` format (the store's default since issue 13): one ``state.tensors`` file, no pickle.

Layout: a 24-byte preamble (magic ``HPCKTENS``, version, flags, header length, little-endian), a JSON header
``{"storages": [[offset, nbytes], ...], "tensors": [[storage, dtype, shape, stride, offset], ...],
"state": ...}``, then the raw bytes of each distinct storage, each 64-byte aligned, offsets counted from the
data region (the first 64-byte boundary after the header). A tensor is a view of a storage, so tied weights
are written once and load tied, and views, non-contiguous and empty tensors come back with their exact
strides. The state's other values are in the safe encoding of :mod:`.codec`; values it cannot carry are
pickled alone into a storage and loaded with ``torch.load(weights_only=True)`` unless the caller allows
full pickle by name. Version 2 of the layout (``compression="zstd"``, issue 14) has the same preamble and
header, with a ``"compression"`` field, and each storage's bytes as zstd records (:mod:`.zstdframes`);
every file is read by what it says it is, whatever the store's current setting.

Invariants: bytes go from each storage's memory to :class:`~hpcckpt.store.fileio.SyncedWriter` with no
intermediate copy (CUDA storages: one host copy through a reused buffer), hashed once while written. On
load the store has hashed the file before this module parses it (verify-before-trust), and the parser is
safe on its own (a crafted file with a crafted manifest passes the checksum): every length, offset, dtype
name, shape and stride is checked against the file before a tensor exists, and a bad one is a
:class:`CorruptCheckpointError` naming the file and the fault; dtype names go through an allow table.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import CorruptCheckpointError, StoreError, UsageError
from ...state import TrainState
from ..fileio import SyncedWriter, format_digest, new_digest
from ..manifest import Checkpoint, FileRecord, check_digest, check_size
from ..transaction import SaveRequest, SaveTransaction
from . import TENSORS_FORMAT, CheckpointRef, CheckpointSource
from .codec import CodecError, Decoder, Encoder, PickleRefusedError
from .zstdframes import MAX_RATIO, Compression, FrameReader, FrameWriter

if TYPE_CHECKING:
    import torch

    from ...state import RestoreOptions

MAGIC = b"HPCKTENS"
VERSION = 1
COMPRESSED_VERSION = 2  # storages as zstd records: a hpcckpt that predates it refuses the file by its version
_PREAMBLE = struct.Struct("<8sIIQ")
ALIGN = 64
_MAX_DIMS = 64
_LIMIT = 1 << 62  # any size, stride or offset beyond this is absurd (and would overflow torch's int64)
# Every torch dtype with plain bytes, by name; quantized dtypes are not here (their tensors are pickled).
_DTYPE_NAMES = (
    *("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64"),
    *("float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128"),
    *("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2"),
    *("bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"),
    *("uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7", "int1", "int2", "int3", "int4", "int5", "int6"),
    "int7",
)
_CHUNK = 64 << 20  # CUDA storages are copied to the host in pieces of this size through one pinned buffer
_READ_PIECE = 1 << 20  # a verified read hashes each piece of this size right after reading it (in cache)


@functools.cache
def dtypes() -> dict[str, torch.dtype]:
    """The allow table: dtype name -> dtype, for the names this torch has (read at first use: the store
    makes its format object on login nodes, where torch is not imported)."""
    import torch

    found = {name: getattr(torch, name, None) for name in _DTYPE_NAMES}
    return {name: dtype for name, dtype in found.items() if isinstance(dtype, torch.dtype)}


class TensorFileFormat:
    """One ``state.tensors`` file: a JSON index and each distinct storage's raw bytes."""

    name = TENSORS_FORMAT
    filename = "state.tensors"

    def __init__(self, *, checksum: bool = True, compression: Compression | None = None) -> None:
        self.checksum = checksum
        self.compression = compression

    def check_save(self, state: object, tag: str | None, metadata: Mapping[str, Any] | None) -> None:
        """A state dict or a TrainState, with a tag and metadata: everything the store takes (a value the
        encoding refuses, a meta tensor, is named when the save encodes it)."""

    # -- saving ---------------------------------------------------------------------------------------------
    def save(self, request: SaveRequest, state: TrainState | Mapping[str, Any]) -> Checkpoint:
        """Write ``state`` (a :class:`TrainState`'s state dict with the request's step and epoch, or a dict as
        it is) and commit it. What cannot be saved is refused before the temporary directory exists."""
        payload = request.payload(state)
        plan = self.plan(payload)
        compression = None if self.compression is None else self.compression.describe()
        with SaveTransaction.begin(request) as transaction:
            return transaction.commit(
                [plan.write(transaction.directory / self.filename, self.checksum)],
                format=self.name,
                compression=compression,
            )

    def write(self, state: Mapping[str, Any], directory: Path) -> list[FileRecord]:
        """Write ``state`` into ``directory``; the file is fsynced when this returns."""
        return [self.plan(state).write(directory / self.filename, self.checksum)]

    def plan(self, state: Mapping[str, Any]) -> _Plan:
        """The header and the storages to write for ``state``; :class:`UsageError` for what cannot be saved."""
        plan = _Plan({dtype: name for name, dtype in dtypes().items()}, self.compression)
        try:
            tree = plan.encoder.encode(dict(state))
            plan.finish(tree)
        except CodecError as error:
            raise UsageError(f"Cannot save the state {error}") from None
        return plan

    # -- loading --------------------------------------------------------------------------------------------
    def read(self, checkpoint: Checkpoint, map_location: Any, *, weights_only: bool, mmap: bool) -> dict[str, Any]:
        """The state; with ``mmap`` its tensors are views of a private (copy-on-write) mapping of the file
        (a compressed file cannot be mapped: it is read, and decompressed, into fresh memory instead)."""
        path = checkpoint.path / self.filename
        device = _device(map_location)
        _check_usable(device, path)
        expected = self._record(checkpoint, path) if self.verifies_read(mmap=mmap) else None
        with _Reader(path, dtypes(), mapped=mmap and device.type == "cpu", expected=expected) as reader, _no_gc():
            try:
                return reader.state(device, weights_only=weights_only)
            except (RuntimeError, MemoryError) as error:
                # The file parsed and matched its checksum: out of memory (host or device) is not a reason
                # to fall back to an older checkpoint.
                raise StoreError(f"{path}: cannot load onto {device}: {type(error).__name__}: {error}") from error

    def verifies_read(self, *, mmap: bool) -> bool:
        """Without ``mmap`` the file is hashed as it is read into fresh memory (one pass over the bytes: on a
        cold cache, one pass over the disk) and nothing is handed out before the checksum matches. With
        ``mmap`` the store hashes the file first, which fills the page cache that the views then map."""
        return not mmap

    def _record(self, checkpoint: Checkpoint, path: Path) -> FileRecord:
        for record in checkpoint.files:
            if record.name == self.filename:
                return record
        raise CorruptCheckpointError(f"{path}: not listed in the manifest of checkpoint {checkpoint.name}")

    def restore(
        self,
        source: CheckpointSource,
        state: TrainState,
        ckpt: CheckpointRef,
        options: RestoreOptions,
        map_location: Any,
    ) -> Checkpoint | None:
        """In one process. Every storage is read once into fresh memory, hashed as it is read (one pass over
        the file, verified before anything is handed out); then the model's ``load_state_dict`` copies its
        weights into the parameters and the other objects (optimizer state, RNG states...) keep the fresh
        tensors as they are. The file is closed, and was never mapped, when this returns. Measured at
        1.2 GB (an MLP and AdamW, ``hpcckpt bench store --only restore``, 2 cores): cold 0.85 s against
        1.43 s for hashing a mapping first and copying from it, warm 0.71 s against 0.36 s (fresh memory
        costs its page faults). A chain's task restores on a node that has not read the file: cold wins.
        """
        if ckpt is None and not source.list():
            return None
        checkpoint, payload = source.load_checkpoint(ckpt, map_location, mmap=False)
        state.load_state_dict(payload, options)
        return checkpoint


class _Plan:
    """What one save writes: the encoded header, then each storage's bytes at its aligned offset."""

    def __init__(self, dtype_names: Mapping[Any, str], compression: Compression | None = None) -> None:
        self.dtype_names = dtype_names
        self.compression = compression
        self.sources: list[Any] = []  # a uint8 tensor over a storage, or a memoryview of raw bytes
        self.sizes: list[int] = []
        self.entries: list[list[Any]] = []
        self._index: dict[Any, int] = {}
        self.encoder = Encoder(self._tensor, self._raw, self._dtype_name)
        self.header = b""
        self.offsets: list[int] = []

    def _dtype_name(self, dtype: Any) -> str:
        try:
            return self.dtype_names[dtype]
        except KeyError:
            raise CodecError(f"dtype {dtype} is not one of {sorted(self.dtype_names.values())}") from None

    def _raw(self, data: memoryview) -> int:
        self.sources.append(data)
        self.sizes.append(data.nbytes)
        return len(self.sources) - 1

    def _tensor(self, tensor: torch.Tensor) -> Any:
        import torch

        if tensor.device.type == "meta":
            raise CodecError("a meta tensor holds no data; materialise it (e.g. Module.to_empty) or leave it out")
        kind = type(tensor)
        if (
            kind not in (torch.Tensor, torch.nn.Parameter)
            or tensor.layout != torch.strided
            or tensor.is_quantized
            or tensor.is_nested
            or tensor.dtype not in self.dtype_names
        ):
            return None  # sparse, quantized, nested, subclasses: pickled alone (the codec's fallback)
        if tensor.is_conj() or tensor.is_neg():
            tensor = tensor.resolve_conj().resolve_neg()  # a lazy view: its storage alone is not its value
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = (tensor.device, storage.data_ptr(), nbytes) if nbytes else ("empty", len(self.sources))
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.sources)
            self.sources.append(torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage))
            self.sizes.append(nbytes)
        self.entries.append(
            [index, self.dtype_names[tensor.dtype], list(tensor.shape), list(tensor.stride()), tensor.storage_offset()]
        )
        ref = len(self.entries) - 1
        if kind is torch.nn.Parameter:
            return {"$param": [ref, tensor.requires_grad]}
        return {"$tensor": ref}

    def finish(self, tree: Any) -> None:
        offset = 0
        for size in self.sizes:
            self.offsets.append(offset)
            offset = _aligned(offset + size)
        storages = [[o, n] for o, n in zip(self.offsets, self.sizes, strict=True)]
        header: dict[str, Any] = {"storages": storages, "tensors": self.entries, "state": tree}
        if self.compression is not None:
            header["compression"] = self.compression.describe()
        self.header = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()

    def write(self, path: Path, checksum: bool) -> FileRecord:
        out = SyncedWriter(path, checksum=checksum)
        try:
            version = VERSION if self.compression is None else COMPRESSED_VERSION
            out.write(_PREAMBLE.pack(MAGIC, version, 0, len(self.header)))
            out.write(self.header)
            start = _aligned(_PREAMBLE.size + len(self.header))
            _pad(out, start)
            host: list[Any] = []  # the reused host buffer for device storages
            if self.compression is not None:
                frames = FrameWriter(self.compression, out)
                for source in self.sources:  # the background thread of an async save compresses
                    _write_storage(frames, source, host)
            else:
                for source, offset in zip(self.sources, self.offsets, strict=True):
                    _pad(out, start + offset)
                    _write_storage(out, source, host)
            out.close()
        except BaseException:
            out.abort()
            raise
        return FileRecord(path.name, out.size, out.digest)


def _write_storage(out: SyncedWriter | FrameWriter, source: Any, host: list[Any]) -> None:
    """Write one storage's bytes: from its own memory on the CPU, else through one reused host buffer."""
    if isinstance(source, memoryview):
        out.write(source)
        return
    if source.device.type == "cpu":
        out.write(memoryview(source.numpy()))
        return
    import torch

    if not host:  # pinned, so the device copies at full speed; one buffer for the whole save
        host.append(torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=torch.cuda.is_available()))
    buffer = host[0]
    for begin in range(0, source.numel(), _CHUNK):
        piece = source[begin : begin + _CHUNK]
        buffer[: piece.numel()].copy_(piece)  # synchronous: the buffer is reused for the next piece
        out.write(memoryview(buffer[: piece.numel()].numpy()))


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: building 20,000 tensors and their containers otherwise triggers
    collections that walk every object made so far (measured: 40 % of such a load), and they free nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _pad(out: SyncedWriter, position: int) -> None:
    gap = position - out.tell()
    if gap:
        out.write(bytes(gap))


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _device(map_location: Any) -> torch.device:
    import torch

    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, torch.device | str):
        try:
            return torch.device(map_location)
        except RuntimeError:
            pass
    raise UsageError(
        f"Invalid map_location {map_location!r} for a 'tensors' checkpoint: expected 'cpu', a device name such "
        "as 'cuda:0', or a torch.device"
    )


def _check_usable(device: torch.device, path: Path) -> None:
    """A :class:`StoreError` when this process cannot place tensors on ``device`` (a CUDA device on a
    CPU-only node): said before the file is read, and not a reason to try an older checkpoint."""
    if device.type == "cpu":
        return
    import torch

    try:
        torch.empty(0, device=device)
    except Exception as error:  # torch raises AssertionError, RuntimeError or others by backend
        raise StoreError(
            f"{path}: map_location {str(device)!r} is not usable in this process ({type(error).__name__}: "
            f"{error}); pass map_location='cpu' or a device this node has"
        ) from None


class _Reader:
    """One checkpoint file, parsed and checked; tensors are built on demand from its storages.

    ``mapped``: the storages are views of a private (copy-on-write) mapping of the file, which the store has
    verified before; a compressed file is never mapped. Otherwise each storage is read (or decompressed)
    into fresh memory, and with ``expected`` (the manifest's record) every byte of the file is hashed in
    file order as it is read, each piece right after its read (still in the CPU's cache), and the checksum
    compared before any tensor is built.
    """

    def __init__(self, path: Path, dtypes: Mapping[str, Any], *, mapped: bool, expected: FileRecord | None) -> None:
        self.path = path
        self.dtypes = dtypes
        self.mapped = mapped
        self.expected = expected
        self.hasher = None if expected is None else new_digest()
        self.hashed = 0  # bytes of the file hashed so far, from its start
        self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        self.map: mmap.mmap | None = None
        try:
            size = os.fstat(self.fd).st_size
            if expected is not None:
                check_size(path, size, expected)
            if size < _PREAMBLE.size:
                raise self.corrupt(f"{size} bytes, shorter than the {_PREAMBLE.size}-byte preamble")
            self.size = size
            # A compressed file's storages are records, not bytes to map: read (and decompress) it instead.
            self.compressed = _PREAMBLE.unpack(self._read_bytes(0, _PREAMBLE.size))[1] == COMPRESSED_VERSION
            mapped = self.mapped = mapped and not self.compressed
            if mapped:
                # Private (copy-on-write): tensors handed out may be written to; the file never is.
                self.map = mmap.mmap(self.fd, size, access=mmap.ACCESS_COPY)
            else:
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(self.fd)
            raise
        self.storages: list[Any] = []
        self.built: list[Any] = []

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        del self.storages, self.built
        os.close(self.fd)
        if self.map is not None:
            with contextlib.suppress(BufferError):  # tensors still map it (mmap=True): it lives, and closes, with them
                self.map.close()

    def corrupt(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path}: {what}; not a valid 'tensors' checkpoint file")

    def state(self, device: Any, *, weights_only: bool) -> dict[str, Any]:
        header, start = self._header()
        spans = self._spans(header.get("storages"), start)
        entries = header.get("tensors")
        if type(entries) is not list:
            raise self.corrupt("header field 'tensors' is not a list")
        self._load_storages(spans, device)
        self.entries = entries
        self.built = [None] * len(entries)
        decoder = Decoder(self._tensor, self._raw, self._dtype, weights_only=weights_only)
        try:
            state = decoder.decode(header.get("state"))
        except PickleRefusedError as refused:
            raise StoreError(f"{self.path}: {refused}") from None
        except CodecError as error:
            raise self.corrupt(str(error)) from None
        if type(state) is not dict:
            raise self.corrupt(f"its state is a {type(state).__name__}, expected a dict")
        return state

    def _header(self) -> tuple[dict[str, Any], int]:
        head = self.map if self.map is not None else self._read_bytes(0, _PREAMBLE.size)
        magic, version, _flags, length = _PREAMBLE.unpack_from(head, 0)
        if magic != MAGIC:
            raise self.corrupt(f"starts with {magic!r}, expected the magic {MAGIC!r}")
        if version not in (VERSION, COMPRESSED_VERSION):
            raise self.corrupt(
                f"version {version}; this hpcckpt reads version {VERSION} or {COMPRESSED_VERSION} (compressed)"
            )
        if length > self.size - _PREAMBLE.size:
            raise self.corrupt(f"header length {length} reaches beyond the file's {self.size} bytes")
        start = self.data_start = _aligned(_PREAMBLE.size + length)
        if self.map is None:
            # Read (and hash) from the file's start through the header and its padding, as one piece.
            head = self._read_bytes(0, min(start, self.size))
            self._hash(head, 0)
        try:
            header = json.loads(head[_PREAMBLE.size : _PREAMBLE.size + length])
        except (ValueError, RecursionError) as error:
            raise self.corrupt(f"its header is not valid JSON ({type(error).__name__}: {str(error)[:80]})") from None
        if type(header) is not dict:
            raise self.corrupt("its header is not a JSON object")
        if self.compressed:
            codec = header.get("compression")
            if type(codec) is not dict or codec.get("codec") != "zstd":
                raise self.corrupt(f"header field 'compression' is {str(codec)[:60]}, expected a codec 'zstd'")
        return header, start

    def _spans(self, storages: Any, start: int) -> list[tuple[int, int]]:
        if type(storages) is not list:
            raise self.corrupt("header field 'storages' is not a list")
        spans, end = [], 0
        for index, span in enumerate(storages):
            if type(span) is not list or len(span) != 2 or not all(type(n) is int for n in span):
                raise self.corrupt(f"storage {index} is {str(span)[:60]}, expected [offset, nbytes]")
            offset, nbytes = span
            if offset < end or nbytes < 0 or offset % ALIGN:
                raise self.corrupt(f"storage {index} at [{offset}, +{nbytes}) overlaps, is misaligned or negative")
            end = offset + nbytes
            if self.compressed:
                # Records hold the bytes: refuse what no zstd data of this size can hold before allocating it.
                if end > (self.size - start) * MAX_RATIO:
                    raise self.corrupt(
                        f"storage {index} ends at raw byte {end}, more than {MAX_RATIO} times the "
                        f"{self.size - start} compressed bytes could hold (a decompression bomb)"
                    )
            elif start + end > self.size:
                raise self.corrupt(f"storage {index} ends at byte {start + end}, beyond the file's {self.size} bytes")
            spans.append((start + offset, nbytes))
        return spans

    def _load_storages(self, spans: list[tuple[int, int]], device: Any) -> None:
        import numpy as np
        import torch

        if self.map is None:  # read into fresh memory by the kernel: no page faults on a mapping
            if self.compressed:
                try:
                    self.storages = self._decompress([nbytes for _begin, nbytes in spans])
                except CorruptCheckpointError:
                    self._check_whole_file()  # a changed byte: say so, rather than what zstd made of it
                    raise
            else:
                self.storages = [self._read_fresh(begin, nbytes) for begin, nbytes in spans]
            self._hash_gap(self.size)
            if self.expected is not None and self.hasher is not None:
                check_digest(self.path, format_digest(self.hasher), self.expected)
            self.storages = [storage.to(device) for storage in self.storages]
            return
        whole = np.frombuffer(self.map, dtype=np.uint8)
        self.storages = [torch.from_numpy(whole[begin : begin + nbytes]) for begin, nbytes in spans]
        del whole

    def _read_fresh(self, begin: int, nbytes: int) -> Any:
        """The bytes [begin, begin + nbytes) in a new uint8 tensor, hashed piece by piece as they arrive."""
        import torch

        self._hash_gap(begin)
        fresh = torch.empty(nbytes, dtype=torch.uint8)
        whole = fresh.numpy().data
        for offset in range(0, nbytes, _READ_PIECE):
            piece = whole[offset : offset + _READ_PIECE]
            self._read_into(piece, begin + offset)
            self._hash(piece, begin + offset)
        return fresh

    def _decompress(self, sizes: list[int]) -> list[Any]:
        """Each storage in fresh memory of its declared size, decompressed from the records that follow
        the header (hashed as they are read, in file order); nothing may follow the last record."""
        import torch

        self.position = self.data_start
        frames = FrameReader(self.path, self._take, self.corrupt)
        storages = []
        for index, nbytes in enumerate(sizes):
            fresh = torch.empty(nbytes, dtype=torch.uint8)
            frames.fill(index, fresh.numpy().data)
            storages.append(fresh)
        if self.position != self.size:
            raise self.corrupt(f"its last storage's compressed records end at byte {self.position}, not at its end")
        return storages

    def _check_whole_file(self) -> None:
        """With a manifest record to check against: hash the rest of the file and raise the checksum
        mismatch when there is one."""
        if self.expected is not None and self.hasher is not None:
            while self.hashed < self.size:  # in pieces: the rest of a large file is not read into memory whole
                self._hash_gap(min(self.hashed + _READ_PIECE, self.size))
            check_digest(self.path, format_digest(self.hasher), self.expected)

    def _take(self, view: memoryview) -> None:
        """The file's next bytes into ``view``, hashed."""
        if self.position + view.nbytes > self.size:
            raise self.corrupt(f"its compressed records end beyond the file's {self.size} bytes")
        self._read_into(view, self.position)
        self._hash(view, self.position)
        self.position += view.nbytes

    def _hash_gap(self, upto: int) -> None:
        """Hash the bytes not read into a storage (padding) from where hashing stands to ``upto``."""
        if self.hasher is not None and upto > self.hashed:
            self._hash(self._read_bytes(self.hashed, upto - self.hashed), self.hashed)

    def _hash(self, data: Any, offset: int) -> None:
        if self.hasher is not None:
            assert offset == self.hashed, "the file is hashed in order"
            self.hasher.update(data)
            self.hashed = offset + len(data)

    def _read_bytes(self, begin: int, nbytes: int) -> bytes:
        buffer = bytearray(nbytes)
        self._read_into(memoryview(buffer), begin)
        return bytes(buffer)

    def _read_into(self, view: memoryview, begin: int) -> None:
        while view.nbytes:
            got = os.preadv(self.fd, [view], begin)
            if got <= 0:
                raise self.corrupt(f"ended while reading bytes {begin}..{begin + view.nbytes}")
            view, begin = view[got:], begin + got

    def _raw(self, index: Any) -> memoryview:
        if type(index) is not int or not 0 <= index < len(self.storages):
            raise CodecError(f"data reference {str(index)[:40]} is not a storage of this file")
        return memoryview(self.storages[index].cpu().numpy())

    def _dtype(self, name: Any) -> Any:
        dtype = self.dtypes.get(name) if type(name) is str else None
        if dtype is None:
            raise CodecError(f"unknown dtype {str(name)[:40]!r}")
        return dtype

    def _tensor(self, index: Any, requires_grad: bool | None) -> Any:
        if type(index) is not int or not 0 <= index < len(self.entries):
            raise CodecError(f"tensor reference {str(index)[:40]} is not a tensor of this file")
        tensor = self.built[index]
        if tensor is None:
            tensor = self.built[index] = self._build(self.entries[index])
        if requires_grad is None:
            return tensor
        import torch

        try:
            return torch.nn.Parameter(tensor, requires_grad=requires_grad)
        except RuntimeError as error:  # a crafted file: gradients on an integer tensor
            raise CodecError(f"parameter {index} cannot be made ({error})") from None

    def _build(self, entry: Any) -> Any:
        try:
            index, name, shape, stride, offset = entry
        except (TypeError, ValueError):
            raise CodecError(f"tensor entry {str(entry)[:60]} is not [storage, dtype, shape, stride, offset]") from None
        dtype = self._dtype(name)
        if type(index) is not int or not 0 <= index < len(self.storages):
            raise CodecError(f"tensor entry names storage {str(index)[:40]}, which this file does not have")
        storage = self.storages[index]
        reach = _reach(shape, stride, offset)
        if reach is None:
            raise CodecError(
                f"tensor shape {str(shape)[:40]}, stride {str(stride)[:40]} or offset {str(offset)[:20]} is not "
                f"sizes (two lists of at most {_MAX_DIMS} whole numbers and a whole number, each below 2**62)"
            )
        if reach * dtype.itemsize > storage.numel():
            raise CodecError(
                f"a {name} tensor of shape {shape}, stride {stride}, offset {offset} reaches byte "
                f"{reach * dtype.itemsize} of a storage of {storage.numel()} bytes"
            )
        return on_storage(storage.untyped_storage(), dtype, offset, shape, stride)


def _reach(shape: Any, stride: Any, offset: Any) -> int | None:
    """How many elements of its storage a tensor spans (0 when it has none), or None when its shape, stride
    or offset are not sizes. One loop: it runs for every tensor of a file (20,000 small ones, issue 13)."""
    if type(shape) is not list or type(stride) is not list or len(shape) != len(stride) or len(shape) > _MAX_DIMS:
        return None
    if type(offset) is not int or not 0 <= offset < _LIMIT:
        return None
    numel, last = 1, offset
    for n, s in zip(shape, stride, strict=True):
        if type(n) is not int or type(s) is not int or not (0 <= n < _LIMIT and 0 <= s < _LIMIT):
            return None
        numel *= n
        last += (n - 1) * s
    if numel >= _LIMIT:
        return None
    return last + 1 if numel else 0


def on_storage(storage: Any, dtype: Any, offset: Any, shape: Any, stride: Any) -> Any:
    """A tensor of ``dtype`` over ``storage`` (no copy). Made from an empty uint8 tensor: an empty tensor of
    ``dtype`` itself is filled when deterministic algorithms are on, which torch lacks for some dtypes
    (float4_e2m1fn_x2: NotImplementedError)."""
    import torch

    empty = torch.empty(0, dtype=torch.uint8, device=storage.device).view(dtype)
    return empty.set_(storage, offset, shape, stride)


FORMAT = TensorFileFormat()
