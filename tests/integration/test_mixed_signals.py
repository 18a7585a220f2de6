"""`ztun run` lifecycle: the first SIGTERM/SIGINT stops accepting and lets open flows finish,
exit 0; a second signal exits at once; a bad config is one clear error, no traceback."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ztun.address import Address

from .peers import REPO, free_port, socks5_connect, start_ztun, tcp_half_close_server

CONFIG = """\
log: {{level: info}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen_port: {port}}}
outbounds:
  - {{type: direct, tag: direct}}
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_lets_open_flow_finish(tmp_path: Path, sig: int) -> None:
    port, echo = free_port(), free_port()
    with tcp_half_close_server(echo):
        z = start_ztun(tmp_path, CONFIG.format(port=port), port)
        try:
            s, code = socks5_connect(port, Address("127.0.0.1", echo))
            assert code == 0
            s.sendall(b"a" * 1000)
            z.p.send_signal(sig)
            time.sleep(0.3)
            # No longer accepting...
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), 1).close()
            # ...but the open flow still works, both ways, until it ends with FIN.
            s.sendall(b"b" * 1000)
            s.shutdown(socket.SHUT_WR)
            answer = s.makefile("rb").read()
            s.close()
            expected = hashlib.sha256(b"a" * 1000 + b"b" * 1000).hexdigest()
            assert answer.decode().split() == ["2000", expected]
            assert z.p.wait(10) == 0
        finally:
            z.stop()
        text = z.text()
        assert "Traceback" not in text
        assert "ztun stopped" in text


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    port, echo = free_port(), free_port()
    with tcp_half_close_server(echo):
        z = start_ztun(tmp_path, CONFIG.format(port=port), port)
        try:
            s, code = socks5_connect(port, Address("127.0.0.1", echo))
            assert code == 0  # held open: the grace period would wait for it
            z.p.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert z.p.poll() is None
            t0 = time.monotonic()
            z.p.send_signal(signal.SIGTERM)
            rc = z.p.wait(5)
            assert time.monotonic() - t0 < 2 and rc != 0
            s.close()
        finally:
            z.stop()


def test_bad_config_is_one_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("inbounds:\n  - {type: mixed, tag: m, listen_port: 1}\noutbounds: []\n"
                   "route: {rules: [{port: 99999, outbound: nowhere}]}\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "ztun", "run", str(cfg)], capture_output=True,
                       text=True, cwd=REPO, timeout=30)  # fmt: skip
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip()
