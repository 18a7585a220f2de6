"""The sans-I/O boundary: pure modules import no sockets, clocks, event loop or OS calls."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "ztun"
FORBIDDEN = {"os", "socket", "asyncio", "time", "subprocess", "selectors", "threading"}
#: Pure layers. Files here may read a file they are handed a path to (pathlib), nothing more.
PURE = [
    *sorted((ROOT / "route").glob("*.py")),
    ROOT / "query.py",
    ROOT / "config" / "duration.py",
    ROOT / "config" / "validate.py",
    ROOT / "config" / "format.py",
    ROOT / "config" / "options.py",
    *sorted((ROOT / "proto").glob("*.py")),
    *sorted((ROOT / "packet").glob("*.py")),
    *sorted((ROOT / "nat").glob("*.py")),
]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", [p for p in PURE if p.exists()], ids=lambda p: p.name)
def test_pure_module_does_no_io(path: Path) -> None:
    bad = imported_modules(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT.parent)} imports {sorted(bad)}: keep it sans-I/O"
