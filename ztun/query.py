"""`ztun route` queries: text in, FlowMeta out; Decision in, text or JSON out. Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

from ztun.errors import ZtunError
from ztun.route.action import Route
from ztun.route.metadata import FlowMeta, IPAddress, parse_ip
from ztun.route.router import Router

NETWORKS = ("tcp", "udp", "icmp")


class QueryError(ZtunError):
    """A query that cannot be understood."""


def _is_domain(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return bool(text) and all(
        0 < len(label) <= 63 and all(c.isalnum() or c in "-_*" for c in label) for label in labels
    )


def parse_source(text: str) -> tuple[IPAddress, int]:
    """`IP`, `IP:PORT`, `[IPv6]:PORT` → (ip, port)."""
    ip = parse_ip(text)
    if ip is not None:
        return ip, 0
    host, sep, port_text = text.rpartition(":")
    ip = parse_ip(host) if sep else None
    if ip is None or not port_text.isdigit() or int(port_text) > 65535:
        raise QueryError(f"'{text}' is not IP or IP:PORT")
    return ip, int(port_text)


def parse_query(
    dest: str, *, port: int = 0, network: str = "tcp", source: IPAddress | None = None,
    source_port: int = 0, inbound: str | None = None, protocol: str | None = None,
    domain: str | None = None, ips: list[str] | None = None, user: str | None = None,
    process: str | None = None, process_user: str | None = None, uid: int | None = None,
) -> FlowMeta:  # fmt: skip
    """A FlowMeta for a destination given as a domain or an IP (nothing is resolved).

    `process` is the flow's local program: an absolute path (its name is the last part) or
    a bare name (then `process_path` items have no path to match); `process_user`/`uid` the
    user its socket belongs to. Left out, the owner is unknown, as for a flow whose owner
    `ztun run` cannot find."""
    ip = parse_ip(dest)
    resolved: list[IPAddress] = []
    for text in ips or []:
        address = parse_ip(text)
        if address is None:
            raise QueryError(f"--ip: '{text}' is not an IP address")
        resolved.append(address)
    if ip is None and not _is_domain(dest):
        raise QueryError(f"'{dest}' is neither an IP address nor a domain")
    if network not in NETWORKS:
        raise QueryError(f"'{network}' is not tcp, udp or icmp")
    return FlowMeta(
        network=network,  # type: ignore[arg-type]
        destination=ip,
        destination_port=port,
        domain=domain if ip is not None else dest,
        source=source,
        source_port=source_port,
        inbound=inbound,
        protocol=protocol,
        resolved=tuple(resolved),
        user=user,
        process_name=process.rsplit("/", 1)[-1] or None if process else None,
        process_path=process if process and process.startswith("/") else None,
        process_user=process_user,
        process_user_id=uid,
    )


def parse_batch_line(line: str, defaults: dict[str, Any]) -> FlowMeta:
    """One `--batch` line: `DEST [PORT] [NETWORK]`; missing parts come from the options."""
    parts = line.split()
    if len(parts) > 3:
        raise QueryError("expected 'DEST [PORT] [NETWORK]'")
    options = dict(defaults)
    for part in parts[1:]:
        if part.isdigit() and int(part) <= 65535:
            options["port"] = int(part)
        elif part.lower() in NETWORKS:
            options["network"] = part.lower()
        else:
            raise QueryError(f"'{part}' is neither a port nor tcp/udp/icmp")
    return parse_query(parts[0], **options)


class GroupNow(NamedTuple):
    """A group outbound's member in use, and where that was learnt ("running ztun", "cache
    file", "default", "first member, before any probe")."""

    now: str
    source: str


def group_chain(outbound: str, groups: Mapping[str, GroupNow]) -> list[str]:
    """`outbound`, then the member it uses now, and so on down through nested groups (bounded:
    the checker refuses cycles, and this stops at one anyway)."""
    chain = [outbound]
    while chain[-1] in groups and len(chain) <= len(groups):
        nxt = groups[chain[-1]].now
        if nxt in chain:
            break
        chain.append(nxt)
    return chain


def render_answer(
    router: Router, meta: FlowMeta, *, as_json: bool, verbose: bool, query: str | None = None,
    groups: Mapping[str, GroupNow] | None = None,
) -> str:  # fmt: skip
    """The decision for `meta` as text (one line, or a block with `verbose`) or one JSON object.
    With `groups`, an outbound that is a group shows the member a flow would get now."""
    if verbose:
        explanation = router.explain(meta)
        decision, reasons = explanation.decision, list(explanation.reasons)
    else:
        decision, reasons = router.decide_all(meta), []
    action = decision.action
    outbound = action.outbound if isinstance(action, Route) else None
    out_type = router.outbound_types.get(outbound) if outbound else None
    rule: int | str = "final" if decision.rule_index is None else decision.rule_index
    groups = groups or {}
    chain = group_chain(outbound, groups) if outbound and outbound in groups else []
    if as_json:
        obj: dict[str, Any] = {}
        if query is not None:
            obj["query"] = query
        obj.update(
            {
                "outbound": outbound,
                "outbound_type": out_type,
                "action": str(action),
                "rule": rule,
                "rule_text": decision.rule,
            }
        )
        if chain:
            obj["chain"] = chain
            obj["group_now_from"] = {g: groups[g].source for g in chain if g in groups}
        if decision.options:
            obj["options"] = decision.options
        if verbose:
            obj["reasons"] = reasons
        return json.dumps(obj, separators=(",", ":") if not verbose else (", ", ": "))
    target = f"{outbound} ({out_type})" if outbound and out_type else outbound or str(action)
    for member in chain[1:]:
        kind = router.outbound_types.get(member)
        target += f" → {member} ({kind})" if kind else f" → {member}"
    if not verbose:
        where = "final" if decision.rule_index is None else f"rule {decision.rule_index}"
        return f"{query}\t{target}\t{where}"
    lines = [f"outbound: {target}", f"action:   {action}"]
    if decision.rule_index is None:
        lines.append(f"rule:     final (route.final = {router.final})")
    else:
        lines.append(f"rule:     {decision.rule_index}: {decision.rule}")
    if decision.options:
        lines.append("options:  " + ", ".join(f"{k}={v}" for k, v in decision.options.items()))
    for group in chain[:-1]:
        lines.append(f"group:    {group} uses {groups[group].now} now ({groups[group].source})")
    lines.extend(f"why:      {r}" for r in reasons)
    return "\n".join(lines)
