"""Peak extra memory of a save: the resident-set high-water mark above what the process held with its state
in memory, measured in a fresh child process per contender (``python -m hpcckpt.bench.memory``), so no
contender inherits another's freed-but-kept pages.

The child imports everything first, builds its state (64 float32 tensors), reads ``VmHWM`` from
``/proc/self/status`` (``ru_maxrss`` where there is none), saves, waits for the save to be durable, and
reads it again; it prints the state's size and the growth as JSON.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

CONTENDERS = ("hpcckpt save", "hpcckpt async save", "torch.save", "safetensors save_file")


def measure(contender: str, directory: Path, nbytes: int, timeout: float = 600.0) -> dict[str, int]:
    """``{"state": bytes, "extra": bytes, "exit": status}`` for one save by ``contender`` in a fresh process.

    A probe that measured and then failed to exit cleanly (status not 0) still reports: the figure is
    good, and the exit status is a finding the report shows rather than a reason to lose the run."""
    result = subprocess.run(
        [sys.executable, "-m", __name__, contender, str(directory), str(nbytes)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise RuntimeError(
            f"the memory probe for {contender!r} failed (exit status {result.returncode}): "
            f"{result.stderr.strip()[-2000:]}"
        )
    figures: dict[str, int] = json.loads(lines[-1])
    if result.returncode != 0:
        print(
            f"  the {contender!r} probe exited with status {result.returncode} after measuring: "
            f"{result.stderr.strip()[-500:]}"
        )
    return {**figures, "exit": result.returncode}


def high_water() -> int:
    """This process's peak resident set so far, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _child(contender: str, directory: Path, nbytes: int) -> dict[str, int]:
    import safetensors.torch  # noqa: F401  (imported before the baseline, as every contender's code is)
    import torch  # noqa: F401

    from ..store.store import CheckpointStore
    from .contenders import nbytes_of, safetensors_save, tensors, torch_save

    state = tensors(nbytes, 64)
    directory.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(directory / "store", keep_last=1)
    before = high_water()
    if contender == "hpcckpt save":
        store.save(state, step=1)
    elif contender == "hpcckpt async save":
        save: Any = store.save  # blocking= is issue 13's async save; typed loosely so this reads either way
        save(state, step=1, blocking=False).wait()
    elif contender == "torch.save":
        torch_save(directory, state)
    elif contender == "safetensors save_file":
        safetensors_save(directory, state)
    else:
        raise SystemExit(f"unknown contender {contender!r}: expected one of {', '.join(CONTENDERS)}")
    return {"state": nbytes_of(state), "extra": max(0, high_water() - before)}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))), flush=True)
