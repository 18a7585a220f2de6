"""From a config file to a compiled router, with every mistake found on the way.

This is the pipeline behind `ztun check`, `ztun route` and `ztun run`: load (YAML, includes,
${VAR}) → validate (schema, references) → open the GeoIP database and load rule sets → compile
the rules → typed options (ztun.config.options). Each stage adds diagnostics; each diagnostic
gets the file:line:column where the offending value was written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ztun.config.loader import LoadedConfig, load_config
from ztun.config.options import Options, build_options
from ztun.config.unexecuted import not_executed
from ztun.config.validate import format_path, schema_passes, validate
from ztun.dns.router import DnsRouter
from ztun.errors import ConfigError, Diagnostic, ZtunError
from ztun.provider.validated import config_key, passed_before, remember
from ztun.route.compile import as_list, compile_dns_router, compile_router
from ztun.route.router import Router
from ztun.runtime.child import in_child


@dataclass
class CheckResult:
    loaded: LoadedConfig | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    router: Router | None = None
    #: the typed config, built once the config has no errors
    options: Options | None = None
    #: the compiled dns.rules, when the config has DNS servers and no errors
    dns_router: DnsRouter | None = None
    #: remote rule sets for `ztun run` to revalidate in the background (online loads only)
    rule_set_refresh: list[Any] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]


def _open_geoip(loaded: LoadedConfig, diagnostics: list[Diagnostic]) -> Any:
    route = loaded.data.get("route")
    geo = route.get("geoip") if isinstance(route, Mapping) else None
    if not isinstance(geo, Mapping) or not geo.get("path"):
        return None
    from ztun.route.geoip import open_geoip

    try:
        return open_geoip(loaded.resolve_path(str(geo["path"])))
    except ZtunError as exc:
        diagnostics.append(Diagnostic(str(exc), ("route", "geoip", "path")))
    return None


def _load_rule_sets(
    loaded: LoadedConfig, diagnostics: list[Diagnostic], refresh: list[Any], *, offline: bool
) -> dict[str, list[Any]]:
    route = loaded.data.get("route")
    entries = as_list(route.get("rule_set")) if isinstance(route, Mapping) else []
    if not entries:
        return {}
    from ztun.provider.ruleset import default_cache_dir, load_rule_sets

    result = load_rule_sets(
        [e for e in entries if isinstance(e, Mapping)],
        base_dir=Path(loaded.base_dir),
        cache_dir=default_cache_dir(),
        offline=offline,
        outbounds=[o for o in as_list(loaded.data.get("outbounds")) if isinstance(o, Mapping)],
        # online is `ztun run`: a cached copy is used at once, and refreshed in the background
        refresh_in_background=not offline,
    )
    diagnostics.extend(result.diagnostics)
    refresh.extend(result.refresh)
    return dict(result.sets)


def _overlaps(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """One path lies inside the other (or they are the same)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _merge_compile(diagnostics: list[Diagnostic], compiled: list[Diagnostic]) -> list[Diagnostic]:
    """Compiler findings the validator has not already reported, in config words.

    The schema catches many of the same mistakes (a malformed port range, say); one mistake
    should give one message. Compiler warnings are dropped while errors exist: they reason
    about rules that may not be what the user meant yet.
    """
    flagged = [d.path for d in diagnostics if d.severity == "error" and d.path]
    has_errors = any(d.severity == "error" for d in diagnostics + compiled)
    merged = []
    for d in compiled:
        if d.severity == "warning" and has_errors:
            continue
        if d.severity == "error" and any(_overlaps(d.path, p) for p in flagged):
            continue
        message = f"{format_path(d.path)}: {d.message}" if d.path else d.message
        merged.append(Diagnostic(message, d.path, d.mark, d.severity))
    return merged


def _place(loaded: LoadedConfig | None, diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    """Give each diagnostic its mark, drop repeats, and sort by where they were written."""
    placed: list[Diagnostic] = []
    seen: set[tuple[object, ...]] = set()
    for d in diagnostics:
        if d.mark is None and loaded is not None:
            d = Diagnostic(d.message, d.path, loaded.mark_for(d.path), d.severity)
        key = (d.mark, d.message, d.severity)
        if key in seen:
            continue
        seen.add(key)
        placed.append(d)
    files = loaded.files if loaded is not None else []

    def order(d: Diagnostic) -> tuple[int, int, int]:
        if d.mark is None:
            return (len(files), 0, 0)
        rank = files.index(d.mark.file) if d.mark.file in files else len(files)
        return (rank, d.mark.line, d.mark.column)

    return sorted(placed, key=order)


def _redirect_unavailable(data: Any) -> list[Diagnostic]:
    """auto_redirect where this machine has no nftables: one warning per tun inbound asking
    for it (`ztun run` then keeps TCP on the TUN)."""
    inbounds = data.get("inbounds") if isinstance(data, dict) else None
    wanted = [i for i, ib in enumerate(inbounds if isinstance(inbounds, list) else [])
              if isinstance(ib, dict) and ib.get("type") == "tun"
              and ib.get("auto_redirect") is True and ib.get("auto_route") is True]  # fmt: skip
    if not wanted:
        return []
    from ztun.platform.linux.nftables import unavailable

    why = unavailable()
    if why is None:
        return []
    out = []
    for i in wanted:
        path = ("inbounds", i, "auto_redirect")
        message = (f"{format_path(path)}: nftables cannot be used here ({why}), so `ztun run` "
                   "keeps TCP on the TUN")  # fmt: skip
        out.append(Diagnostic(message, path, severity="warning"))
    return out


def _cache_dir() -> Path:
    from ztun.provider.ruleset import default_cache_dir

    return default_cache_dir()


def _schema_checked_in_child(loaded: LoadedConfig, cache_dir: Path, key: str) -> bool:
    """A config's first `ztun run`: the schema check in a forked child (ztun.runtime.child),
    which leaves the marker when the schema finds nothing; True when it did. jsonschema
    (5 MiB) then never enters this process; a config with findings is checked here again, to
    report them."""

    def check() -> bool:
        if not schema_passes(loaded.data):
            return False
        remember(cache_dir, key)
        return True

    return in_child(check) and passed_before(cache_dir, key)


def check_file(
    path: str | Path, *, offline: bool = True, trust_validated: bool = False
) -> CheckResult:
    """Every diagnostic for the config at `path`, and its router when there are no errors.

    `offline=True` (what `ztun check` does) never downloads remote rule sets: their cached copy
    is checked, or a warning says they were not. `trust_validated=True` (`ztun run`) skips the
    JSON schema for a config that passed it unchanged before (ztun.provider.validated).
    """
    try:
        loaded = load_config(path, env=os.environ)
    except ConfigError as exc:
        return CheckResult(None, _place(None, exc.diagnostics))
    diagnostics = list(loaded.diagnostics)
    key = config_key(loaded.data) if trust_validated else None
    cache_dir = _cache_dir()
    known = key is not None and (passed_before(cache_dir, key)
                                 or _schema_checked_in_child(loaded, cache_dir, key))  # fmt: skip
    found = validate(loaded, schema=not known)
    diagnostics.extend(found)
    # No child (threads, no fork): a marker only when the schema found nothing, i.e. no
    # findings beyond the other checks'.
    if (key is not None and not known
            and len(found) == len(validate(loaded, schema=False))):  # fmt: skip
        remember(cache_dir, key)
    diagnostics.extend(
        Diagnostic(message, path, severity="warning") for path, message in not_executed(loaded.data)
    )
    diagnostics.extend(_redirect_unavailable(loaded.data))
    errors_before = len(diagnostics)
    geoip = _open_geoip(loaded, diagnostics)
    geoip_failed = len(diagnostics) > errors_before
    # Rule sets load even when the schema found mistakes elsewhere: a missing file is one more
    # thing the user wants to hear about in the same run.
    refresh: list[Any] = []
    rule_sets = _load_rule_sets(loaded, diagnostics, refresh, offline=offline)
    router, compile_diagnostics = compile_router(
        loaded.data, rule_sets=rule_sets, geoip=geoip, report_references=False,
        geoip_failed=geoip_failed,
    )  # fmt: skip
    dns_router = None
    if loaded.data.get("dns") is not None:
        dns_router, dns_diagnostics = compile_dns_router(
            loaded.data, rule_sets=rule_sets, geoip=geoip, report_references=False,
            geoip_failed=geoip_failed, mode=router.mode if router is not None else None,
        )  # fmt: skip
        compile_diagnostics = compile_diagnostics + dns_diagnostics
    diagnostics.extend(_merge_compile(diagnostics, compile_diagnostics))
    options = None
    if not any(d.severity == "error" for d in diagnostics):
        # Only validated data is converted: the conversions trust the schema's shapes.
        try:
            options = build_options(loaded.data)
        except ConfigError as exc:
            diagnostics.extend(exc.diagnostics)
    result = CheckResult(loaded, _place(loaded, diagnostics))
    if not result.errors:
        result.router = router
        result.options = options
        result.dns_router = dns_router
        result.rule_set_refresh = refresh
    return result


class Compiled(NamedTuple):
    """What `ztun run` and `ztun route` start from."""

    loaded: LoadedConfig
    options: Options
    router: Router
    #: what `ztun check` would warn about, for `ztun run` to log once
    warnings: list[Diagnostic]
    #: the compiled dns.rules (None without DNS servers)
    dns_router: DnsRouter | None = None
    #: remote rule sets to revalidate in the background (provider.ruleset.RuleSetRefresher)
    rule_set_refresh: tuple[Any, ...] = ()


def load_and_compile(path: str | Path, *, offline: bool = False) -> Compiled:
    """The loaded config, its options and its router; raises ConfigError listing every error."""
    result = check_file(path, offline=offline, trust_validated=True)
    if result.errors or result.loaded is None or result.router is None or result.options is None:
        raise ConfigError(result.errors or result.diagnostics)
    return Compiled(
        result.loaded, result.options, result.router, result.warnings, result.dns_router,
        tuple(result.rule_set_refresh),
    )  # fmt: skip
