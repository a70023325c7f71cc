"""Restore's robustness, from the review of issue 14: a mirror that fails with its backend's own error (not an
OSError), a bad mark that cannot be recorded, ``hpcckpt pull`` and checkpoints marked bad, and a validate
that runs a forward pass in train mode. With ranks, real gloo process groups on CPU and the tests' real S3
server (moto behind a relay the test kills)."""

from __future__ import annotations

import errno
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks
from s3lab import S3Lab

from hpcckpt import CheckpointStore, HpcckptWarning, StoreError, TrainState
from hpcckpt.cli.main import main
from hpcckpt.store import registry

# See tests/test_distributed.py: torch's gloo sometimes aborts a rank at teardown, after its last line.


def _finite(state: TrainState) -> bool:
    assert state.model is not None
    with torch.no_grad():
        return bool(torch.isfinite(state.model(torch.ones(2, 4))).all())


def _saved_with_nan_newest(run_dir: Path, mirror: str | None = None) -> CheckpointStore:
    """Steps 1 and 2 (weights 1.0) and 3 (NaN weights), uploaded to ``mirror`` when given."""
    store = CheckpointStore(run_dir, keep_last=None, mirror=mirror, mirror_keep_last=None)
    model = torch.nn.Linear(4, 1)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step) if step < 3 else float("nan"))
        store.save(TrainState(model=model, step=step))
    if store.uploads is not None:
        assert store.uploads.wait(120) == []
    return store


# -- 4: a mirror failing with its backend's own error --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)  # s3fs retries a refused connection for about 10 s per call
def test_an_unreachable_s3_mirror_with_nothing_here_stops_the_restore_with_the_store_error(
    tmp_path: Path, s3_env: S3Lab
) -> None:
    url = f"s3://{s3_env.new_bucket()}/prefix/run"
    run_dir = tmp_path / "run"
    _saved_with_nan_newest(run_dir, url)
    s3_env.cut()  # the server cannot be reached: botocore's EndpointConnectionError, which is no OSError
    shutil.rmtree(run_dir)  # purged: only the mirror has the run's progress

    state = TrainState(model=torch.nn.Linear(4, 1))
    with pytest.raises(StoreError) as raised:
        CheckpointStore(run_dir, keep_last=None, mirror=url).restore(state)
    message = str(raised.value)
    assert message.startswith(f"mirror {url}: the storage cannot be reached")
    assert "the run does not start from scratch" in message
    assert s3_env.secret_key not in message
    assert state.step == 0


RANK_WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import torch.distributed as dist
    from hpcckpt import CheckpointStore, TrainState
    from hpcckpt.store import registry

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run_dir, mirror, case = sys.argv[1], sys.argv[2] or None, sys.argv[3]
    if case == "mark-fails" and rank == 0:
        def refused(self, checkpoint, reason):
            raise RuntimeError("the registry broke")
        registry.Registry.mark_bad = refused
    store = CheckpointStore(run_dir, keep_last=None, format="dcp", mirror=mirror)
    state = TrainState(model=torch.nn.Linear(4, 1))
    def finite(state):
        with torch.no_grad():
            return bool(torch.isfinite(state.model(torch.ones(2, 4))).all())
    try:
        chosen = store.restore(state, validate=finite)
        outcome = {"rank": rank, "step": chosen.step}
    except Exception as error:
        outcome = {"rank": rank, "error": type(error).__name__, "message": str(error)}
    print(json.dumps(outcome), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _two_ranks(tmp_path: Path, run_dir: Path, mirror: str, case: str) -> list[dict[str, Any]]:
    """RANK_WORKER on two ranks; each rank's outcome, by rank (a rank left waiting fails the test's timeout)."""
    script = tmp_path / "worker.py"
    script.write_text(RANK_WORKER)
    return run_ranks(script, str(run_dir), mirror, case, timeout=200)


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_with_ranks_an_unreachable_mirror_with_nothing_here_raises_on_every_rank(tmp_path: Path, s3_env: S3Lab) -> None:
    url = f"s3://{s3_env.new_bucket()}/prefix/run"
    run_dir = tmp_path / "run"
    _saved_with_nan_newest(run_dir, url)
    s3_env.cut()
    shutil.rmtree(run_dir)

    outcomes = _two_ranks(tmp_path, run_dir, url, "plain")
    assert [o.get("error") for o in outcomes] == ["StoreError", "StoreError"]
    for outcome in outcomes:
        assert outcome["message"].startswith(f"mirror {url}: the storage cannot be reached")
        assert "the run does not start from scratch" in outcome["message"]


# -- 5: a bad mark that cannot be recorded --------------------------------------------------------------------
def test_a_bad_mark_whose_event_hits_the_quota_still_skips_the_checkpoint_and_restores_the_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    _saved_with_nan_newest(run_dir)
    append = registry.Registry._append

    def over_quota(self: registry.Registry, events: list[dict[str, Any]], *, durable: bool = False) -> None:
        if any(event.get("event") == "bad" for event in events):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        append(self, events, durable=durable)

    monkeypatch.setattr(registry.Registry, "_append", over_quota)
    store = CheckpointStore(run_dir, keep_last=None)
    state = TrainState(model=torch.nn.Linear(4, 1))
    with pytest.warns(HpcckptWarning) as seen:
        chosen = store.restore(state, validate=_finite)
    assert chosen is not None and chosen.step == 2
    assert state.step == 2 and state.model is not None
    assert float(state.model.weight.detach()[0, 0]) == 2.0
    assert any("Disk quota exceeded" in str(w.message) and "events" in str(w.message) for w in seen)
    assert [c.step for c in store.list()] == [1, 2]  # skipped by this process from now on


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_with_ranks_a_bad_mark_that_fails_on_rank_0_is_raised_on_every_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir, keep_last=None, format="dcp")
    model = torch.nn.Linear(4, 1)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(float(step) if step < 2 else float("nan"))
        store.save(TrainState(model=model, step=step))

    outcomes = _two_ranks(tmp_path, run_dir, "", "mark-fails")
    assert [o.get("error") for o in outcomes] == ["StoreError", "StoreError"]
    for outcome in outcomes:
        assert "could not mark checkpoint step_000000002 bad" in outcome["message"]
        assert "the registry broke" in outcome["message"]


# -- 6: hpcckpt pull and bad marks ----------------------------------------------------------------------------
def test_pull_never_brings_back_a_checkpoint_marked_bad_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, mirror = tmp_path / "run", str(tmp_path / "mirror")
    _saved_with_nan_newest(run_dir, mirror)
    with pytest.warns(HpcckptWarning):
        chosen = CheckpointStore(run_dir, keep_last=None).restore(
            TrainState(model=torch.nn.Linear(4, 1)), validate=_finite
        )
    assert chosen is not None and chosen.step == 2
    capsys.readouterr()

    assert main(["pull", mirror, str(run_dir)]) == 0
    assert "step_000000002 (step 2) is already in" in capsys.readouterr().out
    store = CheckpointStore(run_dir, keep_last=None)
    assert [c.step for c in store.list()] == [1, 2]
    latest = store.latest()
    assert latest is not None and latest.step == 2

    assert main(["pull", mirror, str(run_dir), "--step", "3"]) == 1
    err = capsys.readouterr().err
    assert "step_000000003 (step 3)" in err and "is marked bad in" in err
    assert "validate returned False" in err
    assert [c.step for c in CheckpointStore(run_dir, keep_last=None).list()] == [1, 2]


# -- 7: validate leaves the resumed state as it found it -------------------------------------------------------
def test_a_validate_forward_pass_in_train_mode_leaves_the_restored_state_bitwise_as_without_it(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)

    def model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))

    trained = model()
    trained(torch.randn(8, 4))
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    store.save(TrainState(model=trained, step=3))
    batch = torch.randn(8, 4) * 5 + 3

    def validate(state: TrainState) -> bool:
        assert state.model is not None
        with torch.no_grad():  # BatchNorm in train mode updates its running statistics all the same
            return bool(torch.isfinite(state.model(batch)).all())

    plain, checked = TrainState(model=model()), TrainState(model=model())
    store.restore(plain)
    store.restore(checked, validate=validate)
    assert plain.model is not None and checked.model is not None
    assert checked.model.training
    expected, got = plain.model.state_dict(), checked.model.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected), {
        key: (got[key], expected[key]) for key in expected if not torch.equal(got[key], expected[key])
    }
