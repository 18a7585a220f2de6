"""Clients for the DNS and sniffing tests, run inside the client namespace; each prints JSON.

query udp|tcp SERVER NAME [QTYPE] [TIMEOUT]   one DNS query (dnspython): rcode, answers, seconds
whoami HOST PORT                              plain TCP: what the target saw (peer, local)
tls HOST PORT SNI CAFILE                      TLS by IP with server_hostname=SNI, then whoami
http HOST PORT HOSTNAME                       GET / with Host: HOSTNAME; what the target saw
quic HOST PORT SNI                            a real QUIC client (aioquic) sends its Initials
banner HOST PORT N                            N times: connect, wait for the server's first line
socks-dns SOCKS_PORT SERVER NAME              a DNS query in a SOCKS5 UDP ASSOCIATE
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _answer(resp) -> dict[str, object]:  # type: ignore[no-untyped-def]
    import dns.rcode

    answers = [rr.to_text() for rrset in resp.answer for rr in rrset]
    return {"rcode": dns.rcode.to_text(resp.rcode()), "answers": answers}


def query(proto: str, server: str, name: str, qtype: str = "A", timeout: float = 5.0
          ) -> dict[str, object]:  # fmt: skip
    import dns.exception
    import dns.message
    import dns.query

    q = dns.message.make_query(name, qtype)
    t0 = time.monotonic()
    try:
        if proto == "udp":
            resp = dns.query.udp(q, server, timeout=timeout)
        else:
            resp = dns.query.tcp(q, server, timeout=timeout)
    except dns.exception.Timeout:
        return {"rcode": "timeout", "answers": [], "seconds": round(time.monotonic() - t0, 3)}
    except OSError as e:
        return {"rcode": f"errno {e.errno}", "answers": [],
                "seconds": round(time.monotonic() - t0, 3)}  # fmt: skip
    return {**_answer(resp), "seconds": round(time.monotonic() - t0, 3)}


def _whoami_line(line: bytes) -> dict[str, object]:
    out: dict[str, object] = {}
    for part in line.decode().split():
        k, _, v = part.partition("=")
        out[k] = v
    return out


def whoami(host: str, port: int) -> dict[str, object]:
    with socket.create_connection((host, port), 5) as s:
        s.settimeout(5)
        s.sendall(b"hello\n")
        return _whoami_line(s.makefile("rb").readline())


def tls(host: str, port: int, sni: str, cafile: str) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection((host, port), 5) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as s:  # fmt: skip
        s.settimeout(5)
        s.sendall(b"hello\n")
        return _whoami_line(s.makefile("rb").readline())


def http(host: str, port: int, hostname: str) -> dict[str, object]:
    # Generous: the suite runs beside other jobs; a sniffed flow through the proxy is the
    # slowest path (sniff, then the SOCKS5 handshake), and it normally takes milliseconds.
    with socket.create_connection((host, port), 15) as s:
        s.settimeout(15)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {hostname}\r\nUser-Agent: dns-client\r\n"
                  "Accept: */*\r\n\r\n".encode())  # fmt: skip
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return {"status": head.split(b"\r\n")[0].decode(), **_whoami_line(body)}


def quic(host: str, port: int, sni: str) -> dict[str, object]:
    """Sends a QUIC Initial (ClientHello with SNI) from aioquic, resends it twice, and reports
    what went out; the handshake cannot complete (the target only echoes), nor need it.
    `first` is the first byte of the first datagram (0xc0 bits set: a long-header Initial)."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name=sni)
    config.verify_mode = ssl.CERT_NONE
    conn = QuicConnection(configuration=config)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(0.3)
    conn.connect((host, port), now=time.time())
    datagrams = [data for data, _addr in conn.datagrams_to_send(now=time.time())]
    sent: list[int] = []
    replies = 0
    for _ in range(3):  # the same Initial again when nothing came back (a duplicate packet)
        for data in datagrams:
            s.send(data)
            sent.append(len(data))
        try:
            while s.recv(65535):
                replies += 1
        except (TimeoutError, OSError):
            pass
        if replies:
            break
    return {"sent": sent, "replies": replies, "first": datagrams[0][0] if datagrams else None,
            "version": datagrams[0][1:5].hex() if datagrams else None}


def banner(host: str, port: int, n: int) -> dict[str, object]:
    times: list[float] = []
    errors: list[str] = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            with socket.create_connection((host, port), 5) as s:
                s.settimeout(5)
                line = s.makefile("rb").readline()
                if line.startswith(b"SSH-2.0-"):
                    times.append(time.perf_counter() - t0)
                else:
                    errors.append(repr(line))
        except OSError as e:
            errors.append(repr(e))
        time.sleep(0.01)
    times.sort()
    return {"times_ms": [round(t * 1000, 3) for t in times],
            "median_ms": round(times[len(times) // 2] * 1000, 3) if times else None,
            "errors": errors}  # fmt: skip


def socks_dns(socks_port: int, server: str, name: str) -> dict[str, object]:
    import dns.message

    from ztun.address import Address
    from ztun.proto import socks5
    from ztun.proto.socks5 import Command

    ctl = socket.create_connection(("127.0.0.1", socks_port), 5)
    hs = socks5.ClientHandshake(Command.UDP_ASSOCIATE, Address("0.0.0.0", 0), None, None)
    while not hs.done:
        ctl.sendall(hs.data_to_send())
        hs.receive_data(ctl.recv(4096))
    assert hs.bound is not None
    relay = (hs.bound.host, hs.bound.port)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(2)
    q = dns.message.make_query(name, "A")
    t0 = time.monotonic()
    try:
        for _ in range(3):
            udp.sendto(socks5.build_udp_datagram(Address(server, 53), q.to_wire()), relay)
            try:
                data, _ = udp.recvfrom(65535)
            except TimeoutError:
                continue
            d = socks5.parse_udp_datagram(data)
            resp = dns.message.from_wire(d.payload)
            return {**_answer(resp), "from": f"{d.address.host}:{d.address.port}",
                    "id_ok": resp.id == q.id, "seconds": round(time.monotonic() - t0, 3)}
        return {"rcode": "timeout", "answers": []}
    finally:
        udp.close()
        ctl.close()


def main() -> None:
    cmd, *a = sys.argv[1:]
    if cmd == "query":
        res = query(a[0], a[1], a[2], a[3] if len(a) > 3 else "A",
                    float(a[4]) if len(a) > 4 else 5.0)  # fmt: skip
    elif cmd == "whoami":
        res = whoami(a[0], int(a[1]))
    elif cmd == "tls":
        res = tls(a[0], int(a[1]), a[2], a[3])
    elif cmd == "http":
        res = http(a[0], int(a[1]), a[2])
    elif cmd == "quic":
        res = quic(a[0], int(a[1]), a[2])
    elif cmd == "banner":
        res = banner(a[0], int(a[1]), int(a[2]))
    elif cmd == "socks-dns":
        res = socks_dns(int(a[0]), a[1], a[2])
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
