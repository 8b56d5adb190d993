"""The API package never imports the worker (it enqueues tasks by dotted path) nor the command line that
starts both: read from the source, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_app_imports_neither_worker_nor_cli():
    offending = {
        f"{path.relative_to(APP.parent)}: {name}"
        for path in APP.rglob("*.py")
        for name in imported_modules(path)
        if name.split(".")[0] in {"worker", "cli"}
    }
    assert list(APP.rglob("*.py")) and not offending, sorted(offending)
