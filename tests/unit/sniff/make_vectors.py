"""Capture the sniffer test vectors in tests/unit/sniff/vectors/ from real clients.

Run `python tests/unit/sniff/make_vectors.py` (needs openssl and curl on PATH, aioquic and
dnspython installed). Everything stays on this machine: Python's ssl, aioquic and dnspython
build their first flight in memory; openssl s_client and curl talk to a recorder listening on
127.0.0.1 (in front of a local openssl s_server for TLS). Handshakes carry fresh randoms, so
the files change on every run; what the tests assert (names, ALPN) does not.

Files (what each holds):
  tls_python.bin           Python ssl ClientHello, SNI python.example.com, ALPN h2 + http/1.1
  tls_openssl.bin          openssl s_client ClientHello, SNI openssl.example.org, ALPN h2
  tls_openssl_nosni.bin    openssl s_client -noservername: a ClientHello without server_name
  tls_split_records.bin    tls_python.bin's handshake message split over two records
  quic_aioquic.bin         aioquic client's first datagram, QUIC v1, SNI quic.example.net, h3
  quic_aioquic_v2.bin      the same client on QUIC v2 (RFC 9369), SNI v2.example.net
  quic_multi_0.bin, _1.bin aioquic with a large ALPN list: the ClientHello spans 2 datagrams
  http_python.bin          http.client GET, Host www.example.com:8080
  http_curl.bin            curl GET through the recorder, Host curl.example.com
  dns_query.bin            dnspython A query for dns.example.com with EDNS (UDP form)
  dns_query_tcp.bin        the same with the 2-byte TCP length prefix
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import dns.message
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicProtocolVersion

VECTORS = Path(__file__).resolve().parent / "vectors"
LOOPBACK = "127.0.0.1"


def python_client_hello() -> bytes:
    """Python's ssl writes its ClientHello into a memory BIO: no socket at all."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname="python.example.com")
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for a ServerHello
        conn.do_handshake()
    return outgoing.read()


def split_records(record: bytes, at: int) -> bytes:
    """One handshake record → two records carrying its message's bytes [:at] and [at:]."""
    head, body = record[:3], record[5:]
    parts = (body[:at], body[at:])
    return b"".join(head + len(p).to_bytes(2, "big") + p for p in parts)


class Recorder:
    """A loopback listener that keeps the first bytes a client sends, optionally relaying the
    connection to `upstream` so the client completes a real handshake."""

    def __init__(self, upstream: int | None = None) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.upstream = upstream
        self.first = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(5)
        self.first = conn.recv(65536)
        if self.upstream is None:
            conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            return
        up = socket.create_connection((LOOPBACK, self.upstream))
        up.sendall(self.first)
        threading.Thread(target=_pump, args=(up, conn), daemon=True).start()
        _pump(conn, up)

    def wait(self) -> bytes:
        self.thread.join(10)
        self.sock.close()
        return self.first


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            s.close()


def openssl_client_hellos() -> tuple[bytes, bytes]:
    """openssl s_client's ClientHello, captured on its way to a local s_server; with and
    without -servername."""
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = f"{tmp}/key.pem", f"{tmp}/cert.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost"],
            check=True, capture_output=True,
        )  # fmt: skip
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            server_port = probe.getsockname()[1]
        server = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"{LOOPBACK}:{server_port}", "-cert", cert,
             "-key", key, "-naccept", "2", "-quiet", "-alpn", "h2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(0.5)
            hellos = []
            for extra in (["-servername", "openssl.example.org", "-alpn", "h2"],
                          ["-noservername"]):  # fmt: skip
                rec = Recorder(upstream=server_port)
                subprocess.run(
                    ["openssl", "s_client", "-connect", f"{LOOPBACK}:{rec.port}", *extra],
                    input=b"", capture_output=True, timeout=10, check=False,
                )
                hellos.append(rec.wait())
        finally:
            server.terminate()
            server.wait(5)
    return hellos[0], hellos[1]


def quic_datagrams(server_name: str, alpn: list[str], version: int) -> list[bytes]:
    """aioquic's first flight for `server_name`, built in memory (no socket)."""
    config = QuicConfiguration(is_client=True, server_name=server_name, alpn_protocols=alpn)
    config.supported_versions = [version]
    conn = QuicConnection(configuration=config)
    conn.connect(("203.0.113.1", 443), now=0.0)
    return [data for data, _addr in conn.datagrams_to_send(now=0.0)]


class _CaptureSocket:
    """What http.client needs of a socket to send a request: sendall."""

    def __init__(self) -> None:
        self.sent = b""

    def sendall(self, data: bytes) -> None:
        self.sent += data


def python_http_request() -> bytes:
    conn = http.client.HTTPConnection("www.example.com", 8080)
    capture = _CaptureSocket()
    conn.sock = capture  # type: ignore[assignment]
    conn.request("GET", "/index.html", headers={"User-Agent": "ztun-vectors"})
    return capture.sent


def curl_http_request() -> bytes:
    rec = Recorder()
    subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "--max-time", "5",
         "--connect-to", f"curl.example.com:80:{LOOPBACK}:{rec.port}",
         "http://curl.example.com/path?q=1"],
        check=False, timeout=10,
    )  # fmt: skip
    return rec.wait()


def main() -> None:
    VECTORS.mkdir(exist_ok=True)
    files: dict[str, bytes] = {}
    hello = python_client_hello()
    files["tls_python.bin"] = hello
    files["tls_split_records.bin"] = split_records(hello, 100)
    files["tls_openssl.bin"], files["tls_openssl_nosni.bin"] = openssl_client_hellos()
    files["quic_aioquic.bin"] = quic_datagrams(
        "quic.example.net", ["h3"], QuicProtocolVersion.VERSION_1
    )[0]
    files["quic_aioquic_v2.bin"] = quic_datagrams(
        "v2.example.net", ["h3"], QuicProtocolVersion.VERSION_2
    )[0]
    # ~1.4 KB of ALPN ids push aioquic's ClientHello past one 1200-byte datagram
    many = [f"proto-{i:02d}-" + "x" * 60 for i in range(20)] + ["h3"]
    multi = quic_datagrams("multi.example.net", many, QuicProtocolVersion.VERSION_1)
    assert len(multi) >= 2, "the ClientHello should span two datagrams"
    files["quic_multi_0.bin"], files["quic_multi_1.bin"] = multi[0], multi[1]
    files["http_python.bin"] = python_http_request()
    files["http_curl.bin"] = curl_http_request()
    query = dns.message.make_query("dns.example.com", "A", use_edns=0).to_wire()
    files["dns_query.bin"] = query
    files["dns_query_tcp.bin"] = len(query).to_bytes(2, "big") + query
    for name, data in files.items():
        assert data, f"{name}: nothing captured"
        (VECTORS / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
