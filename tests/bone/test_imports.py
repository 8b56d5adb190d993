"""The package's import structure: no module of bone/ imports, directly or through others, a module that
imports it back (function-level and TYPE_CHECKING imports included), and the config loads without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports_of(package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports anywhere in its source (``from . import x`` counts
    as importing ``package.x`` when x is a module)."""
    modules = {f"{package}.{p.stem}" if p.stem != "__init__" else package: p for p in (ROOT / package).glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        pkg = package if module == package else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([pkg, *([base] if base else [])])
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif state[nxt] == 0:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if state[start] == 0:
            visit(start, [start])
    return found


def test_the_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_bone_has_no_import_circles():
    graph = imports_of("bone")
    assert "bone.routing" in graph["bone.layer"]  # the walk sees imports at all
    # the package __init__ imports everything by design; circles among the modules are what matter
    inner = {m: deps - {"bone"} for m, deps in graph.items() if m != "bone"}
    assert cycles(inner) == []


def test_config_loads_without_torch():
    code = "import sys, bone.config, core.jobs; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT)})
