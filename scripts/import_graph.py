"""Print the import graph of the xray package (every import, including those inside functions), by module
and by wing, and its cycles.

Usage: python scripts/import_graph.py [--wings] [--fail-on-cycle]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "xray"


def modules() -> dict[str, Path]:
    """Dotted module name under xray (``serve.inference``, ``cli``; packages as ``serve``) -> its file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or "__init__"] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def edges() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (``from xray.serve import guard`` counts as serve.guard)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                elif node.module and (node.module == "xray" or node.module.startswith("xray.")):
                    module = node.module[len("xray."):] if node.module != "xray" else ""
                else:
                    continue
                for alias in node.names:
                    full = f"{module}.{alias.name}" if module else alias.name
                    hit = full if full in known else _resolve(module, known)
                    if hit:
                        targets.add(hit)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("xray."):
                        hit = _resolve(alias.name[len("xray."):], known)
                        if hit:
                            targets.add(hit)
        graph[name] = {t for t in targets if t != name and t != "__init__"}
    return graph


def wing_of(module: str) -> str:
    return module.split(".")[0]


def wing_edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in edges().items():
        graph.setdefault(wing_of(module), set()).update(wing_of(t) for t in targets if wing_of(t) != wing_of(module))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, seen = [], set()

    def visit(node, stack):
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycle = stack[stack.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle + [nxt])
            elif len(stack) < 40:
                visit(nxt, stack + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


if __name__ == "__main__":
    g = wing_edges() if "--wings" in sys.argv else edges()
    width = max(map(len, g))
    for name in sorted(g):
        print(f"{name:{width}s} -> {', '.join(sorted(g[name])) or '-'}")
    found = cycles({k: v for k, v in g.items() if k not in ("__init__", "__main__")})
    for c in found:
        print("CYCLE:", " -> ".join(c))
    print(f"{len(found)} cycle(s)")
    sys.exit(1 if found and "--fail-on-cycle" in sys.argv else 0)
