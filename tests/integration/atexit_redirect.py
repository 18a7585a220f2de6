"""Helper of test_tun_redirect: a TUN inbound with auto_redirect whose event loop ends without
stop(), so only the `atexit` hook (`TunInbound.abort`, what a second signal runs too) can
delete the nftables table and the routes. Run inside a namespace; prints "redirect installed"
and "exiting"."""

from __future__ import annotations

import asyncio

from ztun.config.options import RouteOptions, TunInboundOptions, build
from ztun.inbound.tun import TunInbound


class _Dispatcher:
    def __init__(self) -> None:
        self.outbounds: dict[str, object] = {}

    def route(self, flow: object, network: str) -> object:
        raise AssertionError("no flow here")


async def main() -> None:
    options = build(TunInboundOptions, {"tag": "tun-in", "interface_name": "ztun0",
                                        "address": ["198.18.0.1/30", "fdfe:dcba:9876::1/126"],
                                        "auto_route": True, "auto_redirect": True})  # fmt: skip
    tun = TunInbound(options, _Dispatcher(), RouteOptions())  # type: ignore[arg-type]
    await tun.start()
    assert tun.redirect is not None, "auto_redirect did not start"
    print("redirect installed", flush=True)


asyncio.run(main())  # returns with the inbound running: no stop(), as when the loop dies
print("exiting", flush=True)
