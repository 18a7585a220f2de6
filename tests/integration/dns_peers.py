"""Peers for the DNS, hijack and sniffing tests (and bench/bench_dns.py), on netns.py's topology.

    client ns: ztun (tun + mixed), dns_client.py, tcpdump, dnsperf
        eth0 198.51.100.1 ── eth0 198.51.100.2   server ns, extra addresses on its lo:
                                                   203.0.113.2   sing-box SOCKS5 :1080 (its
                                                                 direct outbound binds here)
                                                   203.0.113.53  dnsmasq A   203.0.113.54 dnsmasq B
                                                   203.0.113.10/.21/.22/.23/.24  dns_server.py

The application asks 198.51.100.200 (or 2001:db8:1::200) on port 53, where nothing listens:
only a hijack can answer it. The two dnsmasq answer the same names differently, so an answer
tells which server gave it, and their query logs tell from where each query came: the
client's uplink 198.51.100.1 (ztun's own query) or 203.0.113.2 (through the SOCKS5 proxy).

`ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf: both namespaces
get one naming dnsmasq A, so nothing started in them (sing-box resolving a domain, a direct
outbound using the system resolver) can ask the host's resolver.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import need

from .netns import DIRECT4, Topology, in_ns, sh, wait_tcp, wait_until
from .peers import REPO, Proc, singbox_path

HERE = Path(__file__).resolve().parent
CLIENT4 = "198.51.100.1"
PROXY, PROXY_PORT = "203.0.113.2", 1080
DNS_A, DNS_B = "203.0.113.53", "203.0.113.54"
#: where the application sends its queries: no DNS server there, nor any host
ASKED4, ASKED6 = "198.51.100.200", "2001:db8:1::200"
A_TEST = DIRECT4  # *.a.test from dnsmasq A
VIA_PROXY_IP = "203.0.113.21"  # *.via-proxy.test from dnsmasq A
FAKE_REAL_IP = "203.0.113.22"  # *.fake.test from dnsmasq A (the real address behind a FakeIP)
SNIFF_IP = "203.0.113.23"  # in no DNS answer: only sniffing can give a flow to it a domain
B_TEST = "203.0.113.24"  # *.b.test from dnsmasq B
B_TEST_FROM_A = "203.0.113.98"  # *.b.test from dnsmasq A: the wrong server was asked
A_TEST_FROM_B = "203.0.113.97"  # *.a.test from dnsmasq B: the wrong server was asked
FAKE4 = "198.18.128.0/17"
FAKE6 = "fdfe:dcba:9876:8000::/65"
MIXED_PORT = 2080
TUN_ADDR = ["198.18.0.1/30", "fdfe:dcba:9876::1/126"]
SERVER_ADDRESSES = [PROXY, DNS_A, DNS_B, VIA_PROXY_IP, FAKE_REAL_IP, SNIFF_IP, B_TEST]
UDP_TARGETS = [A_TEST, VIA_PROXY_IP, FAKE_REAL_IP, SNIFF_IP]
#: the names each dnsmasq answers (every subdomain too); TTLs are --local-ttl
DNSMASQ_ADDRESSES = {
    "A": {"a.test": A_TEST, "via-proxy.test": VIA_PROXY_IP, "fake.test": FAKE_REAL_IP,
          "b.test": B_TEST_FROM_A, "quic.test": SNIFF_IP},
    "B": {"b.test": B_TEST, "a.test": A_TEST_FROM_B},
}  # fmt: skip


def require_dns_environment() -> None:
    for tool in ("dnsmasq", "tcpdump", "openssl"):
        need(shutil.which(tool), f"{tool} (Debian package)")
    try:
        import aioquic  # noqa: F401
    except ImportError:
        need(None, "aioquic (pip install -e '.[test]')")


# -- the ztun config --------------------------------------------------------------------------

ZTUN_CONFIG = """\
log: {{level: debug}}  # idle-ended UDP flows are logged at debug
inbounds:
  - {{type: tun, tag: tun-in, interface_name: ztun0, address: {tun_addr},
     auto_route: true, strict_route: true, udp_timeout: 3s}}
  - {{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: {mixed_port}}}
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: socks, tag: proxy, server: {proxy}, server_port: {proxy_port}}}
dns:
  servers:
    - {{type: udp, tag: dns-a, server: {dns_a}}}
    - {{type: tcp, tag: dns-b, server: {dns_b}, detour: proxy}}
    - {{type: fakeip, tag: fake, inet4_range: {fake4}, inet6_range: "{fake6}"}}
  rules:
    - {{domain_suffix: [b.test], server: dns-b}}
    - {{domain_suffix: [fake.test], server: fake}}
  final: dns-a
  reverse_mapping: true
route:
  rules:
{sniff}    - {{protocol: dns, action: hijack-dns}}
    - {{port: 53, action: hijack-dns}}
    - {{domain_suffix: [via-proxy.test], outbound: proxy}}
    - {{protocol: quic, domain: [quic.test], outbound: proxy}}
  final: direct
"""


def ztun_config(sniff: bool = True) -> str:
    return ZTUN_CONFIG.format(
        tun_addr=json.dumps(TUN_ADDR), mixed_port=MIXED_PORT, proxy=PROXY, proxy_port=PROXY_PORT,
        dns_a=DNS_A, dns_b=DNS_B, fake4=FAKE4, fake6=FAKE6,
        sniff="    - {action: sniff}\n" if sniff else "",
    )  # fmt: skip


def singbox_proxy_config() -> dict[str, object]:
    """The SOCKS5 proxy of the server namespace: its direct outbound binds to PROXY, so a
    target (or dnsmasq B) sees a proxied flow come from PROXY, never from the client."""
    return {
        "log": {"level": "warn"},
        "inbounds": [{"type": "socks", "tag": "in", "listen": PROXY, "listen_port": PROXY_PORT}],
        "outbounds": [{"type": "direct", "tag": "direct", "inet4_bind_address": PROXY}],
    }


# -- dnsmasq ----------------------------------------------------------------------------------


def dnsmasq_args(which: str, log: Path, listen: str) -> list[str]:
    args = ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--port", "53", "--listen-address", listen, "--bind-interfaces", "--user=root",
            "--pid-file=", "--local-ttl=300", "--cache-size=0", "--log-queries",
            f"--log-facility={log}"]  # fmt: skip
    for name, ip in DNSMASQ_ADDRESSES[which].items():
        # --local: a type with no address (AAAA here) is NODATA, not REFUSED
        args += [f"--address=/{name}/{ip}", f"--local=/{name}/"]
    return args


QUERY_RE = re.compile(r"query\[(\w+)\] (\S+) from (\S+)")


def dnsmasq_queries(log: Path) -> list[tuple[str, str, str]]:
    """(qtype, name, source address) of every query in a --log-queries file."""
    if not log.exists():
        return []
    return [m.groups() for m in QUERY_RE.finditer(log.read_text(errors="replace"))]  # type: ignore[misc]


# -- ztun in the client namespace --------------------------------------------------------------


def start_ztun(t: Topology, tmp: Path, config: str, name: str = "ztun") -> Proc:
    """`ztun run` in the client namespace; returns once it logged "ztun started"."""
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(config)
    env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp / "state"))
    proc = Proc(["ip", "netns", "exec", t.client, sys.executable, "-m", "ztun", "run", str(cfg)],
                tmp / f"{name}.log", env)  # fmt: skip
    ok = wait_until(lambda: "ztun started" in proc.text() or proc.p.poll() is not None, 20)
    if not ok or proc.p.poll() is not None:
        proc.stop()
        raise AssertionError(f"ztun did not start:\n{proc.text()}")
    return proc


# -- the world: servers in the server namespace ------------------------------------------------


@dataclass
class World:
    t: Topology
    tmp: Path
    cert: Path
    events_path: Path
    dns_logs: dict[str, Path]
    procs: dict[str, Proc] = field(default_factory=dict)

    def events(self, kind: str | None = None) -> list[dict[str, object]]:
        out = []
        for line in self.events_path.read_text().splitlines():
            e = json.loads(line)
            if kind is None or e.get("kind") == kind:
                out.append(e)
        return out

    def queries(self, which: str) -> list[tuple[str, str, str]]:
        return dnsmasq_queries(self.dns_logs[which])

    def start_dnsmasq(self, which: str) -> Proc:
        old = self.procs.get(f"dnsmasq-{which}")
        if old is not None:
            old.stop()
        listen = DNS_A if which == "A" else DNS_B
        p = Proc(["ip", "netns", "exec", self.t.server,
                  *dnsmasq_args(which, self.dns_logs[which], listen)],
                 self.tmp / f"dnsmasq-{which}.out")  # fmt: skip
        self.procs[f"dnsmasq-{which}"] = p
        wait_tcp(self.t.server, listen, 53)
        return p

    def client(self, script: str, *args: str, timeout: float = 60) -> dict[str, object]:
        return json.loads(self.t.client_python(script, *args, timeout=timeout))  # type: ignore[no-any-return]

    def dns(self, *args: str, timeout: float = 60) -> dict[str, object]:
        return self.client("dns_client.py", *args, timeout=timeout)


SAN = "DNS:via-proxy.test,DNS:*.via-proxy.test,DNS:other.test,DNS:quic.test"


def make_cert(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
       "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj",
       "/CN=via-proxy.test", "-addext", "subjectAltName=" + SAN)  # fmt: skip
    return cert, key


@contextlib.contextmanager
def netns_resolv_conf(t: Topology) -> Iterator[None]:
    """/etc/netns/<ns>/resolv.conf for both namespaces (removed afterwards)."""
    made = []
    try:
        for ns in (t.client, t.server):
            d = Path("/etc/netns") / ns
            d.mkdir(parents=True, exist_ok=True)
            made.append(d)
            (d / "resolv.conf").write_text(f"nameserver {DNS_A}\noptions timeout:2 attempts:1\n")
        yield
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only when empty: never someone else's


@contextlib.contextmanager
def world(t: Topology, tmp: Path, proxy: bool = True) -> Iterator[World]:
    """dnsmasq A and B, the SOCKS5 proxy and dns_server.py in `t`'s server namespace."""
    s = t.server
    for a in SERVER_ADDRESSES:
        in_ns(s, "ip", "addr", "add", f"{a}/32", "dev", "lo")
    cert, key = make_cert(tmp)
    w = World(t, tmp, cert, tmp / "events.jsonl",
              {"A": tmp / "dnsmasq-A.log", "B": tmp / "dnsmasq-B.log"})  # fmt: skip
    w.events_path.touch()
    with netns_resolv_conf(t):
        try:
            w.start_dnsmasq("A")
            w.start_dnsmasq("B")
            if proxy:
                cfg = tmp / "sing-box-proxy.json"
                cfg.write_text(json.dumps(singbox_proxy_config()))
                w.procs["proxy"] = Proc(["ip", "netns", "exec", s, singbox_path(), "run", "-c",
                                         str(cfg)], tmp / "sing-box-proxy.log")  # fmt: skip
                wait_tcp(s, PROXY, PROXY_PORT)
            w.procs["targets"] = Proc(["ip", "netns", "exec", s, sys.executable,
                                       str(HERE / "dns_server.py"), str(w.events_path), str(cert),
                                       str(key), *UDP_TARGETS], tmp / "dns_server.log")  # fmt: skip
            ok = wait_until(lambda: bool(w.events("ready"))
                            or w.procs["targets"].p.poll() is not None, 15)  # fmt: skip
            assert ok and w.procs["targets"].p.poll() is None, w.procs["targets"].text()
            yield w
        finally:
            for p in reversed(list(w.procs.values())):
                p.stop()


# -- capture ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    kind: str  # "udp", "tcp", "arp", "other"
    src: str
    dst: str
    sport: int = 0
    dport: int = 0


def read_pcap(path: Path) -> list[Packet]:
    """The packets of an Ethernet pcap file (tcpdump -w): addresses and ports."""
    import ipaddress

    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    assert linktype == 1, f"not Ethernet: linktype {linktype}"
    out: list[Packet] = []
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[off + 8 : off + 12])[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 14:
            continue
        etype = struct.unpack("!H", frame[12:14])[0]
        p = frame[14:]
        if etype == 0x0806 and len(p) >= 28:
            out.append(Packet("arp", str(ipaddress.IPv4Address(p[14:18])),
                              str(ipaddress.IPv4Address(p[24:28]))))  # fmt: skip
            continue
        if etype == 0x0800 and len(p) >= 20:
            ihl = (p[0] & 0x0F) * 4
            proto, src, dst, l4 = p[9], p[12:16], p[16:20], p[ihl:]
            src_s, dst_s = str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst))
        elif etype == 0x86DD and len(p) >= 40:
            proto, l4 = p[6], p[40:]  # extension headers do not occur in these tests
            src_s = str(ipaddress.IPv6Address(p[8:24]))
            dst_s = str(ipaddress.IPv6Address(p[24:40]))
        else:
            out.append(Packet("other", "", ""))
            continue
        if proto in (6, 17) and len(l4) >= 4:
            sport, dport = struct.unpack("!HH", l4[:4])
            out.append(Packet("tcp" if proto == 6 else "udp", src_s, dst_s, sport, dport))
        else:
            out.append(Packet("other", src_s, dst_s))
    return out


class Capture:
    """tcpdump -i IFACE -w FILE in a namespace, for the length of a `with` block."""

    def __init__(self, ns: str, iface: str, path: Path) -> None:
        self.ns, self.iface, self.path = ns, iface, path
        self.proc: Proc | None = None

    def __enter__(self) -> Capture:
        # --immediate-mode: without it libpcap hands packets over a ring block at a time, and
        # the block still open when tcpdump is stopped (the last ~second) is never written.
        self.proc = Proc(["ip", "netns", "exec", self.ns, "tcpdump", "-i", self.iface, "-n",
                          "--immediate-mode", "-U", "-s", "256", "-w", str(self.path)],
                         self.path.with_suffix(".log"))  # fmt: skip
        ok = wait_until(lambda: "listening on" in self.proc.text()  # type: ignore[union-attr]
                        or self.proc.p.poll() is not None, 10)  # type: ignore[union-attr]  # fmt: skip
        assert ok and self.proc.p.poll() is None, self.proc.text()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.stop(signal.SIGINT)

    def packets(self) -> list[Packet]:
        return read_pcap(self.path)


def dig_like(w: World, proto: str, server: str, name: str, qtype: str = "A",
             timeout: float = 5.0) -> dict[str, object]:  # fmt: skip
    """One query from the client namespace (dns_client.py query)."""
    return w.dns("query", proto, server, name, qtype, str(timeout), timeout=timeout + 30)

