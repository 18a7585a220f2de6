"""auto_redirect without root: the nftables plan, what a state file may name, the original
destination's parsing, and what `check` says about it."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from ztun.check import check_file
from ztun.config.loader import load_config_text
from ztun.config.validate import validate
from ztun.inbound import redirect
from ztun.platform.linux import nftables
from ztun.platform.linux.nftables import FAMILY, TABLE, delete_commands, leftovers, plan


def net(s: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(s)


def rules(p: nftables.RedirectPlan) -> list[list[dict[str, Any]]]:
    return [c["add"]["rule"]["expr"] for c in p.commands() if "rule" in c.get("add", {})]


def sets(p: nftables.RedirectPlan) -> dict[str, list[Any]]:
    return {c["add"]["set"]["name"]: c["add"]["set"]["elem"] for c in p.commands()
            if "set" in c.get("add", {})}  # fmt: skip


def test_plan_is_one_table_of_ztuns_own() -> None:
    p = plan(interface="ztun0", ports={4: 4000, 6: 6000}, mark=0x2024, route_exclude_address=[])
    cmds = p.commands()
    assert cmds[0] == {"metainfo": {"json_schema_version": 1}}
    # `create`, not `add`: an existing table of that name is an error, never joined
    assert cmds[1] == {"create": {"table": {"family": "inet", "name": "ztun"}}}
    chain = cmds[2]["add"]["chain"]
    assert (chain["type"], chain["hook"], chain["prio"], chain["policy"]) == \
        ("nat", "output", -100, "accept")  # fmt: skip
    for c in cmds[1:]:
        (_verb, body), = c.items()
        (_kind, obj), = body.items()
        # every object lives in table inet ztun: nothing else is named
        assert obj["family"] == FAMILY and obj.get("table", obj.get("name")) == TABLE
    # JSON as libnftables takes it
    json.dumps({"nftables": cmds})


def test_own_mark_returns_first_then_tcp_to_the_tun_is_redirected_per_family() -> None:
    p = plan(interface="ztun0", ports={4: 4000, 6: 6000}, mark=0x2024, route_exclude_address=[])
    r = rules(p)
    assert r[0] == [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 0x2024}},
                    {"return": None}]  # fmt: skip
    redirects = [e for e in r if "redirect" in e[-1]]
    assert len(redirects) == 2
    for expr, (proto, port) in zip(redirects, (("ipv4", 4000), ("ipv6", 6000)), strict=True):
        matches = {m["match"]["left"]["meta"]["key"]: m["match"]["right"] for m in expr
                   if "match" in m}  # fmt: skip
        assert expr[-2] == {"counter": None}
        assert matches == {"oifname": "ztun0", "nfproto": proto, "l4proto": "tcp"}
        assert expr[-1] == {"redirect": {"port": port}}
    # nothing but TCP is redirected: UDP and ICMP stay on the TUN
    assert all(m["match"]["right"] == "tcp" for e in redirects for m in e
               if "match" in m and m["match"]["left"] == {"meta": {"key": "l4proto"}})  # fmt: skip


def test_route_exclude_address_returns_before_the_redirect() -> None:
    p = plan(interface="ztun0", ports={4: 4000, 6: 6000}, mark=0x2024,
             route_exclude_address=[net("203.0.113.0/25"), net("203.0.113.128/25"),
                                    net("198.51.100.7/32"), net("2001:db8:5::/48")])  # fmt: skip
    s = sets(p)
    # merged: an interval set refuses overlapping or adjacent duplicates
    assert s["exclude4"] == [{"prefix": {"addr": "198.51.100.7", "len": 32}},
                             {"prefix": {"addr": "203.0.113.0", "len": 24}}]  # fmt: skip
    assert s["exclude6"] == [{"prefix": {"addr": "2001:db8:5::", "len": 48}}]
    r = rules(p)
    kinds = ["mark" if "meta" in e[0]["match"]["left"] and
             e[0]["match"]["left"]["meta"]["key"] == "mark" else
             "redirect" if "redirect" in e[-1] else e[0]["match"]["right"] for e in r]  # fmt: skip
    assert kinds == ["mark", "@exclude4", "@exclude6", "redirect", "redirect"]
    assert r[1][0]["match"]["left"] == {"payload": {"protocol": "ip", "field": "daddr"}}
    assert r[2][0]["match"]["left"] == {"payload": {"protocol": "ip6", "field": "daddr"}}


def test_one_family_only() -> None:
    p = plan(interface="tun3", ports={4: 1234}, mark=0x10,
             route_exclude_address=[net("2001:db8::/32"), net("203.0.113.0/24")])  # fmt: skip
    assert list(sets(p)) == ["exclude4"]  # no IPv6 listener: no IPv6 set either
    redirects = [e for e in rules(p) if "redirect" in e[-1]]
    assert len(redirects) == 1 and redirects[0][-1] == {"redirect": {"port": 1234}}


@pytest.mark.parametrize("ports", [{}, {4: 0}, {4: 70000}, {5: 80}])
def test_plan_refuses_nonsense(ports: dict[int, int]) -> None:
    with pytest.raises(ValueError):
        plan(interface="ztun0", ports=ports, mark=1, route_exclude_address=[])


def test_delete_by_handle_when_known() -> None:
    assert delete_commands(7)[1] == {"delete": {"table": {"family": "inet", "handle": 7}}}
    assert delete_commands(None)[1] == {"delete": {"table": {"family": "inet", "name": "ztun"}}}


# -- state files ---------------------------------------------------------------------------------

GOOD = {"pid": 123, "start_time": 456, "netns": 99, "table": ["inet", "ztun"], "handle": 5}


def test_leftovers_accepts_exactly_what_ztun_writes() -> None:
    assert leftovers(GOOD, 99) == (123, 456, 5)
    assert leftovers({**GOOD, "handle": None}, 99) == (123, 456, None)


@pytest.mark.parametrize("change", [
    {"table": ["inet", "filter"]},  # someone else's table: never deleted
    {"table": ["ip", "ztun"]},
    {"netns": 98},
    {"netns": True},
    {"pid": 0},
    {"pid": "123"},
    {"handle": -1},
    {"handle": "5"},
    {"handle": True},
    {"extra": 1},
])  # fmt: skip
def test_leftovers_refuses_anything_else(change: dict[str, Any]) -> None:
    assert isinstance(leftovers({**GOOD, **change}, 99), str)


def test_leftovers_refuses_other_shapes() -> None:
    for data in (None, [], "x", {"pid": 1}):
        assert isinstance(leftovers(data, 99), str)


def test_cleanup_without_state_file_needs_no_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZTUN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(nftables, "library", lambda: pytest.fail("library loaded"))
    assert nftables.cleanup_leftovers() is False


# -- the listener's original destination ----------------------------------------------------------


class FakeConn:
    def __init__(self, raw: bytes | None) -> None:
        self.raw = raw
        self.asked: tuple[int, int, int] | None = None

    def getsockopt(self, level: int, name: int, size: int) -> bytes:
        self.asked = (level, name, size)
        if self.raw is None:
            raise OSError(2, "No such file or directory")
        return self.raw


def test_original_destination_ipv4() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 443) + \
        socket.inet_aton("203.0.113.10") + bytes(8)  # fmt: skip
    conn = FakeConn(raw)
    got = redirect.original_destination(conn, socket.AF_INET)  # type: ignore[arg-type]
    assert got == (socket.inet_aton("203.0.113.10"), 443)
    assert conn.asked == (socket.SOL_IP, 80, 16)


def test_original_destination_ipv6() -> None:
    addr = socket.inet_pton(socket.AF_INET6, "2001:db8:2::10")
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 8080) + bytes(4) + addr + \
        bytes(4)  # fmt: skip
    conn = FakeConn(raw)
    assert redirect.original_destination(conn, socket.AF_INET6) == (addr, 8080)  # type: ignore[arg-type]
    assert conn.asked == (41, 80, 28)


def test_not_redirected_has_no_original_destination() -> None:
    assert redirect.original_destination(FakeConn(None), socket.AF_INET) is None  # type: ignore[arg-type]


# -- config ---------------------------------------------------------------------------------------

TUN = """\
inbounds:
  - type: tun
    tag: tun-in
    address: [198.18.0.1/30]
    auto_redirect: true
{extra}outbounds: [{{type: direct, tag: direct}}]
"""


def test_auto_redirect_needs_auto_route() -> None:
    loaded = load_config_text(TUN.format(extra=""), env={})
    found = [d for d in validate(loaded) if d.severity == "error"]
    assert len(found) == 1, found
    assert found[0].path == ("inbounds", 0, "auto_redirect")
    assert "auto_redirect needs auto_route: true" in found[0].message
    loaded = load_config_text(TUN.format(extra="    auto_route: true\n"), env={})
    assert not [d for d in validate(loaded) if d.severity == "error"]


def test_check_says_in_one_sentence_when_nftables_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "z.yaml"
    cfg.write_text(TUN.format(extra="    auto_route: true\n"))
    monkeypatch.setattr(nftables, "unavailable", lambda: "python3-nftables is not installed")
    warnings = [d for d in check_file(cfg).warnings if d.path[-1:] == ("auto_redirect",)]
    assert len(warnings) == 1
    msg = warnings[0].message
    assert msg == ("inbounds[0].auto_redirect: nftables cannot be used here (python3-nftables "
                   "is not installed), so `ztun run` keeps TCP on the TUN")  # fmt: skip
    monkeypatch.setattr(nftables, "unavailable", lambda: None)
    assert not [d for d in check_file(cfg).warnings if d.path[-1:] == ("auto_redirect",)]


def test_the_library_loads_here_when_installed() -> None:
    """On a machine the README's test command set up, Debian's module is found and loads
    libnftables (no root needed to load it)."""
    from tests.support import need

    need(None if nftables.unavailable() else "ok", "python3-nftables and libnftables")
    assert nftables.library() is not None

