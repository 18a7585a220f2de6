"""Linux platform code that runs without root: error messages and the auto_route plan."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from ztun.config.options import RouteOptions, TunInboundOptions, build, route_options
from ztun.inbound.tun import TunInbound, TunOptionError
from ztun.platform.linux import routes, tun_device


def test_missing_dev_net_tun_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tun_device, "TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(tun_device.TunError) as e:
        tun_device.TunDevice.open("ztun0", [], 9000)
    assert "does not exist" in str(e.value) and "modprobe tun" in str(e.value)


def test_interface_name_too_long(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / "tun"
    fake.write_bytes(b"")
    monkeypatch.setattr(tun_device, "TUN_PATH", str(fake))
    with pytest.raises(tun_device.TunError, match="longer than 15"):
        tun_device.TunDevice.open("x" * 16, [], 9000)


def net(s: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(s)


def test_plan_like_sing_box() -> None:
    p = routes.plan(interface="ztun0", index=7, tun_networks=[net("198.18.0.0/30")],
                    route_address=[], route_exclude_address=[net("203.0.113.0/24")],
                    bypass=[net("198.51.100.2/32")], mark=0x2024, strict_route=True)  # fmt: skip
    v4 = [r for r in p.rules if r["family"] == socket.AF_INET]
    assert [r["priority"] for r in v4] == [9000, 9001, 9001, 9003]  # strict: no suppress rule
    assert v4[0]["fwmark"] == 0x2024 and v4[0]["table"] == 254
    assert {r.get("dst") for r in v4[1:3]} == {"203.0.113.0", "198.51.100.2"}
    v6 = [r for r in p.rules if r["family"] == socket.AF_INET6]
    assert v6 == [{"family": socket.AF_INET6, "priority": 9004, "action": "FR_ACT_UNREACHABLE"}]
    assert p.routes == [{"family": socket.AF_INET, "dst": "0.0.0.0", "dst_len": 0, "oif": 7,
                         "table": 2022}]  # fmt: skip


def test_plan_route_address() -> None:
    p = routes.plan(interface="t", index=3,
                    tun_networks=[net("198.18.0.0/30"), net("fdfe:dcba:9876::/126")],
                    route_address=[net("203.0.113.0/24"), net("2001:db8::/32")],
                    route_exclude_address=[], bypass=[], mark=1, strict_route=False)  # fmt: skip
    assert [(r["dst"], r["dst_len"]) for r in p.routes] == [("203.0.113.0", 24), ("2001:db8::", 32)]
    assert sum(1 for r in p.rules if r.get("suppress_prefixlen") == 0) == 2


class _D:
    def __init__(self) -> None:
        self.outbounds: dict[str, object] = {}

    def route(self, flow: object, network: str) -> object:
        raise AssertionError("no flow is routed in these tests")


@pytest.mark.parametrize("address,msg", [
    (["198.18.0.1/32"], "one more IPv4 address"),
    (["198.18.0.2/31"], "one more IPv4 address"),
    ([], "needs at least one prefix"),
])  # fmt: skip
def test_tun_options_checked(address: list[str], msg: str) -> None:
    with pytest.raises(TunOptionError, match=msg):
        options = build(TunInboundOptions, {"tag": "t", "address": address})
        TunInbound(options, _D(), RouteOptions())  # type: ignore[arg-type]


def test_tun_options_defaults() -> None:
    options = build(TunInboundOptions, {"tag": "t", "address": ["198.18.0.1/30"]})
    route = route_options({"default_mark": "0x10"})
    t = TunInbound(options, _D(), route)  # type: ignore[arg-type]
    assert t.mtu == 9000 and t.udp_timeout == 60 and t.icmp == "reply" and t.mark == 0x10
    assert t.v4 == (bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])) and t.v6 is None


def test_offload_falls_back_when_the_kernel_refuses(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No TUNGETFEATURES, or no IFF_VNET_HDR in it: a plain device and one log line; a refused
    TUNSETOFFLOAD keeps the headers (they work without super-packets) and logs it."""
    calls: list[int] = []

    def refuse(fd: int, req: int, arg: object = 0, mutate: bool = True) -> int:
        calls.append(req)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(tun_device.fcntl, "ioctl", refuse)
    with caplog.at_level("INFO", logger="ztun.tun"):
        assert tun_device._try_offload(-1, "ztun0") is False
    assert calls == [tun_device.TUNGETFEATURES]
    assert "no offload" in caplog.text

    def no_vnet(fd: int, req: int, arg: object = 0, mutate: bool = True) -> int:
        arg[0] = tun_device.IFF_TUN | tun_device.IFF_NO_PI  # type: ignore[index]
        return 0

    monkeypatch.setattr(tun_device.fcntl, "ioctl", no_vnet)
    assert tun_device._try_offload(-1, "ztun0") is False

    def refuse_offload(fd: int, req: int, arg: object = 0, mutate: bool = True) -> int:
        calls.append(req)
        if req == tun_device.TUNSETOFFLOAD:
            raise OSError(22, "Invalid argument")
        return 0

    calls.clear()
    monkeypatch.setattr(tun_device.fcntl, "ioctl", refuse_offload)
    with caplog.at_level("INFO", logger="ztun.tun"):
        assert tun_device._set_offload(-1) is False
    # With USO first, then without it.
    assert calls == [tun_device.TUNSETVNETHDRSZ, tun_device.TUNSETOFFLOAD,
                     tun_device.TUNSETOFFLOAD]  # fmt: skip
    assert "offload refused" in caplog.text


def test_uso_asked_first_and_dropped_when_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: UDP super-packets (TUN_F_USO4/6, Linux 6.2+) are asked for with the TCP
    offloads; a kernel without them gets the TCP offloads alone."""
    asked: list[object] = []

    def before_6_2(fd: int, req: int, arg: object = 0, mutate: bool = True) -> int:
        if req == tun_device.TUNSETOFFLOAD:
            asked.append(arg)
            if isinstance(arg, int) and arg & tun_device.TUN_F_USO4:
                raise OSError(22, "Invalid argument")
        return 0

    monkeypatch.setattr(tun_device.fcntl, "ioctl", before_6_2)
    assert tun_device._set_offload(-1) is False
    assert asked == [tun_device.OFFLOAD_USO, tun_device.OFFLOAD]
    asked.clear()
    monkeypatch.setattr(tun_device.fcntl, "ioctl", lambda *a, **k: asked.append(a[2]) or 0)
    assert tun_device._set_offload(-1) is True
