"""The package's layering: no import cycle, and no module using another package's private names (issue 12).

Read from the source with ``ast``, so a cycle hidden in a function-local import counts too: such an import
runs later, but it still ties the two modules together, which is what the redesign undid.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hpcckpt

PACKAGE = Path(hpcckpt.__file__).parent
# The deprecated alias re-exports the submitit integration; it imports nothing private and nothing imports it.
ALIASES = {"hpcckpt.submitit"}


def module_name(path: Path, root: Path) -> str:
    parts = (root.name, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def package_of(module: str, known: dict[str, Path]) -> str:
    return module if known[module].name == "__init__.py" else module.rpartition(".")[0]


def resolve(module: str, node: ast.ImportFrom, known: dict[str, Path]) -> str:
    if not node.level:
        return node.module or ""
    base = package_of(module, known).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, known: dict[str, Path]) -> Iterator[tuple[str, str | None, ast.AST]]:
    """(imported module, imported name or None, node) for every import of an hpcckpt module in ``module``."""
    for node in ast.walk(ast.parse(known[module].read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node, known)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:
                    yield submodule, None, node
                elif target in known:
                    yield target, alias.name, node


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t, _, _ in imports(m, known) if t != m} for m in known if m not in ALIASES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            # A package's __init__ importing its own submodules is how it re-exports them, not a cycle.
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_module_imports_itself_back_through_others() -> None:
    edges = graph()
    # Importing a submodule runs its package's __init__ first; that is not an edge back to the package.
    assert cycles(edges) == []


def test_no_module_uses_another_packages_private_names() -> None:
    assert private_uses(modules()) == []


def private_uses(known: dict[str, Path]) -> list[str]:
    offences = []
    for module in known:
        if module in ALIASES:
            continue
        for target, name, _node in imports(module, known):
            if package_of(target, known) == package_of(module, known):
                continue
            if name is not None and name.startswith("_") and name != "__version__":
                offences.append(f"{module} imports {target}.{name}")
        offences.extend(private_attributes(module, known))
    return offences


def private_attributes(module: str, known: dict[str, Path]) -> Iterator[str]:
    """``other._name`` where ``other`` is a module of another package imported by name."""
    tree = ast.parse(known[module].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, node, known)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known and package_of(submodule, known) != package_of(module, known):
                    aliases[alias.asname or alias.name] = submodule
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
        ):
            yield f"{module} uses {aliases[node.value.id]}.{node.attr}"


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path: Path) -> None:
    """The checks above would pass on an empty graph; these show they can fail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    root = tmp_path / "pkg"
    (root / "store").mkdir(parents=True)
    (root / "formats").mkdir()
    for init in (root, root / "store", root / "formats"):
        (init / "__init__.py").write_text("")
    (root / "store" / "core.py").write_text("def _commit(): pass\nclass _Owner: pass\n")
    (root / "formats" / "dcp.py").write_text(
        "from ..store.core import _Owner\nfrom ..store import core\ndef save():\n    core._commit()\n"
    )
    (root / "store" / "mine.py").write_text("from .core import _Owner\n")  # the same package: allowed
    assert private_uses(modules(root)) == [
        "pkg.formats.dcp imports pkg.store.core._Owner",
        "pkg.formats.dcp uses pkg.store.core._commit",
    ]
    assert "hpcckpt.store.store" in graph()["hpcckpt.run"]


def test_the_old_submitit_module_still_imports_and_says_where_it_went() -> None:
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from hpcckpt.submitit import Resumable, stored_result, submit_chain\n"
        "import hpcckpt\n"
        "assert (Resumable, submit_chain, stored_result) == "
        "(hpcckpt.Resumable, hpcckpt.submit_chain, hpcckpt.stored_result)\n"
        "print([str(w.message) for w in caught if w.category is DeprecationWarning])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "hpcckpt.submitit is now hpcckpt.integrations.submitit" in result.stdout
