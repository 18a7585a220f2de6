"""The outbound registry: config `type` → (options class, outbound class), one line per type.

The config layer (ztun.config.options.OUTBOUND_OPTIONS) knows every type the schema accepts;
this table knows the ones `ztun run` can run. A type in the first and not here is a config that
checks but cannot run, which `build_outbound` says in words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from ztun.config.options import (
    BlockOutboundOptions,
    DirectOutboundOptions,
    OutboundOptions,
    SelectorOutboundOptions,
    SocksOutboundOptions,
    URLTestOutboundOptions,
)
from ztun.errors import ZtunError
from ztun.outbound.base import Outbound
from ztun.outbound.block import BlockOutbound
from ztun.outbound.direct import DirectOutbound
from ztun.outbound.group import GroupOutbound
from ztun.outbound.selector import SelectorOutbound
from ztun.outbound.urltest import URLTestOutbound


def _socks(options: SocksOutboundOptions) -> Outbound:
    # Imported only for a config with a socks outbound: python-socks is ~0.5 MiB of RSS a
    # direct-only router never needs.
    from ztun.outbound.socks import SocksOutbound

    return SocksOutbound(options)


class OutboundType(NamedTuple):
    options: type[OutboundOptions]
    factory: Callable[[Any], Outbound]


OUTBOUND_TYPES: Mapping[str, OutboundType] = MappingProxyType({
    "direct": OutboundType(DirectOutboundOptions, DirectOutbound),
    "socks": OutboundType(SocksOutboundOptions, _socks),
    "block": OutboundType(BlockOutboundOptions, BlockOutbound),
    "selector": OutboundType(SelectorOutboundOptions, SelectorOutbound),
    "urltest": OutboundType(URLTestOutboundOptions, URLTestOutbound),
})  # fmt: skip


def build_outbounds(
    options: Iterable[OutboundOptions], cache_file: Path | None = None
) -> dict[str, Outbound]:
    """Every outbound by tag, groups bound to their members; `cache_file` is where selector
    groups keep their choice (`experimental.cache_file`), None when they keep none."""
    outbounds: dict[str, Outbound] = {}
    for o in options:
        if isinstance(o, SelectorOutboundOptions):
            outbounds[o.tag] = SelectorOutbound(o, cache_file)
        else:
            outbounds[o.tag] = build_outbound(o)
    for outbound in outbounds.values():
        if isinstance(outbound, GroupOutbound):
            outbound.bind(outbounds)
    return outbounds


def build_outbound(options: OutboundOptions) -> Outbound:
    """The outbound for one outbound's options; ZtunError for a type ztun cannot run."""
    entry = OUTBOUND_TYPES.get(options.type)
    if entry is None or not isinstance(options, entry.options):
        raise ZtunError(
            f"outbound {options.tag!r}: type {options.type!r} is not available in `ztun run` "
            f"(available: {', '.join(OUTBOUND_TYPES)})"
        )
    return entry.factory(options)
