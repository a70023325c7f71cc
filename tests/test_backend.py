"""The backends' edges (issue 11, items 15, 22, 24, 25, 28): node lists as Slurm writes them, Slurm commands
that fail for a moment, the local backend driven like a user drives it (Ctrl-C, extend, status)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


# --- item 15: no silent fallback to the local backend ------------------------------------------------
def _without_sbatch(tmp_path: Path) -> dict[str, str]:
    """This machine's environment with a PATH that has no Slurm command (a laptop, a container)."""
    empty = tmp_path / "bin-without-slurm"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = str(empty)
    return env


def test_without_sbatch_submit_refuses_instead_of_running_on_this_machine(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text("open('ran', 'w').close()\n")
    argv = ["--run-dir", str(run_dir), "--tasks", "1", "--time", "4:00:00", "--gpus", "1", "--partition", "gpu"]
    result = subprocess.run(
        [sys.executable, "-m", "hpcckpt", "submit", *argv, "--", sys.executable, str(script)],
        env=_without_sbatch(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sbatch is not on PATH" in result.stderr
    assert "module load slurm" in result.stderr and "--backend local" in result.stderr
    assert "local chain" not in result.stdout
    assert not run_dir.exists() and not (tmp_path / "ran").exists()


def test_without_sbatch_the_local_backend_must_be_asked_for(tmp_path: Path) -> None:
    argv = ["--backend", "local", "--dry-run", "--run-dir", str(tmp_path / "run"), "--tasks", "1", "--time", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "hpcckpt", "submit", *argv, "--", sys.executable, "-c", "pass"],
        env=_without_sbatch(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "the local backend" in result.stderr
