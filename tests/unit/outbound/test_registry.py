"""The registries and the capabilities that stand in for `outbound.type == ...` checks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztun.config.options import (
    INBOUND_OPTIONS,
    OUTBOUND_OPTIONS,
    BlockOutboundOptions,
    DirectOutboundOptions,
    MixedInboundOptions,
    RouteOptions,
    SocksOutboundOptions,
    build,
    outbound_options,
)
from ztun.errors import ZtunError
from ztun.inbound.mixed import MixedInbound
from ztun.inbound.registry import INBOUND_TYPES, build_inbound
from ztun.outbound.block import BlockOutbound
from ztun.outbound.direct import DirectOutbound
from ztun.outbound.registry import OUTBOUND_TYPES, build_outbound
from ztun.outbound.socks import SocksOutbound
from ztun.runtime import dial
from ztun.runtime.dispatch import Dispatcher

ZTUN = Path(__file__).resolve().parents[3] / "ztun"


def test_registries_cover_every_type_of_the_config_layer() -> None:
    assert {k: v.options for k, v in OUTBOUND_TYPES.items()} == dict(OUTBOUND_OPTIONS)
    assert {k: v.options for k, v in INBOUND_TYPES.items()} == dict(INBOUND_OPTIONS)


@pytest.mark.parametrize("data,cls", [
    ({"type": "direct", "tag": "d"}, DirectOutbound),
    ({"type": "socks", "tag": "s", "server": "203.0.113.1", "server_port": 1080}, SocksOutbound),
    ({"type": "block", "tag": "b"}, BlockOutbound),
])  # fmt: skip
def test_build_outbound_by_type(data: dict[str, object], cls: type) -> None:
    ob = build_outbound(outbound_options(data))
    assert isinstance(ob, cls) and ob.tag == data["tag"]


def test_build_inbound_by_type() -> None:
    options = build(MixedInboundOptions, {"tag": "m", "listen_port": 0})
    dispatcher = Dispatcher(None, {})  # type: ignore[arg-type]
    assert isinstance(build_inbound(options, dispatcher, RouteOptions()), MixedInbound)


def test_a_type_ztun_cannot_run_is_a_clear_error() -> None:
    @dataclass(frozen=True)
    class VmessOutboundOptions:  # a type the schema might accept before ztun can run it
        type: str = "vmess"
        tag: str = "v"

    with pytest.raises(ZtunError, match="outbound 'v': type 'vmess' is not available"):
        build_outbound(VmessOutboundOptions())  # type: ignore[arg-type]


def test_capabilities() -> None:
    direct = DirectOutbound(build(DirectOutboundOptions, {"tag": "d"}))
    block = BlockOutbound(build(BlockOutboundOptions, {"tag": "b"}))
    socks = SocksOutbound(
        build(SocksOutboundOptions, {"tag": "s", "server": "203.0.113.1", "server_port": 1080})
    )
    assert (block.refuses_tcp, block.drops_udp) == (True, True)
    assert not any((direct.refuses_tcp, direct.drops_udp, socks.refuses_tcp, socks.drops_udp))
    # auto_route's mark reaches every socket through runtime/dial.py, not per outbound.
    assert direct.dial.mark() == 0
    dial.set_own_mark(0x2024)
    try:
        assert direct.dial.mark() == 0x2024
        own = DirectOutbound(build(DirectOutboundOptions, {"tag": "o", "bind_interface": "eth0"}))
        assert own.dial.mark() == 0  # bound to an interface: it goes where the user said
    finally:
        dial.set_own_mark(0)


def test_no_behaviour_by_outbound_type() -> None:
    """Kinds differ through capabilities, so a new outbound needs no edits elsewhere."""
    pattern = re.compile(r"\.type\s*(==|!=|\bin\b)")
    found = [f"{p.relative_to(ZTUN.parent)}:{n}"
             for p in sorted(ZTUN.rglob("*.py"))
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if pattern.search(line)]  # fmt: skip
    assert found == []
