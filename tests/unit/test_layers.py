"""The sans-I/O boundary: pure modules import no sockets, clocks, event loop, OS or HTTP calls,
neither directly nor through another ztun module they import."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "ztun"
FORBIDDEN = frozenset(
    {"asyncio", "socket", "selectors", "time", "os", "threading", "subprocess", "urllib", "http"}
)
#: The pure layers (config compile and validation, route, packet, nat, proto, the stack cores,
#: the sniffers).
#: They may read a file they are handed a path to (pathlib), nothing more.
PURE_PACKAGES = ["route", "packet", "nat", "proto", "stack", "sniff"]
PURE_MODULES = [
    "address.py",
    "errors.py",
    "query.py",
    "config/duration.py",
    "config/validate.py",
    "config/format.py",
    "config/loader.py",
    "config/options.py",
    "config/schema.py",
    "config/legacy_dns.py",
    "config/changes.py",
    # the DNS package mixes pure modules with I/O ones (transport, client, hijack): by name
    "dns/__init__.py",
    "dns/message.py",
    "dns/cache.py",
    "dns/reverse.py",
    "dns/fakeip.py",
    "dns/router.py",
    "dns/wire.py",
    # which member a urltest group uses (its probes are outbound/urltest.py)
    "outbound/choice.py",
    # the owner lookup's parsers (its I/O is platform/linux/owner.py)
    "platform/linux/owner_parse.py",
]


def pure_files() -> list[Path]:
    files = [p for pkg in PURE_PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))]
    files += [ROOT / m for m in PURE_MODULES if (ROOT / m).exists()]
    return files


def module_file(name: str) -> Path | None:
    """The file of ztun module `name` (a package's __init__.py), or None."""
    parts = name.split(".")[1:]
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


@cache
def imports_of(path: Path) -> tuple[frozenset[str], frozenset[Path]]:
    """(top-level names of the outside modules `path` imports, ztun module files it imports).
    Imports inside functions count too: a lazy import is still an import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    outside: set[str] = set()
    inside: set[Path] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] != "ztun":
                outside.add(name.split(".")[0])
                continue
            # every package on the way is imported too (its __init__ runs)
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                f = module_file(".".join(parts[:i]))
                if f is not None:
                    inside.add(f)
    return frozenset(outside), frozenset(inside)


def forbidden_paths(start: Path) -> list[str]:
    """Every chain of ztun imports from `start` to a forbidden module, as text."""
    found: list[str] = []
    seen = {start}
    stack: list[tuple[Path, tuple[Path, ...]]] = [(start, (start,))]
    while stack:
        path, chain = stack.pop()
        outside, inside = imports_of(path)
        for bad in sorted(outside & FORBIDDEN):
            found.append(" → ".join(str(p.relative_to(ROOT.parent)) for p in chain) + f" → {bad}")
        for f in sorted(inside - seen):
            seen.add(f)
            stack.append((f, (*chain, f)))
    return found


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_does_no_io(path: Path) -> None:
    bad = forbidden_paths(path)
    assert not bad, "keep it sans-I/O:\n" + "\n".join(bad)


def test_the_walk_sees_indirect_imports(tmp_path: Path) -> None:
    # The boundary is only as good as the walk: one ztun module that imports an I/O module
    # must make every pure module importing it fail.
    mixed = ROOT / "inbound" / "mixed.py"
    assert any(bad.endswith("asyncio") for bad in forbidden_paths(mixed))
    assert len(pure_files()) >= 30
