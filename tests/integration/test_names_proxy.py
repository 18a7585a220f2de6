"""Hostile host names against a real `ztun run` (issue 12, "Names"): its mixed inbound answers
SOCKS5, SOCKS4a, HTTP CONNECT and absolute-URI GET requests naming a host that cannot exist
with the protocol's error reply, curl shows that reply, the log has no traceback and no line
longer than a few hundred bytes, and a good name still goes through. Loopback only; names
never leave the host (the refusal comes before any lookup)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from .peers import Proc, curl_path, free_port, start_http, start_ztun

NAMES = {
    "254": (".".join(["a" * 49] * 5) + ".abcd").encode(),
    "empty-label": b"a..b",
    "label-64": b"a" * 64 + b".example",
    "16k": b"a." * 8000 + b"example",
}
SOCKS5_REFUSED = b"\x05\x00" + b"\x05\x04\x00\x01" + bytes(6)
SOCKS4_REFUSED = b"\x00\x5b" + bytes(6)
HTTP_400 = b"HTTP/1.1 400 Bad Request\r\n"

CONFIG = """\
log: {{level: debug}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen_port: {port}}}
outbounds:
  - {{type: direct, tag: direct}}
route:
  rules:
    - {{domain_keyword: [aaaa], outbound: direct}}
    - {{domain_suffix: [example], outbound: direct}}
  final: direct
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Proc]]:
    curl_path()
    tmp = tmp_path_factory.mktemp("names")
    www = tmp / "www"
    www.mkdir()
    (www / "ok.txt").write_text("good name\n")
    port, http_port = free_port(), free_port()
    http = start_http(tmp, www, http_port)
    try:
        z = start_ztun(tmp, CONFIG.format(port=port), port)
        try:
            yield port, http_port, z
        finally:
            z.stop()
    finally:
        http.stop()


def _exchange(port: int, *messages: bytes) -> bytes:
    """Send each message (waiting for an answer between them), then read until closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        got = b""
        for i, m in enumerate(messages):
            s.sendall(m)
            if i < len(messages) - 1:
                got += s.recv(4096)
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return got


def _requests(name: bytes) -> dict[str, tuple[tuple[bytes, ...], bytes]]:
    s5 = name[:255]  # one length byte: the longest SOCKS5 name
    return {
        "socks5": ((b"\x05\x01\x00", b"\x05\x01\x00\x03" + bytes((len(s5),)) + s5 + b"\x00\x50"),
                   SOCKS5_REFUSED),
        "socks4a": ((b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + name + b"\x00",), SOCKS4_REFUSED),
        "http-connect": ((b"CONNECT " + name + b":443 HTTP/1.1\r\n\r\n",), HTTP_400),
        "http-get": ((b"GET http://" + name + b"/ HTTP/1.1\r\nHost: " + name + b"\r\n\r\n",),
                     HTTP_400),
    }  # fmt: skip


@pytest.mark.parametrize("proto", ["socks5", "socks4a", "http-connect", "http-get"])
def test_bad_names_get_the_protocols_reply(proxy: tuple[int, int, Proc], proto: str) -> None:
    port, _, z = proxy
    for case, name in NAMES.items():
        messages, expected = _requests(name)[proto]
        t0 = time.monotonic()
        got = _exchange(port, *messages)
        took = time.monotonic() - t0
        if proto.startswith("socks"):
            assert got == expected, (case, got[:40])
        else:
            assert got.startswith(expected), (case, got[:40])
        assert took < 2, (case, took)  # a refusal, not a timeout (per-refusal bounds: unit tests)
    assert z.p.poll() is None


def test_curl_sees_the_refusal_and_a_good_name_goes_through(proxy: tuple[int, int, Proc]) -> None:
    port, http_port, _ = proxy
    curl = curl_path()
    label64 = "a" * 64 + ".example"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([curl, "-sS", "--max-time", "10", *args],
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    r = run("-x", f"socks5h://127.0.0.1:{port}", f"http://{label64}/")
    assert r.returncode == 97, r.stderr  # CURLE_PROXY: the SOCKS5 reply was a refusal
    r = run("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}",
            f"http://{label64}/")  # fmt: skip
    assert r.stdout == "400", (r.stdout, r.stderr)
    r = run("-o", "/dev/null", "-w", "%{http_code}", "-p", "-x", f"http://127.0.0.1:{port}",
            f"http://{label64}/")  # fmt: skip
    assert "400" in r.stdout + r.stderr
    for proxy_url in (f"socks5h://127.0.0.1:{port}", f"socks4a://127.0.0.1:{port}",
                      f"http://127.0.0.1:{port}"):  # fmt: skip
        r = run("-x", proxy_url, f"http://localhost:{http_port}/ok.txt")
        assert r.returncode == 0 and r.stdout == "good name\n", (proxy_url, r.stderr)


def test_log_has_no_traceback_and_bounded_lines(proxy: tuple[int, int, Proc]) -> None:
    port, _, z = proxy
    # what the other tests of this module sent, once more, in case this one runs alone
    for proto in ("socks5", "http-get"):
        messages, _ = _requests(NAMES["16k"])[proto]
        _exchange(port, *messages)
    time.sleep(0.2)
    text = z.text()
    assert "Traceback" not in text and "UnicodeError" not in text
    assert "refused: " in text
    longest = max(len(line) for line in text.splitlines())
    assert longest < 1000, longest

