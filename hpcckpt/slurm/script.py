"""The chain script: rendered from a :class:`~hpcckpt.slurm.spec.ChainSpec` and a Jinja template.

Rendering is pure: a string from a spec, no I/O but reading templates. The template's variables are the
spec's fields (:func:`template_variables`), in the form the script needs, and the names the script
shares with the rest of hpcckpt: the run directory's ``logs`` (:mod:`hpcckpt.rundir`) and task-begin's
exit statuses (:data:`TASK_GO_ON`, :data:`TASK_LEAVE`). Every value that reaches the shell is quoted by
the template's ``q``/``sq`` filters; a user's template is checked for blocks it would silently drop.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import UsageError
from ..rundir import LOGS
from ..timespec import format_slurm_time
from .spec import ChainSpec

TEMPLATE = "chain.sbatch.j2"
# task-begin's exit statuses, which the chain script's `case` reads: go on to the training command, or
# leave at once with status 0 (the run is complete or failed).
TASK_GO_ON = 0
TASK_LEAVE = 3


def template_variables(spec: ChainSpec) -> dict[str, Any]:
    """The template's variables: every field of ``spec`` (tuples as lists), with the command joined for
    the shell, the time limit and the run directory as text, and the names shared with the rest."""
    variables = {
        f.name: list(value) if isinstance(value, tuple) else value
        for f in dataclasses.fields(spec)
        for value in [getattr(spec, f.name)]
    }
    variables.update(
        version=__version__,
        run_dir=str(spec.run_dir),
        command=shlex.join(spec.command),
        time=format_slurm_time(spec.time_seconds),
        signal_directive=spec.signal_directive,
        signal_name=spec.signal_name or "USR1",
        venv=None if spec.venv is None else str(spec.venv),
        log_dir=str(spec.log_dir),
        logs=LOGS,
        task_go_on=TASK_GO_ON,
        task_leave=TASK_LEAVE,
    )
    return variables


def render(spec: ChainSpec) -> str:
    """The sbatch script for ``spec``. ``spec.template`` is a user's template file (``--template``), which
    may extend ours (``{% extends "chain.sbatch.j2" %}``) and override its blocks ``site_setup`` and
    ``launch``; None: ours."""
    import jinja2

    from .resources import template_dir

    template = spec.template
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
        script = loaded.render(**template_variables(spec))
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
