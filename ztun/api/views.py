"""The Clash API's JSON shapes, built from ztun's own objects.

Owns the field names and value formats Clash dashboards and clients read (ports as strings,
RFC 3339 start times, `chains` from the outbound outwards), in one place that tests check
against the documented shapes. No HTTP here: the server (`ztun.api.server`) serves these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from ztun.runtime.tracker import Tracked, Tracker

#: outbound type → the `type` Clash clients know for a proxy
PROXY_TYPES = {"direct": "Direct", "block": "Reject", "socks": "Socks5",
               "selector": "Selector", "urltest": "URLTest"}  # fmt: skip
#: inbound type → Clash's metadata `type`
INBOUND_TYPES = {"mixed": "Mixed", "tun": "Tun", "socks": "Socks5", "http": "HTTP"}


def _start(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def connection(entry: Tracked) -> dict[str, Any]:
    """One open flow, as an item of `/connections`' `connections`."""
    flow = entry.flow
    meta = flow.meta
    up, down = entry.moved()
    decision = flow.decision
    if decision is None:
        rule, payload = "", ""
    elif decision.rule_index is None:
        rule, payload = "final", ""
    else:
        rule, payload = f"{decision.rule} => {decision.action}", ""
    source = "" if meta.source is None else str(meta.source)
    destination = "" if meta.destination is None else str(meta.destination)
    return {
        "id": entry.id,
        "metadata": {
            "network": entry.network,
            "type": INBOUND_TYPES.get(entry.inbound_type, entry.inbound_type),
            "sourceIP": source,
            "destinationIP": destination,
            "sourcePort": str(meta.source_port) if meta.source is not None else "",
            "destinationPort": str(meta.destination_port),
            "host": meta.domain or "",
            "dnsMode": "normal",
            # the local process that owns the flow's socket, known when a rule needed it
            # (process_* / user items); Clash.Meta's field names
            "process": meta.process_name or "",
            "processPath": meta.process_path or "",
            **({} if meta.process_user_id is None else {"uid": meta.process_user_id}),
            # ztun's own, beside Clash's fields (sing-box adds the inbound the same way)
            "inbound": meta.inbound or "",
            "user": meta.user or "",
            "protocol": meta.protocol or "",
            "target": str(flow.dest),
        },
        "upload": up,
        "download": down,
        "start": _start(entry.start),
        # Clash's order: the member that carries the flow first, the rule's outbound last
        "chains": list(reversed(flow.chain)) if flow.chain else [flow.outbound or ""],
        "rule": rule,
        "rulePayload": payload,
    }


def connections(tracker: Tracker) -> dict[str, Any]:
    """`GET /connections`."""
    up, down = tracker.totals()
    return {
        "downloadTotal": down,
        "uploadTotal": up,
        "connections": [connection(e) for e in tracker],
        "memory": 0,
    }


def history(delays: Iterable[Any]) -> list[dict[str, Any]]:
    """A proxy's last URL tests (`ztun.outbound.probe.Delay`s), oldest first; delay 0: failed."""
    return [{"time": _start(d.time), "delay": d.delay} for d in delays]


def proxies(
    outbound_types: Mapping[str, str],
    final: str,
    groups: Mapping[str, tuple[str, list[str]]] | None = None,
    histories: Mapping[str, Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """`GET /proxies`: every outbound, plus Clash's GLOBAL group (here: `route.final`).
    `groups`: group tag → (the member in use now, every member); `histories`: tag → its
    last URL tests."""
    groups = groups or {}
    histories = histories or {}
    out: dict[str, Any] = {}
    for tag, kind in outbound_types.items():
        out[tag] = {
            "type": PROXY_TYPES.get(kind, kind),
            "name": tag,
            "udp": kind != "block",
            "history": history(histories.get(tag, ())),
        }
        if tag in groups:
            now, members = groups[tag]
            out[tag]["now"] = now
            out[tag]["all"] = list(members)
    out["GLOBAL"] = {
        "type": "Selector",
        "name": "GLOBAL",
        "udp": True,
        "history": [],
        "now": final,
        "all": list(outbound_types),
    }
    return {"proxies": out}


def rules(router_rules: Iterable[Any], final: str) -> dict[str, Any]:
    """`GET /rules`: each route rule (its match fields as payload), then `route.final`."""
    out = []
    for rule in router_rules:
        kind = "logical" if hasattr(rule, "rules") else "default"
        out.append({"type": kind, "payload": rule.text, "proxy": str(rule.action)})
    out.append({"type": "final", "payload": "", "proxy": f"route({final})"})
    return {"rules": out}


def configs(mode: str, modes: list[str], log_level: str, mixed_port: int,
            allow_lan: bool) -> dict[str, Any]:  # fmt: skip
    """`GET /configs`: what ztun has of Clash's general config."""
    return {
        "port": 0,
        "socks-port": 0,
        "redir-port": 0,
        "tproxy-port": 0,
        "mixed-port": mixed_port,
        "allow-lan": allow_lan,
        "bind-address": "*",
        "mode": mode,
        "mode-list": modes,
        "log-level": log_level,
        "ipv6": True,
    }
