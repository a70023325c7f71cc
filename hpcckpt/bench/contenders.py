"""The contenders of ``hpcckpt bench store``: the same state written and read by hpcckpt and by the plain
ways a user would otherwise take (``torch.save``, safetensors, ``torch.distributed.checkpoint``, raw I/O).

Every save here is durable when it returns (fsynced), as hpcckpt's is: comparing a durable save with one
that leaves its bytes in the page cache would flatter the peer. hpcckpt is used only through its public
API, with the store's defaults (its default format, whatever that is), so the figures follow the product.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Step = Callable[[Path], None]


def tensors(nbytes: int, count: int, *, seed: int = 0) -> dict[str, Any]:
    """``count`` float32 tensors of ``nbytes`` in all (at least one element each), filled in place."""
    import torch

    numel = max(1, nbytes // 4 // count)
    generator = torch.Generator().manual_seed(seed)
    return {f"t{i:05d}": torch.empty(numel).normal_(generator=generator) for i in range(count)}


def nbytes_of(payload: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


# -- saves --------------------------------------------------------------------------------------------------
def hpcckpt_save(directory: Path, payload: dict[str, Any]) -> None:
    from ..store.store import CheckpointStore

    CheckpointStore(directory, keep_last=None).save(payload, step=1)


def hpcckpt_save_unchecked(directory: Path, payload: dict[str, Any]) -> bool:
    """The same save with its format's checksum switched off; False where the format has no such switch."""
    from ..store.store import CheckpointStore

    store = CheckpointStore(directory, keep_last=None)
    try:
        store.format = _format_class(store)(checksum=False)
    except TypeError:
        return False
    store.save(payload, step=1)
    return True


def checksum_switch_available(root: Path) -> bool:
    """Whether the store's default format takes ``checksum=False`` (the A/B rows need it)."""
    from ..store.store import CheckpointStore

    probe = CheckpointStore(root / "probe-format", keep_last=None)
    try:
        _format_class(probe)(checksum=False)
    except TypeError:
        return False
    return True


def _format_class(store: Any) -> Any:
    return type(store.format)


def torch_save(directory: Path, payload: dict[str, Any]) -> None:
    import torch

    with open(directory / "state.pt", "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def safetensors_save(directory: Path, payload: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path = directory / "state.safetensors"
    save_file(payload, str(path))
    fsync_file(path)  # save_file does not: a durable save needs it


def dcp_save(directory: Path, payload: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict_saver import save

    with single_process():
        save(payload, checkpoint_id=str(directory / "dcp"))  # its FileSystemWriter fsyncs each file


def raw_write(directory: Path, payload: dict[str, Any], name: str = "raw.bin") -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for tensor in payload.values():
            view = memoryview(tensor.numpy()).cast("B")
            while view.nbytes:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


SAVES: dict[str, Callable[[Path, dict[str, Any]], object]] = {
    "hpcckpt save": hpcckpt_save,
    "torch.save": torch_save,
    "safetensors save_file": safetensors_save,
    "dcp.save": dcp_save,
    "raw write": raw_write,
}
PEERS = ("torch.save", "safetensors save_file", "dcp.save")


def warm_up(scratch: Path) -> None:
    """Each save once on a tiny state, untimed: the first call of a library pays for its imports and caches,
    which would otherwise land on whichever contender goes first."""
    import shutil

    tiny = tensors(4096, 2)
    for save in SAVES.values():
        scratch.mkdir(parents=True)
        save(scratch, tiny)
        shutil.rmtree(scratch)


# -- loads --------------------------------------------------------------------------------------------------
def hpcckpt_load(directory: Path, expected: int) -> None:
    from ..store.store import CheckpointStore

    state = CheckpointStore(directory, keep_last=None, create=False).load()
    assert len(state) == expected, f"hpcckpt loaded {len(state)} entries, expected {expected}"


def safetensors_load(path: Path, expected: int) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    assert len(state) == expected, f"safetensors loaded {len(state)} entries, expected {expected}"


def raw_read(path: Path, buffer: bytearray) -> None:
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while view.nbytes:
            view = view[f.readinto(view) :]


# -- helpers ------------------------------------------------------------------------------------------------
def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def single_process() -> Iterator[None]:
    """torch.distributed.checkpoint without a process group: allowed (one process saves everything), with a
    warning each call that says so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        yield


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
