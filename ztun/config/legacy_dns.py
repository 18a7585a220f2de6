"""sing-box's older DNS server form, `address: "tls://1.1.1.1"`, read as the typed form.

Before 1.12 a server was `{tag, address}` with the transport in the address's scheme; 1.14
refuses that form. ztun still reads it (many shared configs use it), converts it here, and
`ztun check` says what to write instead. Pure: data in, data out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["LEGACY_SCHEMES", "is_legacy_server", "legacy_server", "typed_text"]

#: scheme → the typed server `type` it becomes
LEGACY_SCHEMES = {"udp": "udp", "tcp": "tcp", "tls": "tls", "https": "https"}
_DEFAULT_PORTS = {"udp": 53, "tcp": 53, "tls": 853, "https": 443}


def is_legacy_server(item: Any) -> bool:
    """A dns.servers item written in the address form (no `type`, an `address`)."""
    return isinstance(item, Mapping) and "type" not in item and "address" in item


def _host_port(text: str) -> tuple[str, int | None]:
    """'1.1.1.1', '1.1.1.1:53', 'dns.example', '[2001:db8::1]:853' or '2001:db8::1'."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise ValueError(f"'{text}' has an unclosed '['")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"'{text}' has text after ']' that is not ':port'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        return text, None  # a bare IPv6 address (or a name): no port
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"'{port_text}' is not a port (1 to 65535)")
    if not host:
        raise ValueError(f"'{text}' has no host")
    return host, int(port_text)


def legacy_server(item: Mapping[str, Any]) -> dict[str, Any]:
    """The typed form of an address-form server: `{tag, address: "tls://1.1.1.1:853"}` →
    `{type: tls, tag, server: 1.1.1.1, server_port: 853}`; `detour` is kept.

    Reads plain addresses (UDP), udp://, tcp://, tls://, https://host[:port][/path],
    "local" and "fakeip" (with the default ranges). ValueError, with the reason, for any other
    scheme or a malformed address.
    """
    address = str(item.get("address", "")).strip()
    out: dict[str, Any] = {}
    if address in ("local", "fakeip"):
        out["type"] = address
    else:
        scheme, sep, rest = address.partition("://")
        if not sep:
            scheme, rest = "udp", address
        scheme = scheme.lower()
        if scheme not in LEGACY_SCHEMES:
            known = ", ".join(f"{s}://" for s in LEGACY_SCHEMES)
            raise ValueError(
                f"'{scheme}://' servers are not supported (ztun reads {known}, a plain "
                "address, local and fakeip)"
            )
        hostport, slash, path = rest.partition("/")
        if slash and scheme != "https":
            raise ValueError(f"a {scheme}:// address has no path: '{address}'")
        host, port = _host_port(hostport)
        out["type"] = LEGACY_SCHEMES[scheme]
        out["server"] = host
        if port is not None and port != _DEFAULT_PORTS[scheme]:
            out["server_port"] = port
        if scheme == "https" and slash and "/" + path != "/dns-query":
            out["path"] = "/" + path
    if "tag" in item:
        out["tag"] = item["tag"]
    if "detour" in item and out["type"] != "fakeip":
        out["detour"] = item["detour"]
    return out


def typed_text(item: Mapping[str, Any]) -> str:
    """What replaces `address:` in YAML flow style: '{type: tls, server: 1.1.1.1}'."""
    shown = {k: v for k, v in legacy_server(item).items() if k not in ("tag", "detour")}
    return "{" + ", ".join(f"{k}: {v}" for k, v in shown.items()) + "}"
