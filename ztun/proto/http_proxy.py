"""HTTP proxy requests (RFC 9110/9112) as the mixed inbound sees them, without I/O.

Owns: parsing a request head (CONNECT authority-form, or an absolute-form plain proxy request),
Basic proxy credentials, rewriting a plain proxy request to origin form for the origin server,
and building the proxy's own responses (200 for CONNECT, 4xx/5xx errors).

Keep-alive policy for plain (non-CONNECT) proxy requests: ztun forwards the first request with
`Connection: close` and relays the rest of the connection as raw bytes, so the origin closes
after its response and the client opens a new connection (and so a new routing decision) for
its next request. This keeps the relay a byte pump (splice) and never lets a second request on
the same connection bypass routing.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from ztun.address import ip_or_none, peer_host
from ztun.errors import RemoteProtocolError

#: Largest request head accepted; more is an error (431 to the client).
MAX_HEAD = 64 * 1024
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
# One regex search instead of a Python loop per byte: a 64 KiB head is checked in
# microseconds, not milliseconds.
_BAD_TARGET = re.compile(rb"[^\x21-\x7e]")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: Hop-by-hop headers a proxy must not forward (RFC 9110 §7.6.1), plus the proxy-only ones.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)

REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A parsed proxy request head.

    `host`/`port` are where to connect; `path` is the origin-form target (None for CONNECT);
    `headers` keep their order and original case.
    """

    method: str
    target: str
    version: str
    headers: tuple[tuple[bytes, bytes], ...]
    host: str
    port: int
    path: str | None

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    def header(self, name: bytes) -> bytes | None:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None


def parse_request(buf: bytes | bytearray) -> tuple[ProxyRequest, int] | None:
    """The request head at the start of `buf` and its length, or None if it is not complete."""
    end = bytes(buf[: MAX_HEAD + 4]).find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise RemoteProtocolError("HTTP request head too large")
        return None
    head = bytes(buf[:end])
    lines = head.split(b"\r\n")
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise RemoteProtocolError("HTTP: malformed request line")
    raw_method, raw_target, raw_version = parts
    if not raw_method or not all(c in _TOKEN_CHARS for c in raw_method):
        raise RemoteProtocolError("HTTP: malformed method")
    if raw_version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise RemoteProtocolError("HTTP: unsupported version")
    if not raw_target or _BAD_TARGET.search(raw_target) is not None:
        raise RemoteProtocolError("HTTP: malformed request target")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not all(c in _TOKEN_CHARS for c in name):
            raise RemoteProtocolError("HTTP: malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise RemoteProtocolError("HTTP: control character in header value")
        headers.append((name, value))
    method = raw_method.decode("ascii")
    target = raw_target.decode("ascii")
    version = raw_version.decode("ascii")
    if method == "CONNECT":
        host, port = _split_authority(target, None)
        path = None
    else:
        host, port, path = _split_absolute(target)
    _check_host_header(headers)
    return ProxyRequest(method, target, version, tuple(headers), host, port, path), end + 4


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """host:port, [v6]:port (port optional only when a default is given)."""
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise RemoteProtocolError("HTTP: unterminated IPv6 literal")
        host = authority[1:close]
        if ":" not in host or ip_or_none(host) is None:
            raise RemoteProtocolError("HTTP: bracketed host is not an IPv6 address")
        rest = authority[close + 1 :]
        if rest and not rest.startswith(":"):
            raise RemoteProtocolError("HTTP: malformed authority")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port_text = authority, ""
        if ":" in host:
            raise RemoteProtocolError("HTTP: IPv6 literal must be bracketed")
    if "@" in host:
        raise RemoteProtocolError("HTTP: userinfo in authority")
    if not host:
        raise RemoteProtocolError("HTTP: empty host")
    host = peer_host(host, "http")
    if not port_text:
        if default_port is None:
            raise RemoteProtocolError("HTTP: CONNECT target needs a port")
        return host, default_port
    if not port_text.isdigit() or len(port_text) > 5:
        raise RemoteProtocolError("HTTP: malformed port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise RemoteProtocolError("HTTP: port out of range")
    return host, port


def _check_host_header(headers: list[tuple[bytes, bytes]]) -> None:
    """RFC 9112 §3.2: one Host at most, and a valid one (an empty value is allowed). The
    destination comes from the request target, but the Host goes on to the origin server and
    into its logs, so a hostile one is refused here like a hostile target."""
    hosts = [v for k, v in headers if k.lower() == b"host"]
    if len(hosts) > 1:
        raise RemoteProtocolError("HTTP: more than one Host header")
    if hosts and hosts[0]:
        try:
            authority = hosts[0].decode("ascii")
        except UnicodeDecodeError:
            peer_host(hosts[0], "http")  # raises: not ASCII
            raise
        _split_authority(authority, 80)


def _split_absolute(target: str) -> tuple[str, int, str]:
    """http://authority/path?query -> (host, port, origin-form path)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() != "http":
        raise RemoteProtocolError("HTTP: a proxy request needs an absolute http:// URL")
    cut = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    path = path.split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    host, port = _split_authority(authority, 80)
    return host, port, path


def proxy_credentials(req: ProxyRequest) -> tuple[str, str] | None:
    """The Basic credentials in Proxy-Authorization, or None when absent or not Basic."""
    value = req.header(b"proxy-authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def build_origin_request(req: ProxyRequest) -> bytes:
    """The head to send to the origin: origin-form target, hop-by-hop headers dropped,
    `Connection: close` (see the module docstring for why)."""
    assert req.path is not None
    named_by_connection: set[bytes] = set()
    for k, v in req.headers:
        if k.lower() == b"connection":
            named_by_connection.update(t.strip().lower() for t in v.split(b","))
    out = [f"{req.method} {req.path} {req.version}".encode("ascii")]
    has_host = False
    for k, v in req.headers:
        lk = k.lower()
        if lk in _HOP_BY_HOP or lk in named_by_connection:
            continue
        if lk == b"host":
            has_host = True
        out.append(k + b": " + v)
    if not has_host:
        host = f"[{req.host}]" if ":" in req.host else req.host
        out.insert(1, b"Host: " + (host if req.port == 80 else f"{host}:{req.port}").encode())
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


def build_response(status: int, *, extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A proxy-generated response; errors carry a short text body and close the connection."""
    reason = REASONS.get(status, "Error")
    if status == 200:
        return f"HTTP/1.1 200 {reason}\r\n\r\n".encode()
    body = f"{status} {reason} (ztun)\n".encode()
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in extra_headers]
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
