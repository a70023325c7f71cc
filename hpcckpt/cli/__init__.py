"""The ``hpcckpt`` command: argument parsing, exit codes, and the commands that run in a chain's tasks.

``main`` is the console script's entry point (``pyproject.toml``).
"""

from .main import main as main
