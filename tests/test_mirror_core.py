"""The mirror's core on both kinds of location (a second POSIX directory and S3 through the real client):
files before the manifest, never overwriting a complete remote checkpoint, verification, download through the
registry, retention, and URLs refused before anything is written."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from hpcckpt import TrainState
from hpcckpt.errors import CorruptCheckpointError, UsageError
from hpcckpt.run import Run
from hpcckpt.store.locations import open_location, redact
from hpcckpt.store.mirror import Mirror
from hpcckpt.store.store import CheckpointStore


def _remote_names(mirror: Mirror) -> list[str]:
    return [c.name for c in mirror.list()]


def test_upload_then_download_into_an_empty_run_directory_gives_the_same_tensors(
    tmp_path: Path, mirror_url: str
) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    saved = store.save({"w": torch.arange(1000.0)}, step=7, metrics={"loss": 0.5})
    mirror = Mirror(mirror_url)
    remote = mirror.upload(saved)
    assert (remote.name, remote.step, remote.checksum) == ("step_000000007", 7, saved.checksum)
    assert _remote_names(mirror) == ["step_000000007"]
    assert mirror.verify(remote) is remote
    fresh = CheckpointStore(tmp_path / "elsewhere")
    local = mirror.download(remote, fresh)
    assert local.name == "step_000000007" and local.metrics == {"loss": 0.5}
    assert torch.equal(fresh.load()["w"], torch.arange(1000.0))
    pulled = [e for e in fresh.registry.events() if e["event"] == "pulled"]
    assert [(e["name"], e["step"], e["url"]) for e in pulled] == [
        ("step_000000007", 7, f"{mirror.url}/checkpoints/step_000000007")
    ]


def test_a_second_upload_of_the_same_checkpoint_stores_nothing_new(tmp_path: Path, mirror_url: str) -> None:
    store = CheckpointStore(tmp_path / "run")
    saved = store.save({"w": torch.ones(10)}, step=1)
    mirror = Mirror(mirror_url)
    first = mirror.upload(saved)
    assert mirror.upload(saved) == first
    assert _remote_names(mirror) == ["step_000000001"]


def test_a_different_checkpoint_of_a_taken_name_is_stored_beside_it_never_over_it(
    tmp_path: Path, mirror_url: str
) -> None:
    mirror = Mirror(mirror_url, keep_last=None)
    before = CheckpointStore(tmp_path / "run-a").save({"w": torch.zeros(10)}, step=3)
    after = CheckpointStore(tmp_path / "run-b").save({"w": torch.ones(10)}, step=3)  # same step, other data
    mirror.upload(before)
    second = mirror.upload(after)
    assert second.name == "step_000000003.1"
    assert [(c.name, c.checksum) for c in mirror.list()] == [
        ("step_000000003", before.checksum),
        ("step_000000003.1", after.checksum),
    ]
    # The newest upload is the newest on the mirror: downloading it gives the second state.
    fresh = CheckpointStore(tmp_path / "fresh")
    assert mirror.pull_newest(fresh) is not None
    assert torch.equal(fresh.load()["w"], torch.ones(10))


def test_a_remote_file_that_changed_is_named_by_verify_and_never_committed(tmp_path: Path) -> None:
    mirror = Mirror(str(tmp_path / "mirror"), keep_last=None)
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    good = mirror.upload(store.save({"w": torch.zeros(100)}, step=1))
    bad = mirror.upload(store.save({"w": torch.ones(100)}, step=2))
    data = tmp_path / "mirror" / "checkpoints" / bad.name / "state.tensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"step_000000002/state.tensors: checksum"):
        mirror.verify(bad)
    fresh = CheckpointStore(tmp_path / "fresh")
    with pytest.raises(CorruptCheckpointError, match=r"step_000000002/state.tensors: checksum"):
        mirror.download(bad, fresh)
    assert fresh.list() == []
    assert not [p for p in (tmp_path / "fresh" / "checkpoints").iterdir()]  # no temporary left behind
    # The newest valid one is the older: the restore path falls back to it.
    with pytest.warns(UserWarning, match="does not verify, trying an older one"):
        local = mirror.pull_newest(fresh)
    assert local is not None and local.step == 1 and good.step == 1
    with pytest.warns(UserWarning, match="is unusable, trying an older one"):
        newest = mirror.newest_valid()
    assert newest is not None and newest.step == 1


def test_a_remote_directory_without_manifest_is_invisible_and_swept_by_retention_once_past_the_grace(
    tmp_path: Path, mirror_url: str
) -> None:
    mirror = Mirror(mirror_url, keep_last=2, grace=0)  # every leftover is old enough (see test_mirror_review)
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    saved = [store.save({"w": torch.full((10,), float(step))}, step=step) for step in (1, 2, 3, 4)]
    for checkpoint in saved:
        mirror.upload(checkpoint)
    # An upload cut short: its data file is there, its manifest never came.
    mirror.location.put_bytes("checkpoints/step_000000009/state.tensors", b"partial")
    assert _remote_names(mirror) == [c.name for c in saved]
    removed = mirror.retain()
    assert sorted(removed) == ["step_000000001", "step_000000002", "step_000000009"]
    assert _remote_names(mirror) == ["step_000000003", "step_000000004"]
    assert mirror.location.children("checkpoints") == ["step_000000003", "step_000000004"]


def test_retention_never_deletes_the_newest_complete_remote_checkpoint(tmp_path: Path) -> None:
    mirror = Mirror(str(tmp_path / "mirror"), keep_last=None, keep_best=("loss", "min", 1))
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    for step, loss in ((1, 0.1), (2, 0.5), (3, 0.9)):
        mirror.upload(store.save({"w": torch.zeros(3)}, step=step, metrics={"loss": loss}))
    mirror.retain()
    assert _remote_names(mirror) == ["step_000000001", "step_000000003"]  # the best and the newest


def test_a_deletion_removes_the_manifest_first(tmp_path: Path) -> None:
    mirror = Mirror(str(tmp_path / "mirror"))
    remote = mirror.upload(CheckpointStore(tmp_path / "run").save({"w": torch.zeros(3)}, step=1))
    removed: list[str] = []
    original = mirror.location.remove

    def watching(name: str) -> bool:
        removed.append(name)
        assert (tmp_path / "mirror" / "checkpoints" / remote.name / "state.tensors").exists()
        return original(name)

    mirror.location.remove = watching  # type: ignore[method-assign]
    mirror.delete(remote)
    assert removed == ["checkpoints/step_000000001/manifest.json"]
    assert not (tmp_path / "mirror" / "checkpoints" / remote.name).exists()


def test_the_remote_manifest_is_the_local_one_with_the_mirror_upload_order(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    saved = store.save({"w": torch.zeros(3)}, step=5, metadata={"lr": 0.1})
    Mirror(str(tmp_path / "mirror")).upload(saved)
    local = json.loads((saved.path / "manifest.json").read_bytes())
    remote = json.loads((tmp_path / "mirror" / "checkpoints" / saved.name / "manifest.json").read_bytes())
    assert remote == {**local, "seq": 1}


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAEXAMPLE:wJalrXUtnFEMIsecret@bucket/run",
        "s3://bucket/run?secret=wJalrXUtnFEMIsecret",
        "gs://bucket/run?token=wJalrXUtnFEMIsecret&x=1",
    ],
)
def test_a_url_with_credentials_is_refused_showing_it_redacted(url: str) -> None:
    with pytest.raises(UsageError, match="credentials do not belong in the URL") as caught:
        Mirror(url)
    assert "wJalrXUtnFEMIsecret" not in str(caught.value)
    assert "***" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("s3://AKIAEXAMPLE:wJalrXUtnFEMIsecret@bucket/run", "credentials do not belong in the URL"),
        ("nosuchfs://bucket/run", "protocol 'nosuchfs' is unknown to fsspec"),
    ],
)
def test_run_refuses_a_bad_hpcckpt_mirror_before_writing_anything(tmp_path: Path, value: str, said: str) -> None:
    with pytest.raises(UsageError, match=said) as caught:
        Run(tmp_path / "run", TrainState(), environ={"HPCCKPT_MIRROR": value})
    assert "wJalrXUtnFEMIsecret" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_redaction_keeps_what_locates_the_data() -> None:
    assert redact("s3://user:pw@bucket/run?key=k") == "s3://***@bucket/run?key=***"
    assert redact("/scratch/run") == "/scratch/run"


def test_an_unknown_protocol_is_a_usage_error_naming_it() -> None:
    with pytest.raises(UsageError, match="protocol 'nosuchfs' is unknown to fsspec"):
        open_location("nosuchfs://bucket/run")


def test_a_file_url_and_a_plain_path_are_the_same_posix_location(tmp_path: Path) -> None:
    assert open_location(f"file://{tmp_path}/m").url == open_location(str(tmp_path / "m")).url == str(tmp_path / "m")


@pytest.mark.parametrize("refusal", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_path_mirror_copies_by_reads_and_writes_where_the_kernel_will_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    store = CheckpointStore(tmp_path / "run")
    saved = store.save({"w": torch.arange(3_000_000.0)}, step=3)  # several copy chunks

    def refuse(*_: object) -> int:
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "copy_file_range", refuse)  # older kernels across filesystems, NFS, macOS
    mirror = Mirror(str(tmp_path / "other-fs" / "run"))
    remote = mirror.upload(saved)
    assert mirror.verify(remote).checksum == saved.checksum
    back = CheckpointStore(tmp_path / "back")
    mirror.download(remote, back)
    assert torch.equal(back.load()["w"], torch.arange(3_000_000.0))


def test_a_path_mirror_whose_disk_fails_mid_copy_shows_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path / "run")
    saved = store.save({"w": torch.arange(3_000_000.0)}, step=3)
    real = os.copy_file_range
    copied: list[int] = []

    def fill_up(source: int, target: int, count: int) -> int:
        if copied:  # the second chunk finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        copied.append(real(source, target, count))
        return copied[-1]

    monkeypatch.setattr(os, "copy_file_range", fill_up)
    mirror = Mirror(str(tmp_path / "other-fs" / "run"))
    with pytest.raises(OSError, match="No space left"):
        mirror.upload(saved)
    assert mirror.list() == []
    assert not [p for p in (tmp_path / "other-fs").rglob("*") if p.is_file()]  # no temporary left behind
