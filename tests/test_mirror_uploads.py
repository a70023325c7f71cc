"""The store's background uploads to its mirror, with real faults: the S3 server cut off in the middle of an
upload, wrong credentials, every local checkpoint corrupt, and the mirror's own retention."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import s3fs
import torch
from s3lab import S3Lab

from hpcckpt import TrainState
from hpcckpt.store.mirror import Mirror
from hpcckpt.store.store import CheckpointStore

WAIT = 300.0  # generous: s3fs retries with back-off against a cut server, on a busy 2-core machine


def _weights(seed: int, numel: int = 1000) -> dict[str, torch.Tensor]:
    return {"w": torch.full((numel,), float(seed))}


def _names(mirror: Mirror) -> list[str]:
    return [c.name for c in mirror.list()]


def test_every_commit_is_uploaded_in_the_background_and_the_mirror_keeps_its_own_last_k(
    tmp_path: Path, mirror_url: str
) -> None:
    store = CheckpointStore(tmp_path / "run", keep_last=None, mirror=mirror_url, mirror_keep_last=2)
    assert store.uploads is not None and store.mirror is not None
    for step in range(1, 5):
        store.save(_weights(step), step=step)
    assert store.uploads.wait(WAIT) == []
    assert store.uploads.failed() == {}
    assert _names(store.mirror) == ["step_000000003", "step_000000004"]
    uploaded = [e["name"] for e in store.registry.events() if e["event"] == "uploaded"]
    assert uploaded[-1] == "step_000000004" and set(uploaded) <= {f"step_00000000{s}" for s in range(1, 5)}
    for checkpoint in store.mirror.list():
        store.mirror.verify(checkpoint)


def test_async_saves_are_uploaded_too(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", mirror=str(tmp_path / "mirror"))
    assert store.uploads is not None and store.mirror is not None
    store.save(_weights(1), step=1, blocking=False).wait()
    assert store.uploads.wait(WAIT) == []
    assert _names(store.mirror) == ["step_000000001"]


def test_every_local_checkpoint_corrupt_restores_from_the_mirror(tmp_path: Path, mirror_url: str) -> None:
    model = torch.nn.Linear(4, 3)
    store = CheckpointStore(tmp_path / "run", mirror=mirror_url)
    assert store.uploads is not None
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(float(step))
        store.save(TrainState(model=model, step=step))
    assert store.uploads.wait(WAIT) == []
    for checkpoint in store.list():
        data = checkpoint.path / "state.tensors"
        raw = bytearray(data.read_bytes())
        raw[-5] ^= 0xFF
        data.write_bytes(bytes(raw))
    fresh = TrainState(model=torch.nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="corrupt"):
        restored = CheckpointStore(tmp_path / "run", mirror=mirror_url).restore(fresh)
    assert restored is not None and restored.step == 2 and fresh.step == 2
    assert torch.equal(fresh.model.weight, torch.full((3, 4), 2.0))  # type: ignore[union-attr]
    pulled = [e for e in CheckpointStore(tmp_path / "run").registry.events() if e["event"] == "pulled"]
    assert [e["step"] for e in pulled] == [2]


def test_an_empty_run_directory_restores_the_mirror_newest_and_a_mirror_without_any_starts_fresh(
    tmp_path: Path,
) -> None:
    mirror = str(tmp_path / "mirror")
    empty = TrainState(model=torch.nn.Linear(2, 2))
    assert CheckpointStore(tmp_path / "first", mirror=mirror).restore(empty) is None  # a first run: fresh
    store = CheckpointStore(tmp_path / "first", mirror=mirror)
    store.save(TrainState(model=torch.nn.Linear(2, 2), step=9))
    assert store.uploads is not None and store.uploads.wait(WAIT) == []
    state = TrainState(model=torch.nn.Linear(2, 2))
    restored = CheckpointStore(tmp_path / "new-node", mirror=mirror).restore(state)
    assert restored is not None and state.step == 9


@pytest.mark.timeout(900)
def test_server_cut_before_the_manifest_leaves_nothing_visible_and_the_next_save_completes_the_mirror(
    tmp_path: Path, s3_env: S3Lab, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = s3_env.new_bucket()
    store = CheckpointStore(tmp_path / "run", keep_last=None, mirror=f"s3://{bucket}/run", mirror_keep_last=None)
    assert store.uploads is not None and store.mirror is not None
    location = store.mirror.location
    publish = location.put_bytes
    cuts: list[str] = []

    def cut_then_publish(name: str, data: bytes) -> None:
        # The fault: the server goes away once every data file is stored, before the manifest is sent.
        if not cuts:
            cuts.append(name)
            s3_env.cut()
        publish(name, data)

    location.put_bytes = cut_then_publish  # type: ignore[method-assign]
    big = {"w": torch.arange(3 << 20, dtype=torch.float32)}  # 12 MiB: a multipart upload
    with caplog.at_level(logging.WARNING, logger="hpcckpt"):
        first = store.save(big, step=1)
        assert store.uploads.wait(WAIT) == ["step_000000001"]
        assert "step_000000001" in store.uploads.failed()
        # Training goes on while the server is away: the next save commits locally and its upload fails too.
        second = store.save(_weights(2), step=2)
        assert store.uploads.wait(WAIT) == ["step_000000001", "step_000000002"]
    assert [c.name for c in store.list()] == [first.name, second.name]
    failures = [r.getMessage() for r in caplog.records if "training goes on" in r.getMessage()]
    assert len(failures) == 1, failures
    assert failures[0].startswith(f"hpcckpt: mirror s3://{bucket}/run: ")

    s3_env.resume()
    direct = s3fs.S3FileSystem(skip_instance_cache=True)
    assert direct.exists(f"{bucket}/run/checkpoints/step_000000001/state.tensors")  # the data did arrive
    assert _names(store.mirror) == []  # but without its manifest the checkpoint is invisible

    third = store.save(_weights(3), step=3)
    assert store.uploads.wait(WAIT) == []
    assert store.uploads.failed() == {}
    assert _names(store.mirror) == [first.name, second.name, third.name]
    for remote in store.mirror.list():
        store.mirror.verify(remote)
    fresh = CheckpointStore(tmp_path / "elsewhere")
    local = store.mirror.download(store.mirror.list()[0], fresh)
    assert torch.equal(fresh.load(local)["w"], big["w"])
    kinds = [e["event"] for e in store.registry.events() if e["event"] in ("uploaded", "upload_failed")]
    assert kinds.count("upload_failed") >= 2 and kinds.count("uploaded") == 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_killed_in_the_middle_of_a_large_upload_leaves_no_partial_checkpoint(
    tmp_path: Path, s3_env: S3Lab
) -> None:
    bucket = s3_env.new_bucket()
    store = CheckpointStore(tmp_path / "run", keep_last=None, mirror=f"s3://{bucket}/run", mirror_keep_last=None)
    assert store.uploads is not None and store.mirror is not None
    location = store.mirror.location
    send = location.put_file
    started: list[str] = []

    class CutAfterFirstPart:
        """The transfer's progress: once the first part of the file is on the server, the relay dies, while
        the client goes on with the next part (a real reset in the middle of the transfer)."""

        def update(self, n: int) -> None:
            if s3_env.relay_up:
                s3_env.cut()

    def cut_while_sending(local: Path, name: str, progress: object = None) -> int:
        started.append(name)
        return send(local, name, CutAfterFirstPart())

    location.put_file = cut_while_sending  # type: ignore[method-assign]
    # 104 MiB: s3fs sends a file of twice its 50 MiB part size or more as a multipart upload, part by part.
    store.save({"w": torch.arange(26 << 20, dtype=torch.float32)}, step=1)
    assert store.uploads.wait(WAIT) == ["step_000000001"]
    location.put_file = send  # type: ignore[method-assign]
    s3_env.resume()
    assert started == ["checkpoints/step_000000001/state.tensors"]
    # Cut in the middle: the multipart upload never completed, so not even the data file exists remotely.
    direct = s3fs.S3FileSystem(skip_instance_cache=True)
    assert not direct.exists(f"{bucket}/run/checkpoints/step_000000001/state.tensors")
    assert _names(store.mirror) == []
    store.save(_weights(2), step=2)
    assert store.uploads.wait(WAIT) == []
    assert _names(store.mirror) == ["step_000000001", "step_000000002"]
    for remote in store.mirror.list():
        store.mirror.verify(remote)


@pytest.mark.timeout(900)
def test_wrong_credentials_are_said_once_and_never_shown(
    tmp_path: Path, s3_lab: S3Lab, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = s3_lab.new_bucket()
    wrong = s3_lab.wrong_env()
    for key, value in wrong.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.DEBUG, logger="hpcckpt"):
        store = CheckpointStore(tmp_path / "run", mirror=f"s3://{bucket}/run")
        assert store.uploads is not None
        for step in (1, 2, 3):
            store.save(_weights(step), step=step)
            store.uploads.wait(WAIT)
    said = [r.getMessage() for r in caplog.records if "access denied" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"hpcckpt: mirror s3://{bucket}/run: access denied (check the credentials")
    assert [c.step for c in store.list()] == [1, 2, 3]  # training went on locally
    failed = [e for e in store.registry.events() if e["event"] == "upload_failed"]
    assert {e["name"] for e in failed} == {"step_000000001", "step_000000002", "step_000000003"}
    for secret in (wrong["AWS_SECRET_ACCESS_KEY"], s3_lab.secret_key):
        assert secret not in caplog.text
        for path in (tmp_path / "run").rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


@pytest.mark.timeout(900)
def test_what_a_task_left_unuploaded_is_uploaded_at_the_next_task_start(tmp_path: Path, s3_env: S3Lab) -> None:
    url = f"s3://{s3_env.new_bucket()}/run"
    first_task = CheckpointStore(tmp_path / "run", mirror=url)
    assert first_task.uploads is not None
    s3_env.cut()
    saved = first_task.save(_weights(1), step=1)
    assert first_task.uploads.wait(WAIT) == [saved.name]  # the server is away until this task ends
    s3_env.resume()
    next_task = CheckpointStore(tmp_path / "run", mirror=url)
    assert next_task.uploads is not None and next_task.mirror is not None
    next_task.upload_to_mirror(None)  # what Run does right after it resumes
    assert next_task.uploads.wait(WAIT) == []
    assert [(c.name, c.checksum) for c in next_task.mirror.list()] == [(saved.name, saved.checksum)]
