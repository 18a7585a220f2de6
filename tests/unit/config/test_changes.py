"""What a reload changes (ztun.config.changes): which inbounds restart, whether the DNS module
and the network monitor are rebuilt, which sections wait for the next start."""

from __future__ import annotations

from typing import Any

from ztun.config.changes import plan_reload
from ztun.config.options import Options, build_options

TUN = {"type": "tun", "tag": "tun-in", "interface_name": "ztun0",
       "address": ["198.18.0.1/30"], "auto_route": True}  # fmt: skip
MIXED = {"type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1", "listen_port": 2080}


def options(**overrides: Any) -> Options:
    data: dict[str, Any] = {
        "inbounds": [TUN, MIXED],
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "route": {"rules": [{"ip_cidr": ["203.0.113.0/24"], "outbound": "direct"}]},
    }
    data.update(overrides)
    return build_options(data)


def test_same_config_keeps_everything() -> None:
    plan = plan_reload(options(), options())
    assert plan.keep == ("tun-in", "mixed-in")
    assert not plan.inbounds_changed and not plan.rebuild_dns and not plan.rebuild_monitor
    assert plan.not_applied == ()


def test_rules_only_keep_every_inbound() -> None:
    new = options(route={"rules": [{"ip_cidr": ["203.0.113.0/24"], "outbound": "direct"},
                                   {"domain": ["example.com"], "action": "reject"}],
                         "final": "direct"})  # fmt: skip
    plan = plan_reload(options(), new)
    assert plan.keep == ("tun-in", "mixed-in") and not plan.inbounds_changed
    assert not plan.rebuild_monitor and not plan.rebuild_dns


def test_changed_mixed_port_restarts_only_the_mixed_inbound() -> None:
    new = options(inbounds=[TUN, {**MIXED, "listen_port": 2081}])
    plan = plan_reload(options(), new)
    assert plan.keep == ("tun-in",) and plan.restart == ("mixed-in",)
    assert not plan.rebuild_monitor  # the TUN device the monitor leaves out is the same


def test_changed_tun_option_restarts_the_tun() -> None:
    new = options(inbounds=[{**TUN, "mtu": 1400}, MIXED])
    plan = plan_reload(options(), new)
    assert plan.restart == ("tun-in",) and plan.keep == ("mixed-in",)


def test_changed_busy_poll_keeps_the_tun_and_retunes_it() -> None:
    new = options(inbounds=[{**TUN, "busy_poll": "50us"}, MIXED])
    plan = plan_reload(options(), new)
    assert plan.keep == ("tun-in", "mixed-in") and plan.retune == ("tun-in",)
    assert not plan.inbounds_changed
    # with another change too, the TUN restarts (and starts with the new busy_poll)
    both = options(inbounds=[{**TUN, "busy_poll": "50us", "mtu": 1400}, MIXED])
    plan = plan_reload(options(), both)
    assert plan.restart == ("tun-in",) and plan.retune == ()
    assert plan_reload(options(), options()).retune == ()


def test_default_mark_restarts_an_auto_route_tun_only() -> None:
    new = options(route={**options_route(), "default_mark": 1234})
    plan = plan_reload(options(), new)
    assert plan.restart == ("tun-in",) and plan.keep == ("mixed-in",)


def options_route() -> dict[str, Any]:
    return {"rules": [{"ip_cidr": ["203.0.113.0/24"], "outbound": "direct"}]}


def test_added_and_removed_inbounds() -> None:
    other = {**MIXED, "tag": "mixed-2", "listen_port": 2082}
    plan = plan_reload(options(), options(inbounds=[TUN, other]))
    assert plan.stop == ("mixed-in",) and plan.start == ("mixed-2",) and plan.keep == ("tun-in",)
    # a renamed tag with the same options is a stop and a start: flows are tracked by tag
    renamed = {**MIXED, "tag": "renamed"}
    plan = plan_reload(options(), options(inbounds=[TUN, renamed]))
    assert plan.stop == ("mixed-in",) and plan.start == ("renamed",)


def test_tun_interface_change_rebuilds_the_monitor() -> None:
    new = options(inbounds=[{**TUN, "interface_name": "ztun1"}, MIXED])
    plan = plan_reload(options(), new)
    assert plan.restart == ("tun-in",) and plan.rebuild_monitor


def test_auto_detect_interface_rebuilds_the_monitor() -> None:
    new = options(route={**options_route(), "auto_detect_interface": True})
    plan = plan_reload(options(), new)
    assert plan.rebuild_monitor and plan.keep == ("tun-in", "mixed-in")


def test_dns_rebuilt_for_servers_outbounds_cache_and_hijack_not_for_rules() -> None:
    dns = {"servers": [{"type": "udp", "tag": "d", "server": "198.51.100.53"}]}
    base = options(dns=dns)
    rules = {**dns, "rules": [{"domain": ["example.com"], "action": "reject"}]}
    assert not plan_reload(base, options(dns=rules)).rebuild_dns
    other = {"servers": [{"type": "udp", "tag": "d", "server": "198.51.100.54"}]}
    assert plan_reload(base, options(dns=other)).rebuild_dns
    more = [{"type": "direct", "tag": "direct"}, {"type": "block", "tag": "block"}]
    assert plan_reload(base, options(dns=dns, outbounds=more)).rebuild_dns
    cache = {"cache_file": {"enabled": True, "store_fakeip": True}}
    assert plan_reload(base, options(dns=dns, experimental=cache)).rebuild_dns
    assert plan_reload(base, base, old_hijacks=False, new_hijacks=True).rebuild_dns


def test_api_and_log_changes_are_named_as_not_applied() -> None:
    new = options(log={"level": "debug"},
                  experimental={"clash_api": {"external_controller": "127.0.0.1:9091"}})
    plan = plan_reload(options(), new)
    assert len(plan.not_applied) == 2
    assert plan.not_applied[0].startswith("experimental.clash_api")
    assert plan.not_applied[1].startswith("log")
