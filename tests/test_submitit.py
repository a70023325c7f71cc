"""hpcckpt.integrations.submitit with submitit's real executors: Slurm (on the test cluster), local and debug.

Every run is compared with an uninterrupted reference: same weights, same optimizer state, same return
value, however many allocations, requeues and preemptions it took.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from compare import assert_same_training
from harness import clean_env, events, wait_started
from paths import REPO, SUBMITIT_TRAIN, WORKERS
from slurm_cluster import SlurmCluster

from hpcckpt import CheckpointStore, HpcckptError, UsageError

submitit = pytest.importorskip("submitit")

from submitit_train import crash, rank_zero_trains, train  # noqa: E402

from hpcckpt.integrations.submitit import Resumable, Unfinished, stored_result, submit_chain  # noqa: E402


# --- helpers -------------------------------------------------------------------------------------------
@pytest.fixture
def job_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs import submitit_train by name; no Slurm or hpcckpt setting leaks in from outside."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "HPCCKPT_", "SUBMITIT_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(WORKERS), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def on_cluster(slurm_cluster: SlurmCluster, job_env: None, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster


Reference = tuple[dict[str, Any], dict[str, Any]]
_references: dict[int, Reference] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, steps: int) -> Reference:
    """(return value, final state) of the same training run straight through, in a plain process."""
    if steps not in _references:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        env = clean_env("SUBMITIT_")
        out = subprocess.run(
            [sys.executable, str(SUBMITIT_TRAIN), str(run_dir), str(steps)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        )
        _references[steps] = json.loads(out.stdout.splitlines()[-1]), CheckpointStore(run_dir, create=False).load()
    return _references[steps]


def assert_like_reference(
    run_dir: Path, value: dict[str, Any], expected: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    ref_value, ref_state = expected
    assert (value["step"], value["loss"]) == (ref_value["step"], ref_value["loss"])
    assert_same_training(ref_state, CheckpointStore(run_dir, create=False).load())


def assert_resumed_in_turn(run_dir: Path) -> None:
    """Each allocation resumed exactly where the previous one stopped, losing no step."""
    starts, stops = events(run_dir, "start"), events(run_dir, "stop")
    assert len(starts) == len(stops) >= 2
    assert [s["resumed_step"] for s in starts] == [0] + [s["step"] for s in stops[:-1]]
    assert all(s["saved"] and s["steps_lost"] == 0 for s in stops)
    assert [s["reason"] for s in stops][-1] == "completed"


# Slurm sends --signal's warning when its periodic check (every 30 s, PERIODIC_TIMEOUT) finds the job's end
# within the delay plus 30 s: with a one-minute limit, a 30-s delay may come at the very start, before Python
# runs at all (it killed a chain's first task 0.2 s after launch, under load). A 15-s delay comes 15 to 45 s
# after the start: time to start, and 15 s to save and leave.
SIGNAL_DELAY_S = 15


def slurm_executor(folder: Path, **parameters: Any) -> Any:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=20)
    executor.update_parameters(slurm_partition="low", **parameters)
    return executor


# --- Slurm ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(420, func_only=True)
def test_a_slurm_job_requeues_at_each_time_limit_until_done(
    on_cluster: SlurmCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps = 1300  # >= 65 s at 0.05 s a step: more than any one-minute allocation can do
    run_dir = tmp_path / "run"
    executor = slurm_executor(tmp_path / "submitit", timeout_min=1, slurm_signal_delay_s=SIGNAL_DELAY_S)
    job = executor.submit(Resumable(train, run_dir), steps, 0.05)
    value = job.result()

    assert_like_reference(run_dir, value, reference(tmp_path_factory, steps))
    assert_resumed_in_turn(run_dir)
    begins = events(run_dir, "task-begin")
    assert {b["job"] for b in begins} == {job.job_id}, "one job, requeued: the same id each time"
    assert value["job"] == job.job_id
    stops = events(run_dir, "stop")
    assert {s["reason"] for s in stops[:-1]} == {"signal"}, "submitit's USR2 before the time limit"
    assert {s["cause"] for s in stops[:-1]} == {"timeout"}
    for stop, end in zip(stops, events(run_dir, "task-end"), strict=True):
        # Under load a warning can come before the first step: then nothing was trained, nor lost.
        assert end["progress"] or stop["steps_done"] == 0, "an allocation that trained saved its steps"
    # The requeued submission carries the wrapper, the function's reference and its arguments: no state.
    submission = pickle.loads(job.paths.submitted_pickle.read_bytes())
    assert isinstance(submission.function, Resumable) and submission.function.fn is train
    assert vars(submission.function).keys() == {"fn", "run_dir", "max_failures", "mirror", "chain_task"}
    assert (submission.args, submission.kwargs) == ((steps, 0.05), {})
    assert job.paths.submitted_pickle.stat().st_size < 4096


@pytest.mark.timeout(420, func_only=True)
def test_a_preempted_slurm_job_saves_and_resumes(
    on_cluster: SlurmCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps = 1000
    run_dir = tmp_path / "run"
    executor = slurm_executor(tmp_path / "submitit", timeout_min=5, slurm_additional_parameters={"exclusive": True})
    job = executor.submit(Resumable(train, run_dir), steps, 0.05)
    wait_started(run_dir, 120)
    time.sleep(5)
    high = on_cluster.sbatch(
        "#!/bin/bash\nsleep 5\n", "-p", "high", "-N", "2", "--exclusive", "--time=1", "--output=/dev/null", cwd=tmp_path
    )
    try:
        value = job.result()
    finally:
        on_cluster.cancel(high)

    assert_like_reference(run_dir, value, reference(tmp_path_factory, steps))
    assert_resumed_in_turn(run_dir)
    first = events(run_dir, "stop")[0]
    assert (first["reason"], first["cause"], first["saved"]) == ("signal", "preemption", True)
    assert 0 < first["step"] < steps


@pytest.mark.timeout(180, func_only=True)
def test_an_scancelled_slurm_job_saves_and_stays_cancelled(on_cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    executor = slurm_executor(tmp_path / "submitit", timeout_min=5)
    job = executor.submit(Resumable(train, run_dir), 10**6, 0.01)
    wait_started(run_dir, 120)
    time.sleep(2)
    on_cluster.cancel(job.job_id)
    on_cluster.wait_for(lambda: events(run_dir, "task-end"), 60, what="the task to end")
    time.sleep(15)  # a requeued job would be pending again by now (cred_expire is 10 s)
    assert on_cluster.squeue_ids(job.job_id) == [], "cancelled, not requeued"
    (stop,) = events(run_dir, "stop")
    assert (stop["reason"], stop["signal"], stop["saved"]) == ("signal", "SIGTERM", True)
    assert len(events(run_dir, "task-begin")) == 1
    assert not job.paths.result_pickle.exists()


@pytest.mark.timeout(420, func_only=True)
def test_a_slurm_chain_runs_in_turn_completes_and_cancels_the_rest(
    on_cluster: SlurmCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps = 900
    run_dir = tmp_path / "run"
    executor = slurm_executor(tmp_path / "submitit", timeout_min=1, slurm_signal_delay_s=SIGNAL_DELAY_S)
    chain = submit_chain(executor, Resumable(train, run_dir), steps, 0.05, tasks=6)
    assert executor.parameters.get("array_parallelism") is None, "the user's executor is left as it was"
    array = chain.array_job_id
    assert array and [j.job_id for j in chain.jobs] == [f"{array}_{i}" for i in range(6)]
    value = chain.result(poll=1)

    assert_like_reference(run_dir, value, reference(tmp_path_factory, steps))
    assert_resumed_in_turn(run_dir)
    begins = events(run_dir, "task-begin")
    used = [b["job"] for b in begins]
    assert used == [f"{array}_{i}" for i in range(len(used))] and 2 <= len(used) < 6, "in turn, one each"
    on_cluster.wait_for(lambda: not on_cluster.squeue_ids(array), 60, what="the rest of the chain to be cancelled")
    assert not any(job.paths.result_pickle.exists() for job in chain.jobs[len(used) :]), "they never ran"
    first = chain.jobs[0].result()
    # Under load the first task's USR2 may come before its first step: it then stops at step 0, unsaved.
    assert isinstance(first, Unfinished) and first.step == (begins[1]["latest_step"] or 0)
    assert chain.jobs[len(used) - 1].result() == value, "the task that completed the run returned its value"
    status = subprocess.run(
        ["hpcckpt", "status", "--json", str(run_dir)], capture_output=True, text=True, timeout=60, check=True
    )
    summary = json.loads(status.stdout)
    assert (summary["state"], summary["step"], summary["tasks_used"]) == ("complete", steps, len(used))
    with pytest.raises(UsageError, match="already complete"):
        submit_chain(executor, Resumable(train, run_dir), steps, tasks=2)


# --- submitit's local and debug executors --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_local_executor_job_requeues_at_each_time_limit(
    job_env: None, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps = 400  # >= 20 s at 0.05 s a step, in tasks of 12 s
    run_dir = tmp_path / "run"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit", max_num_timeout=10)
    executor.update_parameters(timeout_min=0.2, signal_delay_s=4)
    value = executor.submit(Resumable(train, run_dir), steps, 0.05).result()
    assert_like_reference(run_dir, value, reference(tmp_path_factory, steps))
    assert_resumed_in_turn(run_dir)
    starts = events(run_dir, "start")
    assert {s["deadline_source"] for s in starts} == {"HPCCKPT_DEADLINE"}, "the local executor's time limit"
    assert all(0 < s["time_left"] < 6 for s in events(run_dir, "stop")[:-1]), "stopped at the USR2, 4 s early"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_local_executor_chain_submits_task_after_task(
    job_env: None, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    steps = 400
    run_dir = tmp_path / "run"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=0.2, signal_delay_s=4)
    chain = submit_chain(executor, Resumable(train, run_dir), steps, 0.05, tasks=8)
    assert len(chain.jobs) == 1, "no arrays here: the next task is submitted when this one ends"
    value = chain.result()
    assert_like_reference(run_dir, value, reference(tmp_path_factory, steps))
    assert_resumed_in_turn(run_dir)
    assert 2 <= len(chain.jobs) < 8 and len(chain.jobs) == len(events(run_dir, "task-begin"))
    assert all(isinstance(job.result(), Unfinished) for job in chain.jobs[:-1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_crash_loop_stops_a_local_chain(job_env: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    chain = submit_chain(executor, Resumable(crash, run_dir, max_failures=2), 10, tasks=6)
    with pytest.raises(HpcckptError, match="marked failed: 2 consecutive tasks made no progress"):
        chain.result()
    assert len(chain.jobs) == 2, "nothing more is submitted once the run is marked failed"
    with pytest.raises(HpcckptError, match="marked failed"):
        stored_result(run_dir)
    with pytest.raises(UsageError, match="already failed"):
        submit_chain(executor, Resumable(crash, run_dir), 10, tasks=2)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("form", ["single", "chain"])
def test_the_debug_executor_runs_it_in_process(
    job_env: None, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, form: str
) -> None:
    steps = 300
    run_dir = tmp_path / "run"
    argv = [sys.executable, str(SUBMITIT_TRAIN), "debug", str(run_dir), str(tmp_path / "submitit"), str(steps), form]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    value = json.loads(stdout.splitlines()[-1])
    assert_like_reference(run_dir, value, reference(tmp_path_factory, steps))
    assert value["pid"] == process.pid, "trained in the submitting process itself"


# --- in this process: wrong use gets a clear error -----------------------------------------------------
def _no_run() -> int:
    return 1


def test_a_function_that_does_not_train_in_a_run_is_an_error(job_env: None, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"_no_run returned without training in run .*hpcckpt.Run\(state=...\)"):
        Resumable(_no_run, tmp_path / "run")()


def test_an_unfinished_run_outside_submitit_is_not_silently_dropped(
    job_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcckpt import Run, TrainState

    def stops_at_the_budget() -> None:
        with Run(state=TrainState(), total_steps=10**9) as run:
            for _ in run:
                time.sleep(0.01)

    monkeypatch.setenv("HPCCKPT_DEADLINE", str(time.time() + 1.5))
    with pytest.raises(HpcckptError, match=r"stopped unfinished at step \d+ \(budget\) .* not a submitit job"):
        Resumable(stops_at_the_budget, tmp_path / "run")()
    assert "HPCCKPT_RUN_DIR" not in os.environ and "HPCCKPT_SIGNAL" not in os.environ, "the environment is restored"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: Resumable("train", d), "Resumable\\(\\) needs a function to run, got 'train'"),
        (lambda d: Resumable(train, d, max_failures=0), "Invalid max_failures=0: expected a whole number >= 1"),
        (lambda d: Resumable(train, ""), "Invalid run_dir='': expected a directory path"),
        (lambda d: Resumable(train, None), "Invalid run_dir=None: expected a directory path"),
        (
            lambda d: submit_chain(submitit.DebugExecutor(d), Resumable(train, d), tasks=0),
            "Invalid tasks=0: expected a whole number >= 1",
        ),
        (
            lambda d: submit_chain(submitit.DebugExecutor(d), train, tasks=2),
            "submit_chain\\(\\) needs a Resumable\\(fn, run_dir\\)",
        ),
        (lambda d: submit_chain(object(), Resumable(train, d), tasks=2), "does not know the executor 'object'"),
    ],
)
def test_bad_input_is_refused_before_anything_is_submitted(tmp_path: Path, call: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        call(tmp_path)
    assert not (tmp_path / "events.jsonl").exists()


@pytest.mark.timeout(300, func_only=True)
def test_the_example_runs_a_chain_on_the_cluster(on_cluster: SlurmCluster, tmp_path: Path) -> None:
    example = REPO / "examples" / "submitit_chain.py"
    argv = [sys.executable, str(example), "--run-dir", "runs/ex", "--tasks", "4", "--time", "1", "--steps", "600"]
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert "complete: {'step': 600, 'loss': " in out.stdout
    begins = events(tmp_path / "runs" / "ex", "task-begin")
    assert 2 <= len(begins) < 4, "one minute is not enough for 600 steps of 0.05 s"
    assert (tmp_path / "runs" / "ex" / "submitit").is_dir(), "submitit's files next to the checkpoints"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_only_rank_zero_keeps_the_books_in_a_multi_task_job(job_env: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=1, tasks_per_node=2)
    job = executor.submit(Resumable(rank_zero_trains, run_dir), 20)
    values = job.results()
    assert values[0]["step"] == 20 and values[1] == "rank 1"
    assert len(events(run_dir, "task-begin")) == len(events(run_dir, "task-end")) == 1, "rank 1 recorded nothing"
    assert stored_result(run_dir) == values[0]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_far_from_the_time_limit_is_not_requeued(job_env: None, tmp_path: Path) -> None:
    """An scancel (or a preemption, which Slurm requeues itself): saved, not requeued by hpcckpt."""
    run_dir = tmp_path / "run"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit", max_num_timeout=10)
    executor.update_parameters(timeout_min=5)
    job = executor.submit(Resumable(train, run_dir), 10**6, 0.01)
    wait_started(run_dir, 60)
    time.sleep(1)
    job._process.send_signal(signal.SIGTERM)  # the local controller forwards it to the task
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="has not produced any output"):
        job.result()
    (stop,) = events(run_dir, "stop")
    assert (stop["reason"], stop["signal"], stop["cause"], stop["saved"]) == ("signal", "SIGTERM", "preemption", True)
    assert len(events(run_dir, "task-begin")) == 1, "not requeued"


def _trains_then_fails() -> None:
    from hpcckpt import Run, TrainState

    with Run(state=TrainState(), total_steps=3) as run:
        for _ in run:
            pass
    raise ValueError("evaluation broke")


def test_a_failure_after_training_is_named_by_the_stored_result(job_env: None, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="evaluation broke"):
        Resumable(_trains_then_fails, tmp_path / "run")()
    with pytest.raises(HpcckptError, match=r"complete at step 3, .* failed after training: ValueError: evaluation"):
        stored_result(tmp_path / "run")


def test_a_single_job_in_an_array_cancels_nothing(
    job_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep submitted as one array: the run that completes must not scancel its siblings."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scancel-calls"
    for tool in ("scancel", "squeue"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "71", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HPCCKPT_DEADLINE", str(time.time() + 3600))
    run_dir = tmp_path / "run"
    Resumable(_completes, run_dir)()
    Resumable(_completes, run_dir)()  # a second start of a complete run: returns the stored value
    assert not calls.exists() or "scancel" not in calls.read_text()
    assert stored_result(run_dir) == "done"


def _completes() -> str:
    from hpcckpt import Run, TrainState

    with Run(state=TrainState(), total_steps=2) as run:
        for _ in run:
            pass
    return "done"
