"""`ztun dns`: which DNS rule a query meets, which server (or action) answers it, and — unless
told not to — the answer itself, asked through the DNS module with its real transports.

The `ztun route` of DNS. Owns the query's FlowMeta, the run (outbounds built for the detours,
one `DnsClient`), and the text and JSON the CLI prints; cli.py only parses arguments.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from ztun.config.options import DNSServerOptions, Options
from ztun.errors import ZtunError
from ztun.route.metadata import FlowMeta


class DnsQueryError(ZtunError):
    """A `ztun dns` argument that cannot be a query."""


def query_type(text: str) -> int:
    """`A`, `aaaa`, `HTTPS`, `65` → the type number."""
    try:
        return int(text) if text.isdigit() else int(dns.rdatatype.from_text(text.upper()))
    except Exception:
        raise DnsQueryError(f"--type: {text!r} is not a DNS record type") from None


def make_query(name: str, qtype: int) -> bytes:
    try:
        q = dns.message.make_query(name, qtype, dns.rdataclass.IN)
    except Exception as e:
        raise DnsQueryError(f"{name!r} is not a name to ask for: {e}") from None
    return bytes(q.to_wire())


@dataclass
class Explained:
    name: str
    qtype: int
    inbound: str | None
    decision: Any
    action: str  # route | reject | drop | predefined
    server: str | None
    server_options: DNSServerOptions | None
    result: Any = None  # ztun.dns.client.DnsResult, None with --no-query


def _describe_server(s: DNSServerOptions | None) -> str:
    if s is None:
        return ""
    where = ""
    host = getattr(s, "server", None)
    if host is not None:
        port = s.server_port  # type: ignore[union-attr]
        where = f" {'[' + host + ']' if ':' in host else host}:{port}"
    detour = getattr(s, "detour", None)
    via = f" via {detour}" if detour else ""
    return f"{s.type}{where}{via}"


async def explain(
    options: Options,
    dns_router: Any,
    name: str,
    qtype: int,
    *,
    inbound: str | None = None,
    query: bool = True,
    base_dir: str | Path | None = None,
    timeout: float = 5.0,
) -> Explained:
    """Decide (and unless `query` is False, ask) `name`/`qtype` as the DNS module would."""
    from ztun.dns.client import _predefined, _reject_method
    from ztun.outbound.registry import build_outbound

    if not options.dns.servers:
        raise DnsQueryError("the config has no dns.servers")
    meta = FlowMeta(network="udp", domain=name.rstrip(".") or None, inbound=inbound,
                    query_type=qtype)  # fmt: skip
    decision = dns_router.decide(meta) if dns_router is not None else None
    servers = {s.tag: s for s in options.dns.servers}
    final = options.dns.final or options.dns.servers[0].tag
    method = _reject_method(decision)
    server: str | None = None
    if method is not None:
        action = "drop" if method == "drop" else "reject"
    elif _predefined(decision) is not None:
        action = "predefined"
    else:
        action = "route"
        server = getattr(decision, "server", None) or final
    out = Explained(name, qtype, inbound, decision, action, server, servers.get(server or ""))
    if not query:
        return out
    outbounds = {o.tag: build_outbound(o) for o in options.outbounds}
    from ztun.dns.module import build_dns

    module = build_dns(options, outbounds, dns_router, base_dir)
    assert module is not None  # the caller checked that the config has DNS servers
    client = module.client
    client.timeout = timeout
    try:
        meta_in = FlowMeta(network="udp", inbound=inbound)
        out.result = await client.resolve(make_query(name, qtype), meta_in)
    finally:
        await module.close()
        for ob in outbounds.values():
            await ob.close()
    return out


def run_explain(*args: Any, **kwargs: Any) -> Explained:
    return asyncio.run(explain(*args, **kwargs))


# -- output ----------------------------------------------------------------------------------


def _rule_text(decision: Any) -> tuple[int | None, str | None]:
    index = getattr(decision, "rule_index", None)
    rule = getattr(decision, "rule", None)
    return index, None if rule is None else str(rule)


def _records(response: dns.message.Message) -> list[dict[str, Any]]:
    out = []
    for section, rrsets in (("answer", response.answer), ("authority", response.authority)):
        for rrset in rrsets:
            for rdata in rrset:
                out.append({
                    "section": section,
                    "name": rrset.name.to_text(omit_final_dot=True),
                    "ttl": rrset.ttl,
                    "type": dns.rdatatype.to_text(rrset.rdtype),
                    "data": rdata.to_text(),
                })  # fmt: skip
    return out


def to_json(e: Explained) -> dict[str, Any]:
    index, text = _rule_text(e.decision)
    data: dict[str, Any] = {
        "query": {"name": e.name, "type": dns.rdatatype.to_text(e.qtype), "inbound": e.inbound},
        "rule": None if index is None else {"index": index, "rule": text},
        "action": e.action,
        "server": e.server,
        "server_type": e.server_options.type if e.server_options is not None else None,
    }
    r = e.result
    if r is not None:
        response = r.response
        data["answer"] = {
            "rcode": dns.rcode.to_text(response.rcode()) if response is not None else None,
            "records": _records(response) if response is not None else [],
            "cached": r.cached,
            "time_ms": round(r.elapsed * 1000, 3),
            "error": r.error,
            "sent": r.wire is not None,
        }
    return data


def render(e: Explained, *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(to_json(e), indent=2)
    qt = dns.rdatatype.to_text(e.qtype)
    lines = [f"query   {e.name} {qt}" + (f" (inbound {e.inbound})" if e.inbound else "")]
    index, text = _rule_text(e.decision)
    if index is None:
        lines.append("rule    none matched: dns.final")
    else:
        lines.append(f"rule    #{index}" + (f" {text}" if text else ""))
    if e.action == "route":
        lines.append(f"server  {e.server} ({_describe_server(e.server_options)})")
    elif e.action == "predefined":
        lines.append("action  predefined answer")
    else:
        lines.append(f"action  {e.action}")
    r = e.result
    if r is not None:
        if r.wire is None:
            lines.append("answer  none (the query is dropped)")
        else:
            response = r.response
            rcode = dns.rcode.to_text(response.rcode()) if response is not None else "SERVFAIL"
            source = " from cache" if r.cached else ""
            why = f": {r.error}" if r.error else ""
            lines.append(f"answer  {rcode}{why} in {r.elapsed * 1000:.1f} ms{source}")
            if response is not None:
                for rec in _records(response):
                    where = "  (authority)" if rec["section"] == "authority" else ""
                    lines.append(
                        f"  {rec['name']}  {rec['ttl']}  {rec['type']}  {rec['data']}{where}"
                    )
    return "\n".join(lines)
