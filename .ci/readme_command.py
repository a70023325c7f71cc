"""Print the one command in the fenced shell block under a README heading: ``readme_command.py HEADING``.

CI runs the README's setup commands as a user would copy them; this is the single place that finds them
(the tests import it too, so what CI runs and what the tests check cannot differ).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_command(heading: str, text: str | None = None) -> str:
    """The single command in the first ```bash block under ``### heading``; ValueError when there is none."""
    text = README.read_text() if text is None else text
    match = re.search(rf"^#+ {re.escape(heading)}\n.*?```(?:bash|sh)\n(.+?)\n```", text, re.M | re.S)
    if match is None:
        raise ValueError(f"README.md has no ```bash block under a heading {heading!r}")
    command = match.group(1).strip()
    if "\n" in command:
        raise ValueError(f"README.md's block under {heading!r} must hold one command, not {command!r}")
    return command


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: readme_command.py HEADING")
    try:
        print(readme_command(sys.argv[1]))
    except ValueError as error:
        sys.exit(f"readme_command.py: {error}")
