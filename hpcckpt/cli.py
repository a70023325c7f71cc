"""The ``hpcckpt`` command.

It runs on login nodes, so it imports only the standard library at start; each subcommand imports what
it needs when it runs. Exit codes follow click's: 0 success, 1 an error, 2 bad usage (nothing was done).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._version import __version__
from .errors import HpcckptError

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Handler


def _configure_templates(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", action="store_true", help="print only the templates' directory")


def _run_templates(args: argparse.Namespace) -> int:
    from .resources import template_dir, template_names

    if args.path:
        print(template_dir())
        return 0
    print(f"templates in {template_dir()}:")
    for name in template_names():
        print(f"  {name}")
    return 0


_COMMANDS: tuple[_Command, ...] = (
    _Command("templates", "list the sbatch templates shipped with hpcckpt", _configure_templates, _run_templates),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcckpt",
        description="Resumable, preemption-safe PyTorch training on Slurm job-array chains.",
        epilog="Run 'hpcckpt COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hpcckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(command_parser)
        command_parser.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except HpcckptError as error:
        print(f"hpcckpt {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"hpcckpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
