"""A chain of Slurm array tasks: its validated options, and the sbatch script rendered from them.

Validation happens here, before anything is written or submitted; each error names the bad value and
the accepted form. Rendering is pure: a string from a :class:`ChainSpec`, no I/O but reading templates.
"""

from __future__ import annotations

import re
import shlex
import signal as signal_module
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._version import __version__
from .errors import UsageError
from .signals import parse_signal
from .timespec import format_slurm_time, parse_slurm_time

TEMPLATE = "chain.sbatch.j2"
DEFAULT_MAX_FAILURES = 3
_SIGNAL_FORMS = "NAME@SECONDS such as USR1@300 (lead before the time limit), NAME alone, or none"
# Options the template manages itself: an extra directive may not set them again.
_MANAGED = (
    "--array",
    "--time",
    "--output",
    "--error",
    "--open-mode",
    "--signal",
    "--job-name",
    "-a",
    "-t",
    "-o",
    "-e",
    "-J",
)
_DIRECTIVE = re.compile(r"^--?[A-Za-z][A-Za-z0-9-]*(=[^\s'\"`$;&|<>()\\]*)?$")


@dataclass(frozen=True)
class ChainSpec:
    """Everything a chain script says. Build it with :func:`chain_spec`, which validates."""

    run_dir: Path
    command: tuple[str, ...]
    tasks: int
    time_seconds: int
    signal_name: str | None  # None: no warning signal (the budget alone stops tasks)
    signal_lead: int
    job_name: str
    launcher: str = ""  # "" (the batch shell runs the command) or "srun ..." (job steps, one per rank)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int | None = None
    ntasks_per_node: int | None = None
    gpus: str | None = None
    gres: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    constraint: str | None = None
    requeue: bool = True
    extra_directives: tuple[str, ...] = field(default_factory=tuple)
    max_failures: int = DEFAULT_MAX_FAILURES
    auto_extend: int = 0
    python: str = sys.executable

    @property
    def signal_directive(self) -> str:
        if self.signal_name is None:
            return ""
        # B: sends the signal to the batch shell, which passes it on; without B: Slurm signals the job
        # steps, which is what reaches Python when srun launches it.
        prefix = "" if self.launcher.startswith("srun") else "B:"
        return f"{prefix}{self.signal_name}@{self.signal_lead}"


def default_lead(time_seconds: int) -> int:
    """The warning lead for a time limit: 5 minutes for jobs of hours, a sixth of shorter limits."""
    return max(1, min(300, time_seconds // 6))


def parse_signal_spec(text: str, time_seconds: int) -> tuple[str | None, int]:
    """``USR1@300`` -> ("USR1", 300); ``USR2`` -> ("USR2", default lead); ``none`` -> (None, 0)."""
    if text.strip().lower() == "none":
        return None, 0
    name, sep, lead_text = text.partition("@")
    try:
        found = parse_signal(name)
    except UsageError:
        raise UsageError(f"Invalid --signal {text!r}: unknown signal {name!r}; expected {_SIGNAL_FORMS}") from None
    if found in (signal_module.SIGKILL, signal_module.SIGSTOP):
        raise UsageError(f"Invalid --signal {text!r}: expected {_SIGNAL_FORMS}")
    lead = default_lead(time_seconds)
    if sep:
        if not lead_text.isdigit() or int(lead_text) < 1:
            raise UsageError(
                f"Invalid --signal {text!r}: the lead must be whole seconds >= 1; expected {_SIGNAL_FORMS}"
            )
        lead = int(lead_text)
    if lead >= time_seconds:
        raise UsageError(
            f"Invalid --signal {text!r}: its lead ({lead} s) must be shorter than the time limit "
            f"({format_slurm_time(time_seconds)}); expected {_SIGNAL_FORMS}"
        )
    return found.name.removeprefix("SIG"), lead


def check_directive(text: str) -> str:
    """One extra ``#SBATCH`` option such as ``--mail-type=END``: one line, no shell, not one we manage."""
    directive = text.strip()
    if "\n" in text or "\r" in text or not _DIRECTIVE.match(directive):
        raise UsageError(
            f"Invalid extra directive {text!r}: expected one sbatch option such as --mail-type=END or "
            "--exclusive, on one line, without spaces, quotes or shell characters ($, `, ;, |, &, <, >, (, ))"
        )
    option = directive.split("=", 1)[0]
    if option in _MANAGED:
        raise UsageError(
            f"Invalid extra directive {text!r}: {option} is set by hpcckpt itself; use its own option "
            "(--tasks, --time, --signal, --job-name)"
        )
    return directive


def chain_spec(
    *,
    run_dir: str | Path,
    command: Sequence[str],
    tasks: int,
    time: str,
    signal: str | None = None,
    job_name: str | None = None,
    srun: bool = False,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    nodes: int | None = None,
    ntasks_per_node: int | None = None,
    gpus: str | None = None,
    gres: str | None = None,
    cpus_per_task: int | None = None,
    mem: str | None = None,
    constraint: str | None = None,
    requeue: bool = True,
    extra_directives: Sequence[str] = (),
    max_failures: int = DEFAULT_MAX_FAILURES,
    auto_extend: int = 0,
    python: str | None = None,
) -> ChainSpec:
    """Validate everything a user gave and return the chain's spec; :class:`UsageError` otherwise."""
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise UsageError(f"Invalid --tasks {tasks!r}: expected a whole number of array tasks >= 1")
    if tasks > 100_000:
        raise UsageError(f"Invalid --tasks {tasks}: expected at most 100000 (Slurm's MaxArraySize is lower)")
    seconds = parse_slurm_time(time)
    signal_name, lead = parse_signal_spec(signal or "USR1", seconds)
    if not command or not command[0]:
        raise UsageError("Missing command: expected the training command after --, e.g. -- python train.py")
    for name, value in (("--nodes", nodes), ("--ntasks-per-node", ntasks_per_node), ("--cpus-per-task", cpus_per_task)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"Invalid {name} {value!r}: expected a whole number >= 1")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 1:
        raise UsageError(f"Invalid --max-failures {max_failures!r}: expected a whole number of tasks >= 1")
    if isinstance(auto_extend, bool) or not isinstance(auto_extend, int) or auto_extend < 0:
        raise UsageError(f"Invalid --auto-extend {auto_extend!r}: expected a whole number of arrays >= 0")
    texts: tuple[tuple[str, str | None], ...] = (
        ("--partition", partition),
        ("--account", account),
        ("--qos", qos),
        ("--gpus", gpus),
        ("--gres", gres),
        ("--mem", mem),
        ("--constraint", constraint),
        ("--job-name", job_name),
    )
    for name, text in texts:
        if text is not None and (not text or any(c in text for c in "\n\r\0")):
            raise UsageError(f"Invalid {name} {text!r}: expected a value on one line")
    run_path = Path(run_dir).expanduser().absolute()
    if any(c in str(run_path) for c in "\n\r\0%"):
        raise UsageError(
            f"Invalid --run-dir {str(run_dir)!r}: newlines and '%' cannot appear in it (Slurm expands % in "
            "output file names); expected an ordinary path"
        )
    return ChainSpec(
        run_dir=run_path,
        command=tuple(command),
        tasks=tasks,
        time_seconds=seconds,
        signal_name=signal_name,
        signal_lead=lead,
        job_name=job_name or f"hpcckpt-{run_path.name}",
        # More than one rank: each is a task of one srun job step; --kill-on-bad-exit ends the step when a
        # rank dies, instead of leaving the others waiting in a collective until the time limit.
        launcher="srun --kill-on-bad-exit=1 " if srun or (nodes or 1) * (ntasks_per_node or 1) > 1 else "",
        partition=partition,
        account=account,
        qos=qos,
        nodes=nodes,
        ntasks_per_node=ntasks_per_node,
        gpus=gpus,
        gres=gres,
        cpus_per_task=cpus_per_task,
        mem=mem,
        constraint=constraint,
        requeue=requeue,
        extra_directives=tuple(check_directive(d) for d in extra_directives),
        max_failures=max_failures,
        auto_extend=auto_extend,
        python=python or sys.executable,
    )


def render(spec: ChainSpec, template: str | Path | None = None) -> str:
    """The sbatch script for ``spec``. ``template`` is a user's template file, which may extend ours
    (``{% extends "chain.sbatch.j2" %}``) and override its blocks ``site_setup`` and ``launch``."""
    import jinja2

    from .resources import template_dir

    search = [str(template_dir())]
    name = TEMPLATE
    if template is not None:
        user = Path(template).expanduser().absolute()
        if not user.is_file():
            raise UsageError(f"Invalid --template {str(template)!r}: no such file; expected a Jinja template")
        search.insert(0, str(user.parent))
        name = user.name
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - shell, not HTML: values are quoted by the q filter
        keep_trailing_newline=True,
    )
    environment.filters["q"] = lambda value: shlex.quote(str(value))
    try:
        return environment.get_template(name).render(
            version=__version__,
            run_dir=str(spec.run_dir),
            command=shlex.join(spec.command),
            tasks=spec.tasks,
            time=format_slurm_time(spec.time_seconds),
            signal_directive=spec.signal_directive,
            signal_name=spec.signal_name or "USR1",
            signal_lead=spec.signal_lead,
            job_name=spec.job_name,
            launcher=spec.launcher,
            partition=spec.partition,
            account=spec.account,
            qos=spec.qos,
            nodes=spec.nodes,
            ntasks_per_node=spec.ntasks_per_node,
            gpus=spec.gpus,
            gres=spec.gres,
            cpus_per_task=spec.cpus_per_task,
            mem=spec.mem,
            constraint=spec.constraint,
            requeue=spec.requeue,
            extra_directives=list(spec.extra_directives),
            max_failures=spec.max_failures,
            auto_extend=spec.auto_extend,
            python=spec.python,
        )
    except jinja2.TemplateError as error:
        where = f" (line {error.lineno})" if isinstance(error, jinja2.TemplateSyntaxError) else ""
        raise UsageError(
            f"Invalid template {name!r}{where}: {error}; expected a Jinja template that extends "
            f"{TEMPLATE!r} and uses only its variables"
        ) from None
