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
from typing import Any

from .._version import __version__
from ..errors import UsageError
from ..signals import parse_signal
from ..timespec import format_slurm_time, parse_slurm_time

TEMPLATE = "chain.sbatch.j2"
DEFAULT_MAX_FAILURES = 3
_SIGNAL_FORMS = "NAME@SECONDS such as USR1@300 (lead before the time limit), NAME alone, or none"
# sbatch options an extra directive may not set (issue 11, item 5), with the hpcckpt flag to use instead:
# those the template sets itself, and those hpcckpt has a flag for (the launcher and the breaker read
# them: `--nodes=2` given behind hpcckpt's back would start one rank on a two-node allocation).
_LOGS = "--run-dir (the logs go to RUN_DIR/logs)"
_MANAGED = {
    "--array": "--tasks",
    "--time": "--time",
    "--output": _LOGS,
    "--error": _LOGS,
    "--open-mode": _LOGS,
    "--signal": "--signal",
    "--job-name": "--job-name",
    "--requeue": "--no-requeue (requeue is the default)",
    "--no-requeue": "--no-requeue",
    "--partition": "--partition",
    "--account": "--account",
    "--qos": "--qos",
    "--nodes": "--nodes",
    "--ntasks-per-node": "--ntasks-per-node",
    "--gpus": "--gpus",
    "--gres": "--gres",
    "--cpus-per-task": "--cpus-per-task",
    "--mem": "--mem",
    "--constraint": "--constraint",
    # The job starts where `hpcckpt submit` ran (the local backend too), and the command check looks there.
    "--chdir": "the job starts where hpcckpt submit runs: run it from that directory",
}
_MANAGED_SHORT = {
    "a": "--array",
    "t": "--time",
    "o": "--output",
    "e": "--error",
    "J": "--job-name",
    "p": "--partition",
    "A": "--account",
    "q": "--qos",
    "N": "--nodes",
    "G": "--gpus",
    "c": "--cpus-per-task",
    "C": "--constraint",
    "D": "--chdir",
}
# sbatch's short options that take no argument (`sbatch --help`, 22.05): getopt reads the next letter of
# the same word as another option, so `-Ht5` is --hold --time=5 (measured: a time limit of 7 minutes
# from `#SBATCH -Ht7`).
_SHORT_FLAGS = "HIOQsvWhVu"
# sbatch options that are a prefix of a managed one: getopt takes an exact name as itself.
_EXACT = {"--ntasks"}
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
    setup: tuple[str, ...] = ()  # shell lines of the site_setup block, as given (shell code by design)
    conda: str | None = None  # a conda environment, activated in the site_setup block
    venv: Path | None = None  # a virtual environment, activated in the site_setup block

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
    if not text.strip():
        raise UsageError(f"Invalid --signal {text!r}: it is empty; expected {_SIGNAL_FORMS}")
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
    _check_not_managed(text, directive.split()[0] if directive else "")
    if "\n" in text or "\r" in text or not _DIRECTIVE.match(directive):
        raise UsageError(
            f"Invalid extra directive {text!r}: expected one sbatch option such as --mail-type=END or "
            "--exclusive, on one line, without spaces, quotes or shell characters ($, `, ;, |, &, <, >, (, ))"
        )
    return directive


def _check_not_managed(text: str, word: str) -> None:
    """Refuse every spelling sbatch's getopt reads as a managed option: the name, an unambiguous prefix
    of it (`--arr=1-50`), a short option with its value attached (`-a1-50`) or after flags (`-Ht5`)."""
    if word.startswith("--"):
        name = word.split("=", 1)[0]
        if name in _MANAGED:
            _refuse(text, name, name)
        if len(name) > 2 and name not in _EXACT:
            for option in _MANAGED:
                if option.startswith(name):
                    _refuse(text, f"{name} (sbatch reads an unambiguous prefix as {option})", option)
    elif word.startswith("-"):
        for letter in word[1:]:
            if letter in _MANAGED_SHORT:
                _refuse(text, f"-{letter} ({_MANAGED_SHORT[letter]})", _MANAGED_SHORT[letter])
            if letter not in _SHORT_FLAGS:
                return  # the rest of the word is this option's value


def _refuse(text: str, spelled: str, option: str) -> None:
    instead = _MANAGED[option]
    raise UsageError(
        f"Invalid extra directive {text!r}: {option} is set by hpcckpt itself ({spelled}); "
        + (f"use hpcckpt's own option instead: {instead}" if instead.startswith("--") else instead)
    )


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
    setup: Sequence[str] = (),
    conda: str | None = None,
    venv: str | Path | None = None,
) -> ChainSpec:
    """Validate everything a user gave and return the chain's spec; :class:`UsageError` otherwise."""
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise UsageError(f"Invalid --tasks {tasks!r}: expected a whole number of array tasks >= 1")
    if tasks > 100_000:
        raise UsageError(f"Invalid --tasks {tasks}: expected at most 100000 (Slurm's MaxArraySize is lower)")
    seconds = parse_slurm_time(time)
    signal_name, lead = parse_signal_spec("USR1" if signal is None else signal, seconds)
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
        ("--conda", conda),
        *(("--setup", line) for line in setup),
    )
    for name, text in texts:
        if text is not None and (not text or any(c in text for c in "\n\r\0")):
            raise UsageError(f"Invalid {name} {text!r}: expected a value on one line")
    for line in setup:
        # The site_setup block comes before the script's first command, where sbatch still reads #SBATCH
        # lines: a setup line must not become a directive around the checks of --sbatch-arg (item 5).
        if line.lstrip().upper().startswith("#SBATCH"):
            raise UsageError(
                f"Invalid --setup {line!r}: sbatch would read it as a directive; expected a shell command "
                "(give Slurm options with hpcckpt's flags or --sbatch-arg)"
            )
    run_path = Path(run_dir).expanduser().absolute()
    if any(c in str(run_path) for c in "\n\r\0%"):
        raise UsageError(
            f"Invalid --run-dir {str(run_dir)!r}: newlines and '%' cannot appear in it (Slurm expands % in "
            "output file names); expected an ordinary path"
        )
    if "\\" in str(run_path):
        # Measured on Slurm 22.05: slurmd drops every backslash from an output file name (and stops
        # expanding %A/%a), escaped or not, so the task cannot open its log and never runs.
        raise UsageError(
            f"Invalid --run-dir {str(run_dir)!r}: a backslash cannot appear in it (Slurm removes backslashes "
            "from the log file names, so the tasks could not start); expected a path without '\\'"
        )
    venv_path = None
    if venv is not None:
        if not str(venv) or any(c in str(venv) for c in "\n\r\0"):
            raise UsageError(f"Invalid --venv {str(venv)!r}: expected the directory of a virtual environment")
        venv_path = Path(venv).expanduser().absolute()
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
        setup=tuple(setup),
        conda=conda,
        venv=venv_path,
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
    # In an #SBATCH line a backslash escapes the next character even inside quotes (measured on Slurm
    # 22.05: --output='/r/back\slash/x' became /r/backslash/x), so it is doubled after shell quoting.
    environment.filters["sq"] = lambda value: shlex.quote(str(value)).replace("\\", "\\\\")
    try:
        loaded = environment.get_template(name)
        if template is not None:
            _check_blocks(environment, name)
        script = loaded.render(
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
            setup=list(spec.setup),
            conda=spec.conda,
            venv=None if spec.venv is None else str(spec.venv),
        )
    except UsageError:
        raise
    except Exception as error:  # a user's template is code: any failure of it is theirs to fix
        where = _template_line(error, name)
        raise UsageError(
            f"Invalid template {name!r}{where}: {type(error).__name__}: {error}; expected a Jinja template "
            f"that extends {TEMPLATE!r} and uses only its variables"
        ) from None
    _check_setup_rendered(spec, script, name)
    return script


def _check_blocks(environment: Any, name: str) -> None:
    """A block the templates it extends do not have is never rendered: a typo (``site_setpu``) would drop
    the user's site setup without a word (issue 11, item 20)."""
    from jinja2 import nodes

    def parse(template_name: str) -> Any:
        return environment.parse(environment.loader.get_source(environment, template_name)[0])

    tree = parse(name)
    parents = []
    current = tree
    for _ in range(10):  # a chain of templates extending each other, ours at its root
        extends = current.find(nodes.Extends)
        if extends is None or not isinstance(extends.template, nodes.Const):
            break
        parents.append(str(extends.template.value))
        current = parse(parents[-1])
    if not parents:
        return
    valid = {block for parent in parents for block in environment.get_template(parent).blocks}
    # Top-level blocks only: one nested in an overriding block is rendered as part of it.
    unknown = sorted({node.name for node in tree.body if isinstance(node, nodes.Block)} - valid)
    if unknown:
        raise UsageError(
            f"Invalid template {name!r}: it defines block(s) {', '.join(map(repr, unknown))} that "
            f"{parents[0]!r} does not have, so they would never be rendered; expected one of "
            f"{', '.join(map(repr, sorted(valid)))}"
        )


def _template_line(error: BaseException, name: str) -> str:
    """`` (line N)`` of the template where rendering failed, from the traceback Jinja rewrites."""
    import jinja2

    if isinstance(error, jinja2.TemplateSyntaxError) and error.lineno:
        return f" (line {error.lineno})"
    line = None
    tb = error.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).name == name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else f" (line {line})"


def _check_setup_rendered(spec: ChainSpec, script: str, name: str) -> None:
    """``--setup``/``--conda``/``--venv`` are rendered by our site_setup block; a user's template that
    replaces the block without ``{{ super() }}`` would silently drop them."""
    body = script.splitlines()
    given = [line for line in spec.setup if line.strip()]
    given += [f"--conda {spec.conda}"] if spec.conda is not None and "conda activate" not in script else []
    given += [f"--venv {spec.venv}"] if spec.venv is not None and "/bin/activate" not in script else []
    missing = [line for line in given if line.startswith(("--conda ", "--venv ")) or line not in body]
    if missing:
        raise UsageError(
            f"Invalid template {name!r}: its site_setup block replaces what --setup/--conda/--venv give "
            f"({'; '.join(missing)}); expected {{{{ super() }}}} in that block, or the setup written there"
        )
