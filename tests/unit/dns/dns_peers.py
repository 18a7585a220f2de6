"""Loopback DNS servers for the DNS I/O tests: plain UDP+TCP, DoT and DoH, built on dnspython
and the standard library, each in its own threads on 127.0.0.1, with knobs for the failures
the tests need (silence, dropped datagrams, truncation, delay) and a log of what they got.

Also a self-signed certificate for 127.0.0.1 and `dns.test`, made with `cryptography`.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ztun.route.metadata import FlowMeta

Record = tuple[str, int, list[str]]  # (type, ttl, values)


class DnsPeer:
    """A DNS server on 127.0.0.1 (UDP and TCP on the same port).

    `records` maps a lower-case name to its records; names not in it are NXDOMAIN.
    """

    def __init__(self, records: dict[str, list[Record]] | None = None) -> None:
        self.records = records if records is not None else {}
        self.log: list[tuple[str, str, int]] = []  # (udp|tcp|tls|https, name, qtype)
        self.lock = threading.Lock()
        self.delay = 0.0
        self.silent = False
        self.drop_udp = 0  # the next N UDP queries get no answer
        self.truncate_udp = False
        self.tcp_connections = 0
        self._stop = threading.Event()
        self.udp, self.tcp = _udp_and_tcp_on_one_port()
        self.port = int(self.udp.getsockname()[1])
        self.tcp.listen(64)
        self.tls: ssl.SSLContext | None = None
        self.udp.settimeout(0.2)
        self.tcp.settimeout(0.2)
        self.threads = [
            threading.Thread(target=self._udp_loop, daemon=True),
            threading.Thread(target=self._tcp_loop, daemon=True),
        ]
        for t in self.threads:
            t.start()

    # -- answers -----------------------------------------------------------------------------

    def count(self, proto: str | None = None) -> int:
        with self.lock:
            return sum(1 for p, _n, _t in self.log if proto is None or p == proto)

    def answer(self, wire: bytes, proto: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        with self.lock:
            self.log.append((proto, name, int(q.rdtype)))
        if self.delay:
            time.sleep(self.delay)
        if self.silent:
            return None
        response = dns.message.make_response(query)
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            for rtype, ttl, values in self.records[name]:
                if dns.rdatatype.from_text(rtype) == q.rdtype:
                    response.answer.append(
                        dns.rrset.from_text_list(q.name, ttl, "IN", rtype, values)
                    )
        return response.to_wire()

    # -- UDP ---------------------------------------------------------------------------------

    def _udp_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.udp.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._udp_one, args=(data, addr), daemon=True).start()

    def _udp_one(self, data: bytes, addr: Any) -> None:
        out = self.answer(data, "udp")
        with self.lock:
            if self.drop_udp > 0:
                self.drop_udp -= 1
                return
        if out is None:
            return
        if self.truncate_udp:
            msg = dns.message.from_wire(out)
            msg.answer = []
            msg.flags |= dns.flags.TC
            out = msg.to_wire()
        with contextlib.suppress(OSError):
            self.udp.sendto(out, addr)

    # -- TCP (and TLS) -------------------------------------------------------------------------

    def _tcp_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self.tcp.accept()
            except (TimeoutError, OSError):
                continue
            with self.lock:
                self.tcp_connections += 1
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        proto = "tcp"
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                proto = "tls"
            while True:
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                body = _recv_exact(conn, struct.unpack("!H", head)[0])
                if body is None:
                    return
                out = self.answer(body, proto)
                if out is not None:
                    conn.sendall(struct.pack("!H", len(out)) + out)
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _udp_and_tcp_on_one_port() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same free loopback port. The UDP port the kernel
    picks may be taken for TCP by another test running beside this one: then try another."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise OSError("no loopback port free for both UDP and TCP")


@contextlib.contextmanager
def dns_peer(records: dict[str, list[Record]] | None = None) -> Iterator[DnsPeer]:
    peer = DnsPeer(records)
    try:
        yield peer
    finally:
        peer.close()


# -- TLS -------------------------------------------------------------------------------------


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for `dns.test` and 127.0.0.1: (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dns.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("dns.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


@contextlib.contextmanager
def dot_peer(
    cert: Path, key: Path, records: dict[str, list[Record]] | None = None
) -> Iterator[DnsPeer]:
    """DNS over TLS: the same server with TLS on its TCP port."""
    peer = DnsPeer(records)
    peer.tls = server_context(cert, key)
    try:
        yield peer
    finally:
        peer.close()


class _DohHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as DoH clients expect
    peer: DnsPeer
    paths: list[str]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        if self.headers.get("Content-Type") != "application/dns-message":
            self.send_response(415)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        out = self.server.peer.answer(body, "https")  # type: ignore[attr-defined]
        if out is None:
            out = b""
        self.send_response(200)
        self.send_header("Content-Type", "application/dns-message")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@contextlib.contextmanager
def doh_peer(
    cert: Path, key: Path, records: dict[str, list[Record]] | None = None
) -> Iterator[Any]:
    """DNS over HTTPS on 127.0.0.1: `.port`, `.peer` (the DnsPeer answering), `.paths`,
    `.connections`."""
    peer = DnsPeer(records)
    ctx = server_context(cert, key)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            self.connections += 1
            return ctx.wrap_socket(sock, server_side=True), addr

    server = Server(("127.0.0.1", 0), _DohHandler)
    server.peer = peer  # type: ignore[attr-defined]
    server.paths = []  # type: ignore[attr-defined]
    server.connections = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        yield SimpleNamespace(
            port=server.server_address[1], peer=peer, server=server, paths=server.paths
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(2)
        peer.close()


# -- rules ----------------------------------------------------------------------------------


class FakeRouter:
    """DNS rules for tests of the I/O half: (suffix → decision) in order, else the final
    server (a decision naming no server). Decisions are plain namespaces with the fields of
    the rule engine's DnsDecision that the client reads."""

    def __init__(self, rules: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        self.rules = rules or []
        self.seen: list[FlowMeta] = []

    def decide(self, meta: FlowMeta, *, allow_fakeip: bool = True) -> Any:
        self.seen.append(meta)
        for i, (suffix, fields) in enumerate(self.rules):
            domain = meta.domain or ""
            if domain == suffix or domain.endswith("." + suffix):
                return decision(rule_index=i, **fields)
        return decision()


def decision(**fields: Any) -> Any:
    base: dict[str, Any] = {
        "server": None, "reject": None, "predefined": None, "disable_cache": False,
        "rewrite_ttl": None, "rule_index": None, "rule": None,
    }  # fmt: skip
    base.update(fields)
    return SimpleNamespace(**base)
