"""Fuzz targets: one entry function per parser, and the seeds each one starts from.

A target's `run(data)` feeds the bytes to its parser the way ztun's I/O layer does. The parser
may refuse the input only with its documented error type(s) (`Target.allowed`); any other
exception, a broken documented invariant (an `AssertionError` raised here), or an input that
takes longer than `run.py`'s time bound is a crash. Both engines of `run.py` (atheris, and the
built-in mutator) and the default suite's smoke test (tests/unit/test_fuzz_harness.py) drive
these same functions.

Seeds are valid inputs built like the unit tests' fixtures (their builders, the sniffers'
captured vectors, the shipped and test configs); `run.py --write-seeds` writes them to
bench/fuzz/seeds/, which is committed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rrset
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ztun.address import Address
from ztun.config.loader import load_config_text
from ztun.config.options import build_options
from ztun.config.unexecuted import not_executed
from ztun.config.validate import validate
from ztun.dns import message as dns_msg
from ztun.dns import wire as dns_wire
from ztun.errors import ConfigError, ProtocolError
from ztun.nat.tcp import TcpNat
from ztun.packet import icmp as icmp_pkt
from ztun.packet import tcp as tcp_pkt
from ztun.packet import udp as udp_pkt
from ztun.packet import virtio
from ztun.packet.checksum import checksum, pseudo_header_sum
from ztun.packet.fragment import Reassembler
from ztun.packet.ip import Drop, IPHeader, Proto, build_ip, parse_ip
from ztun.proto import http_proxy, socks5
from ztun.provider.ruleset import _parse_bytes as parse_rule_set_bytes
from ztun.route.compile import compile_dns_router, compile_headless_rules, compile_router
from ztun.route.ruleset import RuleSetError
from ztun.sniff import NEED_MORE, DatagramSniffer, Sniffed, sniff_datagram, sniff_stream
from ztun.sniff import dns as sniff_dns
from ztun.sniff import quic as sniff_quic
from ztun.sniff import tls as sniff_tls
from ztun.stack.commands import (
    CloseUdpSession,
    FlowEnded,
    OpenUdpSession,
    SendDatagram,
    WritePacket,
)
from ztun.stack.flow import Flow, Refused, SniffFirst
from ztun.stack.tun import TunStack

ROOT = Path(__file__).resolve().parents[2]
SNIFF_VECTORS = ROOT / "tests" / "unit" / "sniff" / "vectors"
CONFIG_FIXTURES = ROOT / "tests" / "unit" / "config" / "fixtures"
RESOURCES = ROOT / "ztun" / "resources"


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    #: the parser's documented error types: raising one of these is a refusal, not a crash
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], Iterator[bytes]]
    #: longest input the engines generate (QUIC needs 1200-byte datagrams, configs are long)
    max_len: int = 4096
    what: str = ""
    #: how much slower the target runs under atheris' instrumentation, about: its worker
    #: screens for slow inputs at this many times the bound (pure-Python parsers slow most)
    slowdown: float = 3.0


class Reader:
    """Structured input from fuzz bytes: never raises, reads zeros past the end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return (self.byte() << 8) | self.byte()

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(self.left())

    def chunks(self, limit: int) -> Iterator[bytes]:
        """Up to `limit` pieces, each prefixed by its 16-bit length (the last takes the rest)."""
        for i in range(limit):
            if not self.left():
                return
            if i == limit - 1:
                yield self.rest()
                return
            yield self.take(self.u16())


def frame(*pieces: bytes) -> bytes:
    """Seeds for `Reader.chunks`: each piece with its 16-bit length."""
    return b"".join(len(p).to_bytes(2, "big") + p for p in pieces)


# -- SOCKS5 / SOCKS4a -------------------------------------------------------------------------

_SOCKS_SERVER = (
    socks5.parse_greeting,
    socks5.parse_userpass,
    socks5.parse_request,
    socks5.parse_socks4_request,
)


def run_socks_server(data: bytes) -> None:
    """The mixed inbound's side: greeting, credentials, request (5), request (4/4a), and a
    UDP ASSOCIATE datagram; the first byte picks the parser, the rest is the input."""
    if not data:
        return
    pick, body = data[0] % 5, data[1:]
    if pick == 4:
        with contextlib.suppress(ProtocolError):
            socks5.parse_udp_datagram(body)
        return
    parse = _SOCKS_SERVER[pick]
    whole = parse(body)
    if whole is not None:
        value, used = whole
        assert 0 < used <= len(body), (used, len(body))
        # A longer input (more bytes pipelined behind) reads the same message.
        again = parse(body + b"\x00")
        assert again is not None and again[0] == value, (value, again)


def run_socks_client(data: bytes) -> None:
    """The socks outbound's handshake state machine fed the server's answers in pieces."""
    r = Reader(data)
    flags = r.byte()
    user = "u" if flags & 1 else None
    hs = socks5.ClientHandshake(
        socks5.Command.UDP_ASSOCIATE if flags & 2 else socks5.Command.CONNECT,
        Address("x.example", 443) if flags & 4 else Address("203.0.113.5", 443),
        user,
        "p",
        pipeline=bool(flags & 8),
    )
    hs.data_to_send()
    for chunk in r.chunks(8):
        if hs.done:
            break
        assert hs.need >= 1
        hs.receive_data(chunk)
        hs.data_to_send()


def seeds_socks_server() -> Iterator[bytes]:
    addr = socks5.build_address
    yield b"\x00" + b"\x05\x02\x00\x02"
    yield b"\x01" + b"\x01\x04user\x08password"
    for a in (Address("203.0.113.5", 443), Address("2001:db8::5", 80), Address("a.example", 1)):
        yield b"\x02" + b"\x05\x01\x00" + addr(a)
        yield b"\x04" + socks5.build_udp_datagram(a, b"payload")
    yield b"\x03" + b"\x04\x01\x01\xbb" + bytes([203, 0, 113, 5]) + b"user\x00"
    yield b"\x03" + b"\x04\x01\x00\x50\x00\x00\x00\x01user\x00a.example\x00"


def seeds_socks_client() -> Iterator[bytes]:
    reply = socks5.build_reply(0, Address("198.51.100.7", 1080))
    yield b"\x00" + frame(b"\x05\x00", reply)
    yield b"\x01" + frame(b"\x05\x02", b"\x01\x00", reply + b"trailing")
    yield b"\x0f" + frame(b"\x05\x02\x01\x00" + socks5.build_reply(0, Address("a.example", 7)))
    yield b"\x08" + frame(b"\x05\x00\x05\x04")


# -- HTTP proxy -------------------------------------------------------------------------------


def run_http_proxy(data: bytes) -> None:
    parsed = http_proxy.parse_request(data)
    if parsed is None:
        return
    req, used = parsed
    assert 0 < used <= len(data)
    assert 0 < req.port < 65536 and req.host
    http_proxy.proxy_credentials(req)
    if req.path is not None:
        http_proxy.build_origin_request(req)


def seeds_http_proxy() -> Iterator[bytes]:
    yield b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"
    yield b"CONNECT [2001:db8::5]:443 HTTP/1.1\r\n\r\n"
    yield (
        b"GET http://a.example/path?q=1 HTTP/1.1\r\nHost: a.example\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\nConnection: keep-alive, x-a\r\n"
        b"X-A: 1\r\n\r\n"
    )
    yield b"POST http://203.0.113.5:8080/ HTTP/1.0\r\nContent-Length: 0\r\n\r\nbody"


# -- packets ----------------------------------------------------------------------------------

A4, B4 = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
A6 = ipaddress.IPv6Address("fdfe:dcba:9876::1").packed
B6 = ipaddress.IPv6Address("fdfe:dcba:9876::2").packed
OK4, OK6 = bytes([203, 0, 113, 5]), ipaddress.IPv6Address("2001:db8::5").packed
LISTEN_PORT = 40000


def tcp_packet(src: bytes, dst: bytes, sp: int, dp: int, flags: int, payload: bytes = b"") -> bytes:
    seg = bytearray(struct.pack("!HHIIBBHHH", sp, dp, 1000, 0, 5 << 4, flags, 65535, 0, 0))
    seg += payload
    c = checksum(seg, pseudo_header_sum(src, dst, Proto.TCP, len(seg)))
    seg[16:18] = c.to_bytes(2, "big")
    return bytes(build_ip(src, dst, Proto.TCP, len(seg))) + bytes(seg)


def udp_packet(src: bytes, sp: int, dst: bytes, dp: int, payload: bytes) -> bytes:
    pkt = udp_pkt.build_udp(src, sp, dst, dp, payload)
    assert isinstance(pkt, bytes)
    return pkt


def echo_packet(src: bytes, dst: bytes) -> bytes:
    v4 = len(src) == 4
    kind = icmp_pkt.ECHO_REQUEST_V4 if v4 else icmp_pkt.ECHO_REQUEST_V6
    msg = bytearray(struct.pack("!BBHHH", kind, 0, 0, 7, 1)) + b"ping"
    proto = Proto.ICMP if v4 else Proto.ICMPV6
    c = checksum(msg, 0 if v4 else pseudo_header_sum(src, dst, proto, len(msg)))
    msg[2:4] = c.to_bytes(2, "big")
    return bytes(build_ip(src, dst, proto, len(msg))) + bytes(msg)


def fragments_v4(pkt: bytes, size: int, ident: int = 0x1234) -> list[bytes]:
    hl = (pkt[0] & 0x0F) * 4
    body = pkt[hl:]
    out = []
    for off in range(0, len(body), size):
        part = body[off : off + size]
        h = bytearray(pkt[:hl])
        h[2:4] = (hl + len(part)).to_bytes(2, "big")
        h[4:6] = ident.to_bytes(2, "big")
        h[6:8] = ((0x2000 if off + size < len(body) else 0) | (off // 8)).to_bytes(2, "big")
        h[10:12] = b"\0\0"
        h[10:12] = checksum(h).to_bytes(2, "big")
        out.append(bytes(h) + part)
    return out


def _sample_packets() -> list[bytes]:
    dns_query = dns.message.make_query("a.example", "A", id=0x1234).to_wire()
    return [
        tcp_packet(A4, OK4, 5000, 443, tcp_pkt.SYN),
        tcp_packet(A6, OK6, 5000, 443, tcp_pkt.SYN),
        tcp_packet(A4, OK4, 5000, 80, tcp_pkt.ACK | tcp_pkt.PSH, b"GET / HTTP/1.1\r\n\r\n"),
        udp_packet(A4, 5353, OK4, 53, dns_query),
        udp_packet(A6, 5353, OK6, 53, dns_query),
        udp_packet(A4, 6000, OK4, 443, bytes(300)),
        echo_packet(A4, OK4),
        echo_packet(A6, OK6),
    ]


def run_packet(data: bytes) -> None:
    """The per-packet parsers and reply builders, on one packet, as the TUN core calls them;
    a packet that begins with a virtio-net header when the first byte is odd."""
    if not data:
        return
    buf = data[1:]
    if data[0] & 1:
        hdr = virtio.parse_header(buf)
        if isinstance(hdr, Drop):
            return
        buf = buf[virtio.HEADER_LEN :]
        virtio.gso_ok(hdr.gso_type, buf[9] if len(buf) > 9 else 0)
        virtio.finish_partial(bytearray(buf), len(buf), hdr.csum_start, hdr.csum_offset)
    h = parse_ip(buf)
    if isinstance(h, Drop):
        return
    assert h.l4 <= h.end <= len(buf)
    if h.proto == Proto.TCP:
        tcp_pkt.tcp_header_len(buf, h)
        rst = tcp_pkt.build_rst(buf, h)
        if isinstance(rst, bytes):
            assert isinstance(parse_ip(rst), IPHeader)
    elif h.proto == Proto.UDP and not h.frag:
        u = udp_pkt.parse_udp(buf, h)
        if not isinstance(u, Drop):
            assert h.l4 + 8 <= u.start <= u.end <= h.end
            icmp_pkt.build_port_unreachable(buf, h)
            udp_pkt.udp_checksum_ok(buf, h)
    elif h.proto in (Proto.ICMP, Proto.ICMPV6) and icmp_pkt.is_echo_request(buf, h):
        reply = icmp_pkt.build_echo_reply(buf, h)
        assert isinstance(reply, bytes)


def seeds_packet() -> Iterator[bytes]:
    for pkt in _sample_packets():
        yield b"\x00" + pkt
        yield b"\x01" + virtio.build_header(virtio.VnetHeader(1, 0, 0, 0, 20, 16)) + pkt


# -- IPv4 fragments ---------------------------------------------------------------------------


def run_fragments(data: bytes) -> None:
    """A sequence of IPv4 fragments built from the input (valid headers, fuzzed offsets, MF,
    lengths, ids and arrival times) through `Reassembler.push`, with small limits so they are
    reached; each record: flags, offset (16 bits), length (16 bits), payload."""
    r = Reader(data)
    small = Reassembler(max_datagrams=4, max_fragments=8, max_bytes=8192, timeout=2.0)
    default = Reassembler()
    now = 0.0
    while r.left():
        flags = r.byte()
        word = r.u16()
        size = r.u16() & 0x1FFF
        payload = r.take(size)
        ident = flags & 0x03
        proto = Proto.UDP if flags & 0x04 else Proto.ICMP
        src = A4 if flags & 0x08 else OK4
        opts = b"\x01" * 4 * ((flags >> 4) & 0x03)  # IHL beyond 20 (NOP options)
        now += (flags >> 6) * 0.75
        hl = 20 + len(opts)
        head = bytearray(build_ip(src, B4, proto, len(opts) + len(payload)))
        head[0] = 0x40 | (hl // 4)
        total = min(hl + len(payload), 0xFFFF)
        head[2:4] = total.to_bytes(2, "big")
        head[4:6] = ident.to_bytes(2, "big")
        head[6:8] = (word & 0x3FFF).to_bytes(2, "big")  # MF and the offset, no DF
        pkt = bytes(head[:20]) + opts + payload
        h = parse_ip(pkt)
        if isinstance(h, Drop) or not h.frag:
            continue
        for reasm in (small, default):
            before = len(reasm)
            whole = reasm.push(pkt, h, now)
            assert reasm.bytes >= 0 and len(reasm) <= max(reasm.max_datagrams, before)
            assert reasm.bytes <= reasm.max_bytes
            if isinstance(whole, bytes):
                assert len(whole) <= 0xFFFF, len(whole)
                again = parse_ip(whole)
                assert isinstance(again, IPHeader) and not again.frag, again
        small.expire(now)


def seeds_fragments() -> Iterator[bytes]:
    def record(frag: bytes, flags: int = 0x04) -> bytes:
        body = frag[20:]
        return bytes([flags]) + frag[6:8] + len(body).to_bytes(2, "big") + body

    pkt = udp_packet(OK4, 5000, B4, 53, bytes(range(256)) * 6)
    frags = fragments_v4(pkt, 512)
    yield b"".join(record(f) for f in frags)
    yield b"".join(record(f) for f in reversed(frags))
    yield b"".join(record(f) for f in frags[:-1]) + record(frags[0])  # a duplicate
    yield b"".join(record(f, 0x04 | 0x40) for f in frags)  # slow: times out


# -- the TUN core -----------------------------------------------------------------------------

_KNOWN_COMMANDS = (WritePacket, OpenUdpSession, SendDatagram, CloseUdpSession, FlowEnded)
_REFUSED = Refused("blocked by rule")
_DROPPED = Refused("dropped by rule", drop=True)


def _decide(flow: Flow, network: str) -> object:
    """A router: sniff first on 53/443/80, then by the destination's last byte."""
    if not flow.sniffed and flow.meta.destination_port in (53, 80, 443):
        return SniffFirst((), 0.3)
    dest = flow.meta.destination
    last = dest.packed[-1] if dest is not None else 0
    if last % 7 == 3:
        return _REFUSED
    if last % 7 == 4:
        return _DROPPED
    flow.outbound = "direct"
    return "direct"


def run_tun_stack(data: bytes) -> None:
    """A run of packets through `TunStack.receive` (or `receive_vnet`), with replies and expiry;
    each record: flags, a 16-bit length, the packet (and a virtio-net header when asked)."""
    stack = TunStack(
        "tun-in",
        _decide,
        nat4=TcpNat(A4, B4, LISTEN_PORT, max_flows=16),
        nat6=TcpNat(A6, B6, LISTEN_PORT, max_flows=16),
        udp_timeout=5.0,
        max_udp_sessions=8,
    )
    r = Reader(data)
    now = 0.0
    while r.left():
        flags = r.byte()
        pkt = r.take(r.u16())
        now += (flags >> 5) * 0.9
        buf = bytearray(pkt) + bytearray(64)
        if flags & 1:
            hdr = r.take(virtio.HEADER_LEN).ljust(virtio.HEADER_LEN, b"\0")
            stack.receive_vnet(buf, len(pkt), hdr, now)
        else:
            stack.receive(buf, len(pkt), now)
        for cmd in stack.out:
            assert isinstance(cmd, _KNOWN_COMMANDS), cmd
            if isinstance(cmd, OpenUdpSession) and flags & 2:
                # From the flow's destination, or (flag 16) from a third host: filtering's say.
                src = cmd.flow.dest if not flags & 16 else Address("203.0.113.99", 53)
                stack.udp_reply(cmd.key, src, b"reply", now)
            if isinstance(cmd, WritePacket):
                assert isinstance(parse_ip(cmd.packet), IPHeader)
        stack.out.clear()
        if flags & 4:
            stack.expire(now)
        if flags & 8:
            for nat in (stack.nat4, stack.nat6):
                assert nat is not None
                for port in nat.ports():
                    stack.tcp_flow(nat, port)
    stack.stop()


def seeds_tun_stack() -> Iterator[bytes]:
    def record(pkt: bytes, flags: int = 0) -> bytes:
        return bytes([flags]) + len(pkt).to_bytes(2, "big") + pkt

    pkts = _sample_packets()
    yield b"".join(record(p, 2 | 8) for p in pkts)
    yield b"".join(
        record(p, 1) + virtio.build_header(virtio.VnetHeader(1, 1, 40, 1400, 20, 16))
        for p in pkts
    )
    big = udp_packet(A4, 5000, OK4, 5001, bytes(1500))
    yield b"".join(record(f, 4) for f in fragments_v4(big, 512))
    yield record(pkts[0]) + record(tcp_packet(A4, OK4, 5000, 443, tcp_pkt.RST), 0xE4)


# -- rule sets --------------------------------------------------------------------------------

_FORMATS = (("source", "classical"), ("clash", "domain"), ("clash", "ipcidr"),
            ("clash", "classical"), ("domains", "classical"))  # fmt: skip


def run_ruleset(data: bytes) -> None:
    """A rule-set file as downloaded (bytes, any format; the first byte picks the format and
    Clash behaviour), parsed, then compiled into a matcher as a config's rule set would be."""
    if not data:
        return
    fmt, behavior = _FORMATS[data[0] % len(_FORMATS)]
    parsed = parse_rule_set_bytes(data[1:], fmt, behavior)
    compile_headless_rules(parsed.rules)


def run_ruleset_source(data: bytes) -> None:
    """sing-box source JSON only (the format with the most structure)."""
    parsed = parse_rule_set_bytes(data, "source", "classical")
    compile_headless_rules(parsed.rules)


def seeds_ruleset_source() -> Iterator[bytes]:
    yield json.dumps({"version": 3, "rules": [
        {"domain": "a.example", "domain_suffix": [".b.example", "c.example"],
         "ip_cidr": "10.0.0.0/8"},
        {"port": 443, "network": "tcp", "ip_is_private": True},
        {"domain_keyword": "ads", "domain_regex": "^x[0-9]+\\.example$"},
        {"port_range": "1000:2000", "source_ip_cidr": ["2001:db8::/32"], "invert": True},
    ]}).encode()  # fmt: skip
    yield json.dumps({"version": 2, "rules": [{
        "type": "logical", "mode": "and", "invert": True,
        "rules": [{"domain": "a.example"},
                  {"type": "logical", "mode": "or", "rules": [{"port": [80, 443]}]}],
    }]}).encode()  # fmt: skip
    # the comments test's file (tests/unit/route/test_ruleset.py), with an escaped quote
    yield (b'// sing-box tolerates these\n{\n  "version": 2, # hash comment\n  /* block\n'
           b'     comment */\n  "rules": [\n    {"domain": ["a.com", "b//c.com", "d#e.com",],\n'
           b'     "domain_keyword": ["say \\"hi\\""],},\n  ],\n}\n')  # fmt: skip


def seeds_ruleset() -> Iterator[bytes]:
    for s in seeds_ruleset_source():
        yield b"\x00" + s
    yield b"\x01" + b"payload:\n  - '+.a.example'\n  - 'b.example'\n  - '*.c.example'\n"
    yield b"\x02" + b"payload:\n  - 10.0.0.0/8\n  - 2001:db8::/32\n"
    yield b"\x03" + (
        b"DOMAIN,a.example\nDOMAIN-SUFFIX,b.example\nDOMAIN-KEYWORD,ads\n"
        b"IP-CIDR,203.0.113.0/24,no-resolve\nDST-PORT,443\nNETWORK,udp\n# comment\n"
    )
    yield b"\x04" + (RESOURCES / "rule-sets" / "ads.txt").read_bytes()[:2000]


# -- the YAML config loader and validation ----------------------------------------------------



def run_config(data: bytes) -> None:
    """What `ztun check` does with a config's text, in memory: load (YAML, includes, `${VAR}`),
    schema validation, the not-executed warnings, compiling the route and DNS rules, and the
    options of a config without errors. Rule sets and GeoIP files are not opened."""
    text = data.decode("utf-8", "surrogateescape")
    loaded = load_config_text(text, base_dir=CONFIG_FIXTURES, env={"HOME": "/nonexistent"})
    diagnostics = list(loaded.diagnostics)
    diagnostics.extend(validate(loaded))
    not_executed(loaded.data)
    if any(d.severity == "error" for d in diagnostics):
        return
    _, found = compile_router(loaded.data, report_references=False)
    diagnostics.extend(found)
    if loaded.data.get("dns") is not None:
        _, found = compile_dns_router(loaded.data, report_references=False)
        diagnostics.extend(found)
    if not any(d.severity == "error" for d in diagnostics):
        build_options(loaded.data)


def seeds_config() -> Iterator[bytes]:
    for folder in (RESOURCES / "examples", RESOURCES / "profiles", CONFIG_FIXTURES):
        for path in sorted(folder.rglob("*.yaml")):
            text = path.read_bytes()
            if len(text) <= 8192:
                yield text


# -- DNS --------------------------------------------------------------------------------------


def _dns_pairs() -> Iterator[tuple[bytes, bytes]]:
    for name, kind, records in (
        ("a.example.", "A", ["a.example. 300 IN A 203.0.113.5"]),
        ("b.example.", "AAAA", ["b.example. 60 IN CNAME c.example.",
                                "c.example. 30 IN AAAA 2001:db8::5"]),
        ("_sip._tcp.example.", "TXT", ['_sip._tcp.example. 10 IN TXT "v=1" "x"']),
        ("m.example.", "MX", ["m.example. 10 IN MX 10 mail.example."]),
    ):  # fmt: skip
        q = dns.message.make_query(name, kind, use_edns=0, id=0x1234)  # seeds are fixed bytes
        resp = dns.message.make_response(q)
        for text in records:
            rr = dns.rrset.from_text(*text.split(" ", 4)[:4], text.split(" ", 4)[4])
            resp.answer.append(rr)
        yield q.to_wire(), resp.to_wire()
    q = dns.message.make_query("n.example.", "A", id=0x4321)
    resp = dns.message.make_response(q)
    resp.set_rcode(3)
    resp.authority.append(dns.rrset.from_text(
        "example.", 300, "IN", "SOA", "ns.example. host.example. 1 2 3 4 60"))  # fmt: skip
    yield q.to_wire(), resp.to_wire()


_PROBE_QUERY = dns.message.make_query("a.example.", "A", id=7).to_wire()


def run_dns_wire(data: bytes) -> None:
    """The hand-written fast path (ztun/dns/wire.py) on a query and an answer (two pieces);
    what it accepts, dnspython (ztun/dns/message.py) must accept and read the same."""
    r = Reader(data)
    pieces = list(r.chunks(2))
    query = pieces[0] if pieces else b""
    response = pieces[1] if len(pieces) > 1 else b""
    q = dns_wire.read_question(query)
    if q is not None:
        parsed = dns_msg.parse_query(query)  # raises (a crash) if dnspython refuses it
        assert (q.name, q.qtype, q.qclass) == dns_msg.question(parsed), (q, parsed.question)
    else:
        q = dns_wire.read_question(_PROBE_QUERY)
        assert q is not None
    scan = dns_wire.scan_response(response, q)
    dns_wire.answers(query, response)
    if scan is not None:
        dns_msg.parse_response(response)  # what the scan accepts, dnspython reads too
        dns_wire.aged(response, scan.ttl_offsets, 5, 7)
        for off in scan.ttl_offsets:
            assert 0 <= off <= len(response) - 4


def seeds_dns_wire() -> Iterator[bytes]:
    for q, resp in _dns_pairs():
        yield frame(q, resp)


_ANSWER_ADDRESSES = (ipaddress.ip_address("203.0.113.5"), ipaddress.ip_address("2001:db8::5"))


def run_dns_message(data: bytes) -> None:
    """dnspython behind ztun/dns/message.py: a query (and every reply built for it) or a
    response (and what the client and cache read of it); refusals are ProtocolError only."""
    if data[:1] == b"\x00":
        dns_msg.formerr_for(data[1:])
        msg = dns_msg.parse_query(data[1:])
        dns_msg.question(msg)
        for build in (dns_msg.servfail, dns_msg.refused, dns_msg.nxdomain, dns_msg.nodata):
            dns_msg.parse_response(build(msg))
        dns_msg.parse_response(dns_msg.answer_with(msg, _ANSWER_ADDRESSES, 60))
    else:
        msg = dns_msg.parse_response(data[1:])
        dns_msg.question(msg)
        dns_msg.addresses(msg)
        assert dns_msg.min_ttl(msg) >= 0
        for strategy in ("ipv4_only", "ipv6_only"):
            dns_msg.to_wire(dns_msg.apply_strategy(msg, strategy))
        dns_msg.to_wire(msg, 512)


def seeds_dns_message() -> Iterator[bytes]:
    for q, resp in _dns_pairs():
        yield b"\x00" + q
        yield b"\x01" + resp


# -- sniffers ---------------------------------------------------------------------------------


def _check_stream(data: bytes, sniffers: frozenset[str]) -> None:
    """A stream verdict is valid, and once final (Sniffed or None) a longer input answers the
    same (the module's promise: a verdict never changes as more bytes arrive)."""
    whole = sniff_stream(data, sniffers)
    assert whole is NEED_MORE or whole is None or isinstance(whole, Sniffed), whole
    if isinstance(whole, Sniffed) and whole.domain is not None:
        assert 0 < len(whole.domain) <= 253 and whole.domain == whole.domain.lower()
    if data:
        before = sniff_stream(data[:-1], sniffers)
        if before is not NEED_MORE:
            assert before == whole, (before, whole)


def run_sniff_tls(data: bytes) -> None:
    _check_stream(data, frozenset({"tls"}))
    sniff_tls.parse_client_hello(data)


def run_sniff_http(data: bytes) -> None:
    _check_stream(data, frozenset({"http"}))


def run_sniff_dns(data: bytes) -> None:
    _check_stream(data, frozenset({"dns"}))
    found = sniff_datagram(data, frozenset({"dns"}))
    assert found is None or isinstance(found, Sniffed)
    sniff_dns.parse_query(data)


def _seal_initial(frames: bytes, dcid: bytes, version: int) -> bytes:
    """A client Initial carrying `frames`, protected with the keys `dcid` gives (RFC 9001 §5):
    random bytes never pass AES-GCM, so this lets the fuzzer reach the frame and ClientHello
    parsers behind the decryption."""
    vinfo = sniff_quic._VERSIONS[version]
    keys = sniff_quic._client_keys(vinfo, dcid)
    first = 0xC0 | (vinfo.initial_type << 4) | 0x01  # 2-byte packet number
    frames = frames[:8000].ljust(1200 - 40, b"\0")  # the datagram: at least 1200 bytes
    length = 2 + len(frames) + 16
    header = (
        bytes((first,)) + version.to_bytes(4, "big") + bytes((len(dcid),)) + dcid
        + b"\x04\x01\x02\x03\x04" + b"\x00" + bytes((0x40 | length >> 8, length & 0xFF))
        + b"\x00\x00"
    )  # fmt: skip
    nonce = keys.iv  # packet number 0
    sealed = keys.aead.encrypt(nonce, frames, header)
    hp = keys.hp.algorithm
    assert isinstance(hp, algorithms.AES)
    enc = Cipher(hp, modes.ECB()).encryptor()
    mask = enc.update(sealed[2:18]) + enc.finalize()
    out = bytearray(header + sealed)
    out[0] ^= mask[0] & 0x0F
    pn_at = len(header) - 2
    out[pn_at] ^= mask[1]
    out[pn_at + 1] ^= mask[2]
    return bytes(out)


def run_sniff_quic(data: bytes) -> None:
    """Odd first byte: the input's pieces are decrypted payloads (frames), each sealed into a
    valid Initial of one connection, so frames, CRYPTO reassembly and the ClientHello are
    fuzzed; even: raw datagrams. Both through `DatagramSniffer` (up to 4 datagrams) and the
    one-datagram `sniff_datagram`."""
    if not data:
        return
    r = Reader(data[1:])
    pieces = list(r.chunks(sniff_quic.MAX_DATAGRAMS))
    if data[0] & 1:
        version = sniff_quic.VERSION_2 if data[0] & 2 else sniff_quic.VERSION_1
        pieces = [_seal_initial(p, bytes(range(8)), version) for p in pieces]
    sniffer = DatagramSniffer(frozenset({"quic"}))
    for datagram in pieces:
        result = sniffer.feed(datagram)
        assert result is NEED_MORE or result is None or isinstance(result, Sniffed)
        one = sniff_datagram(datagram, frozenset({"quic"}))
        assert one is None or isinstance(one, Sniffed)


def _vec(name: str) -> bytes:
    return (SNIFF_VECTORS / name).read_bytes()


def _quic_frames_seed() -> bytes:
    hello = _vec("tls_python.bin")[5:]  # the handshake message inside the record
    def crypto(off: int, chunk: bytes) -> bytes:
        return b"\x06" + bytes((0x40 | off >> 8, off & 0xFF, 0x40 | len(chunk) >> 8,
                                len(chunk) & 0xFF)) + chunk  # fmt: skip
    half = len(hello) // 2
    return b"\x01" + frame(crypto(half, hello[half:]) + b"\x01", crypto(0, hello[:half]))


def seeds_sniff_tls() -> Iterator[bytes]:
    for name in ("tls_openssl.bin", "tls_openssl_nosni.bin", "tls_python.bin",
                 "tls_split_records.bin"):  # fmt: skip
        yield _vec(name)


def seeds_sniff_http() -> Iterator[bytes]:
    yield _vec("http_curl.bin")
    yield _vec("http_python.bin")
    yield b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"
    yield b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def seeds_sniff_dns() -> Iterator[bytes]:
    yield _vec("dns_query.bin")
    yield _vec("dns_query_tcp.bin")
    for q, _ in _dns_pairs():
        yield q


def seeds_sniff_quic() -> Iterator[bytes]:
    yield b"\x00" + frame(_vec("quic_aioquic.bin"))
    yield b"\x00" + frame(_vec("quic_aioquic_v2.bin"))
    yield b"\x00" + frame(_vec("quic_multi_0.bin"), _vec("quic_multi_1.bin"))
    yield _quic_frames_seed()


# -- the table --------------------------------------------------------------------------------

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("socks_server", run_socks_server, (ProtocolError,), seeds_socks_server,
               what="SOCKS5 greeting/userpass/request/UDP header, SOCKS4/4a request"),
        Target("socks_client", run_socks_client, (ProtocolError,), seeds_socks_client,
               what="SOCKS5 client handshake (socks outbound)"),
        Target("http_proxy", run_http_proxy, (ProtocolError,), seeds_http_proxy, max_len=70000,
               what="HTTP proxy request head, credentials, origin rewrite"),
        Target("packet", run_packet, (), seeds_packet,
               what="IPv4/IPv6/TCP/UDP/ICMP/virtio parsing and reply builders"),
        Target("fragments", run_fragments, (), seeds_fragments,
               what="IPv4 fragment reassembly"),
        Target("tun_stack", run_tun_stack, (), seeds_tun_stack,
               what="TunStack.receive/receive_vnet over packet sequences"),
        Target("ruleset", run_ruleset, (RuleSetError, ConfigError), seeds_ruleset, max_len=131072,
               what="rule-set files (source, clash, domains) parsed and compiled"),
        Target("ruleset_source", run_ruleset_source, (RuleSetError, ConfigError),
               seeds_ruleset_source, max_len=16384,
               what="sing-box source JSON parsed and compiled"),
        Target("config", run_config, (ConfigError,), seeds_config, max_len=8192, slowdown=10,
               what="YAML config loader, schema validation, rule compilation, options"),
        Target("dns_wire", run_dns_wire, (), seeds_dns_wire, max_len=16384,
               what="ztun/dns/wire.py fast path, checked against dnspython"),
        Target("dns_message", run_dns_message, (ProtocolError,), seeds_dns_message, max_len=16384,
               what="ztun/dns/message.py (dnspython) queries, responses, replies"),
        Target("sniff_tls", run_sniff_tls, (), seeds_sniff_tls, max_len=20000,
               what="TLS ClientHello sniffer"),
        Target("sniff_http", run_sniff_http, (), seeds_sniff_http, max_len=9000,
               what="HTTP request sniffer"),
        Target("sniff_dns", run_sniff_dns, (), seeds_sniff_dns,
               what="DNS query sniffer (TCP and UDP)"),
        Target("sniff_quic", run_sniff_quic, (), seeds_sniff_quic, max_len=6000,
               what="QUIC Initial sniffer (raw, and sealed frames)"),
    )
}  # fmt: skip
