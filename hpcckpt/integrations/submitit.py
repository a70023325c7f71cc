"""Resumable training launched from Python with submitit, with the registry as the single source of truth.

One job that requeues itself until the training is done::

    job = executor.submit(Resumable(train, "runs/a"), lr=0.1)
    job.result()                     # train's return value, from the allocation that completed the run

A chain: ``tasks`` array tasks that run one after another, the pending ones cancelled at completion::

    chain = submit_chain(executor, Resumable(train, "runs/b"), lr=0.1, tasks=8)
    chain.result()

``train`` builds its model and optimizer and trains inside ``Run(state=...)`` (the run directory comes
from ``HPCCKPT_RUN_DIR``, which the wrapper sets, or pass the same directory). Only the wrapper, the
function's reference and its arguments are pickled; the state always comes back from the registry.

While ``train`` runs, the wrapper owns submitit's signal (USR2, or ``SUBMITIT_PREEMPT_SIGNAL``) and
SIGTERM and tells ``Run`` to watch them (``HPCCKPT_SIGNAL``), so a time-limit warning or a preemption
makes ``Run`` save at the next step boundary instead of submitit's handler exiting in the middle of a
step. When ``train`` returns with the run unfinished, a single job hands over to submitit's own
checkpoint-and-requeue (its ``max_num_timeout`` applies); a chain task returns :class:`Unfinished` and
the next array task goes on. Either way the crash-loop breaker of the chains holds: ``max_failures``
allocations in a row without a new checkpoint mark the run failed and nothing more is requeued.

``submitit`` is imported only when a job runs or is submitted.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import pickle
import signal as signal_module
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import events as event_log
from .. import rundir
from ..checks import whole_number
from ..errors import HpcckptError, StoreError, UsageError
from ..signals import SignalRecorder, parse_signal
from ..slurm.spec import DEFAULT_MAX_FAILURES, check_mirror
from ..slurm.tasks import task_begin, task_end
from ..store.fileio import write_atomic
from ..store.registry import Registry, lock_mode

RESULT_FILE = rundir.RESULT  # the name declared in hpcckpt.rundir

log = logging.getLogger("hpcckpt")


@dataclass(frozen=True)
class Unfinished:
    """What a chain task returns when it stopped (budget or signal) before the run was complete."""

    run_dir: str
    step: int | None
    reason: str | None  # "budget" or "signal"
    cause: str | None  # for a signal: "timeout", "preemption" or "unknown"
    signal: str | None  # the first signal, e.g. "SIGUSR2"
    checkpoint: str | None


class Resumable:
    """``fn`` made resumable under submitit over ``run_dir``; submit it like ``fn`` itself.

    Pass a module-level function: submitit pickles ``fn`` with the submission, and a bound method or a
    closure would carry its object (a model, say) into every requeue.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        run_dir: str | os.PathLike[str],
        *,
        max_failures: int = DEFAULT_MAX_FAILURES,
        mirror: str | None = None,
    ) -> None:
        if not callable(fn):
            raise UsageError(f"Resumable() needs a function to run, got {fn!r}")
        if not isinstance(run_dir, str | os.PathLike) or not str(run_dir).strip():
            raise UsageError(f"Invalid run_dir={run_dir!r}: expected a directory path, e.g. 'runs/resnet50'")
        whole_number(max_failures, "max_failures")
        self.fn = fn
        # Absolute: the job may start in another working directory than the submitting process.
        self.run_dir = Path(run_dir).expanduser().absolute()
        self.max_failures = max_failures
        # Run reads it from HPCCKPT_MIRROR in the job, as in a chain; credentials stay in the backend's
        # environment (issue 14): a URL carrying them is refused here, before anything is pickled.
        self.mirror = check_mirror(mirror)
        self.chain_task = False

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"Resumable({name}, {str(self.run_dir)!r}{', chain task' if self.chain_task else ''})"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook before a requeue: the same submission again, nothing of the training state."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        warning = _submitit_signal()
        requeue = _submitit_requeue(warning)
        updates = {"HPCCKPT_RUN_DIR": str(self.run_dir), "HPCCKPT_SIGNAL": warning.name}
        if self.mirror is not None:
            updates["HPCCKPT_MIRROR"] = self.mirror
        updates.update(_local_executor_limits(os.environ))
        with _environ(updates), SignalRecorder((warning, signal_module.SIGTERM)):
            if _global_rank() != 0:
                # The registry's bookkeeping, the result and the requeue are rank 0's; the training loop
                # agrees its stops across ranks by itself.
                return self.fn(*args, **kwargs)
            outcome = self._run_once(args, kwargs)
            if not isinstance(outcome, Unfinished) or self.chain_task:
                return outcome
            # Still inside the recorder: submitit's own handler cannot fire in the middle of this.
            self._requeue(outcome, requeue, warning)
        raise AssertionError("unreachable: _requeue exits or raises")

    def _run_once(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        registry = Registry(self.run_dir, lock=lock_mode(os.environ))
        cancel = self.chain_task  # a single job's array is a sweep of other runs, not a chain
        if not task_begin(self.run_dir, os.environ, self.max_failures, pid=os.getpid(), cancel=cancel):
            return stored_result(self.run_dir)
        begun = _last_index(registry.events(), event=event_log.TASK_BEGIN, pid=os.getpid())
        exit_status = 1
        try:
            value = self.fn(*args, **kwargs)
            exit_status = 0
        except BaseException as error:
            if _is_complete(registry):  # the training is safe; what came after it failed
                registry.append_event(event_log.result_error(error=f"{type(error).__name__}: {error}"))
            raise
        finally:
            task_end(self.run_dir, os.environ, exit_status, self.max_failures, 0, log=_submitit_log(), cancel=cancel)
        status = registry.status()
        if _is_complete(registry):
            if not (self.run_dir / RESULT_FILE).exists():
                try:
                    _store_result(registry, value)
                except Exception as error:
                    registry.append_event(event_log.result_error(error=f"cannot store the return value: {error}"))
                    raise
            return stored_result(self.run_dir)
        if status is not None:
            raise HpcckptError(f"run {self.run_dir} is marked failed: {status.get('reason')}")
        mine = registry.events()[begun:]
        starts = event_log.of_kind(mine, event_log.START)
        stops = event_log.of_kind(mine, event_log.STOP)
        if not starts:
            raise UsageError(
                f"{_name(self.fn)} returned without training in run {self.run_dir}: it must train inside "
                "`with hpcckpt.Run(state=...)`, whose run directory is HPCCKPT_RUN_DIR (set by the wrapper)"
            )
        if not stops:
            raise HpcckptError(
                f"{_name(self.fn)} returned at step {starts[-1].get('resumed_step')}+ before run {self.run_dir} "
                "was complete, without a budget or signal stop (did the loop end early?); not requeued"
            )
        stop = stops[-1]
        return Unfinished(
            run_dir=str(self.run_dir),
            step=stop.get("step"),
            reason=stop.get("reason"),
            cause=stop.get("cause"),
            signal=stop.get("signal"),
            checkpoint=stop.get("checkpoint"),
        )

    def _requeue(
        self,
        outcome: Unfinished,
        requeue: Callable[[signal_module.Signals], None] | None,
        warning: signal_module.Signals,
    ) -> None:
        if requeue is None:
            raise HpcckptError(
                f"run {self.run_dir} stopped unfinished at step {outcome.step} ({outcome.reason}) and this "
                "process is not a submitit job that can be requeued; submit it again to go on"
            )
        if outcome.signal == "SIGTERM" and outcome.cause != "timeout":
            # Early SIGTERM: a preemption, during whose grace time the job is still RUNNING (a job that
            # ends by itself then is not requeued by Slurm: requeue it, as submitit does), or an scancel,
            # after which it is COMPLETING and must stay cancelled. No result then, nothing to wait for.
            state = _slurm_job_state(os.environ)
            if state != "RUNNING":
                log.info(
                    "hpcckpt: run %s stopped at step %s on SIGTERM; the job is %s (cancelled, not preempted): "
                    "not requeueing",
                    self.run_dir,
                    outcome.step,
                    state or "not a Slurm job",
                )
                sys.exit(-1)
        log.info("hpcckpt: run %s unfinished at step %s; requeueing through submitit", self.run_dir, outcome.step)
        requeue(warning)  # submitit's checkpoint-and-requeue: calls self.checkpoint(), requeues, exits
        raise HpcckptError(f"submitit did not requeue run {self.run_dir} (unfinished at step {outcome.step})")


def submit_chain(executor: Any, resumable: Resumable, /, *args: Any, tasks: int, **kwargs: Any) -> Chain:
    """Submit ``resumable(*args, **kwargs)`` as a chain of ``tasks`` submitit tasks that run one after
    another over its run directory.

    With a Slurm executor (``AutoExecutor`` on Slurm, ``SlurmExecutor``) this is one job array with
    parallelism 1: Slurm runs the tasks in turn, and the task that completes the run cancels the pending
    ones. submitit's local and debug executors have no arrays: there the chain submits its next task
    when the previous one ends, while :meth:`Chain.result` waits.
    """
    if not isinstance(resumable, Resumable):
        raise UsageError(f"submit_chain() needs a Resumable(fn, run_dir), got {resumable!r}")
    whole_number(tasks, "tasks")
    kind = _executor_kind(executor)
    registry = Registry(resumable.run_dir, lock=lock_mode(os.environ))
    status = registry.status()
    if status is not None:
        raise UsageError(
            f"run {resumable.run_dir} is already {status['event']}"
            f"{': ' + str(status.get('reason')) if status.get('reason') else ''}; nothing to submit "
            f"(hpcckpt.integrations.submitit.stored_result({str(resumable.run_dir)!r}) gives a complete run's result)"
        )
    task = Resumable(resumable.fn, resumable.run_dir, max_failures=resumable.max_failures)
    task.chain_task = True
    chain = Chain(executor, kind, task, args, kwargs, tasks)
    if kind == "slurm":
        busy = chain.queued_jobs() + _open_task_queued(registry)
        if busy:
            raise UsageError(
                f"run {resumable.run_dir} already has jobs queued or running ({', '.join(busy)}); a second "
                "chain would train it twice. Wait for them or cancel them first"
            )
        chain._submit_array()
    else:
        chain._submit_next()
    return chain


class Chain:
    """A chain of submitit tasks over one run directory; made by :func:`submit_chain`."""

    def __init__(
        self, executor: Any, kind: str, task: Resumable, args: tuple[Any, ...], kwargs: dict[str, Any], tasks: int
    ) -> None:
        self.executor = executor
        self.kind = kind
        self.run_dir = task.run_dir
        self.tasks = tasks
        self.jobs: list[Any] = []
        self._task, self._args, self._kwargs = task, args, kwargs
        self._registry = Registry(task.run_dir, lock=lock_mode(os.environ))

    def __repr__(self) -> str:
        return f"Chain({str(self.run_dir)!r}, {self.kind}, {len(self.jobs)}/{self.tasks} tasks submitted)"

    @property
    def array_job_id(self) -> str | None:
        """The Slurm array's job id (None on the local and debug executors)."""
        if self.kind != "slurm" or not self.jobs:
            return None
        return str(self.jobs[0].job_id).split("_")[0]

    def result(self, poll: float = 5.0, timeout: float | None = None) -> Any:
        """Wait until the run is complete and return the training function's value, polling every
        ``poll`` seconds, at most ``timeout`` seconds (:class:`TimeoutError`). Raises
        :class:`~hpcckpt.HpcckptError` when the run is marked failed or the chain ended unfinished."""
        from ..slurm.commands import SlurmError

        give_up = None if timeout is None else time.monotonic() + timeout
        if self.kind != "slurm":
            return self._drive(poll, give_up)
        failures = 0
        while True:
            if self._settled():
                return stored_result(self.run_dir)
            try:
                queued = self.queued_jobs()
                failures = 0
            except SlurmError:  # squeue can time out on a busy controller: ask again, up to a point
                failures += 1
                if failures >= 5:
                    raise
                queued = ["?"]
            if not queued:
                if self._registry.status() is not None:  # settled while the queue was being read
                    return stored_result(self.run_dir)
                raise HpcckptError(f"chain {self.array_job_id} ended, run {self.run_dir} unfinished; {_where(self)}")
            if give_up is not None and time.monotonic() > give_up:
                raise TimeoutError(f"chain {self.array_job_id} still running after {timeout} s; {_where(self)}")
            time.sleep(poll)

    def _settled(self) -> bool:
        """Failed, or complete with its value stored (which happens just after the run completes)."""
        status = self._registry.status()
        return status is not None and (status["event"] == event_log.FAILED or (self.run_dir / RESULT_FILE).exists())

    def queued_jobs(self) -> list[str]:
        """The chain's Slurm jobs still pending or running (for every chain submitted on this run)."""
        from ..slurm import commands as slurm

        jobs = event_log.chain_jobs(self._registry.events())
        return sorted({entry.job for entry in slurm.queue(jobs)}) if jobs else []

    def cancel(self) -> None:
        """Cancel what is left of the chain (the checkpoints stay)."""
        if self.kind == "slurm":
            from ..slurm import commands as slurm

            if self.array_job_id:
                slurm.cancel([self.array_job_id])
        else:
            for job in self.jobs:
                job.cancel(check=False)
        self.tasks = len(self.jobs)

    # -- internals ------------------------------------------------------------------------------------------
    def _submit_array(self) -> None:
        parameters = self.executor.parameters  # AutoExecutor shares its Slurm executor's dict
        before = parameters.get("array_parallelism")
        parameters["array_parallelism"] = 1
        try:
            with self.executor.batch():
                self.jobs = [self.executor.submit(self._task, *self._args, **self._kwargs) for _ in range(self.tasks)]
        finally:
            if before is None:
                parameters.pop("array_parallelism", None)
            else:
                parameters["array_parallelism"] = before
        folder = str(self.executor.folder)
        self._registry.append_event(
            event_log.submitted(job=self.array_job_id, tasks=self.tasks, backend="submitit", folder=folder)
        )

    def _submit_next(self) -> None:
        job = self.executor.submit(self._task, *self._args, **self._kwargs)
        self.jobs.append(job)
        backend = f"submitit-{self.kind}"
        self._registry.append_event(
            event_log.submitted(job=None, task=len(self.jobs), tasks=self.tasks, backend=backend)
        )

    def _drive(self, poll: float, give_up: float | None) -> Any:
        """Local and debug executors: wait for each task, submit the next while the run is unfinished."""
        while True:
            job = self.jobs[-1]
            if self.kind == "local":
                while not job.done():
                    if give_up is not None and time.monotonic() > give_up:
                        raise TimeoutError(f"chain task {job.job_id} still running; {_where(self)}")
                    time.sleep(min(poll, 1.0))
            error: BaseException | None = None
            outcome: Any = None
            try:
                outcome = job.result()  # the debug executor runs the task here, in this process
            except Exception as failure:  # the task crashed: the next one retries, as in a Slurm array
                error = failure
            if self._registry.status() is not None:
                return stored_result(self.run_dir)
            if self.kind == "debug" and isinstance(outcome, Unfinished) and outcome.reason == "signal":
                # No time limit here: a signal is someone stopping this process; do not train on.
                raise HpcckptError(f"chain task stopped by {outcome.signal} at step {outcome.step}; {_where(self)}")
            if len(self.jobs) >= self.tasks:
                raise HpcckptError(
                    f"chain ended after {self.tasks} tasks with run {self.run_dir} unfinished; {_where(self)}"
                ) from error
            self._submit_next()


def _open_task_queued(registry: Registry) -> list[str]:
    """The job of a task that began and has not ended (a single job, say), when Slurm still has it."""
    from ..slurm import commands as slurm

    begin = event_log.open_task(registry.events())
    job = str(begin.get("job") or "") if begin else ""
    if not job or job == "-":
        return []
    array, _, _task = job.partition("_")
    return [entry.job for entry in slurm.queue([array]) if entry.job in (job, array)]


def _executor_kind(executor: Any) -> str:
    import submitit

    if isinstance(executor, submitit.AutoExecutor):
        kind = str(executor.cluster)
    elif isinstance(executor, submitit.SlurmExecutor):
        kind = "slurm"
    elif isinstance(executor, submitit.LocalExecutor):
        kind = "local"
    elif isinstance(executor, submitit.DebugExecutor):
        kind = "debug"
    else:
        kind = type(executor).__name__
    if kind not in ("slurm", "local", "debug"):
        raise UsageError(
            f"submit_chain() does not know the executor {kind!r}: expected a submitit AutoExecutor, "
            "SlurmExecutor, LocalExecutor or DebugExecutor"
        )
    return kind


def _where(chain: Chain) -> str:
    from ..store.store import CheckpointStore

    latest = CheckpointStore(chain.run_dir, keep_last=None).latest()
    return (
        f"latest checkpoint {latest.name} (step {latest.step}); submit another chain to go on"
        if latest
        else "no checkpoint was committed"
    ) + f"; see `hpcckpt status {chain.run_dir}`"


def stored_result(run_dir: str | os.PathLike[str]) -> Any:
    """The return value of the training function of a complete run; raises while it is not complete."""
    run_dir = Path(run_dir)
    status = Registry(run_dir, lock=lock_mode(os.environ)).status()
    if status is None:
        raise HpcckptError(f"run {run_dir} is not complete: no result yet")
    if status["event"] == event_log.FAILED:
        raise HpcckptError(f"run {run_dir} is marked failed: {status.get('reason')}")
    try:
        data = _read_own_file(run_dir / RESULT_FILE)
    except FileNotFoundError:
        registry = Registry(run_dir, lock=lock_mode(os.environ))
        failure = event_log.last(registry.events(), event_log.RESULT_ERROR)
        why = f"the function failed after training: {failure['error']}" if failure else "its process ended first"
        raise HpcckptError(
            f"run {run_dir} is complete at step {status.get('step')}, but the training function's return value "
            f"was not stored ({why}); the final checkpoint {status.get('checkpoint')} is there "
            f"(hpcckpt export {run_dir} --out FILE)"
        ) from None
    return pickle.loads(data)  # noqa: S301 - written by this user's own job (checked), as submitit's are


def _read_own_file(path: Path) -> bytes:
    """The content of ``path`` if the current user owns it and no one else can write it: unpickling it runs
    whatever it holds, so it must be what this user's own job wrote (issue 11, item 4). The checks are made
    on the opened file (not followed through a link), so it cannot be swapped in between."""
    try:
        # O_NONBLOCK: a FIFO planted there must not hang the reader before the regular-file check below.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StoreError(
                f"refusing to unpickle {path}: it is a symbolic link; hpcckpt reads only the result file that "
                "the run's own job wrote there. Remove the link; the final checkpoint is still usable"
            ) from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        me = os.getuid()
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem, fix = "not a regular file", f"remove it (`rm {path}`)"
        elif info.st_uid != me:
            problem = f"owned by uid {info.st_uid}, not by you (uid {me})"
            fix = f"if you trust its owner, read it yourself with pickle.load(open({str(path)!r}, 'rb'))"
        elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = f"writable by {'group and others' if info.st_mode & stat.S_IWOTH else 'its group'} (mode "
            problem += f"{stat.S_IMODE(info.st_mode):o})"
            fix = f"if no one else has written it, `chmod go-w {path}`"
        if problem is not None:
            raise HpcckptError(
                f"refusing to unpickle {path}: it is {problem}, and unpickling runs the code a file holds; "
                f"hpcckpt reads only a result file owned by you and writable by no one else. To use it: {fix}"
            )
        return f.read()


def _is_complete(registry: Registry) -> bool:
    status = registry.status()
    return status is not None and status["event"] == event_log.COMPLETE


def _store_result(registry: Registry, value: Any) -> None:
    import cloudpickle  # submitit's own dependency: values that pickle for submitit pickle here

    buffer = io.BytesIO()
    cloudpickle.dump(value, buffer)
    # Writable by its owner only, whatever the umask, so that _read_own_file accepts it (item 4).
    write_atomic(registry.run_dir / RESULT_FILE, buffer.getvalue(), private=True)
    registry.append_event(event_log.result(type_name=type(value).__qualname__, size=buffer.tell()))


def _submitit_signal() -> signal_module.Signals:
    """The signal submitit's jobs get before their time limit and at preemption (its ``--signal``)."""
    try:
        from submitit import JobEnvironment

        name = JobEnvironment.USR_SIG
    except ImportError:
        name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL") or "USR2"
    return parse_signal(name)


def _submitit_requeue(warning: signal_module.Signals) -> Callable[[signal_module.Signals], None] | None:
    """submitit's checkpoint-and-requeue, when this process is a submitit job that installed it."""
    handler = signal_module.getsignal(warning)
    owner = getattr(handler, "__self__", None)
    requeue = getattr(owner, "checkpoint_and_try_requeue", None)
    if requeue is None or type(owner).__module__.split(".")[0] != "submitit":
        return None
    return lambda sig: requeue(int(sig), None)


def _local_executor_limits(environ: Mapping[str, str]) -> dict[str, str]:
    """submitit's local executor kills its task ``timeout_min`` after starting it and signals it
    ``signal_delay_s`` before; no variable says when that is, so count from this process's start."""
    if environ.get("SUBMITIT_EXECUTOR") != "local" or not environ.get("SUBMITIT_LOCAL_TIMEOUT_S"):
        return {}
    limits = {"HPCCKPT_SIGNAL_LEAD": environ.get("SUBMITIT_LOCAL_SIGNAL_DELAY_S") or "0"}
    if not environ.get("HPCCKPT_DEADLINE"):
        limits["HPCCKPT_DEADLINE"] = repr(_process_start_time() + float(environ["SUBMITIT_LOCAL_TIMEOUT_S"]))
    return limits


def _slurm_job_state(environ: Mapping[str, str]) -> str | None:
    """This job's state as squeue sees it (RUNNING, COMPLETING...), None outside Slurm or on failure."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    from ..slurm import commands as slurm

    try:
        return slurm.job_state(job)
    except slurm.SlurmError:
        return None


def _global_rank() -> int:
    """This task's rank in a multi-task submitit job (0 outside submitit)."""
    with contextlib.suppress(Exception):
        from submitit import JobEnvironment

        return int(JobEnvironment().global_rank)
    return 0


def _process_start_time() -> float:
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime, field 22 of proc(5), in clock ticks since boot
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _submitit_log() -> str | None:
    folder = os.environ.get("SUBMITIT_FOLDER")
    if not folder:
        return None
    with contextlib.suppress(Exception):
        from submitit import JobEnvironment

        return str(JobEnvironment().paths.stderr)
    return None


@contextlib.contextmanager
def _environ(updates: Mapping[str, str]) -> Iterator[None]:
    """Set variables for the call and put back what was there (the debug executor runs in-process)."""
    before = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _last_index(events: list[dict[str, Any]], **match: Any) -> int:
    return max(i for i, e in enumerate(events) if all(e.get(k) == v for k, v in match.items()))


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
