"""Every shipped profile and example loads, validates and checks with zero errors."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from ztun.config.loader import PROFILE_DIR, list_profiles, load_config, load_config_text
from ztun.config.validate import SCHEMA_PATH, validate
from ztun.resources import EXAMPLE_DIR

SHIPPED = sorted([*PROFILE_DIR.glob("*.yaml"), *EXAMPLE_DIR.glob("*.yaml")])
PROFILES = ["block-ads", "bypass-private", "failover-proxy", "geoip-split", "global-proxy",
            "split-dns"]  # fmt: skip
EXAMPLES = ["local-proxy", "profile-override", "tun-split"]

# documentation, private, loopback and ULA ranges are the only addresses examples may use
ALLOWED = [ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32",
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fe80::/10", "198.18.0.0/15",
)]  # fmt: skip
IPV4ISH = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?:/\d+)?(?![\w.])")


def test_the_expected_files_are_shipped() -> None:
    assert {p.stem for p in PROFILE_DIR.glob("*.yaml")} >= set(PROFILES)
    assert {p.stem for p in EXAMPLE_DIR.glob("*.yaml")} >= set(EXAMPLES)
    # inside the package, so an installed (not editable) ztun has them too
    package = Path(__file__).resolve().parents[3] / "ztun"
    assert PROFILE_DIR.is_relative_to(package) and EXAMPLE_DIR.is_relative_to(package)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads_and_validates(path: Path) -> None:
    loaded = load_config(path, env={})
    problems = [str(d) for d in loaded.diagnostics + validate(loaded)]
    assert problems == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_header_and_description(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    ref = first.removeprefix("# yaml-language-server: $schema=")
    assert ref != first, "the first line must be the yaml-language-server schema line"
    assert (path.parent / ref).resolve() == SCHEMA_PATH
    description = load_config(path, env={}).data.get("description")
    assert isinstance(description, str) and description and "\n" not in description


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_uses_only_documentation_or_private_addresses(path: Path) -> None:
    for match in IPV4ISH.finditer(path.read_text()):
        address = ipaddress.ip_address(match.group(1))
        assert any(address in net for net in ALLOWED), f"{path.name}: {address}"
    loaded = load_config(path, env={})
    for value in _strings(loaded.data):
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            continue
        assert any(network.subnet_of(net) for net in ALLOWED if net.version == network.version), (
            f"{path.name}: {value}"
        )


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    return []


@pytest.mark.parametrize("name", PROFILES)
def test_each_profile_can_be_included_by_name_from_elsewhere(name: str, tmp_path: Path) -> None:
    loaded = load_config_text(f"include: [{name}]\n", base_dir=tmp_path, env={})
    assert [str(d) for d in loaded.diagnostics + validate(loaded)] == []
    for key in ("geoip",):
        path = loaded.data.get("route", {}).get(key, {}).get("path")
        if path:
            assert loaded.resolve_path(path).is_file()
    for rule_set in loaded.data.get("route", {}).get("rule_set", []):
        if rule_set.get("type") == "local":
            assert loaded.resolve_path(rule_set["path"]).is_file()


def test_profiles_are_listed_with_their_descriptions() -> None:
    listed = {name: desc for name, desc, _ in list_profiles()}
    for name in PROFILES:
        assert listed[name] == load_config(PROFILE_DIR / f"{name}.yaml", env={}).data["description"]


def test_environment_overrides_the_profile_defaults() -> None:
    env = {"ZTUN_SOCKS_SERVER": "203.0.113.7", "ZTUN_SOCKS_PORT": "1081",
           "ZTUN_DIRECT_COUNTRY": "de"}  # fmt: skip
    loaded = load_config(PROFILE_DIR / "geoip-split.yaml", env=env)
    proxy = loaded.data["outbounds"][1]
    assert (proxy["server"], proxy["server_port"]) == ("203.0.113.7", 1081)
    assert loaded.data["route"]["rules"][0]["geoip"] == "de"


def test_local_proxy_example_is_the_rootless_one() -> None:
    data = load_config(EXAMPLE_DIR / "local-proxy.yaml", env={}).data
    assert [(i["type"], i["listen"], i["listen_port"]) for i in data["inbounds"]] == [
        ("mixed", "127.0.0.1", 2080)
    ]
    assert {o["type"] for o in data["outbounds"]} == {"direct", "block"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_passes_check_file(path: Path) -> None:
    from ztun.check import check_file

    result = check_file(path)
    # warnings are allowed only for features accepted but not yet executed (split-dns's dns)
    others = [str(d) for d in result.diagnostics if "not yet executed" not in d.message]
    assert others == []
    assert result.router is not None


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("network", ["udp", "tcp"])
def test_dns_through_a_shipped_config_is_answered_not_refused(path: Path, network: str) -> None:
    """Every shipped config lets DNS work: a DNS flow is routed or handed to ztun's DNS
    module (hijack-dns), never refused."""
    from ztun.check import check_file
    from ztun.route.action import HijackDNS, Route
    from ztun.route.metadata import FlowMeta

    router = check_file(path).router
    assert router is not None
    for resolver in ("192.168.1.1", "198.51.100.53", "2001:db8::53"):
        meta = FlowMeta(
            network=network,  # type: ignore[arg-type]
            destination=ipaddress.ip_address(resolver),
            destination_port=53,
            source=ipaddress.ip_address("192.168.1.10"),
            source_port=40000,
        )
        decision = router.decide_all(meta)
        assert isinstance(decision.action, Route | HijackDNS), f"{resolver}: {decision.action}"


def test_split_dns_answers_every_query_itself_local_names_locally() -> None:
    from ztun.check import check_file
    from ztun.route.action import HijackDNS
    from ztun.route.metadata import FlowMeta

    result = check_file(PROFILE_DIR / "split-dns.yaml")
    router, dns_router = result.router, result.dns_router
    assert router is not None and dns_router is not None
    for resolver in ("192.168.1.1", "127.0.0.53", "203.0.113.53"):
        meta = FlowMeta(network="udp", destination=ipaddress.ip_address(resolver),
                        destination_port=53)  # fmt: skip
        assert isinstance(router.decide_all(meta).action, HijackDNS)
    assert dns_router.decide(FlowMeta(domain="printer.lan")).server == "local"
    assert dns_router.decide(FlowMeta(domain="example.org")).server == "remote"


def test_failover_profile_is_a_urltest_over_two_proxies() -> None:
    from ztun.config.options import SocksOutboundOptions, URLTestOutboundOptions, build_options

    env = {"ZTUN_SOCKS_SERVER": "198.51.100.7", "ZTUN_SOCKS_PORT": "1080",
           "ZTUN_SOCKS_SERVER_B": "198.51.100.8", "ZTUN_SOCKS_PORT_B": "1090",
           "ZTUN_URLTEST_URL": "http://203.0.113.1/generate_204"}  # fmt: skip
    loaded = load_config(PROFILE_DIR / "failover-proxy.yaml", env=env)
    assert validate(loaded) == []
    options = build_options(loaded.data)
    a, b, group = options.outbounds
    assert isinstance(a, SocksOutboundOptions) and isinstance(b, SocksOutboundOptions)
    assert (a.server, a.server_port) == ("198.51.100.7", 1080)
    assert (b.server, b.server_port) == ("198.51.100.8", 1090)
    assert isinstance(group, URLTestOutboundOptions) and group.tag == "proxy"
    assert group.outbounds == ("proxy-a", "proxy-b") and group.url == env["ZTUN_URLTEST_URL"]
    assert options.route.final == "proxy"
    # it combines with the other profiles: their `proxy` is this group
    combined = load_config_text("include: [failover-proxy, bypass-private, block-ads]\n",
                                env={})  # fmt: skip
    assert validate(combined) == []
