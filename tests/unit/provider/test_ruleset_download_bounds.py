"""Remote rule sets against hostile or broken servers: a real HTTP server in this process that
trickles bytes, never answers or sends too much; a cache that cannot be written; a cached copy
while the network hangs. Each test asserts the bound (time, memory, message)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ztun.check import load_and_compile
from ztun.provider import ruleset as provider
from ztun.provider.ruleset import RuleSetRefresher, load_rule_sets

SOURCE_A = json.dumps({"version": 2, "rules": [{"domain_suffix": "a.example"}]}).encode()
SOURCE_B = json.dumps({"version": 2, "rules": [{"domain_suffix": "b.example"}]}).encode()
T0 = 1_700_000_000.0
DAY = 86400.0
#: The download deadline of these tests (the real one is provider.DOWNLOAD_TIMEOUT, 10 s).
DEADLINE = 1.0

Behaviour = Callable[[socket.socket, threading.Event], None]


class RawServer:
    """A TCP server on loopback that hands each connection to `behaviour` in its own thread;
    `stop()` ends every behaviour (they poll `stopping`) and closes the listener."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.stopping = threading.Event()
        self.connections = 0
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server.connections += 1
                # OSError: the client hung up, which is what these clients are meant to do
                with contextlib.suppress(OSError):
                    server.behaviour(self.request, server.stopping)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.tcp = Server(("127.0.0.1", 0), Handler)
        self.port = self.tcp.server_address[1]
        self.thread = threading.Thread(target=self.tcp.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/set.json"

    def stop(self) -> None:
        self.stopping.set()
        self.tcp.shutdown()
        self.tcp.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], RawServer]]:
    servers: list[RawServer] = []

    def start(behaviour: Behaviour) -> RawServer:
        servers.append(RawServer(behaviour))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _read_request(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def answer(body: bytes, *, etag: str = '"v1"') -> Behaviour:
    def behaviour(sock: socket.socket, stopping: threading.Event) -> None:
        _read_request(sock)
        head = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nETag: {etag}\r\n"
                "Connection: close\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + body)

    return behaviour


def trickle(head: bytes, every: float = 0.2, *, tls: bool = False) -> Behaviour:
    """Send `head`, then one byte every `every` seconds for ever: each recv of the client gets
    data long before any per-read timeout. `tls`: answer a ClientHello (with a TLS record
    header announcing a long handshake message)."""

    def behaviour(sock: socket.socket, stopping: threading.Event) -> None:
        if tls:
            sock.recv(4096)
        else:
            _read_request(sock)
        sock.sendall(head)
        while not stopping.wait(every):
            sock.sendall(b"x")

    return behaviour


def never_answer(sock: socket.socket, stopping: threading.Event) -> None:
    _read_request(sock)
    stopping.wait(30)


def flood(*, declare: bool) -> Behaviour:
    """A body without end (64 KiB at a time), with or without a Content-Length saying so."""

    def behaviour(sock: socket.socket, stopping: threading.Event) -> None:
        _read_request(sock)
        length = "Content-Length: 1073741824\r\n" if declare else ""
        sock.sendall(f"HTTP/1.1 200 OK\r\n{length}Connection: close\r\n\r\n".encode())
        block = b"#" * 65536
        for _ in range(16 * 1024):  # at most 1 GiB, and only while the client reads
            if stopping.is_set():
                return
            sock.sendall(block)

    return behaviour


def remote(url: str, **extra: Any) -> dict[str, Any]:
    return {"tag": "r", "type": "remote", "url": url, **extra}


def load(entries: list[dict[str, Any]], tmp_path: Path, **kw: Any) -> Any:
    kw.setdefault("now", T0)
    kw.setdefault("timeout", DEADLINE)
    kw.setdefault("cache_dir", tmp_path / "cache")
    return load_rule_sets(entries, base_dir=tmp_path, **kw)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


# -- one overall deadline -----------------------------------------------------------------------


def _download_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ztun-rule-set-download"]


@pytest.mark.parametrize(
    ("head", "scheme"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", "http"),  # body, byte by byte
        (b"HTTP/1.1 200 OK\r\nX-Slow: ", "http"),  # headers that never end
        (b"", "http"),  # not even a status line
        (b"\x16\x03\x03\x40\x00", "https"),  # a 16 KiB TLS handshake record, byte by byte
    ],
    ids=["body", "headers", "status", "tls-handshake"],
)
def test_trickling_server_cannot_extend_the_deadline(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path, head: bytes, scheme: str
) -> None:
    server = serve(trickle(head, tls=scheme == "https"))
    url = server.url().replace("http:", f"{scheme}:")
    result, elapsed = timed(lambda: load([remote(url)], tmp_path))
    # One byte every 0.2 s would keep a per-read timeout alive for ever (100000 bytes: 5.5 h).
    assert elapsed < DEADLINE + 1.0, elapsed
    (error,) = result.diagnostics
    assert error.severity == "error" and error.path == ("route", "rule_set", 0, "url")
    assert f"within {DEADLINE:g}s" in error.message and "no cached copy" in error.message
    assert server.connections == 1
    # The download's own thread was cut loose too: its socket was shut down at the deadline.
    end = time.monotonic() + 1.0
    while _download_threads() and time.monotonic() < end:
        time.sleep(0.02)
    assert _download_threads() == []


def test_server_that_never_answers_costs_the_deadline_only(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path
) -> None:
    server = serve(never_answer)
    result, elapsed = timed(lambda: load([remote(server.url())], tmp_path))
    assert DEADLINE - 0.1 < elapsed < DEADLINE + 1.0, elapsed
    assert "within 1s" in result.diagnostics[0].message


# -- the size cap -------------------------------------------------------------------------------


@pytest.mark.parametrize("declare", [False, True], ids=["streamed", "declared"])
def test_oversized_download_is_refused_holding_at_most_the_cap(
    serve: Callable[[Behaviour], RawServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    declare: bool,
) -> None:
    cap = 256 * 1024
    monkeypatch.setattr(provider, "MAX_RULE_SET_BYTES", cap)
    server = serve(flood(declare=declare))
    tracemalloc.start()
    try:
        result, elapsed = timed(lambda: load([remote(server.url())], tmp_path, timeout=10.0))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (error,) = result.diagnostics
    assert error.severity == "error"
    assert "refused: the file is larger than the 256 KiB limit for rule sets" in error.message
    # The body never sits in memory beyond the cap (+ one 64 KiB read and urllib's buffers);
    # the server would have sent 1 GiB.
    assert peak < cap + 256 * 1024, peak  # measured: ~360 KiB, the server's block included
    assert elapsed < 5.0
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.data"))


def test_the_cap_is_in_the_message_in_mib(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path
) -> None:
    server = serve(flood(declare=True))
    result = load([remote(server.url())], tmp_path)
    assert "larger than the 64 MiB limit" in result.diagnostics[0].message


# -- a cache that cannot be written -------------------------------------------------------------


def test_unwritable_cache_dir_is_a_warning(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path
) -> None:
    server = serve(answer(SOURCE_A))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory's parent should be")
    # Root ignores permission bits: a file in the path fails the mkdir for every user.
    result = load([remote(server.url())], tmp_path, cache_dir=blocker / "ztun")
    assert result.sets == {"r": [{"domain_suffix": ["a.example"]}]}
    (warning,) = result.diagnostics
    assert warning.severity == "warning" and "cannot write the rule-set cache" in warning.message


def test_read_only_cache_on_revalidation_is_a_warning(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(answer(SOURCE_A))
    load([remote(server.url())], tmp_path)  # cached at T0

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # every atomic write makes one
    server.behaviour = answer(SOURCE_B, etag='"v2"')
    result = load([remote(server.url())], tmp_path, now=T0 + 2 * DAY)
    assert result.sets == {"r": [{"domain_suffix": ["b.example"]}]}
    assert [d.severity for d in result.diagnostics] == ["warning"]
    assert "Read-only file system" in result.diagnostics[0].message

    # and in the background refresh: logged, never raised
    background = load([remote(server.url())], tmp_path, now=T0 + 4 * DAY,
                      refresh_in_background=True)  # fmt: skip
    (job,) = background.refresh
    findings = job.refresh(T0 + 4 * DAY)
    assert [severity for severity, _ in findings] == ["warning"]


# -- a cached copy: start-up never waits for the network ----------------------------------------


def test_cached_copy_starts_at_once_and_refreshes_in_background(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(answer(SOURCE_A))
    load([remote(server.url())], tmp_path)  # cached at T0
    server.behaviour = never_answer

    result, elapsed = timed(lambda: load([remote(server.url())], tmp_path, now=T0 + 2 * DAY,
                                         refresh_in_background=True))  # fmt: skip
    assert elapsed < 0.2, elapsed  # the server would have held it for the whole deadline
    assert result.sets == {"r": [{"domain_suffix": ["a.example"]}]}
    assert result.diagnostics == []
    assert server.connections == 1  # only the first download so far
    (job,) = result.refresh
    assert job.next_at == T0 + 2 * DAY  # stale: due at once

    clock = [T0 + 2 * DAY]
    refresher = RuleSetRefresher(result.refresh, clock=lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="ztun.provider"):
        _, elapsed = timed(refresher.start)
        assert elapsed < 0.2
        deadline = time.monotonic() + DEADLINE + 2.0
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.02)
        refresher.stop()
        assert refresher.join(2.0)
    assert server.connections == 2  # the background refresh asked the server
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "cannot download" in record.getMessage() and "using the copy cached 2d ago" in (
        record.getMessage()
    )
    assert job.next_at == T0 + 3 * DAY  # and again one update_interval later


def test_background_refresh_writes_the_new_copy(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path
) -> None:
    server = serve(answer(SOURCE_A))
    load([remote(server.url())], tmp_path)
    server.behaviour = answer(SOURCE_B, etag='"v2"')
    result = load([remote(server.url())], tmp_path, now=T0 + 2 * DAY, refresh_in_background=True)
    assert result.sets == {"r": [{"domain_suffix": ["a.example"]}]}  # the cached copy
    (job,) = result.refresh
    findings = job.refresh(T0 + 2 * DAY)
    assert [s for s, _ in findings] == ["info"] and "next start" in findings[0][1]
    offline = load([remote(server.url())], tmp_path, now=T0 + 2 * DAY, offline=True)
    assert offline.sets == {"r": [{"domain_suffix": ["b.example"]}]}


def test_fresh_copy_is_not_due_and_no_copy_is_downloaded_at_start(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path
) -> None:
    server = serve(answer(SOURCE_A))
    first = load([remote(server.url(), update_interval="1h")], tmp_path,
                 refresh_in_background=True)  # fmt: skip
    assert first.sets == {"r": [{"domain_suffix": ["a.example"]}]}  # downloaded: no copy yet
    assert first.refresh[0].next_at == T0 + 3600
    again = load([remote(server.url(), update_interval="1h")], tmp_path, now=T0 + 60,
                 refresh_in_background=True)  # fmt: skip
    assert again.refresh[0].next_at == T0 + 3600
    assert server.connections == 1


def test_ztun_run_start_up_uses_the_cache_while_the_server_hangs(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline `ztun run` starts from: a stale cached set, a server that never answers."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    server = serve(answer(SOURCE_A))
    config = tmp_path / "c.yaml"
    config.write_text(
        "outbounds:\n  - {type: direct, tag: direct}\n"
        "route:\n"
        f"  rule_set:\n    - {{tag: r, type: remote, url: '{server.url()}', update_interval: 1s}}\n"
        "  rules:\n    - {rule_set: r, outbound: direct}\n"
    )
    load_and_compile(config)  # downloads and caches
    time.sleep(1.1)  # now stale
    server.behaviour = never_answer
    compiled, elapsed = timed(lambda: load_and_compile(config))
    assert elapsed < 0.5, elapsed  # DOWNLOAD_TIMEOUT is 10 s
    assert [job.tag for job in compiled.rule_set_refresh] == ["r"]
    assert server.connections == 1
