from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

# The shared helpers assert too: rewritten, their failures show values as a test's own asserts do.
pytest.register_assert_rewrite("chains", "harness", "compare", "s3lab")

from chains import SlurmChain  # noqa: E402
from s3lab import S3Lab  # noqa: E402
from slurm_cluster import SlurmCluster, SlurmStartError, SlurmUnavailableError, start_cluster, stop_cluster  # noqa: E402

# --- Slurm cluster (tests/cluster/slurm-lab) ---------------------------------------------------------
# One throwaway two-node cluster for the whole session. Where Slurm cannot run (not root, no apt-get)
# the tests that use it are skipped, or fail when HPCCKPT_REQUIRE_SLURM=1 (for CI, so that a broken
# install cannot pass as "skipped"). A test that uses the fixture gets the `slurm` marker by itself.


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    state_dir = tmp_path_factory.mktemp("slurm")
    try:
        cluster = start_cluster(state_dir)
    except SlurmUnavailableError as exc:
        if os.environ.get("HPCCKPT_REQUIRE_SLURM") == "1":
            pytest.fail(f"HPCCKPT_REQUIRE_SLURM=1 but Slurm is unavailable: {exc}")
        pytest.skip(f"Slurm is unavailable: {exc}")
    except SlurmStartError:
        stop_cluster(state_dir)  # the daemons that did start
        raise
    try:
        yield cluster
    finally:
        stop_cluster(state_dir)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marker must be there when it looks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)


# --- end of Slurm cluster ----------------------------------------------------------------------------


# --- a chain on that cluster (tests/support/chains.py) -----------------------------------------------
@pytest.fixture
def slurm_chain(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[SlurmChain]:
    """A chain on ``tmp_path / "chain"``; what it still has queued is cancelled when the test ends."""
    chain = SlurmChain(slurm_cluster, tmp_path / "chain")
    try:
        yield chain
    finally:
        chain.cancel_leftovers()


# --- an S3-protocol server (tests/support/s3lab.py) --------------------------------------------------
# moto's standalone server in a process of its own, for the whole session, behind a relay the tests can
# kill. It is installed by the test extra (moto[server]); it never skips: a missing server fails the tests.
@pytest.fixture(scope="session")
def s3_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Lab]:
    lab = S3Lab(tmp_path_factory.mktemp("s3lab"))
    try:
        yield lab.start()
    finally:
        lab.stop()


@pytest.fixture
def s3_env(s3_lab: S3Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Lab]:
    """This test's process (and the processes it starts) reaches the server through the standard AWS
    variables; the relay is up again after a test that cut it."""
    for key, value in s3_lab.env().items():
        monkeypatch.setenv(key, value)
    yield s3_lab
    if not s3_lab.relay_up:
        s3_lab.resume()


@pytest.fixture(params=["posix", "s3"])
def mirror_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A mirror for one test, run once on each kind of location: a directory standing for a second
    filesystem, and a prefix (two levels deep) in a fresh bucket of the S3 server."""
    if request.param == "posix":
        yield str(tmp_path / "second-fs" / "run")
    else:
        lab: S3Lab = request.getfixturevalue("s3_env")
        yield f"s3://{lab.new_bucket()}/prefix/run"


# --- signal handlers --------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def signal_handlers_restored() -> Iterator[None]:
    """Run leaves a late recorder on the signals it watched (a signal after the loop must not kill the
    process); a test that runs Run in pytest's own process must not hand those handlers to the tests after
    it (test_signals.py checks the defaults), so every test ends with the handlers it started with."""
    watched = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in watched}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)
