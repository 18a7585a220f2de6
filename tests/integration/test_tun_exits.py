"""Issue 12, exits: every way out of `ztun run` leaves the client namespace's rules and routes
exactly as they were (`ip rule`, `ip route show table all`, both families, and the links).

SIGINT and SIGTERM, and SIGKILL followed by a restart, are in test_tun_linux.py; this file adds
SIGHUP (a reload: the routes stay until the stop), a second signal, an exception in start-up
after the routes are in, and the interpreter's exit without stop() where starting a thread
fails (Python 3.12+).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .netns import DIRECT4, require_tun_environment, topology, wait_tcp, wait_until
from .peers import REPO, Proc
from .test_tun_linux import start_ztun, stop

pytestmark = [pytest.mark.netns]

HERE = Path(__file__).resolve().parent


def no_state_left(tmp: Path) -> bool:
    return not [p for p in (tmp / "state").glob("*") if not p.name.startswith(".")] and \
        not list((tmp / "state").glob(".*.tmp"))  # fmt: skip


def test_sighup_keeps_routes_then_stop_restores_them_and_state_files_are_private(
    tmp_path: Path,
) -> None:
    require_tun_environment()
    with topology() as t:
        before = t.snapshot()
        z = start_ztun(t, tmp_path, "ztun-hup")
        sdir = tmp_path / "state"
        files = list(sdir.glob("auto-route-*.json")) + list(sdir.glob("run-*.json"))
        assert len(files) == 2
        assert stat.S_IMODE(sdir.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(f.lstat().st_mode) == 0o600 for f in files)
        running = t.snapshot()
        assert running != before
        os.kill(z.pid, signal.SIGHUP)  # the same config: everything is kept
        assert wait_until(lambda: "reload (SIGHUP): done" in z.text(), 15), z.text()
        assert "inbounds kept: tun-in" in z.text()
        assert t.snapshot() == running
        code, _ = stop(z, signal.SIGTERM)
        assert code == 0, z.text()
        assert t.snapshot() == before, z.text()
        assert no_state_left(tmp_path)


HOLD_FLOW = (
    "import socket,sys\n"
    f"s=socket.create_connection(({DIRECT4!r},7),5)\n"
    "s.sendall(b'x'); assert s.recv(1)==b'x'\n"
    "print('open',flush=True); sys.stdin.read()\n"
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_exits_at_once_and_restores_routes(tmp_path: Path, sig: int) -> None:
    """The second signal arrives while the first one's stop drains an open flow (the
    application holds its side open, so the drain lasts its full second)."""
    require_tun_environment()
    with topology() as t:
        before = t.snapshot()
        echo = Proc(["ip", "netns", "exec", t.server, sys.executable,
                     str(HERE / "tun_server.py")], tmp_path / "echo.log")  # fmt: skip
        app = None
        try:
            wait_tcp(t.server, "127.0.0.1", 7)
            z = start_ztun(t, tmp_path, f"ztun-twice-{sig}")
            assert t.snapshot() != before
            app = subprocess.Popen(["ip", "netns", "exec", t.client, sys.executable, "-c",
                                    HOLD_FLOW], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)  # fmt: skip
            assert app.stdout is not None and app.stdout.readline().strip() == "open"
            os.kill(z.pid, sig)
            assert wait_until(lambda: "stopping (again to exit at once)" in z.text(), 5)
            os.kill(z.pid, sig)
            code = z.p.wait(15)
            text = z.text()
            assert code == 1 and "again: exiting now" in text, text
            assert "ztun stopped" not in text  # it did not get there the orderly way
            assert "Traceback" not in text
            assert t.snapshot() == before, text
            assert no_state_left(tmp_path)
        finally:
            if app is not None:
                app.communicate("", timeout=10)
            echo.stop()


START_FAILS = """\
log: {level: info}
inbounds:
  - {type: tun, tag: tun-in, interface_name: ztun0, auto_route: true,
     address: [198.18.0.1/30, "fdfe:dcba:9876::1/126"]}
  - {type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: 2080}
outbounds:
  - {type: direct, tag: direct}
"""

HOLD_PORT = (
    "import socket,sys,time\n"
    "s=socket.socket(); s.bind(('127.0.0.1',2080)); s.listen()\n"
    "print('held',flush=True); sys.stdin.read()\n"
)


def test_startup_exception_after_routes_restores_them(tmp_path: Path) -> None:
    """The TUN inbound starts first and installs its routes; the mixed inbound then finds its
    port taken. ztun says so in one line, exit 1, and the routes are gone."""
    require_tun_environment()
    with topology() as t:
        before = t.snapshot()
        holder = subprocess.Popen(["ip", "netns", "exec", t.client, sys.executable, "-c",
                                   HOLD_PORT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            wait_tcp(t.client, "127.0.0.1", 2080)
            cfg = tmp_path / "z.yaml"
            cfg.write_text(START_FAILS)
            env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp_path / "state"))
            r = subprocess.run(["ip", "netns", "exec", t.client, sys.executable, "-m", "ztun",
                                "run", str(cfg)], capture_output=True, text=True, env=env,
                               timeout=60)  # fmt: skip
        finally:
            holder.communicate("", timeout=10)
        assert r.returncode == 1, r.stderr
        assert "auto_route: " in r.stderr and "route(s) added" in r.stderr  # they were in
        assert "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("ztun: inbound 'mixed-in': cannot listen on 127.0.0.1:2080"), last
        assert t.snapshot() == before, r.stderr
        assert no_state_left(tmp_path)


def test_interpreter_exit_without_stop_restores_routes_when_threads_are_refused(
    tmp_path: Path,
) -> None:
    """The loop ended without stop(); at exit starting a thread raises, as on Python 3.12+
    (this machine's Python may be older: the helper refuses threads the same way). The atexit
    hook still removes the rules (the TUN and its routes go with the process)."""
    require_tun_environment()
    with topology() as t:
        before = t.snapshot()
        env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp_path / "state"))
        r = subprocess.run(["ip", "netns", "exec", t.client, sys.executable,
                            str(HERE / "atexit_routes.py")], capture_output=True, text=True,
                           env=env, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[:2] == ["routes installed", "exiting"], r.stdout
        assert "can't create new thread" not in r.stderr, r.stderr
        assert "Exception ignored" not in r.stderr, r.stderr
        assert t.snapshot() == before, r.stderr
        assert no_state_left(tmp_path)
