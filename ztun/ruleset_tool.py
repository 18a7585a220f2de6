"""The work behind `ztun rule-set`: read a rule-set file in any format, say which of its rules
a name or an address hits, and write sets as sing-box source JSON or binary `.srs`.

I/O: reads and writes the files it is given (cli.py only parses arguments and prints).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztun.errors import ConfigError, ZtunError
from ztun.provider.ruleset import guess_format, parse_rule_set_bytes, read_rule_set_file
from ztun.query import parse_query
from ztun.route.compile import compile_headless_rules
from ztun.route.srs import read_srs, source_json, write_srs


class RuleSetToolError(ZtunError):
    """A `ztun rule-set` command that cannot be carried out; the message says why."""


@dataclass
class LoadedSet:
    """A rule-set file's rules (sing-box source form), its format and what was skipped."""

    path: Path
    fmt: str
    rules: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def load(path: Path, fmt: str | None = None, behavior: str = "classical") -> LoadedSet:
    """Read `path` in format `fmt` (None: binary for a .srs name or `SRS` bytes, else source)."""
    data = read_rule_set_file(path)
    chosen = fmt or guess_format(str(path), data)
    try:
        parsed = parse_rule_set_bytes(data, chosen, behavior)
    except ZtunError as exc:
        raise RuleSetToolError(f"{path}: {exc}") from None
    return LoadedSet(path, chosen, parsed.rules, parsed.warnings)


def match(loaded: LoadedSet, query: str, *, port: int = 0, network: str = "tcp") -> list[int]:
    """Indexes of the top-level rules of `loaded` that match `query` (a domain or an IP), each
    rule on its own, as `sing-box rule-set match` reports them."""
    meta = parse_query(query, port=port, network=network)
    hits = []
    for index, rule in enumerate(loaded.rules):
        try:
            matcher = compile_headless_rules([rule], path=("rules", index))
        except ConfigError as exc:
            problems = "; ".join(d.message for d in exc.diagnostics)
            raise RuleSetToolError(f"{loaded.path}: rules[{index}]: {problems}") from None
        if matcher.match(meta):
            hits.append(index)
    return hits


def describe(rule: dict[str, Any]) -> str:
    """One rule as one line of JSON."""
    return json.dumps(rule, ensure_ascii=False, separators=(", ", ": "))


def to_binary(rules: Sequence[dict[str, Any]], version: int = 2) -> bytes:
    try:
        return write_srs(rules, version)
    except ZtunError as exc:
        raise RuleSetToolError(str(exc)) from None


def decompile(path: Path) -> tuple[str, list[str]]:
    """A .srs file → sing-box source JSON (every field sing-box wrote, also those ztun cannot
    evaluate) and warnings."""
    data = read_rule_set_file(path)
    try:
        decoded = read_srs(data)
    except ZtunError as exc:
        raise RuleSetToolError(f"{path}: {exc}") from None
    warnings = []
    if decoded.adguard:
        warnings.append("AdGuard patterns were written as the domain, domain_suffix and "
                        "domain_regex entries that match the same names")  # fmt: skip
    return source_json(decoded.rules, decoded.version), warnings


def to_source(rules: Sequence[dict[str, Any]], version: int = 2) -> str:
    return source_json(rules, version)


def default_output(source: Path, suffix: str) -> Path:
    """sing-box's default: the input's name with `suffix` instead of its extension."""
    return source.with_suffix(suffix) if source.suffix else Path(f"{source}{suffix}")
