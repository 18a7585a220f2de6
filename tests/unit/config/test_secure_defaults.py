"""`ztun check` on what the secure defaults refuse: a routing_mark that auto_route would send
back into the TUN, a mixed inbound that would be an open proxy, and credentials longer than
SOCKS5 can carry."""

from __future__ import annotations

import textwrap

import pytest

from ztun.config.loader import load_config_text
from ztun.config.validate import validate
from ztun.errors import Diagnostic

TUN = """\
inbounds:
  - {type: tun, tag: tun-in, address: [198.18.0.1/30], auto_route: %s}
"""


def check(text: str) -> list[Diagnostic]:
    loaded = load_config_text(textwrap.dedent(text), env={})
    assert loaded.diagnostics == []
    return [d for d in validate(loaded) if d.severity == "error"]


def _outbound(mark: str, extra: str = "") -> str:
    return f"outbounds:\n  - {{type: direct, tag: direct, routing_mark: {mark}{extra}}}\n"


@pytest.mark.parametrize("mark", ["0x100", "1", "0x2025", "0xffffffff", "0xdbdb"])
def test_a_mark_other_than_the_tun_mark_loops(mark: str) -> None:
    (d,) = check(TUN % "true" + _outbound(mark))
    assert d.path == ("outbounds", 0, "routing_mark")
    assert f"mark {int(mark, 0):#x} loops into the TUN" in d.message
    assert "only fwmark 0x2024" in d.message and "rule 9003" in d.message
    assert "tun inbound 'tun-in'" in d.message


@pytest.mark.parametrize("mark", ["0x2024", "8228", "0"])
def test_the_tun_mark_or_none_is_fine(mark: str) -> None:
    assert check(TUN % "true" + _outbound(mark)) == []


def test_default_mark_decides_which_mark_is_fine() -> None:
    route = "route: {default_mark: 0x51}\n"
    assert check(TUN % "true" + _outbound("0x51") + route) == []
    (d,) = check(TUN % "true" + _outbound("0x2024") + route)
    assert "only fwmark 0x51" in d.message


def test_bind_interface_or_no_auto_route_is_fine() -> None:
    assert check(TUN % "true" + _outbound("0x100", ", bind_interface: eth0")) == []
    assert check(TUN % "false" + _outbound("0x100")) == []
    assert check(_outbound("0x100")) == []


MIXED = """\
outbounds: [{type: direct, tag: direct}]
inbounds:
  - {type: mixed, tag: m, listen_port: 2080%s}
"""


@pytest.mark.parametrize("listen", ["0.0.0.0", "::", "198.51.100.1", "2001:db8::1"])
def test_open_proxy_beyond_loopback_is_refused(listen: str) -> None:
    (d,) = check(MIXED % f", listen: '{listen}'")
    assert d.path == ("inbounds", 0, "listen")
    assert "no users" in d.message and "allow_unauthenticated_remote: true" in d.message
    assert "169.254.169.254" in d.message


@pytest.mark.parametrize(
    "extra",
    [
        "",
        ", listen: 127.0.0.1",
        ", listen: 127.9.9.9",
        ", listen: '::1'",
        ", listen: '::ffff:127.0.0.1'",
        ", listen: 0.0.0.0, users: [{username: a, password: b}]",
        ", listen: 0.0.0.0, allow_unauthenticated_remote: true",
    ],
)
def test_loopback_users_or_explicit_permission_pass(extra: str) -> None:
    assert check(MIXED % extra) == []


def test_credentials_over_255_bytes() -> None:
    long = "a" * 256
    (d,) = check(MIXED % f", users: [{{username: {long}, password: b}}]")
    assert d.path == ("inbounds", 0, "users", 0, "username")
    assert "SOCKS5 carries 1 to 255 bytes" in d.message and long not in d.message
    # 200 characters pass the schema's maxLength, but are 400 bytes in UTF-8
    wide = "é" * 200
    (d,) = check(MIXED % f", users: [{{username: a, password: {wide}}}]")
    assert d.path == ("inbounds", 0, "users", 0, "password")
    assert "400 bytes in UTF-8" in d.message and "at most 255" in d.message
    (d,) = check(
        "outbounds: [{type: socks, tag: s, server: 203.0.113.1, server_port: 1080, "
        f"username: u, password: {wide}}}]\n"
    )
    assert d.path == ("outbounds", 0, "password")
    assert check(MIXED % (", users: [{username: " + "a" * 255 + ", password: b}]")) == []


LOCAL_DNS = """\
dns: {servers: [{type: local, tag: sys}]}
outbounds: [{type: direct, tag: direct}]
route: {rules: [{port: 53, action: hijack-dns}]}
"""


def test_local_dns_server_with_hijack_under_auto_route_warns() -> None:
    loaded = load_config_text(TUN % "true" + LOCAL_DNS, env={})
    (d,) = validate(loaded)
    assert d.severity == "warning" and d.path == ("dns", "servers", 0)
    assert "cannot mark" in d.message
    assert validate(load_config_text(TUN % "false" + LOCAL_DNS, env={})) == []
