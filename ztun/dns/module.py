"""The DNS module as `ztun run` assembles it: the client, the tables that give IP flows their
names (reverse map, FakeIP pool), the hijack outbound, and the cache file.

Owns: deciding whether there is a DNS module at all (a `dns` section with servers, or a route
rule that hijacks DNS: then, as in sing-box, a `local` server answers), handing every direct
outbound a resolver that goes through it, the `NameLookup` the dispatcher uses for IP
destinations, and loading/saving the FakeIP table in `experimental.cache_file`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ztun.address import IPAddress
from ztun.config.options import FakeIPDNSServerOptions, LocalDNSServerOptions, Options
from ztun.dns.client import DnsClient
from ztun.dns.fakeip import FakeIPPool
from ztun.dns.hijack import DnsHijack
from ztun.dns.reverse import ReverseMap
from ztun.outbound.base import Outbound
from ztun.route.metadata import FlowMeta
from ztun.runtime.cache_file import cache_path, read_state, update_state

log = logging.getLogger("ztun.dns")

#: Entries of the reverse map (IP → the name it was last answered for).
REVERSE_CAPACITY = 65536


class DnsModule:
    def __init__(self, client: DnsClient, reverse: ReverseMap | None, cache_file: Path | None,
                 *, resolves: bool = False):  # fmt: skip
        self.client = client
        self.reverse = reverse
        self.fakeip = client.fakeip
        self.hijack = DnsHijack(client)
        #: where the FakeIP table is kept across restarts (None: it is not)
        self.cache_file = cache_file if self.fakeip is not None else None
        #: the direct outbounds resolve through this module (the config has DNS servers)
        self.resolves = resolves

    def adopt(self, router: Any, outbounds: dict[str, Outbound]) -> None:
        """A reload kept this module: new DNS rules, and the new outbounds resolve through
        it. Cached answers go, since the rules that chose their servers may have changed."""
        self.client.set_router(router)
        if self.client.cache is not None:
            self.client.cache.clear()
        if self.resolves:
            _resolve_through(self.client, outbounds)

    @property
    def gives_names(self) -> bool:
        """Whether IP flows can get names from here (reverse mapping or a FakeIP pool)."""
        return self.reverse is not None or self.fakeip is not None

    def names(self, ip: IPAddress) -> tuple[str, bool] | None:
        """The dispatcher's `NameLookup`: the name behind an IP destination, and whether the
        address is a FakeIP one ("" for a FakeIP address the pool does not know: refused)."""
        fakeip = self.fakeip
        if fakeip is not None and fakeip.contains(ip):
            return fakeip.lookup(ip) or "", True
        if self.reverse is not None:
            domain = self.reverse.lookup(ip, time.monotonic())
            if domain:
                return domain, False
        return None

    def save(self) -> None:
        """Write the FakeIP table (the file's other keys, selector choices, are kept)."""
        if self.cache_file is None or self.fakeip is None:
            return
        update_state(self.cache_file, "fakeip", self.fakeip.dump())

    async def close(self) -> None:
        self.save()
        await self.hijack.close()
        await self.client.close()


def build_dns(
    options: Options,
    outbounds: dict[str, Outbound],
    dns_router: Any,
    base_dir: str | Path | None = None,
    *,
    hijack: bool = False,
    previous: DnsModule | None = None,
) -> DnsModule | None:
    """The DNS module when the config has DNS servers, or when a route rule hijacks DNS (then
    with one `local` server, as sing-box answers without a dns section); else None. With DNS
    servers, every direct outbound resolves through it, so DNS rules, hosts and the cache apply
    to the names it connects to.

    `previous`: the module a reload replaces; its reverse map, and its FakeIP pool when the
    ranges are the same, carry over, so names given out before the reload still mean what
    they meant (applications keep FakeIP answers for their TTL and longer)."""
    dns_options = options.dns
    configured = bool(dns_options.servers)
    if not configured:
        if not hijack:
            return None
        dns_options = replace(dns_options, servers=(LocalDNSServerOptions(tag="local"),))
        dns_router = None
    reverse = ReverseMap(REVERSE_CAPACITY) if dns_options.reverse_mapping else None
    if reverse is not None and previous is not None and previous.reverse is not None:
        reverse = previous.reverse
    cache = options.experimental.cache_file
    cache_file = cache_path(cache, base_dir) if cache.store_fakeip else None
    fake = next((s for s in dns_options.servers if isinstance(s, FakeIPDNSServerOptions)), None)
    pool = None
    old_pool = previous.fakeip if previous is not None else None
    if fake is not None and old_pool is not None and old_pool.ranges == (fake.inet4_range,
                                                                          fake.inet6_range):
        pool = old_pool
    elif fake is not None:
        state = _read_state(cache_file) if cache_file is not None else None
        pool = FakeIPPool.load(
            (state or {}).get("fakeip"), fake.inet4_range, fake.inet6_range  # type: ignore[arg-type]
        )
    client = DnsClient(dns_options, dns_router, outbounds, reverse=reverse, fakeip=pool,
                       base_dir=base_dir)  # fmt: skip
    if configured:
        _resolve_through(client, outbounds)
    return DnsModule(client, reverse, cache_file, resolves=configured)


def _resolve_through(client: DnsClient, outbounds: dict[str, Outbound]) -> None:
    for outbound in outbounds.values():
        set_resolver = getattr(outbound, "set_resolver", None)
        if set_resolver is not None:
            set_resolver(_resolver(client, outbound.tag))


def _read_state(path: Path) -> dict[str, Any] | None:
    """The cache file's content; None if it cannot be read: the module then starts empty and
    rewrites it at exit."""
    return read_state(path, ": starting with an empty FakeIP table")


def _resolver(client: DnsClient, tag: str) -> Callable[[str, str | None], Awaitable[list[Any]]]:
    # DNS rules may match on the outbound the connection was routed to (`outbound`).
    meta = FlowMeta(network="udp", outbound=tag)

    async def resolve(name: str, strategy: str | None) -> list[Any]:
        return await client.lookup(name, strategy=strategy, meta=meta)

    return resolve
