"""FlowMeta: what the rule engine knows about one flow.

Immutable: matching never writes into it (sing-box's InboundContext does, which makes rule
order bugs hard to see). Any state a match needs lives in the match call.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from ztun.address import IPAddress

Network = Literal["tcp", "udp", "icmp"]


@dataclass(frozen=True, slots=True)
class FlowMeta:
    """One flow, as an inbound (or `ztun route`) describes it to the router.

    `destination` is the IP the flow goes to, when known; `domain` the name it was asked for
    (from a SOCKS/HTTP request, the DNS reverse map or a sniffer). Either may be missing.
    """

    network: Network = "tcp"
    destination: IPAddress | None = None
    destination_port: int = 0
    domain: str | None = None
    source: IPAddress | None = None
    source_port: int = 0
    inbound: str | None = None
    protocol: str | None = None
    #: addresses a domain resolved to, when a caller resolved it (sing-box matches ip_cidr on these)
    resolved: tuple[IPAddress, ...] = field(default=())
    user: str | None = None
    #: DNS query type (1 = A, 28 = AAAA, ...) for DNS flows; matched by `query_type`
    query_type: int | None = None
    #: for a DNS query: the outbound tag the flow that caused it was routed to, when known
    #: (matched by the `outbound` item of DNS rules only)
    outbound: str | None = None
    #: the local process that owns the flow's source socket (Linux, `process_*` items), and
    #: the user its socket belongs to (`user`, `user_id`); None when not known: the owner was
    #: not looked up, is gone or is in another namespace ("unknown" matches no such item)
    process_name: str | None = None
    process_path: str | None = None
    process_user: str | None = None
    process_user_id: int | None = None

    def __post_init__(self) -> None:
        # An IPv4-mapped IPv6 address is the IPv4 host: rules written for v4 must match it.
        for name in ("destination", "source"):
            ip = getattr(self, name)
            if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
                object.__setattr__(self, name, ip.ipv4_mapped)
        if self.domain is not None:
            # Domains compare case-insensitively and without the root dot, as DNS does.
            norm = self.domain.lower().rstrip(".")
            if norm != self.domain:
                object.__setattr__(self, "domain", norm)

    def for_query(self, domain: str | None, query_type: int) -> FlowMeta:
        """This flow asking DNS for `domain` (already lower case, no root dot): what DNS rules
        match on. `dataclasses.replace` does the same at about twice the cost, once per
        hijacked query."""
        return FlowMeta(
            self.network, self.destination, self.destination_port, domain, self.source,
            self.source_port, self.inbound, self.protocol, self.resolved, self.user,
            query_type, self.outbound, self.process_name, self.process_path,
            self.process_user, self.process_user_id,
        )  # fmt: skip

    def with_owner(
        self, name: str | None, path: str | None, user: str | None, user_id: int | None
    ) -> FlowMeta:
        """This flow with its local owner known (once per flow, as `for_query`, without the
        cost of `dataclasses.replace`)."""
        return FlowMeta(
            self.network, self.destination, self.destination_port, self.domain, self.source,
            self.source_port, self.inbound, self.protocol, self.resolved, self.user,
            self.query_type, self.outbound, name, path, user, user_id,
        )  # fmt: skip

    @property
    def ip_version(self) -> int | None:
        if self.destination is not None:
            return self.destination.version
        return None


def parse_ip(text: str) -> IPAddress | None:
    """The IP in `text`, or None when it is not an IP literal (brackets allowed for IPv6)."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    try:
        return ipaddress.ip_address(t)
    except ValueError:
        return None
