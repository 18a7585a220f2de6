"""The socks outbound against Debian's microsocks, a SOCKS5 server that reads the greeting
with one read and drops whatever came with it: ztun's default CONNECT (the request after the
greeting's answer) works with it, a 10 MB download arrives sha256-exact, and the connection
is ready in well under `connect_timeout` (a pipelined request would have waited it out)."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

from tests.support import need
from ztun.address import Address

from .peers import (
    Proc,
    free_port,
    socks5_connect,
    start_http,
    start_ztun,
    wait_port,
    write_big_file,
)

CONFIG = """\
log: {{level: info}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen_port: {port}}}
outbounds:
  - {{type: socks, tag: proxy, server: 127.0.0.1, server_port: {micro}, connect_timeout: 5s}}
route: {{final: proxy}}
"""

#: The bound on one connection's set-up through microsocks on loopback (measured: a few ms;
#: a request dropped by the server would take the whole 5 s connect_timeout).
SETUP_BOUND = 2.0


def test_connect_through_microsocks(tmp_path: Path) -> None:
    binary = need(shutil.which("microsocks"), "microsocks (Debian package microsocks)")
    micro_port, http_port, port = free_port(), free_port(), free_port()
    micro = Proc([binary, "-i", "127.0.0.1", "-p", str(micro_port)], tmp_path / "micro.log")
    web = tmp_path / "web"
    web.mkdir()
    digest = write_big_file(web / "big.bin", 10 * 1024 * 1024)
    http = start_http(tmp_path, web, http_port)
    z = None
    try:
        wait_port(micro_port, micro.p)
        z = start_ztun(tmp_path, CONFIG.format(port=port, micro=micro_port), port)
        t0 = time.monotonic()
        s, code = socks5_connect(port, Address("127.0.0.1", http_port))
        setup = time.monotonic() - t0
        with s:
            assert code == 0, z.text()[-2000:]
            assert setup < SETUP_BOUND, setup
            s.settimeout(15)
            s.sendall(b"GET /big.bin HTTP/1.0\r\nHost: x\r\n\r\n")
            data = bytearray()
            while chunk := s.recv(1 << 20):
                data += chunk
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200"), head[:200]
        assert hashlib.sha256(body).hexdigest() == digest
        assert "Traceback" not in z.text()
    finally:
        if z is not None:
            z.stop()
        http.stop()
        micro.stop()
