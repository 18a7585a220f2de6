"""Worker processes (issue 13, "all cores"): connections of the mixed inbound and of
auto_redirect spread over processes; a worker killed mid-transfer resets its flows at once and
is replaced; stops like the main process and leaves nothing behind.

The mixed tests run on loopback in the test's own namespace (nothing on the host changes); the
auto_redirect tests in the namespaces of tests/integration/netns.py. Which process serves a
connection is read from `ss -tnp` (the owner of its sockets) and from the flow log, whose
lines of a worker begin with `worker=N pid=P`; worker pids from ztun's own log
("worker N started (pid P)").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import need
from ztun.address import Address

from .netns import DIRECT4, DIRECT6, Topology, in_ns, topology, wait_until
from .peers import Proc, free_port, socks5_connect, start_ztun, tcp_server, write_big_file
from .test_tun_linux import BIG, HTTP_PORT, served_topology, stop, url
from .test_tun_linux import start_ztun as start_ztun_ns
from .test_tun_redirect import REDIRECT_CONFIG, redirected, require_nftables, snapshot

#: How long a client of a killed worker may wait for its reset or EOF (a hang would be the
#: socket timeout, 10 s); measured: a few milliseconds.
RESET_BOUND = 2.0
#: How long the replacement of a killed worker may take (backoff 0.1 s plus a fork).
RESTART_BOUND = 5.0

MIXED_CONFIG = """\
workers: 3
log: {{level: info}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen_port: {port}}}
outbounds:
  - {{type: direct, tag: direct}}
"""

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
FLOW = re.compile(r"(?:worker=(\d+) pid=(\d+) )?flow (.*)$")


def worker_pids(text: str) -> dict[int, int]:
    """worker index → pid of its latest start."""
    return {int(i): int(p) for i, p in STARTED.findall(text)}


def flows_by_pid(text: str, main: int) -> list[tuple[int, str]]:
    """(pid that served it, the rest of the line) for every flow line."""
    out = []
    for line in text.splitlines():
        m = FLOW.search(line)
        if m:
            out.append((int(m.group(2)) if m.group(2) else main, m.group(3)))
    return out


def alive(pid: int) -> bool:
    """Whether `pid` is still a ztun process, or one on its way out that may still hold its
    sockets (not a zombie yet), and not a pid reused by another program."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    if state in ("Z", "X"):
        return False
    # An exiting process drops its memory (so its command line reads empty) before it
    # closes its files.
    return not cmd or b"ztun" in cmd


def owners(ss_output: str, pids: set[int]) -> set[int]:
    """The pids among `pids` that own a socket in `ss -tnpH` output."""
    return {int(p) for p in re.findall(r"pid=(\d+)", ss_output) if int(p) in pids}


def _stream(c: socket.socket, stop: threading.Event) -> None:
    chunk = b"z" * 65536
    with c:
        c.settimeout(10)
        while not stop.is_set():
            try:
                c.sendall(chunk)
            except OSError:
                return


def _echo(c: socket.socket, stop: threading.Event) -> None:
    with c:
        c.settimeout(10)
        with contextlib.suppress(OSError):
            while data := c.recv(65536):
                c.sendall(data)


def stream_server() -> contextlib.AbstractContextManager[int]:
    """Sends to every client until it goes away (a download without end), echoes nothing."""
    return tcp_server(_stream)


def echo_server() -> contextlib.AbstractContextManager[int]:
    return tcp_server(_echo)


def echo_once(port: int, echo: int) -> None:
    s, code = socks5_connect(port, Address("127.0.0.1", echo))
    with s:
        assert code == 0
        s.settimeout(5)
        s.sendall(b"ping")
        assert s.recv(16) == b"ping"


def socket_owner(port: int, client: socket.socket, pids: set[int]) -> int | None:
    """The ztun process that accepted `client`'s connection to `port` (ss, by ports)."""
    mine = client.getsockname()[1]
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} and "
                          f"dport = :{mine} )"], capture_output=True, text=True,
                         timeout=10).stdout  # fmt: skip
    found = owners(out, pids)
    return found.pop() if len(found) == 1 else None


@dataclass
class Mixed:
    port: int
    z: Proc

    @property
    def main(self) -> int:
        return self.z.pid

    def workers(self) -> dict[int, int]:
        return worker_pids(self.z.text())


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[Mixed]:
    need("ok" if _has_ss() else None, "ss (iproute2)")
    port = free_port()
    z = start_ztun(tmp_path, MIXED_CONFIG.format(port=port), port)
    try:
        assert wait_until(lambda: len(worker_pids(z.text())) == 2, 10), z.text()
        yield Mixed(port, z)
    finally:
        z.stop()


def _has_ss() -> bool:
    try:
        return subprocess.run(["ss", "-V"], capture_output=True, timeout=10).returncode == 0
    except OSError:
        return False


def test_connections_are_spread_over_the_processes(mixed: Mixed) -> None:
    with echo_server() as echo:
        for _ in range(30):
            echo_once(mixed.port, echo)
    pids = set(mixed.workers().values()) | {mixed.main}

    def served() -> set[int]:
        return {pid for pid, _ in flows_by_pid(mixed.z.text(), mixed.main)}

    assert wait_until(lambda: len(flows_by_pid(mixed.z.text(), mixed.main)) >= 30, 5)
    # 30 connections over 3 processes: all in one has a chance of 3 in 3^30.
    assert len(served()) >= 2 and served() <= pids, mixed.z.text()[-3000:]
    assert "Traceback" not in mixed.z.text()


def test_a_killed_worker_resets_its_flows_at_once_and_is_replaced(mixed: Mixed) -> None:
    workers = mixed.workers()
    pids = set(workers.values()) | {mixed.main}
    held: list[tuple[socket.socket, int | None]] = []
    victim = client = None
    with stream_server() as stream, echo_server() as echo:
        try:
            for _ in range(40):  # until a connection lands in a worker (2 in 3 do)
                s, code = socks5_connect(mixed.port, Address("127.0.0.1", stream))
                assert code == 0
                s.settimeout(10)
                assert s.recv(65536)  # the download runs
                owner = socket_owner(mixed.port, s, pids)
                held.append((s, owner))
                if owner is not None and owner != mixed.main:
                    victim, client = owner, s
                    break
            assert victim is not None and client is not None, "no connection reached a worker"
            index = next(i for i, p in workers.items() if p == victim)
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            ended = "?"
            try:
                while client.recv(1 << 20):
                    pass
                ended = "eof"
            except ConnectionResetError:
                ended = "reset"
            took = time.monotonic() - t0
            assert ended in ("eof", "reset") and took < RESET_BOUND, (ended, took)
            # Replaced within the bound, with a new pid...
            assert wait_until(lambda: mixed.workers().get(index) not in (None, victim),
                              RESTART_BOUND), mixed.z.text()[-2000:]  # fmt: skip
            new = mixed.workers()[index]
            assert alive(new) and not alive(victim)
            text = mixed.z.text()
            assert f"worker {index} (pid {victim}) was killed by SIGKILL" in text, text[-2000:]
            # ...and every new connection works, some of them in the new worker.
            before = len(flows_by_pid(mixed.z.text(), mixed.main))
            for _ in range(30):
                echo_once(mixed.port, echo)
            assert wait_until(lambda: len(flows_by_pid(mixed.z.text(), mixed.main)) >= before + 30,
                              5)  # fmt: skip
            served = {pid for pid, _ in flows_by_pid(mixed.z.text(), mixed.main)[before:]}
            assert new in served, (new, served)
            # The other flows (in the main process) go on.
            for s, owner in held:
                if owner == mixed.main:
                    assert s.recv(65536)
        finally:
            for s, _ in held:
                s.close()


@pytest.mark.parametrize("everyone", [False, True], ids=["main", "every-process"])
def test_sigterm_stops_workers_with_the_grace_period_and_nothing_is_left(
    mixed: Mixed, everyone: bool
) -> None:
    """SIGTERM to the main process, or to every process as systemd's stop does (the workers'
    own signal and the main process's stop count as one: no early exit)."""
    pids = set(mixed.workers().values())
    conns: list[socket.socket] = []
    with echo_server() as echo:
        try:
            for _ in range(12):  # open flows in (very likely) every process
                s, code = socks5_connect(mixed.port, Address("127.0.0.1", echo))
                assert code == 0
                s.settimeout(5)
                conns.append(s)
            in_workers = {socket_owner(mixed.port, s, pids | {mixed.main}) for s in conns}
            assert in_workers & pids, in_workers
            mixed.z.p.send_signal(signal.SIGTERM)
            if everyone:
                supervisor = subprocess.run(["ps", "-o", "pid=", "--ppid", str(mixed.main)],
                                            capture_output=True, text=True).stdout.split()
                for pid in [*map(int, supervisor), *pids]:
                    os.kill(pid, signal.SIGTERM)
            time.sleep(0.5)
            # No process accepts any more...
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", mixed.port), 1).close()
            # ...and every open flow, wherever it runs, still works until it ends.
            for s in conns:
                s.sendall(b"late")
                assert s.recv(16) == b"late"
                s.close()
            assert mixed.z.p.wait(10) == 0
        finally:
            for s in conns:
                s.close()
    assert wait_until(lambda: not any(alive(p) for p in pids), 3)
    text = mixed.z.text()
    assert "Traceback" not in text and "ztun stopped" in text


def test_workers_die_with_a_killed_main_process(mixed: Mixed) -> None:
    pids = set(mixed.workers().values())
    assert all(alive(p) for p in pids)
    mixed.z.p.send_signal(signal.SIGKILL)
    mixed.z.p.wait(5)
    assert wait_until(lambda: not any(alive(p) for p in pids), 3)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", mixed.port), 1).close()


API_CONFIG = MIXED_CONFIG + """\
experimental:
  clash_api: {{external_controller: "127.0.0.1:{api}"}}
"""


def test_totals_of_the_api_count_every_process(tmp_path: Path) -> None:
    """The Clash API lists the main process's flows only, but its byte totals and flow count
    include the workers' (sent each second once a flow ended)."""
    import json
    import urllib.request

    port, api = free_port(), free_port()
    z = start_ztun(tmp_path, API_CONFIG.format(port=port, api=api), port)
    try:
        assert wait_until(lambda: len(worker_pids(z.text())) == 2, 10), z.text()
        assert "lists and closes only the flows of the main process" in z.text()
        with echo_server() as echo:
            for _ in range(30):
                s, code = socks5_connect(port, Address("127.0.0.1", echo))
                with s:
                    assert code == 0
                    s.settimeout(5)
                    s.sendall(b"x" * 1000)
                    got = 0
                    while got < 1000:
                        got += len(s.recv(4096))

        def status() -> dict:  # type: ignore[type-arg]
            with urllib.request.urlopen(f"http://127.0.0.1:{api}/ztun/status", timeout=5) as r:
                return json.load(r)  # type: ignore[no-any-return]

        assert wait_until(lambda: len(flows_by_pid(z.text(), z.pid)) == 30, 5)
        served = {pid for pid, _ in flows_by_pid(z.text(), z.pid)}
        assert served - {z.pid}, "no flow ran in a worker"
        assert wait_until(lambda: status()["uploadTotal"] == 30_000, 5), status()
        st = status()
        assert st["downloadTotal"] == 30_000 and st["connectionsTotal"] == 30, st
        assert st["outbounds"]["direct"]["upload"] == 30_000, st
    finally:
        z.stop()


# -- auto_redirect, in namespaces --------------------------------------------------------------

WORKERS_REDIRECT = "workers: 3\n" + REDIRECT_CONFIG


@dataclass
class Ns:
    t: Topology
    tmp: Path
    sha: str
    z: Proc
    before: str


@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ns]:
    require_nftables()
    need("ok" if _has_ss() else None, "ss (iproute2)")
    tmp = tmp_path_factory.mktemp("workers")
    www = tmp / "www"
    www.mkdir()
    sha = write_big_file(www / "big.bin", BIG)
    with served_topology(tmp, www) as (t, procs):
        before = snapshot(t)
        z = start_ztun_ns(t, tmp, "ztun-workers", config=WORKERS_REDIRECT)
        procs.append(z)
        assert wait_until(lambda: len(worker_pids(z.text())) == 2, 10), z.text()
        yield Ns(t, tmp, sha, z, before)


def curl(ns: Ns, target: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", ns.t.client, "curl", "-sS", "--max-time", "60",
                             *extra, url(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip


def sha_of(p: subprocess.Popen[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    assert p.stdout is not None
    while chunk := p.stdout.read(1 << 20):
        h.update(chunk)
    return h.hexdigest(), p.wait(70)


def big_flows(ns: Ns, target: str) -> list[tuple[int, str]]:
    return [(pid, rest) for pid, rest in flows_by_pid(ns.z.text(), ns.z.pid)
            if f"destination={target}" in rest or f"destination=[{target}]" in rest
            if "end=eof" in rest and int(re.search(r"down=(\d+)", rest).group(1)) > BIG]  # type: ignore[union-attr]


@pytest.mark.netns
@pytest.mark.singbox
@pytest.mark.parametrize("target", [DIRECT4, DIRECT6])
def test_redirect_100mb_sha256_through_a_worker(ns: Ns, target: str) -> None:
    family = "ipv6" if ":" in target else "ipv4"
    workers = set(worker_pids(ns.z.text()).values())
    served: list[int] = []
    for _ in range(8):  # until one lands in a worker (2 in 3 do)
        seen = len(big_flows(ns, target))
        before = redirected(ns.t)[family]
        digest, code = sha_of(curl(ns, target))
        assert code == 0 and digest == ns.sha
        assert redirected(ns.t)[family] == before + 1  # it took the redirect
        assert wait_until(lambda: len(big_flows(ns, target)) > seen, 5)  # noqa: B023
        served.append(big_flows(ns, target)[-1][0])
        if served[-1] in workers:
            break
    assert served[-1] in workers, (served, workers)


@pytest.mark.netns
@pytest.mark.singbox
def test_redirect_worker_killed_mid_transfer(ns: Ns) -> None:
    workers = worker_pids(ns.z.text())
    pids = set(workers.values()) | {ns.z.pid}
    victim = None
    for _ in range(12):
        p = curl(ns, DIRECT4, "--limit-rate", "20M", "-o", "/dev/null")

        def owner() -> set[int]:
            out = in_ns(ns.t.client, "ss", "-tnpH", "state", "established",
                        f"( dport = :{HTTP_PORT} )").stdout  # the flow's outbound socket
            return owners(out, pids)

        assert wait_until(lambda: bool(owner()), 5)
        found = owner()
        if len(found) == 1 and (pid := found.pop()) != ns.z.pid:
            victim = pid
            break
        p.kill()
        p.wait(5)
    assert victim is not None, "no transfer reached a worker"
    assert p.poll() is None  # still downloading: 100 MB at 20 MB/s
    index = next(i for i, x in workers.items() if x == victim)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    code = p.wait(RESET_BOUND + 5)
    took = time.monotonic() - t0
    assert code != 0 and took < RESET_BOUND, (code, took)  # cut short, at once
    assert wait_until(lambda: worker_pids(ns.z.text()).get(index) not in (None, victim),
                      RESTART_BOUND), ns.z.text()[-2000:]  # fmt: skip
    for _ in range(6):
        r = in_ns(ns.t.client, "curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
                  "%{http_code}", url(DIRECT6, ""))  # fmt: skip
        assert r.stdout == "200"


@pytest.mark.netns
@pytest.mark.singbox
def test_redirect_stop_leaves_nothing_behind(ns: Ns) -> None:
    """Last in this module: stops the shared ztun."""
    pids = set(worker_pids(ns.z.text()).values())
    assert pids and all(alive(p) for p in pids)
    code, took = stop(ns.z, signal.SIGTERM)
    assert code == 0 and took < 10, ns.z.text()[-2000:]
    assert wait_until(lambda: not any(alive(p) for p in pids), 3)
    assert snapshot(ns.t) == ns.before
    assert not list((ns.tmp / "state").glob("*.json"))
    assert "Traceback" not in ns.z.text()


@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_redirect_host_state_restored_after_sigint_and_sigkill_with_restart(
    tmp_path: Path, sig: int
) -> None:
    """With workers as without: SIGINT puts everything back; after SIGKILL every worker dies
    with the main process, and the next start removes the table the killed run left."""
    require_nftables()
    with topology() as t:
        before = snapshot(t)
        z = start_ztun_ns(t, tmp_path, f"ztun-{sig}", config=WORKERS_REDIRECT)
        assert wait_until(lambda: len(worker_pids(z.text())) == 2, 10), z.text()
        pids = set(worker_pids(z.text()).values())
        code, _ = stop(z, sig)
        assert wait_until(lambda: not any(alive(p) for p in pids), 3)
        if sig == signal.SIGKILL:
            assert "table inet ztun" in in_ns(t.client, "nft", "list", "ruleset").stdout
            z2 = start_ztun_ns(t, tmp_path, f"ztun-{sig}-again", config=WORKERS_REDIRECT)
            assert "removing the nftables table of a previous run" in z2.text(), z2.text()
            assert wait_until(lambda: len(worker_pids(z2.text())) == 2, 10), z2.text()
            pids = set(worker_pids(z2.text()).values())
            code, _ = stop(z2, signal.SIGTERM)
            assert wait_until(lambda: not any(alive(p) for p in pids), 3)
        assert code == 0
        assert snapshot(t) == before
        assert not list((tmp_path / "state").glob("*.json"))


def test_a_reload_replaces_the_workers_and_their_open_flows_go_on(mixed: Mixed) -> None:
    """SIGHUP with workers: the supervisor compiles the new config and starts new workers;
    the old ones stop accepting but their open flows go on, and they end with them. New
    connections in every process follow the new rules (here: everything blocked)."""
    before = mixed.workers()
    pids = set(before.values()) | {mixed.main}
    held: list[socket.socket] = []
    in_worker: socket.socket | None = None
    with echo_server() as echo:
        try:
            for _ in range(40):  # a connection held by an old worker
                s, code = socks5_connect(mixed.port, Address("127.0.0.1", echo))
                assert code == 0
                s.settimeout(10)
                s.sendall(b"hello")
                assert s.recv(16) == b"hello"
                held.append(s)
                owner = socket_owner(mixed.port, s, pids)
                if owner is not None and owner != mixed.main:
                    in_worker = s
                    break
            assert in_worker is not None, "no connection reached a worker"
            path = mixed.z.log.parent / "ztun.yaml"  # where start_ztun wrote it
            path.write_text(path.read_text() + "route:\n  rules:\n    - {network: tcp, "
                            "action: reject}\n")  # fmt: skip
            os.kill(mixed.main, signal.SIGHUP)
            compiled = "the supervisor compiled the reloaded config"
            assert wait_until(lambda: compiled in mixed.z.text(), 15), mixed.z.text()[-3000:]
            assert wait_until(lambda: set(mixed.workers().values()).isdisjoint(before.values()),
                              10), mixed.z.text()[-3000:]  # fmt: skip
            # new connections, whichever process takes them: the new rules
            for _ in range(12):
                s, code = socks5_connect(mixed.port, Address("127.0.0.1", echo))
                s.close()
                assert code != 0, mixed.z.text()[-3000:]
            # the old worker's flow goes on
            for _ in range(3):
                in_worker.sendall(b"still")
                assert in_worker.recv(16) == b"still"
            assert any(alive(p) for p in before.values())
        finally:
            for s in held:
                s.close()
        # with its flows ended, the old generation goes
        assert wait_until(lambda: not any(alive(p) for p in before.values()), 10), \
            mixed.z.text()[-3000:]  # fmt: skip
    assert "Traceback" not in mixed.z.text()


SELECTOR_CONFIG = """\
workers: 3
log: {{level: info}}
experimental: {{clash_api: {{external_controller: "127.0.0.1:{api}"}}}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen_port: {port}}}
outbounds:
  - {{type: selector, tag: pick, outbounds: [direct, block]}}
  - {{type: direct, tag: direct}}
  - {{type: block, tag: block}}
route: {{final: pick}}
"""


def test_a_selector_switched_through_the_api_moves_every_process(tmp_path: Path) -> None:
    """PUT /proxies/{name} reaches the workers: within the check interval (1 s) new
    connections in every process take the new member."""
    import json
    import urllib.request

    port, api = free_port(), free_port()
    z = start_ztun(tmp_path, SELECTOR_CONFIG.format(port=port, api=api), port)
    try:
        assert wait_until(lambda: len(worker_pids(z.text())) == 2, 10), z.text()
        with echo_server() as echo:
            for _ in range(9):
                echo_once(port, echo)  # direct, whichever process
            request = urllib.request.Request(
                f"http://127.0.0.1:{api}/proxies/pick", method="PUT",
                data=json.dumps({"name": "block"}).encode(),
                headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=10) as reply:
                assert reply.status == 204
            time.sleep(2.5)  # the workers look once a second
            codes = []
            for _ in range(30):
                s, code = socks5_connect(port, Address("127.0.0.1", echo))
                s.close()
                codes.append(code)
            assert all(code != 0 for code in codes), (codes, z.text()[-3000:])
        served = {pid for pid, line in flows_by_pid(z.text(), z.pid) if "block" in line}
        assert len(served) >= 2, z.text()[-3000:]  # the switch reached more than one process
    finally:
        z.stop()
    assert "Traceback" not in z.text()
