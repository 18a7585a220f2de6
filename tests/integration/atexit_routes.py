"""Helper of test_tun_exits: a TUN inbound whose event loop ends without stop(), at an
interpreter exit that refuses new threads as Python 3.12+ does. Run inside a namespace.

The hook that refuses threads is registered after the inbound's own atexit hook, so it runs
first (atexit is last in, first out): when ztun's hook runs, starting a thread raises
RuntimeError exactly as on 3.12+.
"""

from __future__ import annotations

import _thread
import asyncio
import atexit
import threading

from ztun.config.options import RouteOptions, TunInboundOptions, build
from ztun.inbound.tun import TunInbound


class _Dispatcher:
    def __init__(self) -> None:
        self.outbounds: dict[str, object] = {}

    def route(self, flow: object, network: str) -> object:
        raise AssertionError("no flow here")


def refuse_threads() -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    threading.Thread.start = refuse  # type: ignore[method-assign]
    _thread.start_new_thread = refuse  # type: ignore[assignment]


async def main() -> None:
    options = build(TunInboundOptions, {"tag": "tun-in", "interface_name": "ztun0",
                                        "address": ["198.18.0.1/30", "fdfe:dcba:9876::1/126"],
                                        "auto_route": True})  # fmt: skip
    tun = TunInbound(options, _Dispatcher(), RouteOptions())  # type: ignore[arg-type]
    await tun.start()
    print("routes installed", flush=True)


asyncio.run(main())  # returns with the inbound running: no stop(), as when the loop dies
atexit.register(refuse_threads)
print("exiting", flush=True)
