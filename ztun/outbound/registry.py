"""The outbound registry: config `type` → factory, one explicit line per type."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ztun.errors import ZtunError
from ztun.outbound.base import Outbound
from ztun.outbound.block import BlockOutbound
from ztun.outbound.direct import DirectOutbound
from ztun.outbound.socks import SocksOutbound

Factory = Callable[[Mapping[str, Any]], Outbound]

OUTBOUND_TYPES: dict[str, Factory] = {
    "direct": DirectOutbound.from_options,
    "socks": SocksOutbound.from_options,
    "block": BlockOutbound.from_options,
}


def build_outbound(opts: Mapping[str, Any]) -> Outbound:
    kind = opts.get("type")
    factory = OUTBOUND_TYPES.get(str(kind))
    if factory is None:
        raise ZtunError(f"outbound {opts.get('tag')!r}: unknown type {kind!r}")
    return factory(opts)
