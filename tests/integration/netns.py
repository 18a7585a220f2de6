"""Network namespaces for the TUN tests: a client and a server namespace joined by a veth.

    client ns (ztun, curl, clients)          server ns (sing-box SOCKS5, HTTP, echo, iperf3)
    eth0 198.51.100.1/24 2001:db8:1::1/64 ── eth0 198.51.100.2/24 2001:db8:1::2/64
    default via the server                   lo: 203.0.113.{10,20,30}/32, 2001:db8:2::{10,20,30}

The test destinations sit behind the client's default route (not on its link), so auto_route
sends them into the TUN. Everything is deleted afterwards, also when a test fails; nothing is
added to the root namespace except the two namespaces themselves (and the veth while it moves).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import need

HERE = Path(__file__).resolve().parent
DIRECT4, PROXY4, BLOCK4 = "203.0.113.10", "203.0.113.20", "203.0.113.30"
DIRECT6, PROXY6, BLOCK6 = "2001:db8:2::10", "2001:db8:2::20", "2001:db8:2::30"
SERVER4, SERVER6 = "198.51.100.2", "2001:db8:1::2"
SNAPSHOT = (
    ("ip", "route", "show", "table", "all"),
    ("ip", "-6", "route", "show", "table", "all"),
    ("ip", "rule"),
    ("ip", "-6", "rule"),
    ("ip", "link"),
)


def require_tun_environment() -> None:
    """Root, /dev/net/tun and the tools: skip locally when missing, fail under CI."""
    need("root" if os.geteuid() == 0 else None, "root (network namespaces and TUN)")
    need("tun" if os.path.exists("/dev/net/tun") else None, "/dev/net/tun")
    for tool in ("ip", "curl", "iperf3", "ping"):
        need(shutil.which(tool), tool)


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def in_ns(ns: str, *args: str, check: bool = True, timeout: float = 60,
          input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(["ip", "netns", "exec", ns, *args], check=check, capture_output=True,
                          text=True, timeout=timeout, input=input)  # fmt: skip


@dataclass
class Topology:
    name: str
    client: str
    server: str

    def snapshot(self) -> str:
        """The client's routing state, as the issue asks to compare it.

        Waits until no IPv6 address is tentative: the kernel adds a link-local address's
        `local` route only when duplicate address detection ends, and a snapshot taken before
        that would differ from one taken after for reasons that have nothing to do with ztun.
        """
        wait_until(
            lambda: not in_ns(self.client, "ip", "-6", "addr", "show", "tentative").stdout.strip(),
            10,
        )
        out = []
        for cmd in SNAPSHOT:
            out.append(in_ns(self.client, *cmd).stdout)
        return "\n".join(out)

    def client_python(self, script: str, *args: str, timeout: float = 120) -> str:
        r = in_ns(self.client, sys.executable, str(HERE / script), *args, check=False,
                  timeout=timeout)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    tag = secrets.token_hex(3)
    t = Topology(f"ztun-t-{tag}", f"ztun-t-{tag}-c", f"ztun-t-{tag}-s")
    va, vb = f"zt{tag}a", f"zt{tag}b"
    try:
        sh("ip", "netns", "add", t.client)
        sh("ip", "netns", "add", t.server)
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        sh("ip", "link", "set", va, "netns", t.client)
        sh("ip", "link", "set", vb, "netns", t.server)
        for ns, dev, v4, v6 in ((t.client, va, "198.51.100.1/24", "2001:db8:1::1/64"),
                                (t.server, vb, "198.51.100.2/24", "2001:db8:1::2/64")):  # fmt: skip
            in_ns(ns, "ip", "link", "set", "lo", "up")
            in_ns(ns, "ip", "link", "set", dev, "name", "eth0")
            in_ns(ns, "ip", "addr", "add", v4, "dev", "eth0")
            in_ns(ns, "ip", "addr", "add", v6, "dev", "eth0", "nodad")
            in_ns(ns, "ip", "link", "set", "eth0", "mtu", "9000", "up")
        in_ns(t.client, "ip", "route", "add", "default", "via", SERVER4)
        in_ns(t.client, "ip", "-6", "route", "add", "default", "via", SERVER6)
        for a in (DIRECT4, PROXY4, BLOCK4):
            in_ns(t.server, "ip", "addr", "add", f"{a}/32", "dev", "lo")
        for a in (DIRECT6, PROXY6, BLOCK6):
            in_ns(t.server, "ip", "addr", "add", f"{a}/128", "dev", "lo", "nodad")
        yield t
    finally:
        sh("ip", "netns", "del", t.client, check=False)
        sh("ip", "netns", "del", t.server, check=False)
        sh("ip", "link", "del", va, check=False)  # only if it never moved


def wait_tcp(ns: str, host: str, port: int, timeout: float = 15) -> None:
    code = ("import socket,sys,time\n"
            f"d=time.monotonic()+{timeout}\n"
            "while time.monotonic()<d:\n"
            "    try:\n"
            f"        socket.create_connection(({host!r},{port}),0.5).close(); sys.exit(0)\n"
            "    except OSError: time.sleep(0.05)\n"
            "sys.exit(1)\n")  # fmt: skip
    r = in_ns(ns, sys.executable, "-c", code, check=False, timeout=timeout + 5)
    if r.returncode:
        raise TimeoutError(f"nothing listens on {host}:{port} in {ns}")


def wait_until(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())

