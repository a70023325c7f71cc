"""Files shipped with hpcckpt: the Jinja sbatch templates.

The repository keeps ``templates/`` at its top level; the wheel places it inside the package, where
``importlib.resources`` finds it. An editable install or a plain checkout has no copy inside the package,
so the top-level folder next to the package is used instead.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import HpcckptError


def template_dir() -> Path:
    """The directory holding the shipped ``*.j2`` templates."""
    packaged = resources.files("hpcckpt").joinpath("templates")
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent.parent / "templates"
    if checkout.is_dir():
        return checkout
    raise HpcckptError(f"hpcckpt's templates are missing: looked in {packaged} and {checkout}; reinstall hpcckpt")


def template_names() -> list[str]:
    """Names of the shipped templates, sorted, e.g. ``['chain.sbatch.j2']``."""
    return sorted(p.name for p in template_dir().glob("*.j2"))
