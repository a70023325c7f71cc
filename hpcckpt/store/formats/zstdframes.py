"""zstd compression of a ``tensors`` file's storages (issue 14): ``CheckpointStore(compression="zstd")``.

A compressed file (version 2 of the ``tensors`` layout) keeps the same preamble and JSON header, whose
``"compression"`` field names the codec; after the header each storage, in order, is a run of *records*:
an 8-byte little-endian ``(raw length, frame length)`` pair, then one zstd frame holding at most
:data:`CHUNK` raw bytes of the storage (its content size in the frame header, a content checksum at its
end). No index of compressed offsets is needed: the reader consumes the records in file order, which is
the order it hashes the file in.

Invariants. Writing holds one chunk's frame in memory at a time, never the state compressed whole; the
manifest's digest stays the digest of the bytes on disk, so verification and the mirror work unchanged.
Reading decompresses each frame straight into the storage's fresh memory and can write no byte beyond the
storage's declared ``nbytes``: a record whose raw length exceeds what remains of its storage (or
:data:`MAX_CHUNK`), a frame whose declared content size differs from its record's, a frame that yields
fewer or more bytes, a zstd window above :data:`MAX_CHUNK`, a file declaring more raw bytes than zstd can
encode in its size (:data:`MAX_RATIO`): each is a :class:`CorruptCheckpointError` naming the file, the
storage and the record, raised before any tensor is handed out (decompression bombs are refused, not
allocated).
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ...errors import StoreError, UsageError

CODEC = "zstd"
CODECS = (None, CODEC)
MIN_LEVEL, MAX_LEVEL = 1, 22
CHUNK = 4 << 20  # raw bytes per frame: a bounded buffer, and large enough that per-frame overhead is nil
MAX_CHUNK = 64 << 20  # the largest frame a reader accepts (raw bytes, and zstd's window)
RECORD = struct.Struct("<II")
# zstd's densest encoding is an RLE block: 128 KiB from 4 bytes (32768:1; 4 MiB of zeros measured 151 bytes
# for a frame, 27,800:1). A file declaring more raw bytes than twice that ratio allows is not a zstd file.
MAX_RATIO = 1 << 16
EXTRA = "pip install 'hpcckpt[zstd]'"


@dataclass(frozen=True)
class Compression:
    """How a save compresses its storages: the codec and its level (the manifest records both)."""

    codec: str
    level: int

    def describe(self) -> dict[str, Any]:
        return {"codec": self.codec, "level": self.level}


def parse(compression: Any, level: Any, format_name: str) -> Compression | None:
    """The checked setting for ``CheckpointStore(compression=..., compression_level=...)``; a
    :class:`UsageError` naming the bad value and the accepted ones, or the missing package's extra."""
    if compression not in CODECS or isinstance(compression, bool):
        raise UsageError(f"Invalid compression={compression!r}: expected None (the default) or {CODEC!r}")
    if type(level) is not int or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise UsageError(
            f"Invalid compression_level={level!r}: expected a whole number from {MIN_LEVEL} to {MAX_LEVEL} "
            "(zstd's levels; 3 is the default)"
        )
    if compression is None:
        return None
    if format_name != "tensors":
        raise UsageError(
            f"compression={compression!r} applies to format='tensors' (the default), not format={format_name!r}: "
            "a 'torch' file is torch.save's own zip, and 'dcp' compression is an experimental private "
            "torch.distributed.checkpoint extension (no level, read by our own safe reader); use "
            "format='tensors' or compression=None"
        )
    backend()
    return Compression(compression, level)


def backend() -> ModuleType:
    """The zstandard module, or a :class:`UsageError` naming the extra that installs it."""
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        raise UsageError(f"compression='zstd' needs the zstandard package: {EXTRA}") from None


def read_backend(path: object) -> ModuleType:
    """The zstandard module for reading a compressed file; a :class:`StoreError` (not a corrupt file: an
    older checkpoint must not be chosen instead) when it is missing."""
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        raise StoreError(f"{path} is compressed with zstd; reading it needs the zstandard package: {EXTRA}") from None


class FrameWriter:
    """Compresses what is written to it chunk by chunk, as records, into ``out`` (anything with
    ``write(bytes)``: the file's hashing, fsyncing writer)."""

    def __init__(self, compression: Compression, out: Any) -> None:
        self.context = backend().ZstdCompressor(level=compression.level, write_checksum=True)
        self.out = out

    def write(self, data: memoryview) -> None:
        """Append the records of ``data`` (a flat byte view); none for empty data. The records of one
        storage may come from several writes (a device storage is copied to the host in pieces)."""
        compress, out = self.context.compress, self.out
        for begin in range(0, data.nbytes, CHUNK):
            piece = data[begin : begin + CHUNK]
            frame = compress(piece)  # zstd releases the GIL: training goes on beside an async save
            out.write(RECORD.pack(piece.nbytes, len(frame)))
            out.write(frame)


class FrameReader:
    """Decompresses the records that follow, in file order, into each storage's memory.

    ``take(view)`` fills ``view`` with the file's next bytes (hashing them); ``corrupt(what)`` makes the
    error naming the file.
    """

    def __init__(self, path: object, take: Callable[[memoryview], None], corrupt: Callable[[str], Exception]) -> None:
        zstd = read_backend(path)
        self.error = zstd.ZstdError
        self.content_size = zstd.frame_content_size
        self.context = zstd.ZstdDecompressor(max_window_size=MAX_CHUNK)
        self.take = take
        self.corrupt = corrupt
        self.head = bytearray(RECORD.size)
        self.buffer = bytearray()

    def fill(self, index: int, destination: memoryview) -> None:
        """Decompress storage ``index``'s records into ``destination`` (its declared size), exactly."""
        filled, record = 0, 0
        while filled < destination.nbytes:
            raw, size = self._record(index, record, destination.nbytes - filled)
            frame = self._frame(size)
            try:
                declared = self.content_size(frame)
                if declared != raw:
                    raise self.corrupt(
                        f"storage {index}, record {record}: its zstd frame declares {declared} bytes, the record {raw}"
                    )
                self._decompress(frame, destination[filled : filled + raw], index, record)
            except self.error as error:
                raise self.corrupt(f"storage {index}, record {record}: invalid zstd data ({error})") from None
            filled += raw
            record += 1

    def _record(self, index: int, record: int, remaining: int) -> tuple[int, int]:
        self.take(memoryview(self.head))
        raw, size = RECORD.unpack(self.head)
        if not 0 < raw <= min(remaining, MAX_CHUNK) or not 0 < size <= 2 * MAX_CHUNK:
            raise self.corrupt(
                f"storage {index}, record {record} claims {raw} raw bytes in a {size}-byte frame; expected 1 to "
                f"{min(remaining, MAX_CHUNK)} raw bytes (what remains of the storage) in at most {2 * MAX_CHUNK}"
            )
        return raw, size

    def _frame(self, size: int) -> memoryview:
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        frame = memoryview(self.buffer)[:size]
        self.take(frame)
        return frame

    def _decompress(self, frame: memoryview, out: memoryview, index: int, record: int) -> None:
        """Decompress one frame into ``out``: bounded by ``out``'s size, and exactly filling it."""
        reader = self.context.stream_reader(frame, read_across_frames=False)
        got = 0
        while got < out.nbytes:
            n = reader.readinto(out[got:])
            if not n:
                raise self.corrupt(f"storage {index}, record {record}: its zstd frame ends after {got} of {out.nbytes}")
            got += n
        if reader.read(1):
            raise self.corrupt(f"storage {index}, record {record}: its zstd frame expands beyond {out.nbytes} bytes")
