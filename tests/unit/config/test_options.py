"""Typed options: built once from validated data, field names = config keys, values parsed."""

from __future__ import annotations

import ipaddress
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from ztun.check import check_file
from ztun.config import options as o
from ztun.config.schema import schema
from ztun.errors import ConfigError

FULL: dict[str, Any] = {
    "log": {"level": "debug", "timestamp": True},
    "inbounds": [
        {"type": "mixed", "tag": "in", "listen_port": 2080,
         "users": [{"username": "alice", "password": "pw"}]},
        {"type": "tun", "tag": "tun", "address": ["172.19.0.1/30", "fdfe::1/126"],
         "route_address": "198.51.100.7/24", "route_exclude_address": ["203.0.113.0/24"],
         "udp_timeout": "1m30s", "auto_route": True, "icmp": "drop"},
    ],
    "outbounds": [
        {"type": "direct", "tag": "direct", "routing_mark": "0x2024", "connect_timeout": "300ms"},
        {"type": "socks", "tag": "proxy", "server": "127.0.0.1", "server_port": 1080,
         "version": "4a", "udp_timeout": 5},
        {"type": "block", "tag": "block"},
    ],
    "dns": {
        "servers": [
            {"type": "udp", "tag": "u", "server": "203.0.113.53"},
            {"type": "tcp", "tag": "t", "server": "203.0.113.53"},
            {"type": "tls", "tag": "s", "server": "203.0.113.53"},
            {"type": "https", "tag": "h", "server": "dns.example"},
            {"type": "local", "tag": "l"},
            {"type": "hosts", "tag": "hosts", "path": "/etc/hosts",
             "predefined": {"router.lan": "203.0.113.1"}},
            {"type": "fakeip", "tag": "f", "inet4_range": "198.18.0.0/16"},
        ],
        "rules": [{"domain_suffix": "lan", "server": "hosts"},
                  {"type": "logical", "mode": "or", "rules": [{"query_type": ["A", 28]}],
                   "action": "reject"}],
        "final": "u",
    },
    "route": {
        "rules": [
            {"port": 53, "action": "hijack-dns"},
            {"action": "sniff", "timeout": "1s", "sniffer": "tls"},
            {"type": "logical", "mode": "and", "invert": True, "outbound": "proxy",
             "rules": [{"domain": "a.example"}, {"type": "logical", "mode": "or",
                                                 "rules": [{"network": "udp"}]}]},
            {"ip_cidr": "10.0.0.0/8", "outbound": "direct", "udp_timeout": "10s"},
        ],
        "rule_set": [
            {"type": "inline", "tag": "i", "rules": [{"domain": ["x.example"]}]},
            {"type": "local", "tag": "l", "path": "ads.txt", "format": "domains"},
            {"type": "remote", "tag": "r", "url": "https://example.com/r.json",
             "update_interval": "12h", "download_detour": "proxy"},
        ],
        "final": "direct",
        "default_mark": 8484,
        "geoip": {"path": "geo.mmdb"},
    },
}  # fmt: skip


def test_every_section_is_typed_and_parsed() -> None:
    opts = o.build_options(FULL)
    assert opts.log == o.LogOptions(level="debug", timestamp=True)
    mixed, tun = opts.inbounds
    assert isinstance(mixed, o.MixedInboundOptions) and mixed.listen == "127.0.0.1"
    assert mixed.users == (o.UserOptions(username="alice", password="pw"),)
    assert isinstance(tun, o.TunInboundOptions)
    assert tun.address == (ipaddress.ip_interface("172.19.0.1/30"),
                           ipaddress.ip_interface("fdfe::1/126"))  # fmt: skip
    assert tun.route_address == (ipaddress.ip_network("198.51.100.0/24"),)
    assert tun.route_exclude_address == (ipaddress.ip_network("203.0.113.0/24"),)
    assert (tun.udp_timeout, tun.mtu, tun.auto_route, tun.icmp) == (90.0, 9000, True, "drop")
    direct, socks, block = opts.outbounds
    assert isinstance(direct, o.DirectOutboundOptions)
    assert (direct.routing_mark, direct.connect_timeout) == (0x2024, 0.3)
    assert isinstance(socks, o.SocksOutboundOptions)
    assert (socks.version, socks.connect_timeout, socks.udp_timeout) == ("4a", 5.0, 5.0)
    assert isinstance(block, o.BlockOutboundOptions)
    kinds = [type(s) for s in opts.dns.servers]
    assert kinds == [o.UDPDNSServerOptions, o.TCPDNSServerOptions, o.TLSDNSServerOptions,
                     o.HTTPSDNSServerOptions, o.LocalDNSServerOptions, o.HostsDNSServerOptions,
                     o.FakeIPDNSServerOptions]  # fmt: skip
    hosts, fake = opts.dns.servers[5], opts.dns.servers[6]
    assert isinstance(hosts, o.HostsDNSServerOptions)
    assert hosts.path == ("/etc/hosts",) and hosts.predefined == {"router.lan": ("203.0.113.1",)}
    assert isinstance(fake, o.FakeIPDNSServerOptions)
    assert fake.inet4_range == ipaddress.ip_network("198.18.0.0/16")
    assert fake.inet6_range == ipaddress.ip_network("fc00::/18")
    dns_logical = opts.dns.rules[1]
    assert isinstance(dns_logical, o.LogicalDNSRuleOptions)
    assert dns_logical.rules[0].query_type == ("A", 28)  # type: ignore[union-attr]


def test_route_rules_keep_sing_box_shapes() -> None:
    route = o.build_options(FULL).route
    hijack, sniff, logical, cidr = route.rules
    assert isinstance(hijack, o.DefaultRuleOptions)
    assert (hijack.port, hijack.action, hijack.outbound) == ((53,), "hijack-dns", None)
    assert isinstance(sniff, o.DefaultRuleOptions)
    assert (sniff.timeout, sniff.sniffer) == (1.0, ("tls",))
    assert isinstance(logical, o.LogicalRuleOptions)
    assert (logical.mode, logical.invert, logical.outbound) == ("and", True, "proxy")
    inner = logical.rules[1]
    assert isinstance(inner, o.LogicalRuleOptions)
    assert inner.rules == (o.DefaultRuleOptions(network=("udp",)),)
    assert isinstance(cidr, o.DefaultRuleOptions)
    assert (cidr.ip_cidr, cidr.udp_timeout) == (("10.0.0.0/8",), 10.0)
    inline, local, remote = route.rule_set
    assert isinstance(inline, o.InlineRuleSetOptions)
    assert inline.rules == (o.DefaultHeadlessRuleOptions(domain=("x.example",)),)
    assert isinstance(local, o.LocalRuleSetOptions) and local.format == "domains"
    assert isinstance(remote, o.RemoteRuleSetOptions)
    assert (remote.update_interval, remote.download_detour) == (43200.0, "proxy")
    assert (route.default_mark, route.geoip) == (8484, o.GeoIPOptions(path="geo.mmdb"))


def test_defaults_mirror_the_schema() -> None:
    opts = o.build_options({})
    assert opts.log == o.LogOptions(level="info", disabled=False, timestamp=True, output=None)
    assert opts.inbounds == opts.outbounds == () and opts.route == o.RouteOptions()
    assert o.outbound_options({"type": "direct", "tag": "d"}) == o.DirectOutboundOptions(
        tag="d", connect_timeout=5.0
    )


@pytest.mark.parametrize("section,table", [
    ("inbound", o.INBOUND_OPTIONS),
    ("outbound", o.OUTBOUND_OPTIONS),
    ("dns_server", o.DNS_SERVERS),
    ("rule_set", o.RULE_SETS),
])  # fmt: skip
def test_one_options_class_per_schema_type(section: str, table: Any) -> None:
    defs = schema()["$defs"][section]
    assert set(table) == set(defs["properties"]["type"]["enum"])
    for branch in defs["allOf"]:
        kind = branch["if"]["properties"]["type"]["const"]
        names = {f.name for f in fields(table[kind])}
        assert names == set(branch["then"]["properties"]), kind  # field names == config keys


@pytest.mark.parametrize("rule_def,cls", [
    ("default_rule", o.DefaultRuleOptions),
    ("logical_rule", o.LogicalRuleOptions),
    ("headless_default_rule", o.DefaultHeadlessRuleOptions),
    ("headless_logical_rule", o.LogicalHeadlessRuleOptions),
    ("dns_default_rule", o.DefaultDNSRuleOptions),
    ("dns_logical_rule", o.LogicalDNSRuleOptions),
])  # fmt: skip
def test_rule_fields_are_the_schema_keys(rule_def: str, cls: type) -> None:
    assert {f.name for f in fields(cls)} == set(schema()["$defs"][rule_def]["properties"])


def test_top_level_and_sections_are_the_schema_keys() -> None:
    top = schema()["properties"]
    assert {f.name for f in fields(o.Options)} == set(top) - {"description", "include"}
    for name, cls in (("log", o.LogOptions), ("dns", o.DNSOptions), ("route", o.RouteOptions)):
        assert {f.name for f in fields(cls)} == set(top[name]["properties"]), name


def test_a_conversion_that_fails_names_the_value_in_config_words() -> None:
    data = {"inbounds": [{"type": "tun", "tag": "t", "address": ["172.19.0.1/30", "1.2.3.999/30"]}]}
    with pytest.raises(ConfigError) as e:
        o.build_options(data)
    [d] = e.value.diagnostics
    assert d.path == ("inbounds", 0, "address", 1)
    assert (
        d.message == "inbounds[0].address[1]: '1.2.3.999/30' is not an address with a prefix length"
    )
    with pytest.raises(
        ConfigError, match=r"outbounds\[0\].connect_timeout: '.5s' is not a duration"
    ):
        o.outbound_options({"type": "direct", "tag": "d", "connect_timeout": ".5s"})


def test_check_reports_a_failed_conversion_at_its_place(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "inbounds:\n  - type: tun\n    tag: t\n    address: [172.19.0.1/30, 1.2.3.999/30]\n"
        "outbounds:\n  - {type: direct, tag: direct}\n"
    )
    result = check_file(cfg)
    assert result.options is None and result.router is None
    [err] = result.errors
    assert err.mark is not None and err.mark.line == 4 and "1.2.3.999/30" in err.message


def test_check_hands_over_the_options(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("outbounds:\n  - {type: direct, tag: direct, connect_timeout: 2s}\n")
    result = check_file(cfg)
    assert not result.errors and result.options is not None
    assert result.options.outbounds == (o.DirectOutboundOptions(tag="direct", connect_timeout=2.0),)
