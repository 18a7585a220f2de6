"""The shipped example local-proxy.yaml runs without root and proxies."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ztun.resources import EXAMPLE_DIR

from .peers import curl_path, free_port, start_http, start_ztun

EXAMPLE = EXAMPLE_DIR / "local-proxy.yaml"


def test_local_proxy_example_runs(tmp_path: Path) -> None:
    curl = curl_path()
    port, http_port = free_port(), free_port()
    text = re.sub(r"listen_port:\s*\d+", f"listen_port: {port}", EXAMPLE.read_text())
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello\n")
    http = start_http(tmp_path, www, http_port)
    z = start_ztun(tmp_path, text, port, "example")
    try:
        for proxy in (f"socks5h://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
            r = subprocess.run([curl, "-sS", "--max-time", "10", "-x", proxy,
                                f"http://127.0.0.1:{http_port}/hello.txt"],
                               capture_output=True, timeout=30)  # fmt: skip
            assert r.stdout == b"hello\n", r.stderr
        assert z.p.poll() is None
    finally:
        assert z.stop() == 0
        http.stop()
    assert "Traceback" not in z.text()
