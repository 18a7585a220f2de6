"""Checking a loaded config: the JSON schema plus the cross-references the schema cannot express.

Owns the translation of schema errors into one clear Diagnostic each, placed at the offending key
(with "did you mean" for misspelt keys, tags and enum values), and the semantic checks that
sing-box's own `check` misses: references to missing tags, duplicate tags, a config without
outbounds, DNS defaults that cannot work, TUN prefixes too small for the system stack, a
`routing_mark` that auto_route would send back into the TUN, and a mixed inbound that would be
an open proxy beyond loopback, and a Clash API beyond loopback without a secret.

Value-level checks (CIDR parsing, regex compiling, port-range bounds, GeoIP files) belong to the
rule compiler. `validate` never raises, whatever shape the data has.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterator, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from ztun.address import is_loopback
from ztun.config.legacy_dns import is_legacy_server, legacy_server, typed_text
from ztun.config.loader import LoadedConfig
from ztun.config.schema import SCHEMA_PATH
from ztun.config.schema import schema as load_schema
from ztun.errors import ConfigPath, Diagnostic, Mark, Severity

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError

__all__ = ["SCHEMA_PATH", "format_path", "load_schema", "validate"]

_Finding = tuple[ConfigPath, str, Severity]

_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "nothing",
}


@cache
def _validator() -> Draft202012Validator:
    # Imported here: jsonschema and what it brings are 5 MiB of RSS that a `ztun run` of a
    # config the schema passed before does not need (check.py, provider/validated.py).
    from jsonschema import Draft202012Validator

    return Draft202012Validator(load_schema())


def schema_passes(data: Any) -> bool:
    """Whether the JSON schema finds nothing at all in `data` (stops at the first finding; an
    error while checking counts as one)."""
    try:
        return next(iter(_schema_findings(data)), None) is None
    except Exception:  # RecursionError and the rest: `validate` reports them
        return False


def validate(loaded: LoadedConfig, *, schema: bool = True) -> list[Diagnostic]:
    """Every schema and reference problem of the merged config, sorted by position.

    Does not repeat `loaded.diagnostics` (problems found while loading): callers report both.
    `schema=False` leaves out the JSON schema (for data that passed it before, unchanged); the
    other checks always run.
    """
    findings: list[_Finding] = []
    try:
        if schema:
            findings.extend(_schema_findings(loaded.data))
    except RecursionError:
        findings.append(((), "the config is nested too deeply to check", "error"))
    except Exception as exc:  # never raise: report, and let the other checks run
        findings.append(((), f"internal error while checking the schema: {exc!r}", "error"))
    checks = (
        _duplicate_tags,
        _references,
        _groups,
        _outbound_presence,
        _dns_defaults,
        _dns_legacy_servers,
        _tun_prefixes,
        _auto_redirect_needs_route,
        _listen_clashes,
        _looping_marks,
        _unmarked_resolver,
        _open_proxies,
        _open_api,
        _credential_bytes,
    )
    for check in checks:
        try:
            findings.extend(check(loaded.data, loaded))
        except Exception as exc:  # a bug in one check must not hide the others' findings
            findings.append(((), f"internal error while checking the config: {exc!r}", "error"))
    out: list[Diagnostic] = []
    seen: set[tuple[ConfigPath, str]] = set()
    for path, message, severity in findings:
        if (path, message) in seen:
            continue
        seen.add((path, message))
        out.append(Diagnostic(message, path, loaded.mark_for(path), severity))
    order = {name: index for index, name in enumerate(loaded.files)}

    def position(d: Diagnostic) -> tuple[int, int, int, int]:
        if d.mark is None:
            return (1, 0, 0, 0)
        return (0, order.get(d.mark.file, len(order)), d.mark.line, d.mark.column)

    out.sort(key=position)
    return out


# --- wording --------------------------------------------------------------------------------------


def format_path(path: Sequence[str | int]) -> str:
    """A config path in config words: ("route", "rules", 3, "port") -> "route.rules[3].port"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "config"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(word: Any, candidates: Sequence[Any]) -> str:
    if not isinstance(word, str):
        return ""
    names = [str(c) for c in candidates]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if not close:
        close = [n for n in names if n.lower() == word.lower()]
    return f"; did you mean {close[0]!r}?" if close else ""


# --- schema ---------------------------------------------------------------------------------------


def _schema_findings(data: Any) -> Iterator[_Finding]:
    for error in _validator().iter_errors(data):
        yield from _explain(error)


def _x_error(schema: Any, instance: Any) -> str | None:
    if isinstance(schema, dict) and isinstance(schema.get("x-error"), str):
        return str(schema["x-error"]).replace("{value}", _show(instance))
    return None


def _pick(error: ValidationError) -> list[ValidationError]:
    """The sub-errors of an anyOf/oneOf that say most about what is wrong, or none.

    An empty list means the alternatives as a whole explain it best (the wrapper's x-error, or
    a list of the types that would have been accepted).
    """
    subs = list(error.context or [])
    if not subs:
        return []
    depth = len(error.absolute_path)
    deeper = [e for e in subs if len(e.absolute_path) > depth]
    if deeper:
        # a branch got further into the value (e.g. the list form of a listable): report every
        # problem that branch found, there
        best = max(deeper, key=lambda e: (len(e.absolute_path), e.validator != "type"))
        branch = best.relative_schema_path[0] if best.relative_schema_path else None
        return [e for e in deeper if (e.relative_schema_path or [None])[0] == branch]
    specific = [e for e in subs if e.validator != "type"]
    with_text = [e for e in specific if _x_error(e.schema, e.instance)]
    if with_text:
        return with_text[:1]
    schema = error.schema if isinstance(error.schema, dict) else {}
    if specific and (schema.get("x-listable") or not _x_error(schema, error.instance)):
        # a single value of the right type but a wrong value: the item's own error is precise
        return specific[:1]
    return []


def _explain(error: ValidationError) -> Iterator[_Finding]:
    path: ConfigPath = tuple(error.absolute_path)
    where = format_path(path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    instance = error.instance
    kind = error.validator

    if kind in ("anyOf", "oneOf"):
        chosen = _pick(error)
        if chosen:
            for sub in chosen:
                yield from _explain(sub)
            return
        text = _x_error(schema, instance)
        if text is None:
            types = [s.get("type") for s in error.validator_value if isinstance(s, dict)]
            words = [_TYPE_WORDS.get(t, str(t)) for t in types if isinstance(t, str)]
            text = f"expected {' or '.join(words) or 'another value'}, got {_show(instance)}"
        yield (path, f"{where}: {text}", "error")
        return

    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = list(schema.get("properties", {}))
        hints = schema.get("x-hints", {}) if isinstance(schema.get("x-hints"), dict) else {}
        for key in instance:
            if key in allowed:
                continue
            message = f"{where}: unknown key {key!r}"
            if key in hints:
                message += f": {hints[key]}"
            else:
                suggestion = _did_you_mean(key, allowed)
                if suggestion:
                    message += suggestion
                elif len(allowed) <= 16:
                    message += f" (known keys: {', '.join(allowed)})"
            yield ((*path, key), message, "error")
        return

    if kind == "required" and isinstance(instance, dict):
        custom = _x_error(schema, instance)
        for name in error.validator_value:
            if name not in instance:
                text = custom or f"missing required key {name!r}"
                yield (path, f"{where}: {text}", "error")
        return

    custom = _x_error(schema, instance)
    if custom is not None:
        yield (path, f"{where}: {custom}", "error")
        return

    value = error.validator_value
    if kind == "type":
        wanted = value if isinstance(value, list) else [value]
        words = " or ".join(_TYPE_WORDS.get(str(t), str(t)) for t in wanted)
        text = f"expected {words}, got {_show(instance)}"
    elif kind == "enum":
        options = ", ".join(str(v) for v in value)
        text = f"{_show(instance)} is not one of: {options}{_did_you_mean(instance, value)}"
    elif kind == "const":
        text = f"{_show(instance)} must be {value!r}"
    elif kind == "minimum":
        text = f"{_show(instance)} is below the minimum {value}"
    elif kind == "maximum":
        text = f"{_show(instance)} is above the maximum {value}"
    elif kind == "minLength":
        text = "must not be empty" if value == 1 else f"needs at least {value} characters"
    elif kind == "minItems":
        text = f"needs at least {value} item{'s' if value != 1 else ''}"
    elif kind == "pattern":
        text = f"{_show(instance)} does not match the pattern {value}"
    elif kind in ("not", "false"):
        text = "is not allowed here"
    else:
        text = error.message
    yield (path, f"{where}: {text}", "error")


# --- semantic checks ------------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _listable(value: Any, path: ConfigPath) -> Iterator[tuple[Any, ConfigPath]]:
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield item, (*path, index)
    elif value is not None:
        yield value, path


def _tagged(items: Any, path: ConfigPath) -> Iterator[tuple[str, ConfigPath, dict[str, Any]]]:
    for index, item in enumerate(_list(items)):
        if isinstance(item, dict) and isinstance(item.get("tag"), str):
            yield item["tag"], (*path, index), item


_TAGGED_LISTS: tuple[tuple[ConfigPath, str], ...] = (
    (("inbounds",), "inbound"),
    (("outbounds",), "outbound"),
    (("route", "rule_set"), "rule set"),
    (("dns", "servers"), "DNS server"),
)


def _get(data: Any, path: ConfigPath) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)  # type: ignore[call-overload]
    return data


def _where(loaded: LoadedConfig, path: ConfigPath) -> str:
    mark: Mark | None = loaded.mark_for(path)
    return f"{format_path(path)} ({mark})" if mark else format_path(path)


def _duplicate_tags(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    for list_path, what in _TAGGED_LISTS:
        first: dict[str, ConfigPath] = {}
        for tag, item_path, _ in _tagged(_get(data, list_path), list_path):
            if tag in first:
                yield (
                    (*item_path, "tag"),
                    f"{format_path((*item_path, 'tag'))}: duplicate {what} tag {tag!r}; "
                    f"{_where(loaded, (*first[tag], 'tag'))} already uses it",
                    "error",
                )
            else:
                first[tag] = item_path


def _unknown(
    value: Any, path: ConfigPath, known: list[str], what: str, severity: Severity = "error"
) -> Iterator[_Finding]:
    known = list(dict.fromkeys(known))
    for item, item_path in _listable(value, path):
        if not isinstance(item, str) or item in known:
            continue
        message = f"{format_path(item_path)}: no {what} tagged {item!r}"
        suggestion = _did_you_mean(item, known)
        if suggestion:
            message += suggestion
        elif known:
            message += f" ({what}s: {', '.join(known)})"
        else:
            message += f" (there are no {what}s)"
        if severity == "warning":
            message += "; this rule can never match"
        yield (item_path, message, severity)


def _walk_rules(rules: Any, path: ConfigPath) -> Iterator[tuple[dict[str, Any], ConfigPath, bool]]:
    """Every rule with its path; the flag says whether it is a top-level rule (with an action)."""
    stack: list[tuple[Any, ConfigPath, bool]] = [
        (rule, (*path, index), True) for index, rule in enumerate(_list(rules))
    ]
    stack.reverse()
    while stack:
        rule, rule_path, top = stack.pop()
        if not isinstance(rule, dict):
            continue
        yield rule, rule_path, top
        if rule.get("type") == "logical":
            nested = [
                (sub, (*rule_path, "rules", index), False)
                for index, sub in enumerate(_list(rule.get("rules")))
            ]
            stack.extend(reversed(nested))


def _references(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    del loaded
    outbounds = [t for t, _, _ in _tagged(_get(data, ("outbounds",)), ("outbounds",))]
    inbounds = [t for t, _, _ in _tagged(_get(data, ("inbounds",)), ("inbounds",))]
    rule_sets = [t for t, _, _ in _tagged(_get(data, ("route", "rule_set")), ())]
    servers = [t for t, _, _ in _tagged(_get(data, ("dns", "servers")), ())]

    for section, target, known, what in (
        ("route", "outbound", outbounds, "outbound"),
        ("dns", "server", servers, "DNS server"),
    ):
        rules_path: ConfigPath = (section, "rules")
        for rule, path, top in _walk_rules(_get(data, rules_path), rules_path):
            if top and target in rule:
                yield from _unknown(rule[target], (*path, target), known, what)
            if "rule_set" in rule:
                yield from _unknown(rule["rule_set"], (*path, "rule_set"), rule_sets, "rule set")
            if "inbound" in rule:
                yield from _unknown(
                    rule["inbound"], (*path, "inbound"), inbounds, "inbound", "warning"
                )
            if section == "dns" and "outbound" in rule:
                # a match item here: the outbound the query's flow was routed to
                yield from _unknown(
                    rule["outbound"], (*path, "outbound"), [*outbounds, "any"], "outbound",
                    "warning",
                )  # fmt: skip

    final = _get(data, ("route", "final"))
    if final is not None:
        yield from _unknown(final, ("route", "final"), outbounds, "outbound")
    dns_final = _get(data, ("dns", "final"))
    if dns_final is not None:
        yield from _unknown(dns_final, ("dns", "final"), servers, "DNS server")
    for _, path, server in _tagged(_get(data, ("dns", "servers")), ("dns", "servers")):
        if "detour" in server:
            yield from _unknown(server["detour"], (*path, "detour"), outbounds, "outbound")
    for index, rule_set in enumerate(_list(_get(data, ("route", "rule_set")))):
        if isinstance(rule_set, dict) and "download_detour" in rule_set:
            path = ("route", "rule_set", index, "download_detour")
            yield from _unknown(rule_set["download_detour"], path, outbounds, "outbound")


#: Outbound types that are groups of other outbounds (sing-box's `selector` and `urltest`).
GROUP_TYPES = ("selector", "urltest")


def _groups(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    """Group outbounds: members that exist, a `default` among them, no member twice, and no
    cycle (a group that reaches itself through its members could never pick a real one)."""
    outbounds = _get(data, ("outbounds",))
    known = [t for t, _, _ in _tagged(outbounds, ("outbounds",))]
    #: group tag → [(member tag, path of that member item)]
    graph: dict[str, list[tuple[str, ConfigPath]]] = {}
    for tag, path, item in _tagged(outbounds, ("outbounds",)):
        if item.get("type") not in GROUP_TYPES or not isinstance(item.get("outbounds"), list):
            continue
        members_path: ConfigPath = (*path, "outbounds")
        members = item["outbounds"]
        yield from _unknown(members, members_path, known, "outbound")
        seen: set[str] = set()
        edges = graph.setdefault(tag, [])
        for index, member in enumerate(members):
            if not isinstance(member, str):
                continue
            if member in seen:
                yield ((*members_path, index),
                       f"{format_path((*members_path, index))}: {member!r} is already a member "
                       f"of group {tag!r}", "warning")  # fmt: skip
            seen.add(member)
            edges.append((member, (*members_path, index)))
        default = item.get("default")
        if isinstance(default, str) and default not in members:
            yield ((*path, "default"),
                   f"{format_path((*path, 'default'))}: {default!r} is not a member of group "
                   f"{tag!r} (members: {', '.join(map(str, members))})", "error")  # fmt: skip
    yield from _group_cycles(graph, loaded)


def _group_cycles(
    graph: dict[str, list[tuple[str, ConfigPath]]], loaded: LoadedConfig
) -> Iterator[_Finding]:
    """Each cycle once, reported at the member item that closes it."""
    done: set[str] = set()
    for start in graph:
        if start in done:
            continue
        # Iterative depth-first walk; `trail` is the current path of groups.
        trail: list[str] = [start]
        on_trail = {start}
        stack = [iter(graph[start])]
        while stack:
            step = next(stack[-1], None)
            if step is None:
                stack.pop()
                left = trail.pop()
                done.add(left)
                on_trail.discard(left)
                continue
            member, member_path = step
            if member in on_trail:
                cycle = [*trail[trail.index(member):], member]
                message = (f"{format_path(member_path)}: group cycle {' → '.join(cycle)}: "
                           "a group cannot contain itself, directly or through other groups")
                yield (member_path, message, "error")
            elif member in graph and member not in done:
                trail.append(member)
                on_trail.add(member)
                stack.append(iter(graph[member]))


def _outbound_presence(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    del loaded
    outbounds = _get(data, ("outbounds",))
    if outbounds is None or outbounds == []:
        yield (
            ("outbounds",),
            "no outbounds: add at least one (e.g. {type: direct, tag: direct})",
            "error",
        )
    elif isinstance(outbounds, list) and _get(data, ("route", "final")) is None:
        first = outbounds[0]
        if not (isinstance(first, dict) and isinstance(first.get("tag"), str)):
            yield (
                ("outbounds", 0),
                "outbounds[0]: route.final is not set, so the first outbound is the default, "
                "but it has no tag; add a tag or set route.final",
                "error",
            )


def _dns_defaults(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    del loaded
    dns = _dict(_get(data, ("dns",)))
    servers = list(_tagged(dns.get("servers"), ("dns", "servers")))
    kinds = {tag: _server_kind(server) for tag, _, server in servers}
    final = dns.get("final")
    if isinstance(final, str):
        if kinds.get(final) == "fakeip":
            yield (
                ("dns", "final"),
                f"dns.final: {final!r} is a fakeip server, which cannot be "
                "the default: choose a server that resolves for real",
                "error",
            )
    elif final is None and servers and kinds.get(servers[0][0]) == "fakeip":
        yield (
            (*servers[0][1], "type"),
            f"{format_path(servers[0][1])}: the first DNS server is "
            "the default when dns.final is not set, and a fakeip server cannot be the default: "
            "set dns.final or put another server first",
            "error",
        )
    if _list(dns.get("rules")) and not _list(dns.get("servers")):
        yield (
            ("dns", "rules"),
            "dns.rules: there are no dns.servers for the rules to use",
            "error",
        )


def _server_kind(server: dict[str, Any]) -> Any:
    if is_legacy_server(server):
        try:
            return legacy_server(server).get("type")
        except ValueError:
            return None
    return server.get("type")


def _dns_legacy_servers(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    """The address form read as the typed one: say what it became, or why it cannot be."""
    del loaded
    for index, server in enumerate(_list(_get(data, ("dns", "servers")))):
        if not is_legacy_server(server) or not isinstance(server["address"], str):
            continue  # not the legacy form, or the schema reports the address
        path: ConfigPath = ("dns", "servers", index, "address")
        try:
            text = typed_text(server)
        except ValueError as exc:
            yield (path, f"{format_path(path)}: {exc}", "error")
            continue
        yield (
            path,
            f"{format_path(path)}: the address: form is read as {text} (write that; "
            "the address form is deprecated in sing-box)",
            "warning",
        )


def _tun_prefixes(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    del loaded
    for index, inbound in enumerate(_list(_get(data, ("inbounds",)))):
        if not isinstance(inbound, dict) or inbound.get("type") != "tun":
            continue
        seen_versions: set[int] = set()
        base: ConfigPath = ("inbounds", index, "address")
        for item, path in _listable(inbound.get("address"), base):
            if not isinstance(item, str) or "/" not in item:
                continue  # the schema reports an address without a prefix length
            try:
                iface = ipaddress.ip_interface(item)
            except ValueError:
                continue  # malformed prefixes are reported by the schema and the compiler
            if iface.version in seen_versions:
                continue
            # the system stack uses the first prefix of each family: address A and A+1
            seen_versions.add(iface.version)
            network = iface.network
            if network.prefixlen == network.max_prefixlen:
                wider = 30 if iface.version == 4 else 126
                yield (
                    path,
                    f"{format_path(path)}: {item} leaves no second address for the "
                    f"system stack, which needs {iface.ip + 1} too: use a /{wider} such as "
                    f"{iface.ip}/{wider}",
                    "error",
                )
                continue
            try:
                peer = iface.ip + 1
            except ValueError:  # the last address of the family has no successor
                peer = None
            if peer is None or peer not in network:
                first_host = network.network_address + 1
                yield (
                    path,
                    f"{format_path(path)}: the system stack needs the address after "
                    f"{iface.ip}, which is outside {network}: use an earlier address such as "
                    f"{first_host}/{network.prefixlen}",
                    "error",
                )


def _auto_redirect_needs_route(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    """auto_redirect redirects what auto_route sends into the TUN: without it, nothing."""
    del loaded
    for index, inbound in enumerate(_list(_get(data, ("inbounds",)))):
        if not isinstance(inbound, dict) or inbound.get("type") != "tun":
            continue
        if inbound.get("auto_redirect") is True and inbound.get("auto_route") is not True:
            path: ConfigPath = ("inbounds", index, "auto_redirect")
            yield (
                path,
                f"{format_path(path)}: auto_redirect needs auto_route: true (it redirects the "
                "TCP that auto_route sends into the TUN)",
                "error",
            )


def _listen_clashes(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    used: dict[tuple[str, int], ConfigPath] = {}
    for index, inbound in enumerate(_list(_get(data, ("inbounds",)))):
        if not isinstance(inbound, dict) or inbound.get("type") != "mixed":
            continue
        port = inbound.get("listen_port")
        listen = inbound.get("listen", "127.0.0.1")
        if not isinstance(port, int) or isinstance(port, bool) or not isinstance(listen, str):
            continue
        path: ConfigPath = ("inbounds", index, "listen_port")
        if (listen, port) in used:
            yield (
                path,
                f"{format_path(path)}: {listen}:{port} is already used by "
                f"{_where(loaded, used[(listen, port)])}",
                "error",
            )
        else:
            used[(listen, port)] = path


#: auto_route's fwmark when `route.default_mark` is absent (platform/linux/routes.py uses it).
DEFAULT_AUTO_ROUTE_MARK = 0x2024


def _mark_value(value: Any) -> int | None:
    try:
        if isinstance(value, str):
            return int(value, 0)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    except ValueError:
        pass
    return None  # the schema reports it


def _looping_marks(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    """A routing_mark that auto_route's rules send into the TUN.

    auto_route installs, per family: 9000 `fwmark M lookup main` (M = route.default_mark,
    0x2024 when absent; an exact match of all 32 bits), 9001 `to <route_exclude_address>
    lookup main`, 9002 `lookup main suppress_prefixlength 0` (not with strict_route) and 9003
    `lookup 2022` (the TUN). A socket with mark 0 gets M; with M it goes to main; with any other
    mark it skips rule 9000 and every destination that is neither excluded nor on a more
    specific main route goes into the TUN, where ztun routes it again out of the same outbound:
    a loop. bind_interface escapes it (no route of table 2022 leaves by that interface).
    """
    del loaded
    tuns = [
        (i, t)
        for i, t in enumerate(_list(_get(data, ("inbounds",))))
        if isinstance(t, dict) and t.get("type") == "tun" and t.get("auto_route") is True
    ]
    if not tuns:
        return
    own = _mark_value(_get(data, ("route", "default_mark"))) or DEFAULT_AUTO_ROUTE_MARK
    tun_tag = tuns[0][1].get("tag") or f"inbounds[{tuns[0][0]}]"
    for index, outbound in enumerate(_list(_get(data, ("outbounds",)))):
        if not isinstance(outbound, dict) or "routing_mark" not in outbound:
            continue
        mark = _mark_value(outbound["routing_mark"])
        if mark is None or mark in (0, own) or outbound.get("bind_interface"):
            continue
        path: ConfigPath = ("outbounds", index, "routing_mark")
        yield (
            path,
            f"{format_path(path)}: mark {mark:#x} loops into the TUN: with auto_route on tun "
            f"inbound {tun_tag!r}, only fwmark {own:#x} (route.default_mark) is sent to the main "
            f"table (ip rule 9000, an exact match); a socket with any other non-zero mark "
            f"falls through to rule 9003, which routes it into the TUN, where ztun sends it out "
            f"through this outbound again. Leave routing_mark out (ztun's sockets then carry "
            f"{own:#x}), set it to {own:#x}, or also set bind_interface",
            "error",
        )


def _unmarked_resolver(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    """A `local` DNS server asks the system resolver, whose queries carry no mark: under
    auto_route they enter the TUN, and a hijack-dns rule hands them back to ztun's DNS."""
    del loaded
    auto_route = any(
        isinstance(t, dict) and t.get("type") == "tun" and t.get("auto_route") is True
        for t in _list(_get(data, ("inbounds",)))
    )
    hijacks = any(
        rule.get("action") == "hijack-dns"
        for rule, _, _ in _walk_rules(_get(data, ("route", "rules")), ("route", "rules"))
    )
    if not (auto_route and hijacks):
        return
    for index, server in enumerate(_list(_get(data, ("dns", "servers")))):
        if isinstance(server, dict) and server.get("type") == "local":
            path: ConfigPath = ("dns", "servers", index)
            yield (
                path,
                f"{format_path(path)}: a local server asks the system resolver, whose queries "
                "ztun cannot mark: under auto_route they enter the TUN, and the hijack-dns rule "
                "hands them back to ztun's DNS (a loop until the query times out if this "
                "server answers them). Use a udp/tcp/tls/https server, whose queries carry "
                "the mark",
                "warning",
            )


def _open_proxies(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    """A mixed inbound beyond loopback without users is an open proxy; it must be asked for."""
    del loaded
    for index, inbound in enumerate(_list(_get(data, ("inbounds",)))):
        if not isinstance(inbound, dict) or inbound.get("type") != "mixed":
            continue
        listen = inbound.get("listen", "127.0.0.1")
        if not isinstance(listen, str) or is_loopback(listen) or inbound.get("users"):
            continue
        if inbound.get("allow_unauthenticated_remote") is True:
            continue
        path: ConfigPath = ("inbounds", index, "listen")
        yield (
            path,
            f"{format_path(path)}: {listen} is reachable from other hosts and this inbound has "
            f"no users: anyone who reaches it could use this host as a proxy, to its own "
            f"loopback services, its LAN and cloud metadata addresses (169.254.169.254). Add "
            f"users, listen on 127.0.0.1, or set allow_unauthenticated_remote: true on the "
            f"inbound to allow it",
            "error",
        )


def split_controller(text: str) -> tuple[str, int] | None:
    """`external_controller` ("127.0.0.1:9090", "[::1]:9090", ":9090") → (host, port); an
    empty host means every address. None when it is not host:port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None  # an IPv6 address needs brackets
    return host, int(port)


def _open_api(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    """The Clash API can close flows and switch modes: beyond loopback it needs a secret."""
    del loaded
    api = _get(data, ("experimental", "clash_api"))
    if not isinstance(api, dict) or not isinstance(api.get("external_controller"), str):
        return
    path: ConfigPath = ("experimental", "clash_api", "external_controller")
    controller = api["external_controller"]
    parsed = split_controller(controller)
    if parsed is None:
        yield (path, f"{format_path(path)}: {controller!r} is not host:port "
               "(such as 127.0.0.1:9090 or [::1]:9090)", "error")  # fmt: skip
        return
    host = parsed[0]
    if host == "localhost" or (host and is_loopback(host)) or api.get("secret"):
        return
    where = host or "every address"
    yield (
        path,
        f"{format_path(path)}: {where} is reachable from other hosts and the API has no "
        "secret: anyone who reaches it could read every connection, close them and switch "
        "the mode. Set experimental.clash_api.secret, or listen on 127.0.0.1",
        "error",
    )


#: RFC 1929: ULEN and PLEN are one byte each.
MAX_CREDENTIAL_BYTES = 255


def _credential_bytes(data: Any, loaded: LoadedConfig) -> Iterator[_Finding]:
    """User names and passwords longer than SOCKS5 can carry, counted in UTF-8 bytes (the
    schema's maxLength counts characters, so "é" * 200 passes it and is 400 bytes)."""
    del loaded
    places: list[tuple[ConfigPath, Any]] = []
    for index, inbound in enumerate(_list(_get(data, ("inbounds",)))):
        if isinstance(inbound, dict) and inbound.get("type") == "mixed":
            for u, user in enumerate(_list(inbound.get("users"))):
                if isinstance(user, dict):
                    for key in ("username", "password"):
                        places.append((("inbounds", index, "users", u, key), user.get(key)))
    for index, outbound in enumerate(_list(_get(data, ("outbounds",)))):
        if isinstance(outbound, dict) and outbound.get("type") == "socks":
            for key in ("username", "password"):
                places.append((("outbounds", index, key), outbound.get(key)))
    for path, value in places:
        if not isinstance(value, str) or len(value) > MAX_CREDENTIAL_BYTES:
            continue  # absent, or the schema reports it
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_CREDENTIAL_BYTES:
            yield (
                path,
                f"{format_path(path)}: {size} bytes in UTF-8; SOCKS5 carries at most "
                f"{MAX_CREDENTIAL_BYTES} (RFC 1929: one length byte)",
                "error",
            )
