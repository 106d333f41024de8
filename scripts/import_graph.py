"""Print the import graph of the xray package (every import, including those inside functions) and its cycles.

Usage: python scripts/import_graph.py [--fail-on-cycle]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "xray"


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    if node.module:
                        targets.add(node.module.split(".")[0])
                    else:
                        targets.update(a.name for a in node.names)
                elif node.module and node.module.startswith("xray"):
                    parts = node.module.split(".")
                    if len(parts) > 1:
                        targets.add(parts[1])
                    else:
                        targets.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("xray."):
                        targets.add(a.name.split(".")[1])
        graph[name] = {t for t in targets if (PACKAGE / f"{t}.py").is_file() and t != name}
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
            elif len(stack) < 30:
                visit(nxt, stack + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


if __name__ == "__main__":
    g = edges()
    for name in sorted(g):
        print(f"{name:12s} -> {', '.join(sorted(g[name])) or '-'}")
    found = cycles({k: v for k, v in g.items() if k not in ("__init__", "__main__")})
    for c in found:
        print("CYCLE:", " -> ".join(c))
    print(f"{len(found)} cycle(s)")
    sys.exit(1 if found and "--fail-on-cycle" in sys.argv else 0)
