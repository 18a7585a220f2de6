"""Issue 12, exits: the auto_route state file. Private directory, atomic 0600 writes that follow
no symlink, content checked before anything is deleted, and the writer identified by pid *and*
start time. Deleting is replaced by a recorder: nothing here touches any routing table."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from ztun.platform.linux import routes, state
from ztun.platform.linux.routes import RouteError, cleanup_leftovers
from ztun.platform.linux.state import StateError, read_state, write_state
from ztun.platform.linux.tun_device import in_netlink_thread


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def sdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("ZTUN_STATE_DIR", str(d))
    return d


@pytest.fixture
def deleted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[Any], list[Any]]]:
    calls: list[tuple[list[Any], list[Any]]] = []
    monkeypatch.setattr(routes, "_delete", lambda rules, rts: calls.append((rules, rts)))
    return calls


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not ztun (and not this test)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def a_plan(strict: bool = True, v6: bool = True) -> routes.RoutePlan:
    """What `plan` makes: both families, or IPv4 only (then strict_route adds `unreachable`)."""
    tun = [ip_network("198.18.0.0/30")] + ([ip_network("fdfe:dcba:9876::/126")] if v6 else [])
    return routes.plan(interface="ztun0", index=7, tun_networks=tun, route_address=[],
                       route_exclude_address=[ip_network("203.0.113.0/24")],
                       bypass=[ip_network("198.51.100.2/32")], mark=0x2024,
                       strict_route=strict)  # fmt: skip


def record(pid: int, started: int | None, p: routes.RoutePlan | None = None) -> dict[str, Any]:
    p = p or a_plan()
    return {"pid": pid, "start_time": started, "netns": routes.netns_id(),
            "interface": p.interface, "rules": p.rules, "routes": p.routes}  # fmt: skip


def state_path(sdir: Path) -> Path:
    return sdir / f"auto-route-{routes.netns_id()}.json"


# -- the directory and the file -----------------------------------------------------------


def test_written_0600_in_a_0700_directory_atomically(sdir: Path) -> None:
    path = state_path(sdir)
    write_state(path, {"a": 1})
    write_state(path, {"a": 2})
    assert mode(sdir) == 0o700 and mode(path) == 0o600
    assert os.listdir(sdir) == [path.name]  # no temporary file left
    assert read_state(path) == {"a": 2}


def test_write_replaces_a_symlink_and_never_writes_through_it(sdir: Path, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious")
    path = state_path(sdir)
    write_state(path, {"a": 1})
    path.unlink()
    path.symlink_to(target)
    tmp = sdir / f".{path.name}.{os.getpid()}.tmp"
    tmp.symlink_to(target)  # planted at the temporary name too
    write_state(path, {"a": 2})
    assert target.read_text() == "precious"
    assert not path.is_symlink() and read_state(path) == {"a": 2}
    assert not tmp.exists() and not tmp.is_symlink()


def test_symlinked_state_file_is_not_followed(
    sdir: Path, tmp_path: Path, deleted: list[Any]
) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(record(999999, 1)))
    os.chmod(target, 0o600)
    write_state(state_path(sdir), {})  # makes the directory
    path = state_path(sdir)
    path.unlink()
    path.symlink_to(target)
    assert cleanup_leftovers(path) is False
    assert deleted == []
    assert target.exists() and not path.is_symlink()  # the link is gone, its target is not


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o666, 0o400])
def test_state_file_with_another_mode_is_ignored(
    sdir: Path, bad_mode: int, deleted: list[Any]
) -> None:
    path = state_path(sdir)
    write_state(path, record(999999, 1))
    os.chmod(path, bad_mode)
    assert cleanup_leftovers(path) is False
    assert deleted == [] and not path.exists()


def test_state_file_of_another_owner_is_ignored(sdir: Path, deleted: list[Any]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    path = state_path(sdir)
    write_state(path, record(999999, 1))
    os.chown(path, 65534, 65534)
    assert cleanup_leftovers(path) is False
    assert deleted == []


def test_oversized_or_garbled_state_file_is_ignored(sdir: Path, deleted: list[Any]) -> None:
    path = state_path(sdir)
    for content in (b"{" * 10, b"\xff\xfe", b" " * (state.MAX_STATE_BYTES + 1)):
        write_state(path, {})
        path.write_bytes(content)
        assert cleanup_leftovers(path) is False
    assert deleted == []


def test_unsafe_directory_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(StateError, match="symlink"):
        write_state(link / "s.json", {})
    with pytest.raises(StateError, match="symlink"):
        read_state(link / "s.json")
    wide = tmp_path / "wide"
    wide.mkdir()
    os.chmod(wide, 0o777)
    with pytest.raises(StateError, match="writable by others"):
        write_state(wide / "s.json", {})
    assert not (wide / "s.json").exists()
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 65534, 65534)
        with pytest.raises(StateError, match="belongs to uid 65534"):
            read_state(other / "s.json")


def test_readable_directory_of_an_older_ztun_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "old"
    d.mkdir()
    os.chmod(d, 0o755)
    write_state(d / "s.json", {"a": 1})
    assert mode(d) == 0o700


def test_auto_route_says_why_the_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deleted: list[Any]
) -> None:
    wide = tmp_path / "wide"
    wide.mkdir()
    os.chmod(wide, 0o777)
    monkeypatch.setenv("ZTUN_STATE_DIR", str(wide))
    ar = routes.AutoRoute(a_plan())
    with pytest.raises(RouteError, match=r"auto_route: state directory .* writable by others"):
        ar._apply()  # refused before any rule is added
    assert not ar.active


# -- what the file says ---------------------------------------------------------------------


def test_leftovers_of_a_dead_run_are_removed(sdir: Path, deleted: list[Any]) -> None:
    path = state_path(sdir)
    p = a_plan()
    write_state(path, record(4194303, 12345, p))  # the largest pid Linux hands out
    assert cleanup_leftovers(path) is True
    assert deleted == [(p.rules, p.routes)]
    assert not path.exists()


def test_what_ztun_writes_passes_its_own_check(sdir: Path, deleted: list[Any]) -> None:
    """The file AutoRoute writes, for plans with and without strict_route, both families."""
    plans = [a_plan(strict, v6) for strict in (True, False) for v6 in (True, False)]
    assert any(r.get("action") for p in plans for r in p.rules)
    for p in plans:
        ar = routes.AutoRoute(p)
        ar._write_state()
        data = json.loads(ar.path.read_text())
        assert data["pid"] == os.getpid() and data["start_time"] == state.start_time(os.getpid())
        # Written by this very process (a start that failed halfway): ours to remove.
        assert cleanup_leftovers(ar.path) is True
    assert [d[0] for d in deleted] == [p.rules for p in plans]


def test_same_pid_other_start_time_is_not_alive(
    sdir: Path, deleted: list[Any], stranger: subprocess.Popen[bytes]
) -> None:
    started = state.start_time(stranger.pid)
    assert started is not None
    path = state_path(sdir)
    write_state(path, record(stranger.pid, started - 1))  # a recycled pid: not our writer
    assert cleanup_leftovers(path) is True
    assert len(deleted) == 1
    assert stranger.poll() is None  # nothing was done to the unrelated process


def test_the_writer_still_running_is_refused(
    sdir: Path, deleted: list[Any], stranger: subprocess.Popen[bytes]
) -> None:
    path = state_path(sdir)
    write_state(path, record(stranger.pid, state.start_time(stranger.pid)))
    with pytest.raises(RouteError, match=f"another ztun \\(pid {stranger.pid}\\)"):
        cleanup_leftovers(path)
    assert deleted == [] and path.exists()


def test_start_time_reads_the_right_field() -> None:
    """Field 22 of /proc/PID/stat, also when the command name holds spaces and parentheses."""
    with open("/proc/self/stat", "rb") as f:
        expected = int(f.read().rsplit(b")", 1)[1].split()[19])
    assert state.start_time(os.getpid()) == expected
    p = subprocess.Popen(["/bin/sh", "-c", "exec -a 'a) b (c' sleep 5"])
    try:
        with open(f"/proc/{p.pid}/stat", "rb") as f:
            assert b") " in f.read()[:40]
        t = state.start_time(p.pid)
        assert t is not None and t >= expected
    finally:
        p.kill()
        p.wait()
    assert state.start_time(p.pid) is None


V4, V6 = socket.AF_INET, socket.AF_INET6
FOREIGN: dict[str, Any] = {
    "a rule of another priority": {"rules": [{"family": V4, "priority": 100, "table": 2022}]},
    "a rule of another table": {"rules": [{"family": V4, "priority": 9003, "table": 254}]},
    "main table's default route": {
        "routes": [{"family": V4, "dst": "0.0.0.0", "dst_len": 0, "oif": 2, "table": 254}]
    },
    "a table as text": {"rules": [{"family": V4, "priority": 9003, "table": "2022"}]},
    "a priority as float": {"rules": [{"family": V4, "priority": 9003.0, "table": 2022}]},
    "a family as bool": {"rules": [{"family": True, "priority": 9003, "table": 2022}]},
    "an extra key": {"rules": [{"family": V4, "priority": 9003, "table": 2022, "oif": 1}]},
    "a prohibit action": {"rules": [{"family": V4, "priority": 9004, "action": "FR_ACT_PROHIBIT"}]},
    "a v6 prefix in a v4 rule": {
        "rules": [
            {"family": V4, "priority": 9001, "dst": "2001:db8::", "dst_len": 32, "table": 254}
        ]
    },
    "a prefix length too long": {
        "rules": [
            {"family": V4, "priority": 9001, "dst": "203.0.113.0", "dst_len": 33, "table": 254}
        ]
    },
    "an address as number": {
        "routes": [{"family": V4, "dst": 0, "dst_len": 0, "oif": 2, "table": 2022}]
    },
    "rules not a list": {"rules": {"family": V4}},
    "another namespace": {"netns": 1},
    "no start time": {"start_time": None},
    "pid zero": {"pid": 0},
    "an interface path": {"interface": "../../etc"},
    "an unknown key": {"comment": "hello"},
}


@pytest.mark.parametrize("change", FOREIGN.values(), ids=FOREIGN.keys())
def test_foreign_content_deletes_nothing(
    sdir: Path, deleted: list[Any], change: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    data = {**record(4194303, 1), **change}
    path = state_path(sdir)
    write_state(path, data)
    caplog.set_level(logging.WARNING, logger="ztun")
    assert cleanup_leftovers(path) is False
    assert deleted == []
    assert "nothing in it deleted" in caplog.text
    assert not path.exists()


def test_not_a_mapping_at_all(sdir: Path, deleted: list[Any]) -> None:
    path = state_path(sdir)
    for data in ([], "x", 5, None):
        write_state(path, data)  # type: ignore[arg-type]
        assert cleanup_leftovers(path) is False
    assert deleted == []


# -- the netlink helper at interpreter exit -----------------------------------------------


def test_netlink_work_needs_no_thread_outside_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.12+ refuses to start a thread in atexit; route removal must not need one."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert in_netlink_thread(lambda: 42) == 42
