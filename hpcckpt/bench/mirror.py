"""``hpcckpt bench store --only mirror``: what copying checkpoints to a mirror costs (issue 14).

Two figures, each interleaved with its reference, medians:

- upload throughput: :meth:`Mirror.upload` of a checkpoint of ``--mirror-mib`` MiB against the backend
  client's own upload of the same files (fsspec's ``put_file``, file by file; for a path, a copy of each
  file then an fsync, since the mirror's copy is durable too). Each upload goes to a fresh prefix under
  ``--mirror-url`` (the mirror stores a checkpoint once), deleted untimed afterwards;
- the training thread's block: the time of a CPU-bound training step (a matrix product) while a background
  thread uploads the checkpoint (:meth:`Mirror.upload`, as the store's upload thread calls it), against as
  many steps with nothing in the background; the ratio of median steps and the longest single step of each.

The default ``--mirror-url`` is a second directory on the bench's own filesystem; ``s3://bucket/prefix``
measures against an object store (its credentials come from the backend's usual environment).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .contenders import fsync_file
from .targets import Target

Figures = dict[str, Any]
MIN_STEPS = 20  # training steps per arm at least, however fast the upload


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mirror-url",
        metavar="URL",
        help="mirror rows: where to upload (s3://bucket/prefix, a path...; default: a directory beside the others)",
    )
    parser.add_argument("--mirror-mib", type=int, default=256, help="mirror rows: checkpoint size in MiB")


def mirror_rows(root: Path, args: argparse.Namespace, figures: Figures) -> list[Target]:
    from ..store.mirror import Mirror
    from ..store.store import CheckpointStore
    from .contenders import tensors

    root.mkdir(parents=True)
    base = args.mirror_url or str(root / "second-filesystem")
    shown = Mirror(base, keep_last=None).url  # validates the URL; the form without credentials
    payload = tensors(args.mirror_mib << 20, 16)
    local = CheckpointStore(root / "local", keep_last=None)
    checkpoint = local.save({"model": payload}, step=1)
    print(f"\nmirror to {shown}: a checkpoint of {checkpoint.size / 2**20:.0f} MiB in {len(checkpoint.files)} file(s)")
    target = _Remote(base)
    upload = _throughput(checkpoint, target, args.repeats)
    block = _block(checkpoint, target, args.repeats)
    megabytes = checkpoint.size / 1e6
    for label, seconds in upload.items():
        print(f"  {label:<36} median {seconds:7.3f} s  {megabytes / seconds:8.1f} MB/s")
    for label, steps in block.items():
        print(
            f"  training step, {label:<21} median {steps['median_s'] * 1e3:7.2f} ms  longest "
            f"{steps['longest_s'] * 1e3:7.2f} ms  ({steps['count']} steps)"
        )
    figures["mirror"] = {"url": shown, "bytes": checkpoint.size, "upload_s": upload, "steps": block}
    during, alone = block["during an upload"], block["without upload"]
    return [
        Target(
            "mirror upload throughput: hpcckpt / client's own put",
            upload["client's own put"] / upload["Mirror.upload"],
            ">= 0.9",
        ),
        Target(
            "mirror: training step during an upload / without",
            during["median_s"] / alone["median_s"],
            "<= 1.1",
            _few_cores(),
        ),
        Target("mirror: longest training step during an upload (ms)", during["longest_s"] * 1e3, "info"),
        Target("mirror: longest training step without upload (ms)", alone["longest_s"] * 1e3, "info"),
    ]


def _few_cores() -> str:
    cores = os.cpu_count() or 1
    return f"{cores} cores: the upload (and a local server) compete with the step for them" if cores <= 2 else ""


# -- (a) throughput -----------------------------------------------------------------------------------------
def _throughput(checkpoint: Any, remote: _Remote, repeats: int) -> dict[str, float]:
    from ..store.mirror import Mirror

    samples: dict[str, list[float]] = {"Mirror.upload": [], "client's own put": []}
    trials: dict[str, Callable[[str], None]] = {
        "Mirror.upload": lambda prefix: _done(Mirror(remote.url(prefix), keep_last=None).upload(checkpoint)),
        "client's own put": lambda prefix: remote.put_files(checkpoint.path, checkpoint.files, prefix),
    }
    order = list(trials)
    for round_ in range(repeats):
        shift = round_ % len(order)
        for index, label in enumerate(order[shift:] + order[:shift]):
            prefix = f"trial-{round_}-{index}"
            start = time.perf_counter()
            trials[label](prefix)
            samples[label].append(time.perf_counter() - start)
            remote.remove(prefix)
    return {label: statistics.median(values) for label, values in samples.items()}


def _done(_: object) -> None:
    pass


class _Remote:
    """The backend client's own operations on the mirror's URL: fsspec for a URL, plain files for a path."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self.path: Path | None = None
        self.fs: Any = None
        if "://" not in base or base.startswith("file://"):
            self.path = Path(base.removeprefix("file://"))
        else:
            from fsspec.core import url_to_fs

            self.fs, self.root = url_to_fs(base)

    def url(self, prefix: str) -> str:
        return f"{self.base}/{prefix}"

    def put_files(self, directory: Path, files: Any, prefix: str) -> None:
        names = [record.name for record in files] + ["manifest.json"]
        if self.path is not None:
            target = self.path / prefix
            target.mkdir(parents=True)
            for name in names:
                shutil.copyfile(directory / name, target / name)
                fsync_file(target / name)
            fsync_file(target)
            return
        for name in names:
            self.fs.put_file(str(directory / name), f"{self.root}/{prefix}/{name}")

    def remove(self, prefix: str) -> None:
        """Delete what the bench wrote under ``prefix`` (never more: the URL may hold other things)."""
        if self.path is not None:
            shutil.rmtree(self.path / prefix, ignore_errors=True)
            return
        where = f"{self.root}/{prefix}"
        if self.fs.exists(where):
            self.fs.rm(where, recursive=True)


# -- (b) the training thread's block ------------------------------------------------------------------------
def _block(checkpoint: Any, remote: _Remote, repeats: int) -> dict[str, dict[str, float]]:
    """Step times while a background thread runs :meth:`Mirror.upload` (as the store's upload thread does)
    of a fresh copy of ``checkpoint``, and of as many steps with nothing in the background."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=generator), torch.randn(512, 512, generator=generator)
    # One intra-op thread in both arms: a step that spreads over every core measures the scheduler (an
    # OpenMP team waits for its slowest thread, descheduled by the upload or a local server: 9x on 2 cores
    # against moto), not whether the upload holds the training thread. A GPU step leaves the cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _block_steps(_step_of(a, b), checkpoint, remote, repeats)
    finally:
        torch.set_num_threads(threads)


def _step_of(a: Any, b: Any) -> Callable[[], None]:
    import torch

    def step() -> None:
        torch.mm(a, b)

    return step


def _block_steps(
    step: Callable[[], None], checkpoint: Any, remote: _Remote, repeats: int
) -> dict[str, dict[str, float]]:
    from ..store.mirror import Mirror

    _steps(step, lambda: False)  # warm up the kernels and the allocator
    samples: dict[str, list[float]] = {"during an upload": [], "without upload": []}
    last = MIN_STEPS  # steps of the last arm with an upload: the arm without runs as many
    order = list(samples)
    for round_ in range(repeats):
        shift = round_ % len(order)
        for label in order[shift:] + order[:shift]:
            if label == "during an upload":
                prefix = f"block-{round_}"
                upload = _Background(Mirror(remote.url(prefix), keep_last=None).upload, checkpoint)
                times = _steps(step, upload.running)
                upload.result()
                remote.remove(prefix)
                last = len(times)
            else:
                times = _steps(step, lambda: False, at_least=last)
            samples[label] += times
    return {
        label: {"median_s": statistics.median(times), "longest_s": max(times), "count": len(times)}
        for label, times in samples.items()
    }


class _Background:
    """``work`` on a thread of its own; :meth:`result` re-raises its error."""

    def __init__(self, work: Callable[[Any], object], argument: Any) -> None:
        self._error: BaseException | None = None
        self._work = work
        self._argument = argument
        self._thread = threading.Thread(target=self._run, name="hpcckpt-bench-upload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._work(self._argument)
        except BaseException as error:  # handed to the caller by result()
            self._error = error

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _steps(step: Callable[[], None], busy: Callable[[], bool], at_least: int = MIN_STEPS) -> list[float]:
    """Times of training steps run while ``busy()`` holds, and at least ``at_least`` of them."""
    times: list[float] = []
    while len(times) < at_least or busy():
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times
