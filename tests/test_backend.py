"""The backends' edges (issue 11, items 15, 22, 24, 25, 28): node lists as Slurm writes them, Slurm commands
that fail for a moment, the local backend driven like a user drives it (Ctrl-C, extend, status)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcckpt.distributed import expand_nodelist
from hpcckpt.errors import UsageError

# --- item 24: node lists -------------------------------------------------------------------------------
NODE_LISTS = {
    "node[1-2]-ib": ["node1-ib", "node2-ib"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
    "a,b[3,5-6]": ["a", "b3", "b5", "b6"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "n[8-10]": ["n8", "n9", "n10"],
    "n[01-2]": ["n01", "n02"],
    "n[1-3,2]": ["n1", "n2", "n3", "n2"],
    " a , b": ["a", "b"],
    "a,,b": ["a", "b"],
    "x[1-2]y[3]z": ["x1y3z", "x2y3z"],
    "gpu[01-02]-ib,cpu[1-2]": ["gpu01-ib", "gpu02-ib", "cpu1", "cpu2"],
}


@pytest.mark.parametrize("nodelist", sorted(NODE_LISTS))
def test_every_slurm_node_list_form_expands(nodelist: str) -> None:
    assert expand_nodelist(nodelist) == NODE_LISTS[nodelist]


@pytest.mark.parametrize("nodelist", ["gpu[01-", "gpu01]", "a[x]", "n[3-1]", "a[]", "a[[1]]", "n[1-2"])
def test_a_malformed_node_list_is_refused_naming_it(nodelist: str) -> None:
    with pytest.raises(UsageError, match=r"Invalid node list .*expected"):
        expand_nodelist(nodelist)


def test_node_lists_expand_as_the_real_scontrol_expands_them(tmp_path: Path) -> None:
    """The oracle: ``scontrol show hostnames`` of the installed Slurm (it needs a slurm.conf, not a
    controller). Slurm 22.05 refuses text after a bracket group (``node[1-2]-ib``), which newer Slurm and
    the sites that name nodes so accept; those forms are checked by the table above only."""
    if shutil.which("scontrol") is None:
        if os.environ.get("HPCCKPT_REQUIRE_SLURM") == "1":
            pytest.fail("HPCCKPT_REQUIRE_SLURM=1 but scontrol is not on PATH")
        pytest.skip("scontrol is not on PATH")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    compared = 0
    for nodelist, hosts in NODE_LISTS.items():
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], env=env, capture_output=True, text=True, timeout=30
        )
        if "Invalid hostlist" in proc.stdout + proc.stderr:
            continue
        assert proc.stdout.split() == hosts == expand_nodelist(nodelist), nodelist
        compared += 1
    assert compared >= 8  # all but the forms Slurm 22.05 refuses
