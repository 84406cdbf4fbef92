"""Structure of the package: lines per module, the longest chain of package-internal imports.

    python benchmarks/structure.py            # table of modules, then the longest import chain

Counts every import of a ``longdoc_cli`` module (top-level or inside a function, absolute or
relative); a chain is a path in that graph without repeating a module. A second line counts only
the imports a module runs when it is imported (module level, not under ``if TYPE_CHECKING``).
Issue 14's before/after figures.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "longdoc_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], module_level: bool = False) -> set[str]:
    """The package modules that ``path`` imports (``from . import x`` counts ``x`` when it is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def main() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f): f for f in files}
    total = 0
    for m, f in sorted(modules.items()):
        lines = len(f.read_text().splitlines())
        total += lines
        print(f"{lines:6d}  {m}")
    print(f"{total:6d}  total ({len(modules)} modules)")
    for what, module_level in (("every import", False), ("module-level imports", True)):
        graph = {m: imports_of(f, set(modules), module_level) for m, f in modules.items()}
        chain = longest_chain(graph)
        names = " -> ".join(c.removeprefix("longdoc_cli.") for c in chain)
        print(f"longest import chain, {what} ({len(chain)} deep): {names}")


def longest_chain(graph: dict[str, set[str]]) -> tuple[str, ...]:
    @cache
    def longest(m: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for n in sorted(graph[m] - seen - {m}):
            chain = longest(n, seen | {m})
            if len(chain) > len(best):
                best = chain
        return (m, *best)

    return max((longest(m) for m in graph), key=len)


if __name__ == "__main__":
    main()
