from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The shared helpers assert too: rewritten, their failures show values as a test's own asserts do.
pytest.register_assert_rewrite("chains", "harness", "compare")

from chains import SlurmChain  # noqa: E402
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
