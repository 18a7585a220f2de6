"""The Clash API's JSON shapes (ztun.api.views), `ztun status`/`top` text (ztun.api.console)
and the log broker, without a server."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from datetime import datetime

from ztun.address import Address
from ztun.api import console, views
from ztun.api.logs import LogBroker
from ztun.route.action import Decision, Route
from ztun.route.metadata import FlowMeta
from ztun.runtime.tracker import Tracker
from ztun.stack.flow import Flow


def _tracked() -> Tracker:
    tracker = Tracker(inbound_types={"mixed-in": "mixed", "tun-in": "tun"})
    meta = FlowMeta(network="tcp", domain="www.example.com", destination_port=443,
                    source=ipaddress.ip_address("198.51.100.2"), source_port=50000,
                    inbound="tun-in", protocol="tls")  # fmt: skip
    flow = Flow(meta, Address("www.example.com", 443), 0.0)
    flow.outbound = "proxy"
    flow.decision = Decision(Route("proxy"), 2, "domain_suffix=[example.com]")
    tracker.add(flow, "tcp", lambda: (12, 3400), lambda: None)
    return tracker


def test_connections_shape() -> None:
    found = views.connections(_tracked())
    assert found["uploadTotal"] == 12 and found["downloadTotal"] == 3400
    (c,) = found["connections"]
    assert set(c) == {"id", "metadata", "upload", "download", "start", "chains", "rule",
                      "rulePayload"}  # fmt: skip
    m = c["metadata"]
    assert m["network"] == "tcp" and m["type"] == "Tun" and m["host"] == "www.example.com"
    assert m["sourceIP"] == "198.51.100.2" and m["sourcePort"] == "50000"
    assert m["destinationIP"] == "" and m["destinationPort"] == "443"
    assert c["chains"] == ["proxy"] and c["rule"] == "domain_suffix=[example.com] => route(proxy)"
    assert datetime.fromisoformat(c["start"]).tzinfo is not None
    assert m["process"] == "" and m["processPath"] == "" and "uid" not in m


def test_connections_name_the_local_process_when_known() -> None:
    """A flow whose owner was looked up (a process or user rule asked) shows it, as
    Clash.Meta's `process`, `processPath` and `uid`."""
    tracker = Tracker(inbound_types={"tun-in": "tun"})
    meta = FlowMeta(network="tcp", destination=ipaddress.ip_address("203.0.113.10"),
                    destination_port=443, inbound="tun-in", process_name="curl",
                    process_path="/usr/bin/curl", process_user="alice",
                    process_user_id=1000)  # fmt: skip
    flow = Flow(meta, Address("203.0.113.10", 443), 0.0)
    tracker.add(flow, "tcp", lambda: (0, 0), lambda: None)
    m = views.connections(tracker)["connections"][0]["metadata"]
    assert (m["process"], m["processPath"], m["uid"]) == ("curl", "/usr/bin/curl", 1000)


def test_proxies_and_rules() -> None:
    proxies = views.proxies({"direct": "direct", "proxy": "socks", "block": "block"}, "proxy")
    assert proxies["proxies"]["proxy"]["type"] == "Socks5"
    assert proxies["proxies"]["block"]["udp"] is False
    assert proxies["proxies"]["GLOBAL"]["now"] == "proxy"
    assert views.rules([], "direct")["rules"] == [
        {"type": "final", "payload": "", "proxy": "route(direct)"}]


def test_status_text_and_top() -> None:
    status = {"version": "0.1.0", "uptime": 3725, "mode": "Rule", "connections": 1,
              "connectionsTotal": 9, "closedByApi": 2, "uploadTotal": 2048,
              "downloadTotal": 5 << 20,
              "outbounds": {"proxy": {"upload": 2048, "download": 5 << 20, "connections": 1}},
              "dns": {"cloudflare": {"queries": 7, "answers": 5, "timeouts": 1,
                                     "cache_hits": 2, "errors": 0}}}  # fmt: skip
    text = console.status_text(status)
    assert "up 1h02m" in text and "1 open, 9 since start (2 closed through the API)" in text
    assert "proxy" in text and "5.0 MiB" in text and "cloudflare" in text
    top = console.Top()
    connections = views.connections(_tracked())
    first = top.screen(connections, status, 1.0)
    assert "www.example.com:443" in first and "0 B/s" in first
    connections["connections"][0]["download"] += 2048
    connections["downloadTotal"] += 2048
    second = top.screen(connections, status, 1.0, width=200, height=5)
    assert "2.0 KiB/s" in second


def test_the_log_broker_bounds_each_reader() -> None:
    async def main() -> None:
        broker = LogBroker(asyncio.get_running_loop())
        logger = logging.getLogger("ztun.test-broker")
        logger.addHandler(broker)
        logger.setLevel(logging.DEBUG)
        try:
            warnings = broker.subscribe(logging.WARNING)
            everything = broker.subscribe(logging.DEBUG)
            logger.info("hello %s", "there")
            logger.warning("careful")
            other = threading.Thread(target=logger.error, args=("from a thread",))
            other.start()
            other.join()
            await asyncio.sleep(0.01)
            assert [warnings.get_nowait()["payload"] for _ in range(2)] == [
                "careful", "from a thread"]
            assert everything.get_nowait() == {"type": "info", "payload": "hello there"}
            for i in range(5000):
                logger.debug("flood %d", i)
            assert everything.qsize() == everything.maxsize and broker.dropped > 0
        finally:
            logger.removeHandler(broker)

    asyncio.run(main())


def test_proxies_with_groups_now_all_and_history() -> None:
    from ztun.outbound.probe import Delay

    found = views.proxies(
        {"a": "socks", "b": "socks", "auto": "urltest", "pick": "selector"}, "pick",
        {"auto": ("b", ["a", "b"]), "pick": ("auto", ["auto", "a"])},
        {"b": [Delay(0.0, 0), Delay(1.5, 42)]},
    )["proxies"]  # fmt: skip
    assert found["auto"]["type"] == "URLTest" and found["auto"]["now"] == "b"
    assert found["auto"]["all"] == ["a", "b"]
    assert found["pick"]["type"] == "Selector" and found["pick"]["now"] == "auto"
    assert found["b"]["history"] == [
        {"time": "1970-01-01T00:00:00.000+00:00", "delay": 0},
        {"time": "1970-01-01T00:00:01.500+00:00", "delay": 42},
    ]
    assert "now" not in found["a"] and found["a"]["history"] == []


def test_chains_of_a_flow_through_groups_list_the_member_first() -> None:
    tracker = _tracked()
    (entry,) = list(tracker)
    entry.flow.chain = ("pick", "auto", "proxy-a")
    assert views.connection(entry)["chains"] == ["proxy-a", "auto", "pick"]
