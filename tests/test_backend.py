"""The backends' edges (issue 11, items 15, 22, 24, 25, 28): node lists as Slurm writes them, Slurm commands
that fail for a moment, the local backend driven like a user drives it (Ctrl-C, extend, status)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from chains import SlurmChain
from harness import events, train_command, wait_for
from slurm_cluster import SlurmCluster

from hpcckpt.distributed import expand_nodelist
from hpcckpt.errors import UsageError
from hpcckpt.slurm.tasks import extension_size

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


# --- item 25: Slurm commands that fail for a moment ----------------------------------------------------
def flaky(tmp_path: Path, command: str, failures: int, message: str) -> tuple[dict[str, str], Path]:
    """A PATH whose ``command`` fails ``failures`` times with ``message`` on stderr, then runs the real one;
    the file returned counts the calls. The fault is injected at the process edge, nothing is patched."""
    real = shutil.which(command)
    bin_dir = tmp_path / f"flaky-{command}"
    bin_dir.mkdir()
    calls = tmp_path / f"{command}-calls"
    script = bin_dir / command
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {shlex.quote(str(calls))} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {shlex.quote(str(calls))}\n"
        f"if [ $n -le {failures} ]; then echo {shlex.quote(message)} >&2; exit 1; fi\n"
        + (f'exec {shlex.quote(real)} "$@"\n' if real else "echo 'no real command' >&2; exit 1\n")
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def calls(counter: Path) -> int:
    return int(counter.read_text()) if counter.exists() else 0


def chain_run_dir(tmp_path: Path, *, job: str = "4242") -> Path:
    """A run directory whose chain was submitted to Slurm and whose one task has ended."""
    from hpcckpt import CheckpointStore

    run_dir = tmp_path / "run"
    registry = CheckpointStore(run_dir).registry
    registry.record("submit", job=job, tasks=2, time_seconds=60, backend="slurm", script=str(run_dir / "chain.sbatch"))
    registry.record("task-begin", job=f"{job}_1", array_job=job, task=1, latest=None, latest_step=None)
    registry.record("task-end", job=f"{job}_1", status=0, killed=False, progress=True, latest_step=None)
    return run_dir


def test_status_does_not_read_a_failing_squeue_as_an_empty_queue(tmp_path: Path) -> None:
    run_dir = chain_run_dir(tmp_path)
    env, counter = flaky(tmp_path, "squeue", 99, "squeue: error: Unable to contact slurm controller (connect failure)")
    result = subprocess.run(
        [sys.executable, "-m", "hpcckpt", "status", str(run_dir), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert calls(counter) == 4, "asked once and retried three times"
    assert status["state"] == "unknown" and status["tasks_left"] is None
    assert any("the queue is unknown" in w and "Unable to contact" in w for w in status["warnings"])
    assert not any("no task is queued" in w for w in status["warnings"])


def test_a_definite_slurm_error_is_not_retried(tmp_path: Path) -> None:
    env, counter = flaky(tmp_path, "scancel", 99, "scancel: error: Invalid job id specified")
    code = (
        "from hpcckpt.slurm import commands as slurm\n"
        "try:\n    slurm.cancel(['1'])\nexcept slurm.SlurmError as e:\n    print(e)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "Invalid job id specified" in result.stdout and "after 1 attempt" not in result.stdout
    assert calls(counter) == 1


def test_sbatch_is_sent_again_only_when_the_controller_was_not_reached(tmp_path: Path) -> None:
    env, counter = flaky(
        tmp_path, "sbatch", 1, "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"
    )
    code = (
        "from hpcckpt.slurm import commands as slurm\n"
        "try:\n    slurm.submit('x.sbatch')\nexcept slurm.SlurmError as e:\n    print(e)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "Socket timed out" in result.stdout and "after 1 attempt" in result.stdout
    assert calls(counter) == 1, "the job may exist: a second sbatch could start a second array of the chain"


@pytest.mark.timeout(300, func_only=True)
def test_squeue_and_sbatch_that_fail_for_a_moment_are_asked_again(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    sbatch_env, sbatch_calls = flaky(
        tmp_path,
        "sbatch",
        2,
        "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
    )
    run_dir = tmp_path / "run"
    argv = ["--backend", "slurm", "--run-dir", str(run_dir), "--tasks", "2", "--time", "1", "--max-failures", "9"]
    submitted = subprocess.run(
        ["hpcckpt", "submit", *argv, "--", "sleep", "120"],
        env={**sbatch_env, "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert calls(sbatch_calls) == 3
    job = submitted.stdout.split()[2].rstrip(":")
    try:
        squeue_env, squeue_calls = flaky(
            tmp_path, "squeue", 2, "slurm_load_jobs error: Socket timed out on send/recv operation"
        )
        result = subprocess.run(
            ["hpcckpt", "status", str(run_dir), "--json"],
            env={**squeue_env, "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert calls(squeue_calls) == 3
        assert status["tasks_left"] == 2 and status["jobs"] == [job], status
        assert status["state"] in ("pending", "running")
    finally:
        slurm_cluster.cancel(job)


# --- item 22: the local backend driven from a terminal -------------------------------------------------


def hpcckpt(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["hpcckpt", *argv], capture_output=True, text=True, timeout=timeout, check=False)


def status_json(run_dir: Path) -> dict[str, Any]:
    result = hpcckpt("status", str(run_dir), "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def session_members(session: int) -> list[int]:
    """Processes whose session is ``session`` (the local backend starts each task in its own)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # after "pid (comm)": state ppid pgrp session
            members.append(int(stat.parent.name))
    return members


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_on_a_local_submit_saves_the_running_task_and_leaves_nothing_behind(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["--backend", "local", "--run-dir", str(run_dir), "--tasks", "3", "--time", "2:00", "--signal", "USR1@20"]
    training = train_command(run_dir, "--steps", "1000000", "--step-sleep", "0.02")
    chain = subprocess.Popen(
        ["hpcckpt", "submit", *argv, "--", *training, "--workers", "0", "--save-every", "10ba"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        from hpcckpt import CheckpointStore

        saved = lambda: (run_dir / "registry.json").exists() and CheckpointStore(run_dir, create=False).list()  # noqa: E731
        first = wait_for(saved, 240, "a first periodic save", interval=0.2)[0]
        now = status_json(run_dir)
        assert (now["state"], now["tasks_left"], now["tasks_running"]) == ("running", 3, 1), now
        extended = hpcckpt("extend", str(run_dir), "--tasks", "2")
        assert extended.returncode == 0, extended.stderr
        assert "added 2 task(s) to local chain" in extended.stdout
        assert status_json(run_dir)["tasks_left"] == 5
        os.killpg(chain.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        out, err = chain.communicate(timeout=180)
    finally:
        if chain.poll() is None:
            os.killpg(chain.pid, signal.SIGKILL)
    assert chain.returncode == 130, out + err
    assert "interrupted by SIGINT" in err and "4 task(s) not run" in err
    (stop,) = events(run_dir, "stop")
    assert stop["reason"] == "signal" and stop["saved"] and stop["steps_lost"] == 0
    assert stop["step"] > first.step > 0
    assert CheckpointStore(run_dir, create=False).list()[-1].step == stop["step"]
    (begin,) = events(run_dir, "task-begin")
    (end,) = events(run_dir, "task-end")
    assert end["status"] == 0 and not end["killed"]
    assert events(run_dir, "cancel"), "the interruption is in the run's history"
    assert session_members(int(begin["pid"])) == [], "no process of the task is left running"
    after = status_json(run_dir)
    assert (after["tasks_left"], after["tasks_running"], after["state"]) == (0, 0, "stalled")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_extend_runs_more_tasks_of_a_local_run_here(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    training = train_command(run_dir, "--steps", "100000", "--step-sleep", "0.02", "--workers", "0")
    base = ["--run-dir", str(run_dir), "--time", "0:12", "--signal", "none"]
    first = hpcckpt("submit", "--backend", "local", *base, "--tasks", "1", "--max-tasks", "1", "--", *training)
    assert first.returncode == 0, first.stdout + first.stderr
    extended = hpcckpt("extend", str(run_dir), "--tasks", "1")
    assert extended.returncode == 0, extended.stdout + extended.stderr
    assert "task 1/1 ended" in extended.stdout
    stops, starts = events(run_dir, "stop"), events(run_dir, "start")
    assert len(stops) == len(starts) == 2
    assert starts[1]["resumed_step"] == stops[0]["step"] > 0 and stops[1]["step"] > stops[0]["step"]
    assert status_json(run_dir)["tasks_used"] == 2


# --- item 28: chains that extend themselves, within a cap -----------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_local_chain_too_short_for_its_run_extends_itself_until_complete(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    training = train_command(run_dir, "--steps", "400", "--step-sleep", "0.02", "--workers", "0")
    argv = ["--backend", "local", "--run-dir", str(run_dir), "--tasks", "1", "--time", "0:10", "--signal", "none"]
    result = hpcckpt("submit", *argv, "--max-tasks", "30", "--", *training, timeout=580)
    assert result.returncode == 0, result.stdout + result.stderr
    assert events(run_dir, "complete"), result.stdout
    submits = events(run_dir, "submit")
    assert submits[0]["max_tasks"] == 30 and len(submits) >= 2, "8 s of sleeps alone do not fit one 10-s task"
    assert all(s["auto"] and s["tasks"] == 1 for s in submits[1:])
    assert len(events(run_dir, "task-begin")) == len(submits) <= 30
    assert "auto-extension" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_auto_extension_stops_at_the_default_cap_and_status_says_what_the_eta_needs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    training = train_command(run_dir, "--steps", "100000", "--step-sleep", "0.02", "--workers", "0")
    argv = ["--backend", "local", "--run-dir", str(run_dir), "--tasks", "1", "--time", "0:08", "--signal", "none"]
    result = hpcckpt("submit", *argv, "--", *training, timeout=580)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(events(run_dir, "task-begin")) == 4, "default --max-tasks: 4 x --tasks"
    assert events(run_dir, "submit")[0]["max_tasks"] == 4
    now = status_json(run_dir)
    assert now["tasks_needed"] is not None and now["tasks_needed"] > 1
    assert (now["max_tasks"], now["extension_left"], now["tasks_left"]) == (4, 0, 0)
    text = hpcckpt("status", str(run_dir)).stdout
    assert f"the ETA needs about {now['tasks_needed']} more task(s), 0 queued" in text
    assert "auto-extension used up (--max-tasks 4)" in text


def test_max_tasks_below_tasks_is_refused(tmp_path: Path) -> None:
    argv = ["--backend", "local", "--run-dir", str(tmp_path / "run"), "--tasks", "3", "--time", "1"]
    result = hpcckpt("submit", *argv, "--max-tasks", "2", "--", sys.executable, "-c", "pass")
    assert result.returncode == 2
    assert "Invalid --max-tasks 2: expected a whole number >= --tasks (3)" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(720, func_only=True)
def test_a_slurm_chain_of_two_tasks_that_needs_four_extends_itself_and_completes(slurm_chain: SlurmChain) -> None:
    args = ["--epochs", "320", "--step-sleep", "0.05", "--workers", "0"]  # ~3.5 one-minute tasks of training
    first = slurm_chain.submit(
        *("--tasks", "2", "--time", "1", "--signal", "none"),
        command=slurm_chain.train(*args),
        env_extra={"HPCCKPT_MARGIN": "3"},
    )
    final = slurm_chain.wait_state({"complete", "failed", "stalled"}, timeout=660)
    assert final["state"] == "complete", final
    submits = slurm_chain.events("submit")
    assert submits[0]["max_tasks"] == 8, "default --max-tasks: 4 x --tasks"
    assert len(submits) >= 2 and all(s["auto"] and s["tasks"] == 2 for s in submits[1:]), submits
    assert final["jobs"][0] == first and len(final["jobs"]) == len(submits)
    stops = slurm_chain.events("stop")
    assert [s["reason"] for s in stops] == ["budget"] * (len(stops) - 1) + ["completed"]
    assert len(stops) >= 3 and all(s["saved"] and s["steps_lost"] == 0 for s in stops)
    slurm_chain.assert_gone(*final["jobs"])


def test_auto_extension_stops_once_the_run_is_cancelled() -> None:
    # `hpcckpt cancel` during the last task: the task still saves and ends with progress, and its task-end
    # must not submit a new array that the user's cancel never saw.
    submitted = [{"event": "submit", "job": "7", "tasks": 2, "max_tasks": 8}]
    progressed = [{"event": "task-end", "job": "7_2", "status": 0, "progress": True}]
    assert extension_size([*submitted, *progressed]) == 2
    cancelled = [*submitted, {"event": "cancel", "jobs": ["7"]}, *progressed]
    assert extension_size(cancelled) == 0
    # `hpcckpt extend` submits anew: the run goes on, and may extend again.
    extended = [*cancelled, {"event": "submit", "job": "8", "tasks": 2}, *progressed]
    assert extension_size(extended) == 2
