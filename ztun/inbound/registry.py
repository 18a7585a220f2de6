"""The inbound registry: config `type` → (options class, inbound factory), one line per type.

The config layer (ztun.config.options.INBOUND_OPTIONS) knows every type the schema accepts;
this table knows the ones `ztun run` can run. Every factory takes the same arguments, so
box.py builds any inbound the same way: `factory(options, dispatcher, route_options)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from ztun.config.options import (
    InboundOptions,
    MixedInboundOptions,
    RouteOptions,
    TunInboundOptions,
)
from ztun.errors import ZtunError
from ztun.runtime.dispatch import Dispatcher


class Inbound(Protocol):
    """What box.py needs of a running inbound."""

    tag: str
    #: one task per open flow; box waits for them on shutdown
    tasks: set[asyncio.Task[None]]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def abort(self) -> None:
        """Put back at once, synchronously, whatever the inbound changed on the host (routes):
        the last thing before an immediate exit (a second signal)."""
        ...


# Each inbound's module is imported by its factory: a config without a TUN never loads the
# TUN's packet stack and NAT, one without a mixed inbound never loads the proxy codecs.
def _mixed(options: Any, dispatcher: Dispatcher, route: RouteOptions) -> Inbound:
    from ztun.inbound.mixed import MixedInbound

    return MixedInbound(options, dispatcher)


def _tun(options: Any, dispatcher: Dispatcher, route: RouteOptions) -> Inbound:
    from ztun.inbound.tun import TunInbound

    return TunInbound(options, dispatcher, route)


class InboundType(NamedTuple):
    options: type[InboundOptions]
    factory: Callable[[Any, Dispatcher, RouteOptions], Inbound]


INBOUND_TYPES: Mapping[str, InboundType] = MappingProxyType({
    "mixed": InboundType(MixedInboundOptions, _mixed),
    "tun": InboundType(TunInboundOptions, _tun),
})  # fmt: skip


def build_inbound(options: InboundOptions, dispatcher: Dispatcher, route: RouteOptions) -> Inbound:
    """The inbound for one inbound's options; ZtunError for a type ztun cannot run."""
    entry = INBOUND_TYPES.get(options.type)
    if entry is None or not isinstance(options, entry.options):
        raise ZtunError(
            f"inbound {options.tag!r}: type {options.type!r} is not available in `ztun run` "
            f"(available: {', '.join(INBOUND_TYPES)})"
        )
    return entry.factory(options, dispatcher, route)
