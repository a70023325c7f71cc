"""Ranks that agree and sharded (DCP) checkpoints: real gloo process groups on CPU, started here with
torchrun's variables (and once through torchrun itself), and under srun on the two-node test cluster.

Every interrupted run is compared with an uninterrupted one at the same world size: same weights, same
optimizer state, bitwise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from chains import SlurmChain
from compare import assert_bitwise_equal
from harness import TEARDOWN_ABORT, clean_env, events, wait_for
from paths import DDP_WORKER

from hpcckpt import CheckpointStore
from hpcckpt.distributed import dist_env, expand_nodelist

_port = 29700 + os.getpid() % 200


def rank_env(**extra: str) -> dict[str, str]:
    """A rank's environment: nothing of an outer job or launcher, plus ``extra``."""
    return clean_env("RANK", "WORLD_SIZE", **extra)


# torch 2.13 with gloo, on this 2-core machine under load, sometimes ends a launch with one rank aborting
# at teardown, after training and after its last line ("terminate called without an active exception"):
# a plain DDP loop without hpcckpt does it too. A launch passes when every rank reported its end and the
# only failure is that abort.


class Ranks:
    """The DDP worker as ``nproc`` processes with torchrun's variables, or through torchrun itself."""

    def __init__(
        self, run_dir: Path, nproc: int, *args: str, deadline_in: float | None = None, torchrun: bool = False
    ) -> None:
        global _port
        _port += 1
        # The deadline counts from when each rank has built its model, not from here: under load the imports
        # and the process group took longer than a whole 10-s budget (issue 11, item 32).
        extra: dict[str, str] = {}
        deadline = ["--deadline-in", str(deadline_in)] if deadline_in else []
        self.pid_dir = run_dir.parent / f"{run_dir.name}-pids-{time.monotonic_ns()}"
        self.pid_dir.mkdir(parents=True)
        worker = [str(DDP_WORKER), str(run_dir), "--pid-dir", str(self.pid_dir), *deadline, *args]
        self.processes: list[subprocess.Popen[str]] = []
        if torchrun:
            launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_port)]
            self.processes.append(self._start([sys.executable, *launcher, *worker], rank_env(**extra)))
        else:
            for rank in range(nproc):
                variables = {"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank)}
                variables |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port)} if nproc > 1 else {}
                env = rank_env(**extra, **variables) if nproc > 1 else rank_env(**extra)
                self.processes.append(self._start([sys.executable, *worker], env))
        self.nproc = nproc

    @staticmethod
    def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    @property
    def returncode(self) -> int | None:
        codes = [p.returncode for p in self.processes]
        return None if None in codes else max(codes, key=abs)  # type: ignore[arg-type]

    def pids(self, timeout: float = 60) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {int(p.stem): int(p.read_text()) for p in self.pid_dir.glob("*.pid") if p.read_text()}
            if len(found) == self.nproc:
                return found
            for process in self.processes:
                assert process.poll() is None, process.communicate()[1]
            time.sleep(0.05)
        raise AssertionError("the ranks did not start training")

    def end(self, timeout: float = 180, check: bool = True) -> list[dict[str, Any]]:
        outs, errs = [], []
        for process in self.processes:
            out, err = process.communicate(timeout=timeout)
            outs.append(out)
            errs.append(err)
        self.stderr = "\n".join(errs)
        # Ranks that share torchrun's stdout may write their lines run together.
        lines = [json.loads(found) for found in re.findall(r'\{"rank": [^{}]*\}', "\n".join(outs))]
        if check:
            assert len(lines) == self.nproc, self.stderr[-3000:]
            assert self.returncode == 0 or TEARDOWN_ABORT in self.stderr, self.stderr[-3000:]
        return sorted(lines, key=lambda line: line["rank"])


def training(state: dict[str, Any]) -> dict[str, Any]:
    return {key: state[key] for key in ("model", "optimizer", "step")}


_references: dict[tuple[int, int], dict[str, Any]] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, nproc: int, steps: int) -> dict[str, Any]:
    if (nproc, steps) not in _references:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        Ranks(run_dir, nproc, "--steps", str(steps)).end()
        _references[nproc, steps] = training(CheckpointStore(run_dir, create=False).load())
    return _references[nproc, steps]


def save_under_way(checkpoints: Path) -> bool:
    """A temporary checkpoint directory exists (poll it often: a rank's save lasts a fraction of a second)."""
    return checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())


# --- the launcher's environment ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[1-2]", ["node1", "node2"]),
        ("gpu[01-03,07],cpu1", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu1"]),
        ("a[8-10]b", ["a8b", "a9b", "a10b"]),
        ("a[8-]b", None),
    ],
)
def test_node_lists_expand_like_scontrol_show_hostnames(nodelist: str, hosts: list[str] | None) -> None:
    if hosts is None:
        with pytest.raises(Exception, match="Invalid node list"):
            expand_nodelist(nodelist)
    else:
        assert expand_nodelist(nodelist) == hosts


def test_rank_and_rendezvous_come_from_srun_or_torchrun() -> None:
    srun = dist_env(
        {
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "123",
            "SLURM_STEP_NODELIST": "gpu[07-08]",
            "SLURM_JOB_NODELIST": "gpu[01-08]",
        }
    )
    assert (srun.rank, srun.world_size, srun.local_rank, srun.master_addr) == (3, 4, 1, "gpu07")
    assert srun.master_port == 20123 and srun.launcher == "srun"
    torchrun = dist_env(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "9",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
        }
    )
    assert (torchrun.rank, torchrun.world_size, torchrun.master_addr, torchrun.master_port) == (1, 2, "h", 9)
    assert dist_env({}).world_size == 1
    with pytest.raises(Exception, match="Invalid SLURM_NTASKS='two': expected a whole number"):
        dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "two", "SLURM_JOB_NODELIST": "n1"})


# --- torchrun on this machine --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ranks_stop_together_on_the_budget_and_on_a_signal_to_one_rank(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps, args = 1200, ("--steps", "1200", "--step-sleep", "0.01")  # >= 12 s: the 10 s budget stops it
    run_dir = tmp_path / "run"
    budget = Ranks(run_dir, 2, *args, deadline_in=10).end()
    assert [r["reason"] for r in budget] == ["budget", "budget"] and budget[0]["step"] == budget[1]["step"] < steps

    signalled = Ranks(run_dir, 2, *args)
    os.kill(signalled.pids()[1], signal.SIGUSR1)  # rank 1 only
    ranks = signalled.end()
    assert [r["reason"] for r in ranks] == ["signal", "signal"], "rank 0 stopped with rank 1"
    assert ranks[0]["step"] == ranks[1]["step"] and ranks[0]["resumed"] == budget[0]["step"]

    last = Ranks(run_dir, 2, *args).end()
    assert [r["reason"] for r in last] == ["completed", "completed"] and last[0]["resumed"] == ranks[0]["step"]
    stops = events(run_dir, "stop")
    assert [s["reason"] for s in stops] == ["budget", "signal", "completed"], "one record per stop, not per rank"
    assert all(s["saved"] and s["steps_lost"] == 0 for s in stops)
    store = CheckpointStore(run_dir, create=False)
    assert {c.format for c in store.list()} == {"dcp"}
    assert_bitwise_equal(reference(tmp_path_factory, 2, steps), training(store.load()))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wall_time_saves_are_agreed_although_the_ranks_clocks_differ_under_torchrun(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ranks = Ranks(run_dir, 2, "--steps", "300", "--step-sleep", "0.01", "--save-every", "1s", torchrun=True).end()
    assert [(r["rank"], r["step"], r["reason"]) for r in ranks] == [(0, 300, "completed"), (1, 300, "completed")]
    commits = events(run_dir, "commit")
    assert len(commits) >= 3, "about one a second for 3 s, then the final one"
    for checkpoint in CheckpointStore(run_dir, create=False).list():
        assert {f.name for f in checkpoint.files} == {".metadata", "__0_0.distcp", "__1_0.distcp"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ranks_with_async_saves_commit_every_due_save_and_resume_from_the_last(tmp_path: Path) -> None:
    """Run(async_save=True) with ranks: every interval save goes through DCP's background save and its
    collective wait, which the ranks reach together (at the next save and at the stop), never at a step
    boundary where one rank finds its part done and the other not."""
    run_dir = tmp_path / "run"
    args = ("--save-every", "3ba", "--async-save", "--step-sleep", "0.01")
    (first, _) = Ranks(run_dir, 2, "--steps", "100000", *args, deadline_in=8).end()
    assert first["reason"] == "budget"
    commits = [e["step"] for e in events(run_dir, "commit")]
    due = list(range(3, first["step"] + 1, 3))
    assert commits == (due if due[-1] == first["step"] else [*due, first["step"]]), "every due save, in order"
    store = CheckpointStore(run_dir, create=False)
    assert store.latest().step == first["step"] and all(c.format == "dcp" for c in store.list())  # type: ignore[union-attr]
    # The next task resumes from the budget stop's checkpoint and completes, saving in the background.
    target = first["step"] + 7
    (second, _) = Ranks(run_dir, 2, "--steps", str(target), *args).end()
    assert (second["resumed"], second["step"], second["reason"]) == (first["step"], target, "completed")
    assert store.latest().step == target  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_crash_on_one_rank_drops_the_async_save_in_flight_instead_of_waiting_alone(tmp_path: Path) -> None:
    """A crash on rank 1 while an async save is in flight: its wait is collective, and rank 0 is still
    training. Rank 1 leaves at once with its own error (waiting alone would pair its wait's collectives with
    rank 0's training ones: undefined, a hang until the process group's 600-s timeout here); nothing of the
    dropped save is committed, and the checkpoint before it stays the latest and loads."""
    run_dir = tmp_path / "run"
    args = ("--steps", "100000", "--save-every", "2ba", "--async-save", "--crash-at", "5", "--crash-rank", "1")
    ranks = Ranks(run_dir, 2, *args)
    _, crashing = ranks.processes
    try:
        _, err = crashing.communicate(timeout=120)  # well under the process group's timeout
    finally:
        ranks.processes[0].kill()  # rank 0 waits for its peer in training's collectives
        ranks.end(check=False)
    assert crashing.returncode != 0
    assert "RuntimeError: diverged on rank 1 at step 5" in err, err[-3000:]
    assert "the async save of step 4 is dropped after the crash" in err, err[-3000:]
    store = CheckpointStore(run_dir, create=False)
    assert [c.step for c in store.list()] == [2], "step 4's save was never committed"
    store.verify(store.list()[0])
    assert store.load()["step"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_a_sharded_checkpoint_resumes_at_another_world_size_and_exports(tmp_path: Path, wrapper: str) -> None:
    run_dir = tmp_path / "run"
    args = ("--steps", "100000", "--step-sleep", "0.01", *(["--fsdp"] if wrapper == "fsdp" else []))
    (first, _) = Ranks(run_dir, 2, *args, deadline_in=10).end()
    assert first["reason"] == "budget"
    store = CheckpointStore(run_dir, create=False)
    saved = training(store.load())
    # World size 1: the DDP or FSDP checkpoint's parameters load into a plain model (resharded by DCP).
    (one,) = Ranks(run_dir, 1, *args, deadline_in=8).end()
    assert (one["world"], one["resumed"], one["reason"]) == (1, first["step"], "budget")
    assert one["step"] > first["step"]
    assert [c.format for c in store.list()][-1] == "tensors", "a lone process saves one file"
    # And back to two ranks, from the one-file checkpoint.
    two = Ranks(run_dir, 2, *args, deadline_in=10).end()
    assert [r["resumed"] for r in two] == [one["step"]] * 2 and two[0]["step"] > one["step"]
    # Export of the first, sharded checkpoint to one plain file.
    out, checkpoint = store.export(tmp_path / "first.pt", ckpt=first["step"])
    import torch

    exported = torch.load(out, weights_only=True)
    assert checkpoint.format == "dcp" and exported["step"] == first["step"]
    assert_bitwise_equal(saved["model"], exported["model"])
    assert sorted(exported["model"]) == ["0.bias", "0.weight", "2.bias", "2.weight"], "plain names, no wrapper's"
    assert exported["model"]["0.weight"].shape == (32, 16), "whole tensors, gathered from the shards"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rank_killed_during_a_save_commits_nothing_partial(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps = 40
    run_dir = tmp_path / "run"
    # 32 MiB of state saved every step: most of the time is spent saving.
    args = ("--steps", str(steps), "--save-every", "1ba", "--ballast", str(8 << 20))
    ranks = Ranks(run_dir, 2, *args)
    victim = ranks.pids()[1]
    checkpoints = run_dir / "checkpoints"
    wait_for(lambda: save_under_way(checkpoints), 60, "a save to start", interval=0.005)
    os.kill(victim, signal.SIGKILL)
    ranks.end(check=False)
    assert ranks.returncode != 0
    store = CheckpointStore(run_dir, create=False)
    committed = store.list()
    for checkpoint in committed:
        store.verify(checkpoint)
        assert {f.name for f in checkpoint.files} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    latest = committed[-1].step if committed else 0
    assert latest < steps
    resumed = Ranks(run_dir, 2, *args).end()
    assert [r["resumed"] for r in resumed] == [latest or None] * 2 and resumed[0]["step"] == steps
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")], "the killed save's leftovers are gone"
    expected = reference(tmp_path_factory, 2, steps)["model"]
    got = training(store.load())["model"]
    assert_bitwise_equal(expected, {key: got[key] for key in expected})


# --- srun on the two-node test cluster -----------------------------------------------------------------
@pytest.mark.timeout(600, func_only=True)
def test_a_ddp_chain_across_two_nodes_survives_budget_stops_and_a_signal_to_one_rank(
    slurm_chain: SlurmChain, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps = 1500  # >= 75 s at 0.05 s a step: two one-minute tasks at least, three with the signal
    run_dir = slurm_chain.run_dir
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    args = ["--steps", str(steps), "--step-sleep", "0.05", "--pid-dir", str(pid_dir)]
    slurm_chain.submit(
        *("--tasks", "5", "--time", "1", "--nodes", "2", "--ntasks-per-node", "1", "--signal", "none"),
        command=[sys.executable, str(DDP_WORKER), str(run_dir), *args],
        env_extra={"HPCCKPT_MARGIN": "3", "PYTHONPATH": os.pathsep.join(sys.path)},
    )

    # The second task: once both ranks train, rank 1 (on node2) alone gets USR1.
    def second_task_training() -> bool:
        starts = events(run_dir, "start")
        pids = list(pid_dir.glob("*.pid"))
        # File times come from the kernel's coarse clock, a few ms behind time.time(); the first task's pid
        # files are a minute older.
        return len(starts) >= 2 and len(pids) == 2 and all(p.stat().st_mtime > starts[1]["time"] - 5 for p in pids)

    slurm_chain.cluster.wait_for(second_task_training, 240, what="the second task's ranks to train")
    time.sleep(3)
    os.kill(int((pid_dir / "1.pid").read_text()), signal.SIGUSR1)
    final = slurm_chain.wait_state({"complete", "failed", "stalled"}, timeout=420)
    assert final["state"] == "complete", final
    stops = events(run_dir, "stop")
    reasons = [s["reason"] for s in stops]
    assert reasons[0] == "budget" and reasons[1] == "signal" and reasons[-1] == "completed", reasons
    assert all(s["saved"] and s["steps_lost"] == 0 for s in stops)
    starts = events(run_dir, "start")
    assert {s["world_size"] for s in starts} == {2}
    assert [s["resumed_step"] for s in starts[1:]] == [s["step"] for s in stops[:-1]]
    assert_bitwise_equal(reference(tmp_path_factory, 2, steps), training(CheckpointStore(run_dir, create=False).load()))
    slurm_chain.assert_gone()


def test_a_sharded_checkpoint_is_checksummed_like_any_other(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from hpcckpt import CorruptCheckpointError, TrainState

    model = nn.Linear(4, 2)
    store = CheckpointStore(tmp_path / "run", format="dcp")
    first = store.save(TrainState(model=model, step=1))
    first_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    second = store.save(TrainState(model=model, step=2))
    assert {f.name for f in second.files} == {".metadata", "__0_0.distcp"} and second.format == "dcp"
    shard = second.path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: checksum"):
        store.verify(second)
    restored = nn.Linear(4, 2)
    with pytest.warns(Warning, match="step_000000002 is corrupt, trying an older one"):
        assert store.restore(TrainState(model=restored)) == first
    assert torch.equal(restored.weight, first_weight), "the older, intact checkpoint"


@pytest.mark.timeout(400, func_only=True)
def test_under_srun_a_two_rank_checkpoint_resumes_on_one_rank(slurm_chain: SlurmChain, tmp_path: Path) -> None:
    run_dir = slurm_chain.run_dir
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    args = ["--step-sleep", "0.02", "--pid-dir", str(pid_dir)]
    env = {"PYTHONPATH": os.pathsep.join(sys.path)}
    # --max-tasks 1: no auto-extension (item 28), whose two-rank array would resume the same checkpoint
    # beside the one-rank chain below (seen once: the run's last start was a two-rank one, from that step).
    two = slurm_chain.submit(
        *("--tasks", "1", "--max-tasks", "1", "--time", "2", "--signal", "none"),
        *("--nodes", "2", "--ntasks-per-node", "1"),
        command=[sys.executable, str(DDP_WORKER), str(run_dir), "--steps", "100000", *args],
        env_extra=env,
    )
    slurm_chain.cluster.wait_for(lambda: len(list(pid_dir.glob("*.pid"))) == 2, 120, what="both ranks to train")
    time.sleep(3)
    os.kill(int((pid_dir / "0.pid").read_text()), signal.SIGUSR1)
    slurm_chain.assert_gone(two)
    (stop,) = events(run_dir, "stop")
    assert (stop["reason"], stop["saved"]) == ("signal", True)
    store = CheckpointStore(run_dir, create=False)
    assert store.latest().format == "dcp"  # type: ignore[union-attr]
    target = stop["step"] + 20
    one = slurm_chain.submit(
        *("--tasks", "1", "--time", "2", "--signal", "none"),
        command=[sys.executable, str(DDP_WORKER), str(run_dir), "--steps", str(target), *args],
        env_extra=env,
    )
    final = slurm_chain.wait_state({"complete", "failed", "stalled"}, timeout=240)
    assert final["state"] == "complete", final
    slurm_chain.assert_gone(one)
    start = events(run_dir, "start")[-1]
    assert (start["world_size"], start["resumed_step"]) == (1, stop["step"])
    assert store.latest().format == "tensors" and store.latest().step == target  # type: ignore[union-attr]


@pytest.mark.timeout(400, func_only=True)
def test_under_srun_a_rank_killed_during_a_save_commits_nothing_partial(
    slurm_chain: SlurmChain, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps = 40
    run_dir = slurm_chain.run_dir
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    args = ["--steps", str(steps), "--save-every", "1ba", "--ballast", str(8 << 20), "--pid-dir", str(pid_dir)]
    slurm_chain.submit(
        *("--tasks", "3", "--time", "2", "--nodes", "2", "--ntasks-per-node", "1", "--signal", "none"),
        command=[sys.executable, str(DDP_WORKER), str(run_dir), *args],
        env_extra={"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    checkpoints = run_dir / "checkpoints"
    slurm_chain.cluster.wait_for(lambda: len(list(pid_dir.glob("*.pid"))) == 2, 120, what="both ranks to train")
    wait_for(lambda: save_under_way(checkpoints), 60, "a save to start", interval=0.005)
    os.kill(int((pid_dir / "1.pid").read_text()), signal.SIGKILL)  # the rank on node2, mid-save
    final = slurm_chain.wait_state({"complete", "failed", "stalled"}, timeout=300)
    assert final["state"] == "complete", final
    slurm_chain.assert_gone()
    ends = events(run_dir, "task-end")
    assert ends[0]["status"] != 0, "srun --kill-on-bad-exit ended the task when a rank died"
    store = CheckpointStore(run_dir, create=False)
    for checkpoint in store.list():
        store.verify(checkpoint)
        assert {f.name for f in checkpoint.files} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    resumed = events(run_dir, "start")[1]["resumed_step"]
    assert resumed < steps
    expected = reference(tmp_path_factory, 2, steps)["model"]
    got = training(store.load())["model"]
    assert_bitwise_equal(expected, {key: got[key] for key in expected})
