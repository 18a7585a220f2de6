"""The owner lookup: its parsers (arbitrary input, never an exception) and `OwnerFinder` on
this process's own sockets (loopback only, no namespace needed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
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


# -- the inline step against another process ---------------------------------------------------

#: A client process: N connections to PORT, "ready"; then per stdin line: "swap" passes its
#: newest socket to a child over a Unix socket and closes its own copy, printing the child's
#: pid; "exit" ends.
HOLDER = r"""
import os, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "swap":
        a, b = socket.socketpair(socket.AF_UNIX)
        pid = os.fork()
        if pid == 0:
            a.close()
            _, fds, _, _ = socket.recv_fds(b, 1, 1)
            b.recv(1)  # holds the passed socket until the parent goes
            os._exit(0)
        b.close()
        socket.send_fds(a, [b"x"], [held[-1].fileno()])
        held.pop().close()
        print(pid, flush=True)
    else:
        break
"""


@contextlib.contextmanager
def held_by_child(n: int) -> Iterator[tuple[subprocess.Popen[str], list[socket.socket]]]:
    """A child process (HOLDER) with `n` TCP connections to a listener here: the child and
    this side's accepted sockets, once the child says it is ready."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", HOLDER, str(port), str(n)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdin is not None
        conns = [srv.accept()[0] for _ in range(n)]
        try:
            assert child.stdout.readline().strip() == "ready"
            yield child, conns
        finally:
            child.stdin.close()
            child.wait(10)
            for c in conns:
                c.close()


@linux
def test_concurrent_first_lookups_share_one_search() -> None:
    """The first flows of a new client, looked up together: one search by the worker finds
    the process and hands its fd table over; the others wait for it and are found inline."""

    from ztun.platform.linux.owner import OwnerFinder

    async def main() -> tuple[list[int | None], int, int]:
        finder = OwnerFinder(process=True)
        with held_by_child(20) as (child, conns):
            owners = await asyncio.gather(*(
                finder.find("tcp", *c.getpeername(), *c.getsockname()) for c in conns))
        finder.close()
        return [o.pid for o in owners], child.pid, finder.searches

    pids, child_pid, searches = asyncio.run(main())
    if pids[0] is None:
        pytest.skip("sock_diag is not available here")
    assert pids == [child_pid] * 20
    assert searches <= 2, searches


@linux
def test_a_passed_socket_names_its_new_holder_within_the_trust_bound() -> None:
    """A socket passed to another process (SCM_RIGHTS) and closed by its first owner: named
    by its old owner for at most INDEX_TRUST, then by the process that holds it."""

    from ztun.platform.linux import owner as mod

    finder = mod.OwnerFinder(process=True)
    with held_by_child(3) as (child, conns):
        assert child.stdout is not None and child.stdin is not None
        args = ("tcp", *conns[-1].getpeername(), *conns[-1].getsockname())
        first = finder.lookup(*args)
        if first.pid is None:
            pytest.skip("sock_diag is not available here")
        assert first.pid == child.pid
        child.stdin.write("swap\n")
        child.stdin.flush()
        holder = int(child.stdout.readline())
        time.sleep(mod.INDEX_TRUST + 0.1)
        assert finder.lookup(*args).pid == holder
    finder.close()


#: A client churning connections as bench_tun.py's load does (bench/tun_load.py `rate`).
LOAD = str(Path(__file__).resolve().parents[3] / "bench" / "tun_load.py")


@linux
def test_a_churning_client_costs_few_links_per_lookup() -> None:
    """Issue 16's cost bound, as what it is made of: fd links read per lookup (each about
    3 µs) and the share of lookups the worker had to search for. Measured: about 2 links
    and under 0.1 % (bench/bench_owner.py); bounds with a wide margin, not timings."""

    from ztun.platform.linux.owner import OwnerFinder

    async def main() -> tuple[OwnerFinder, int]:
        finder = OwnerFinder(process=True)
        looked = 0

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal looked
            sock = w.get_extra_info("socket")
            owner = await finder.find("tcp", *sock.getpeername(), *sock.getsockname())
            if owner.pid is not None:
                looked += 1
            w.write(await r.read(1))
            w.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=256)
        port = srv.sockets[0].getsockname()[1]
        client = await asyncio.create_subprocess_exec(
            sys.executable, LOAD, "rate", "127.0.0.1", str(port), "64", "1.5",
            stdout=subprocess.PIPE)
        await client.communicate()
        srv.close()
        finder.close()
        return finder, looked

    finder, looked = asyncio.run(main())
    if looked == 0:
        pytest.skip("sock_diag is not available here")
    assert looked >= 200, looked
    assert finder.links / looked < 8, (finder.links, looked)
    assert finder.searches / looked < 0.05, (finder.searches, looked)
