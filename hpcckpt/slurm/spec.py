"""A chain's options, declared once, and the validated spec they make.

Each option is one field of :class:`ChainSpec`, declared with its flag, help text, default and check
(:func:`option`). The rest derives from those fields, the way submitit derives its sbatch flags from one
signature: the CLI's flags of ``submit`` and ``render`` (:func:`options`, walked by
``hpcckpt.cli.chain.configure_chain``), the builder's keywords and checks (:func:`chain_spec`), and the
template's variables (``hpcckpt.slurm.script.template_variables``). A new option is one field here and its
line in the template.

Validation happens here, before anything is written or submitted; each error names the bad value and the
accepted form. Nothing here does I/O or imports more than the standard library: the CLI builds its parser
from this module at every start.
"""

from __future__ import annotations

import dataclasses
import re
import signal as signal_module
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks import whole_number, whole_number_arg
from ..errors import UsageError
from ..rundir import LOGS
from ..signals import parse_signal
from ..timespec import format_slurm_time, parse_slurm_time

DEFAULT_MAX_FAILURES = 3  # the crash-loop breaker's default, for chains and for submitit's Resumable
MAX_TASKS = 100_000  # an array's tasks at most (Slurm's MaxArraySize is lower)
_SIGNAL_FORMS = "NAME@SECONDS such as USR1@300 (lead before the time limit), NAME alone, or none"
# sbatch options an extra directive may not set (issue 11, item 5), with the hpcckpt flag to use instead:
# those the template sets itself, and those hpcckpt has a flag for (the launcher and the breaker read
# them: `--nodes=2` given behind hpcckpt's back would start one rank on a two-node allocation).
_LOGS = f"--run-dir (the logs go to RUN_DIR/{LOGS})"
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
class Option:
    """How a user gives one field of :class:`ChainSpec`: its flag (None: from Python only), the keyword
    of :func:`chain_spec` and argparse's dest (the field's name unless the field is derived from it), its
    help text, its default as given, argparse's ``action``/``type``/``nargs``/``metavar``, and ``check``:
    the given value to the field's value, or :class:`UsageError` naming it."""

    flag: str | None
    name: str = ""
    help: str | None = None
    default: Any = None
    required: bool = False
    action: str | None = None
    parse: Callable[[str], Any] | None = None
    nargs: str | None = None
    metavar: str | None = None
    check: Callable[[Any], Any] | None = None


_SAME: Any = object()


def option(flag: str | None, *, spec_default: Any = _SAME, **declared: Any) -> Any:
    """A :class:`ChainSpec` field declared with its :class:`Option`. The field's own default is the
    option's, or ``spec_default`` where the field is derived (``dataclasses.MISSING``: none)."""
    declared_option = Option(flag, **declared)
    default = declared_option.default if spec_default is _SAME else spec_default
    if declared_option.required or default is dataclasses.MISSING:
        return dataclasses.field(metadata={"option": declared_option})
    return dataclasses.field(default=default, metadata={"option": declared_option})


def _line(flag: str) -> Callable[[Any], Any]:
    def check(text: Any) -> Any:
        if text is not None and (not text or any(c in text for c in "\n\r\0")):
            raise UsageError(f"Invalid {flag} {text!r}: expected a value on one line")
        return text

    return check


def _count(flag: str) -> Callable[[Any], int | None]:
    return lambda value: None if value is None else whole_number(value, flag)


def _text(flag: str, **declared: Any) -> Any:
    """An optional one-line value, passed to sbatch or the site setup as given."""
    return option(flag, check=_line(flag), **declared)


def _whole(flag: str, *, minimum: int, of: str, default: int, help: str) -> Any:
    return option(
        flag,
        default=default,
        parse=whole_number_arg(flag),
        check=lambda value: whole_number(value, flag, minimum=minimum, of=of),
        help=help,
    )


def _tasks(value: Any) -> int:
    tasks = whole_number(value, "--tasks", of="array tasks")
    if tasks > MAX_TASKS:
        raise UsageError(f"Invalid --tasks {tasks}: expected at most {MAX_TASKS} (Slurm's MaxArraySize is lower)")
    return tasks


def _run_dir(given: Any) -> Path:
    run_path = Path(given).expanduser().absolute()
    if any(c in str(run_path) for c in "\n\r\0%"):
        raise UsageError(
            f"Invalid --run-dir {str(given)!r}: newlines and '%' cannot appear in it (Slurm expands % in "
            "output file names); expected an ordinary path"
        )
    if "\\" in str(run_path):
        # Measured on Slurm 22.05: slurmd drops every backslash from an output file name (and stops
        # expanding %A/%a), escaped or not, so the task cannot open its log and never runs.
        raise UsageError(
            f"Invalid --run-dir {str(given)!r}: a backslash cannot appear in it (Slurm removes backslashes "
            "from the log file names, so the tasks could not start); expected a path without '\\'"
        )
    return run_path


def _setup(lines: Sequence[str]) -> tuple[str, ...]:
    for line in lines:
        _line("--setup")(line)
    for line in lines:
        # The site_setup block comes before the script's first command, where sbatch still reads #SBATCH
        # lines: a setup line must not become a directive around the checks of --sbatch-arg (item 5).
        if line.lstrip().upper().startswith("#SBATCH"):
            raise UsageError(
                f"Invalid --setup {line!r}: sbatch would read it as a directive; expected a shell command "
                "(give Slurm options with hpcckpt's flags or --sbatch-arg)"
            )
    return tuple(lines)


def _venv(given: Any) -> Path | None:
    if given is None:
        return None
    if not str(given) or any(c in str(given) for c in "\n\r\0"):
        raise UsageError(f"Invalid --venv {str(given)!r}: expected the directory of a virtual environment")
    return Path(given).expanduser().absolute()


# A URL's scheme (RFC 3986): what tells a location (s3://, gs://, file://) from a plain path.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Query parameters that would carry a secret into the script: fsspec passes them to the backend as
# options (s3fs's key/secret/token).
_SECRET_PARAMS = re.compile(r"(key|secret|token|password|passwd|credential|^sig$|signature)", re.IGNORECASE)
_MIRROR_FORMS = "s3://bucket/prefix, gs://bucket/prefix, file:///abs/path or a path"


def has_scheme(text: str) -> bool:
    """Whether ``text`` is a URL with a scheme (``s3://``, ``file://``), not a plain path."""
    return _SCHEME.match(text) is not None


def _userinfo(text: str) -> tuple[str, str] | None:
    """A URL's ``user:secret@`` part and the rest after it, or None. Not ``urlsplit``'s netloc: a secret
    with a ``/`` in it (AWS secret keys have them) ends the netloc early, hiding the ``@``. Bucket names
    never hold ``@``, so one before the query means credentials."""
    _, sep, rest = text.partition("://")
    before_query = rest.split("?", 1)[0]
    if not sep or "@" not in before_query:
        return None
    return before_query.rpartition("@")[0], rest[len(before_query.rpartition("@")[0]) + 1 :]


def redact_url(text: str) -> str:
    """``text`` with a user:secret@ part and the values of secret-looking query parameters masked."""
    found = _userinfo(text)
    if found is not None:
        text = f"{text.partition('://')[0]}://***@{found[1]}"
    parts = urllib.parse.urlsplit(text)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    masked = "&".join(f"{k}={'***' if _SECRET_PARAMS.search(k) else v}" for k, v in query)
    return urllib.parse.urlunsplit(parts._replace(query=masked))


def check_mirror(given: Any) -> str | None:
    """``--mirror``: a URL with a scheme, passed on as given, or a path, made absolute (the chain's tasks
    open it). Refused when it carries credentials: the rendered script, the events and the logs would show
    them, so the backend's own environment or config must hold them (issue 14). Pure: whether the
    backend is installed and the location reachable is checked by ``hpcckpt submit``."""
    if given is None:
        return None
    text = str(given)
    if not text.strip() or any(c in text for c in "\n\r\0"):
        raise UsageError(f"Invalid --mirror {text!r}: expected one URL or path on one line ({_MIRROR_FORMS})")
    if not _SCHEME.match(text):
        if "://" in text:
            shown = redact_url(text)
            raise UsageError(f"Invalid --mirror {shown!r}: its scheme is malformed; expected {_MIRROR_FORMS}")
        return str(Path(text).expanduser().absolute())
    parts = urllib.parse.urlsplit(text)
    names = [k for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if _SECRET_PARAMS.search(k)]
    userinfo = _userinfo(text) is not None
    if userinfo or names:
        where = "a user:secret@ part" if userinfo else f"the parameter(s) {', '.join(names)}"
        raise UsageError(
            f"Invalid --mirror {redact_url(text)!r}: it carries credentials ({where}), which would be written "
            f"into the chain script; expected {_MIRROR_FORMS} without them, the credentials in the backend's "
            "own environment or config (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials...)"
        )
    return text


def _command(given: Sequence[str]) -> tuple[str, ...]:
    if not given or not given[0]:
        raise UsageError("Missing command: expected the training command after --, e.g. -- python train.py")
    return tuple(given)


@dataclass(frozen=True, kw_only=True)
class ChainSpec:
    """Everything a chain script says. Build it with :func:`chain_spec`, which validates.

    The fields are in the order of ``hpcckpt submit --help``; a field without a flag is derived
    (``signal_lead``) or set from Python only (``python``)."""

    run_dir: Path = option(  # noqa: RUF009 - option() returns a dataclasses.field
        "--run-dir", required=True, check=_run_dir, help="the run directory (checkpoints, registry, logs)"
    )
    tasks: int = option(
        "--tasks",
        required=True,
        parse=whole_number_arg("--tasks"),
        check=_tasks,
        help="array tasks, run one after another",
    )
    time_seconds: int = option(
        "--time",
        name="time",
        required=True,
        check=parse_slurm_time,
        help="each task's time limit, e.g. 4:00:00, 1-00:00:00, 30",
    )
    # None: no warning signal (the budget alone stops tasks). Checked with signal_lead from --signal and
    # the time limit (_check_field).
    signal_name: str | None = option(
        "--signal",
        name="signal",
        spec_default=dataclasses.MISSING,
        help="warning signal and lead before the time limit, e.g. USR1@300 (default USR1 with "
        "a lead that suits the time limit), or none",
    )
    signal_lead: int
    partition: str | None = _text("--partition")
    account: str | None = _text("--account")
    qos: str | None = _text("--qos")
    nodes: int | None = option("--nodes", parse=whole_number_arg("--nodes"), check=_count("--nodes"))
    ntasks_per_node: int | None = option(
        "--ntasks-per-node", parse=whole_number_arg("--ntasks-per-node"), check=_count("--ntasks-per-node")
    )
    gpus: str | None = _text("--gpus", help="sbatch --gpus, e.g. 4 or a100:4")
    gres: str | None = _text("--gres")
    cpus_per_task: int | None = option(
        "--cpus-per-task", parse=whole_number_arg("--cpus-per-task"), check=_count("--cpus-per-task")
    )
    mem: str | None = _text("--mem")
    constraint: str | None = _text("--constraint")
    job_name: str = _text("--job-name", spec_default=dataclasses.MISSING)  # default: hpcckpt-<run dir's name>
    # "" (the batch shell runs the command) or "srun ..." (job steps, one per rank): derived from --srun
    # and the ranks (_derived).
    launcher: str = option(
        "--srun",
        name="srun",
        default=False,
        action="store_true",
        spec_default="",
        help="launch the command through srun (multi-node)",
    )
    requeue: bool = option(
        "--no-requeue", default=True, action="store_false", help="ask Slurm not to requeue preempted tasks"
    )
    extra_directives: tuple[str, ...] = option(
        "--sbatch-arg",
        name="extra_directives",
        default=(),
        action="append",
        metavar="OPTION",
        check=lambda given: tuple(check_directive(d) for d in given),
        help="one more #SBATCH option, e.g. --mail-type=END (repeatable)",
    )
    template: str | None = option("--template", help="your own template, extending chain.sbatch.j2")
    # Shell lines of the site_setup block, as given (shell code by design).
    setup: tuple[str, ...] = option(
        "--setup",
        default=(),
        action="append",
        metavar="LINE",
        check=_setup,
        help="one line of shell run before the command, e.g. 'module load cuda/12.4' (repeatable)",
    )
    conda: str | None = _text("--conda", metavar="ENV", help="activate this conda environment before the command")
    venv: Path | None = option(  # noqa: RUF009 - option() returns a dataclasses.field
        "--venv", metavar="PATH", check=_venv, help="activate this virtual environment before the command"
    )
    max_failures: int = _whole(
        "--max-failures",
        minimum=1,
        of="tasks",
        default=DEFAULT_MAX_FAILURES,
        help="consecutive tasks without a new checkpoint before the run is marked failed",
    )
    auto_extend: int = _whole(
        "--auto-extend",
        minimum=0,
        of="arrays",
        default=0,
        help="submit the chain again, at most this many times, when it ends unfinished",
    )
    mirror: str | None = option(
        "--mirror",
        metavar="URL",
        check=check_mirror,
        help="mirror every checkpoint to this location (s3://bucket/prefix, gs://..., a path) and resume from "
        "it when the run directory has lost its checkpoints; checked before submitting",
    )
    python: str = option(None, spec_default=sys.executable, check=lambda given: given or sys.executable)
    command: tuple[str, ...] = option(
        "command",
        required=True,
        nargs="...",  # argparse.REMAINDER
        check=_command,
        help="-- the training command and its arguments",
    )

    @property
    def log_dir(self) -> Path:
        """Where Slurm writes the tasks' logs: RUN_DIR/logs, or beside the run directory with --mirror."""
        return log_dir(self.run_dir, self.mirror)

    @property
    def signal_directive(self) -> str:
        if self.signal_name is None:
            return ""
        # B: sends the signal to the batch shell, which passes it on; without B: Slurm signals the job
        # steps, which is what reaches Python when srun launches it.
        prefix = "" if self.launcher.startswith("srun") else "B:"
        return f"{prefix}{self.signal_name}@{self.signal_lead}"


def options() -> list[Option]:
    """The chain's options in the order of ``hpcckpt submit --help``, each with its keyword (``name``)."""
    return list(_options_by_field().values())


# The order chain_spec checks the fields in, so that of several bad values the same one is reported
# first as before the options were declared once (issue 12: a refactor, no change of behaviour). It is
# not the declaration order, which is --help's: the time limit before the signal whose lead it bounds,
# the signal before the command, the counts, the one-line texts, the run directory last but two.
CHECK_ORDER = (
    "tasks",
    "time_seconds",
    "signal_name",  # with signal_lead: parse_signal_spec, against the time limit checked just before
    "command",
    "nodes",
    "ntasks_per_node",
    "cpus_per_task",
    "max_failures",
    "auto_extend",
    "partition",
    "account",
    "qos",
    "gpus",
    "gres",
    "mem",
    "constraint",
    "job_name",
    "conda",
    "setup",
    "run_dir",
    "venv",
    "extra_directives",
    "mirror",
    "python",
)


def chain_spec(**given: Any) -> ChainSpec:
    """Validate everything a user gave and return the chain's spec; :class:`UsageError` otherwise.

    The keywords are the options' names (:func:`options`): ``run_dir``, ``command``, ``tasks`` and ``time``
    are required, the rest have the options' defaults. The checks run in :data:`CHECK_ORDER`."""
    declared = {o.name: o for o in options()}
    unknown = sorted(set(given) - set(declared))
    missing = sorted(name for name, o in declared.items() if o.required and name not in given)
    if unknown or missing:
        raise TypeError(f"chain_spec() got unknown keyword(s) {unknown} and lacks required keyword(s) {missing}")
    by_field = _options_by_field()
    values: dict[str, Any] = {}
    for field_name in CHECK_ORDER:
        _check_field(field_name, by_field[field_name], given, values)
    for field_name, o in by_field.items():
        if field_name not in values:
            values[field_name] = given.get(o.name, o.default)
    return ChainSpec(**_derived(values, given))


def _options_by_field() -> dict[str, Option]:
    """Each declared field's name to its option, with the option's keyword (``name``) filled in, in the
    order of the fields."""
    found = {}
    for spec_field in dataclasses.fields(ChainSpec):
        declared = spec_field.metadata.get("option")
        if declared is not None:
            found[spec_field.name] = dataclasses.replace(declared, name=declared.name or spec_field.name)
    return found


def _check_field(field_name: str, o: Option, given: dict[str, Any], values: dict[str, Any]) -> None:
    """Check one field's given value into ``values``; the signal's lead is checked against the time limit."""
    value = given.get(o.name, o.default)
    if field_name == "signal_name":
        values["signal_name"], values["signal_lead"] = parse_signal_spec(
            "USR1" if value is None else value, values["time_seconds"]
        )
    else:
        values[field_name] = o.check(value) if o.check is not None else value


def _derived(values: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The fields that depend on others: the job's name on the run directory, the launcher on the ranks
    (the warning signal's lead, which depends on the time limit, is checked in its place in CHECK_ORDER)."""
    values["job_name"] = values["job_name"] or f"hpcckpt-{values['run_dir'].name}"
    ranks = (values["nodes"] or 1) * (values["ntasks_per_node"] or 1)
    # More than one rank: each is a task of one srun job step; --kill-on-bad-exit ends the step when a
    # rank dies, instead of leaving the others waiting in a collective until the time limit.
    values["launcher"] = "srun --kill-on-bad-exit=1 " if given.get("srun") or ranks > 1 else ""
    return values


def log_dir(run_dir: Path, mirror: str | None) -> Path:
    """Where a chain's tasks log: ``RUN_DIR/logs``; with a mirror, ``RUN_DIR.logs`` beside the run directory.
    Slurm opens a task's output files before the script runs and does not create their directory: measured
    on 22.05, a task whose log directory is gone fails at launch (JobLaunchFailure, exit 0:53), and so does
    every later task of the array. A mirrored chain must outlive its run directory (a purge of scratch),
    so its logs cannot live inside it."""
    return run_dir / LOGS if mirror is None else run_dir.parent / f"{run_dir.name}.{LOGS}"


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
            for managed in _MANAGED:
                if managed.startswith(name):
                    _refuse(text, f"{name} (sbatch reads an unambiguous prefix as {managed})", managed)
    elif word.startswith("-"):
        for letter in word[1:]:
            if letter in _MANAGED_SHORT:
                _refuse(text, f"-{letter} ({_MANAGED_SHORT[letter]})", _MANAGED_SHORT[letter])
            if letter not in _SHORT_FLAGS:
                return  # the rest of the word is this option's value


def _refuse(text: str, spelled: str, managed: str) -> None:
    instead = _MANAGED[managed]
    raise UsageError(
        f"Invalid extra directive {text!r}: {managed} is set by hpcckpt itself ({spelled}); "
        + (f"use hpcckpt's own option instead: {instead}" if instead.startswith("--") else instead)
    )
