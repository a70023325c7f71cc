"""``CheckpointStore(compression="zstd")`` (issue 14): streamed, checksummed, off by default; every
checkpoint reads back whatever the store's current setting."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from compare import every_dtype_sample, raw_bytes
from torch import nn

from hpcckpt import CheckpointStore, HpcckptWarning, TrainState
from hpcckpt.errors import CorruptCheckpointError, UsageError
from hpcckpt.store.formats import FORMATS
from hpcckpt.store.formats.zstdframes import CHUNK
from hpcckpt.store.manifest import Checkpoint, FileRecord, file_digest

FILE = "state.tensors"


def zstd_store(run_dir: Path, **options: Any) -> CheckpointStore:
    return CheckpointStore(run_dir, keep_last=None, compression="zstd", **options)


def file_version(checkpoint: Checkpoint) -> int:
    return int(struct.unpack_from("<8sIIQ", (checkpoint.path / FILE).read_bytes())[1])


def trained_weights(numel: int) -> torch.Tensor:
    """Weights of a trained model are not random: small values near zero, many shared exponents."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(numel, generator=generator) * 0.02).round(decimals=3)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")  # torch's own, for complex32
@pytest.mark.parametrize("mmap", [True, False])
def test_every_dtype_round_trips_bit_for_bit_compressed(tmp_path: Path, mmap: bool) -> None:
    state = every_dtype_sample()
    store = zstd_store(tmp_path / "run")
    checkpoint = store.save(state, step=1)
    assert checkpoint.compression == {"codec": "zstd", "level": 3} and file_version(checkpoint) == 2
    loaded = store.load(checkpoint, mmap=mmap)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == (2, 3), name
        assert raw_bytes(loaded[name]) == raw_bytes(tensor), name


def test_views_sharing_and_storages_over_several_frames_come_back_exactly(tmp_path: Path) -> None:
    weight = trained_weights(3 * CHUNK // 4 + 5).reshape(-1)  # 3 frames and a bit: frame edges inside
    state = {
        "weight": weight,
        "tied": weight,
        "window": weight[CHUNK // 4 - 3 : CHUNK // 4 + 3],  # across the first frame's end
        "grid": weight[:600].view(20, 30).t(),
        "empty": torch.empty(0, 4),
        "exactly_one_frame": torch.ones(CHUNK // 4),
        "half": trained_weights(1000).to(torch.bfloat16),
        "values": [1, "two", {"three": 3.0}],
    }
    store = zstd_store(tmp_path / "run")
    checkpoint = store.save(state, step=1)
    loaded = store.load(checkpoint, mmap=False)
    for key in ("weight", "tied", "window", "grid", "empty", "exactly_one_frame", "half"):
        assert torch.equal(loaded[key], state[key]) and loaded[key].stride() == state[key].stride(), key
    assert loaded["values"] == [1, "two", {"three": 3.0}]
    ptr = loaded["weight"].untyped_storage().data_ptr()
    assert all(loaded[k].untyped_storage().data_ptr() == ptr for k in ("tied", "window", "grid"))
    loaded["weight"][0] = 42.0
    assert float(loaded["tied"][0]) == 42.0
    raw = weight.nbytes + CHUNK + 2000
    assert checkpoint.size < raw / 2, f"trained-like weights and ones compress: {checkpoint.size} of {raw} bytes"


def test_off_by_default_and_a_plain_file_is_the_version_1_layout(tmp_path: Path) -> None:
    checkpoint = CheckpointStore(tmp_path / "run").save({"w": torch.ones(4)}, step=1)
    assert checkpoint.compression is None and file_version(checkpoint) == 1
    manifest = json.loads((checkpoint.path / "manifest.json").read_text())
    assert "compression" not in manifest


def test_the_manifest_records_codec_and_level_and_verify_checks_the_bytes_on_disk(tmp_path: Path) -> None:
    store = zstd_store(tmp_path / "run", compression_level=19)
    checkpoint = store.save({"w": trained_weights(10_000)}, step=1)
    manifest = json.loads((checkpoint.path / "manifest.json").read_text())
    assert manifest["compression"] == {"codec": "zstd", "level": 19}
    assert manifest["files"][0]["digest"] == file_digest(checkpoint.path / FILE)
    assert store.verify(checkpoint) == checkpoint
    assert store.list()[0].compression == {"codec": "zstd", "level": 19}  # read back from the registry


@pytest.mark.parametrize("direction", ["compressed read by a plain store", "plain read by a compressing store"])
def test_any_checkpoint_loads_and_restores_whatever_the_current_setting(tmp_path: Path, direction: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    saving, reading = ("zstd", None) if direction.startswith("compressed") else (None, "zstd")
    CheckpointStore(tmp_path / "run", compression=saving).save(TrainState(model=model, optimizer=optimizer, step=3))

    store = CheckpointStore(tmp_path / "run", compression=reading)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    state = TrainState(model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=0.01))
    restored = store.restore(state)
    assert restored is not None and restored.compression == (None if saving is None else {"codec": "zstd", "level": 3})
    assert state.step == 3
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert isinstance(state.optimizer, torch.optim.Optimizer)
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (state.optimizer, optimizer)]
    assert torch.equal(*moments)
    assert torch.equal(store.load()["model"]["0.weight"], model[0].weight)


def frame_start(checkpoint: Checkpoint) -> int:
    """Where the first frame of the first storage begins (after its 8-byte record head)."""
    data = (checkpoint.path / FILE).read_bytes()
    length = struct.unpack_from("<8sIIQ", data)[3]
    return -(-(24 + length) // 64) * 64 + 8


def test_a_flipped_byte_is_detected_and_an_older_checkpoint_loaded(tmp_path: Path) -> None:
    store = zstd_store(tmp_path / "run")
    store.save({"w": trained_weights(100_000)}, step=1)
    newest = store.save({"w": trained_weights(100_000) + 1}, step=2)
    path = newest.path / FILE
    data = bytearray(path.read_bytes())
    data[frame_start(newest) + 5000] ^= 0x10
    path.write_bytes(bytes(data))

    with pytest.raises(CorruptCheckpointError, match=r"state.tensors: checksum xxh3_64:\w+, the manifest says"):
        store.load(newest, mmap=False)
    with pytest.raises(CorruptCheckpointError, match="the manifest says"):
        store.verify(newest)
    with pytest.warns(HpcckptWarning, match="checkpoint step_000000002 is corrupt, trying an older one"):
        assert torch.equal(store.load(mmap=False)["w"], trained_weights(100_000))


def test_a_flipped_byte_under_a_matching_manifest_is_caught_by_zstd_s_own_checksum(tmp_path: Path) -> None:
    """A crafted manifest that matches the flipped file: the frames' content checksums still catch it."""
    checkpoint = zstd_store(tmp_path / "run").save({"w": trained_weights(100_000)}, step=1)
    content = bytearray((checkpoint.path / FILE).read_bytes())
    content[frame_start(checkpoint) + 5000] ^= 0x10
    for mmap in (False, True):
        with pytest.raises(CorruptCheckpointError, match=r"storage 0, record 0: .*zstd"):
            read(checkpoint, bytes(content), mmap=mmap)


# -- crafted files ---------------------------------------------------------------------------------------------


def read(checkpoint: Checkpoint, content: bytes, *, mmap: bool = False) -> dict[str, Any]:
    """Read ``content`` as the checkpoint's file, against a manifest record crafted to match it (the
    checksum passes: only the parser stands between the file and memory)."""
    path = checkpoint.path / FILE
    path.write_bytes(content)
    matching = dataclasses.replace(checkpoint, files=(FileRecord(FILE, len(content), file_digest(path)),))
    return FORMATS["tensors"].read(matching, "cpu", weights_only=True, mmap=mmap)


def craft(nbytes: int, records: bytes, *, compression: Any = None) -> bytes:
    header = {
        "storages": [[0, nbytes]],
        "tensors": [[0, "uint8", [nbytes], [1], 0]],
        "state": {"w": {"$tensor": 0}},
        "compression": {"codec": "zstd", "level": 3} if compression is None else compression,
    }
    text = json.dumps(header).encode()
    start = -(-(24 + len(text)) // 64) * 64
    return (struct.pack("<8sIIQ", b"HPCKTENS", 2, 0, len(text)) + text).ljust(start, b"\0") + records


def record(raw: int, frame: bytes) -> bytes:
    return struct.pack("<II", raw, len(frame)) + frame


ZEROS_1MIB = zstandard.ZstdCompressor().compress(bytes(1 << 20))


def frame_claiming(size: int, payload: bytes) -> bytes:
    """A frame of ``payload`` whose header declares ``size`` content bytes (a lie when they differ)."""
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=False).compress(payload))
    params = zstandard.get_frame_parameters(bytes(frame))
    assert params.content_size == len(payload)
    # Frame header: magic (4), descriptor (1), [window byte], content size field (4 bytes for 1 MiB).
    at = 5 + (0 if frame[4] & 0x20 else 1)
    assert frame[4] >> 6 == 2, "a 4-byte content size field"
    frame[at : at + 4] = struct.pack("<I", size)
    return bytes(frame)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Checkpoint:
    return zstd_store(tmp_path / "run").save({"w": torch.ones(16, dtype=torch.uint8)}, step=1)


def test_the_crafting_helper_makes_a_valid_file(checkpoint: Checkpoint) -> None:
    frame = zstandard.ZstdCompressor().compress(bytes(range(16)))
    assert read(checkpoint, craft(16, record(16, frame)))["w"].tolist() == list(range(16))


BOMBS = [
    ("a record larger than its storage", lambda: craft(16, record(1 << 20, ZEROS_1MIB)), r"claims 1048576 raw bytes"),
    ("a frame declaring more than its record", lambda: craft(16, record(16, ZEROS_1MIB)), r"declares 1048576 bytes"),
    (
        "a frame that expands beyond its declared size",
        lambda: craft(16, record(16, frame_claiming(16, bytes(1 << 20)))),
        r"storage 0, record 0: .*zstd",
    ),
    ("a header claiming a petabyte", lambda: craft(1 << 50, record(16, ZEROS_1MIB)), r"a decompression bomb"),
    ("a frame past the file's end", lambda: craft(16, struct.pack("<II", 16, 1000) + b"x"), r"end beyond the file"),
    (
        "a frame shorter than it says",
        lambda: craft((1 << 20) + 16, record((1 << 20) + 16, frame_claiming((1 << 20) + 16, bytes(1 << 20)))),
        r"storage 0, record 0: .*(zstd|ends after)",
    ),
    ("bytes after the last record", lambda: craft(0, b"trailing"), r"records end at byte \d+, not at its end"),
    ("an unknown codec", lambda: craft(0, b"", compression={"codec": "lz4"}), r"'compression' is .*lz4"),
    ("a record of zero bytes", lambda: craft(16, struct.pack("<II", 0, 0)), r"claims 0 raw bytes in a 0-byte"),
]


@pytest.mark.parametrize(("what", "content", "message"), BOMBS, ids=[b[0] for b in BOMBS])
@pytest.mark.parametrize("mmap", [False, True])
def test_crafted_compressed_files_are_refused_before_any_tensor_exists(
    checkpoint: Checkpoint, what: str, content: Any, message: str, mmap: bool
) -> None:
    with pytest.raises(CorruptCheckpointError, match=message) as caught:
        read(checkpoint, content(), mmap=mmap)
    assert FILE in str(caught.value) and "not a valid 'tensors' checkpoint file" in str(caught.value)


# -- settings ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compression": "gzip"}, r"Invalid compression='gzip': expected None \(the default\) or 'zstd'"),
        ({"compression": True}, r"Invalid compression=True"),
        (
            {"compression": "zstd", "compression_level": 0},
            r"Invalid compression_level=0: expected a whole number from 1 to 22",
        ),
        ({"compression": "zstd", "compression_level": 23}, r"Invalid compression_level=23"),
        ({"compression": "zstd", "compression_level": "3"}, r"Invalid compression_level='3'"),
        (
            {"compression": "zstd", "format": "torch"},
            r"applies to format='tensors' \(the default\), not format='torch'",
        ),
        ({"compression": "zstd", "format": "dcp"}, r"not format='dcp'"),
    ],
)
def test_bad_settings_are_refused_at_construction_naming_the_value(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        CheckpointStore(tmp_path / "run", **options)
    assert not (tmp_path / "run").exists(), "nothing is created for a refused setting"


WITHOUT_ZSTANDARD = textwrap.dedent(
    """
    import sys
    sys.modules["zstandard"] = None  # as if not installed
    from hpcckpt import CheckpointStore
    from hpcckpt.errors import UsageError, StoreError
    try:
        CheckpointStore(sys.argv[1] + "/new", compression="zstd")
    except UsageError as error:
        print("construct:", error)
    store = CheckpointStore(sys.argv[1] + "/run")
    try:
        store.load(mmap=False)
    except StoreError as error:
        print("load:", type(error).__name__, error)
    """
)


def test_without_zstandard_compression_is_refused_and_a_compressed_checkpoint_says_what_to_install(
    tmp_path: Path,
) -> None:
    zstd_store(tmp_path / "run").save({"w": torch.ones(4)}, step=1)
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_ZSTANDARD, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "construct: compression='zstd' needs the zstandard package: pip install 'hpcckpt[zstd]'"
    # Not a corrupt checkpoint (which would send the store to an older one): a StoreError naming the extra.
    assert lines[1].startswith("load: StoreError ") and "is compressed with zstd" in lines[1]
    assert lines[1].endswith("needs the zstandard package: pip install 'hpcckpt[zstd]'")


def test_an_async_save_compresses_in_the_background_and_writes_the_bytes_of_a_blocking_save(tmp_path: Path) -> None:
    state = {"w": trained_weights(2 * CHUNK // 4 + 3), "b": trained_weights(100).bfloat16(), "n": 7}
    blocking = zstd_store(tmp_path / "sync").save(state, step=4)
    handle = zstd_store(tmp_path / "async").save(state, step=4, blocking=False)
    background = handle.wait()
    assert background.compression == blocking.compression == {"codec": "zstd", "level": 3}
    assert (background.path / FILE).read_bytes() == (blocking.path / FILE).read_bytes()
    loaded = CheckpointStore(tmp_path / "async").load(mmap=False)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"]) and loaded["n"] == 7
