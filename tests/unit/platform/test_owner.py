"""The owner lookup: its parsers (arbitrary input, never an exception) and `OwnerFinder` on
this process's own sockets (loopback only, no namespace needed)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztun.platform.linux.owner_parse import (
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    DiagAnswer,
    diag_request,
    parse_diag_reply,
    parse_exe_link,
    parse_socket_link,
    process_name,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


# -- parsers ----------------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_diag_reply_survives_any_bytes(data: bytes) -> None:
    answer = parse_diag_reply(data)
    assert answer is None or isinstance(answer, DiagAnswer)


@given(st.text(max_size=80))
def test_link_parsers_survive_any_text(text: str) -> None:
    inode = parse_socket_link(text)
    assert inode is None or inode >= 0
    path = parse_exe_link(text)
    assert path is None or path.startswith("/")


@given(st.integers(0, 2**64))
def test_socket_link_round_trip(inode: int) -> None:
    assert parse_socket_link(f"socket:[{inode}]") == inode


def test_links() -> None:
    assert parse_socket_link("pipe:[12]") is None
    assert parse_socket_link("socket:[]") is None
    assert parse_socket_link("socket:[１２]") is None  # full-width digits are not digits here
    assert parse_exe_link("/usr/bin/curl (deleted)") == "/usr/bin/curl"
    assert parse_exe_link("curl") is None
    assert process_name("/opt/zt/zt-blocked") == "zt-blocked"


def _message(kind: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**31 - 1))
def test_diag_reply_fields(uid: int, inode: int, seq: int) -> None:
    body = bytes(4 + 48 + 12) + struct.pack("=II", uid, inode)
    assert parse_diag_reply(_message(SOCK_DIAG_BY_FAMILY, seq, body)) == DiagAnswer(seq, uid, inode)
    error = _message(NLMSG_ERROR, seq, struct.pack("=i", -2) + bytes(16))
    assert parse_diag_reply(error) == DiagAnswer(seq, errno=2)
    # A length beyond the data, or a short message: nothing.
    assert parse_diag_reply(_message(SOCK_DIAG_BY_FAMILY, seq, body)[:-1]) is None
    assert parse_diag_reply(_message(SOCK_DIAG_BY_FAMILY, seq, body[:20])) is None


def test_diag_request_layout() -> None:
    req = diag_request(2, 6, bytes([198, 51, 100, 1]), 40000, bytes([203, 0, 113, 9]), 443, 7)
    assert len(req) == 16 + 56
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq) == (72, SOCK_DIAG_BY_FAMILY, 1, 7)
    assert struct.unpack_from(">HH", req, 24) == (40000, 443)
    assert req[28:32] == bytes([198, 51, 100, 1]) and req[44:48] == bytes([203, 0, 113, 9])
    with pytest.raises(ValueError):
        diag_request(2, 6, b"\0" * 4, 70000, b"\0" * 4, 1, 1)


# -- the finder, on this process's sockets ----------------------------------------------------


@linux
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_finds_own_tcp_and_udp_sockets(host: str) -> None:
    from ztun.platform.linux.owner import UNKNOWN, OwnerFinder

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    finder = OwnerFinder(process=True)
    with socket.socket(fam) as srv:
        srv.bind((host, 0))
        srv.listen()
        with socket.create_connection(srv.getsockname()[:2]) as c:
            local, remote = c.getsockname()[:2], srv.getsockname()[:2]
            t0 = time.monotonic()
            owner = finder.lookup("tcp", *local, *remote)
            took = time.monotonic() - t0
            # Bound asked for by the issue (generous margin): one lookup well under a second.
            assert took < 0.5, took
            if owner is UNKNOWN:
                pytest.skip("sock_diag is not available here")
            assert owner.pid == os.getpid() and owner.user_id == os.geteuid()
            assert owner.path == os.path.realpath(f"/proc/{os.getpid()}/exe")
            assert owner.name == os.path.basename(owner.path)
    with socket.socket(fam, socket.SOCK_DGRAM) as u:
        u.bind((host, 0))
        peer = "203.0.113.9" if fam == socket.AF_INET else "2001:db8::9"
        found = finder.lookup("udp", host, u.getsockname()[1], peer, 53)
        assert found.pid == os.getpid()
    # A socket nobody has: unknown, no error.
    assert finder.lookup("tcp", host, 1, host, 2) is UNKNOWN
    assert finder.lookup("udp", host, 1, "not an ip", 2) is UNKNOWN


@linux
def test_find_runs_off_the_loop_and_user_only_skips_proc() -> None:
    from ztun.platform.linux.owner import OwnerFinder

    async def main() -> None:
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            with socket.create_connection(srv.getsockname()) as c:
                args = ("tcp", *c.getsockname(), *srv.getsockname())
                full = await OwnerFinder(process=True).find(*args)
                user_only = OwnerFinder(process=False)
                first = await user_only.find(*args)
                second = await user_only.find(*args)  # the name is cached: no thread
        if full.user_id is None:
            pytest.skip("sock_diag is not available here")
        assert full.pid == os.getpid()
        assert first.pid is None and first.user_id == os.geteuid() and first == second

    asyncio.run(main())


@linux
def test_search_gives_up_by_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from ztun.platform.linux import owner as mod

    finder = mod.OwnerFinder(process=True)
    monkeypatch.setattr(mod, "SCAN_DEADLINE", 0.0)
    t0 = time.monotonic()
    # An inode no process has: the search ends at once instead of walking /proc.
    assert finder.process_of(os.geteuid(), 2**40).pid is None
    assert time.monotonic() - t0 < 0.5


@linux
def test_a_process_of_recent_flows_is_found_inline() -> None:
    """After one search, the next sockets of the same process are found without the worker
    thread (the inline probe), also as old sockets close and their fds are reused."""
    from ztun.platform.linux.owner import OwnerFinder

    finder = OwnerFinder(process=True)

    async def main() -> list[int | None]:
        pids = []
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(64)
            live: list[socket.socket] = []
            for _ in range(40):
                if len(live) >= 16:
                    live.pop(0).close()  # the oldest closes; its fd is reused next
                c = socket.create_connection(srv.getsockname())
                live.append(c)
                owner = await finder.find("tcp", *c.getsockname(), *srv.getsockname())
                pids.append(owner.pid)
            for c in live:
                c.close()
        return pids

    pids = asyncio.run(main())
    finder.close()
    if pids[0] is None:
        pytest.skip("sock_diag is not available here")
    assert pids == [os.getpid()] * 40
    assert finder.searches == 1  # only the first went to the worker


@linux
def test_an_exited_process_leaves_the_recent_list(tmp_path: Path) -> None:
    import subprocess

    from ztun.platform.linux.owner import OwnerFinder

    finder = OwnerFinder(process=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        finder._track(child.pid)
        assert child.pid in finder._procs
    finally:
        child.kill()
        child.wait()
    assert finder._recent_owner(0, None, 2**40) is None
    assert child.pid not in finder._procs
    finder.close()
