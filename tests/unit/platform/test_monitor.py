"""The Linux network monitor's parse of rtnetlink messages (as pyroute2 hands them over)."""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ztun.platform.linux.monitor import IFF_RUNNING, IFF_UP, parse
from ztun.route.network import AddressEvent, LinkEvent, RouteEvent


class Msg(dict[str, Any]):
    """pyroute2's messages answer `get` for fields and NLA names alike; so does this."""


def test_links() -> None:
    up = Msg(event="RTM_NEWLINK", index=2, flags=IFF_UP | IFF_RUNNING, IFLA_IFNAME="eth0")
    assert parse(up) == LinkEvent(2, "eth0", up=True)
    no_carrier = Msg(event="RTM_NEWLINK", index=2, flags=IFF_UP, IFLA_IFNAME="eth0")
    assert parse(no_carrier) == LinkEvent(2, "eth0", up=False)
    gone = Msg(event="RTM_DELLINK", index=2, flags=0, IFLA_IFNAME="eth0")
    assert parse(gone) == LinkEvent(2, "eth0", up=False, removed=True)


def test_addresses_prefer_the_local_one() -> None:
    ptp = Msg(event="RTM_NEWADDR", index=3, IFA_LOCAL="198.51.100.1", IFA_ADDRESS="198.51.100.9")
    assert parse(ptp) == AddressEvent(3, "198.51.100.1")
    v6 = Msg(event="RTM_DELADDR", index=3, IFA_ADDRESS="2001:db8::1")
    assert parse(v6) == AddressEvent(3, "2001:db8::1", removed=True)
    assert parse(Msg(event="RTM_NEWADDR", index=3)) is None


def test_routes() -> None:
    r = Msg(event="RTM_NEWROUTE", family=socket.AF_INET, dst_len=0, table=254, type=1,
            RTA_TABLE=254, RTA_OIF=2, RTA_PRIORITY=100, RTA_GATEWAY="198.51.100.2")  # fmt: skip
    assert parse(r) == RouteEvent(4, 2, metric=100, gateway="198.51.100.2")
    assert parse(r).is_default  # type: ignore[union-attr]
    big_table = Msg(r, RTA_TABLE=2022, table=252)
    assert parse(big_table) == RouteEvent(4, 2, table=2022, metric=100, gateway="198.51.100.2")
    multipath = Msg(event="RTM_DELROUTE", family=socket.AF_INET6, dst_len=0, table=254, type=1,
                    RTA_MULTIPATH=[{"oif": 5, "RTA_GATEWAY": "fe80::1"}, {"oif": 6}])  # fmt: skip
    assert parse(multipath) == RouteEvent(6, 5, gateway="fe80::1", removed=True)
    unreachable = Msg(r, type=7)
    assert parse(unreachable) is None
    assert parse(Msg(r, family=socket.AF_PACKET)) is None


def test_other_messages_are_not_events() -> None:
    assert parse(Msg(event="RTM_NEWNEIGH", index=2)) is None
    assert parse(Msg()) is None


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "event",
                "index",
                "flags",
                "family",
                "dst_len",
                "type",
                "IFLA_IFNAME",
                "IFA_LOCAL",
                "RTA_OIF",
                "RTA_TABLE",
            ]
        ),
        st.one_of(
            st.integers(0, 300),
            st.sampled_from(["RTM_NEWLINK", "RTM_DELADDR", "RTM_NEWROUTE", "eth0", "1.2.3.4"]),
        ),
    )
)
def test_parse_never_raises(fields: dict[str, Any]) -> None:
    """A message missing a field (pyroute2 always fills them) is no event, not an error."""
    ev = parse(Msg(fields))
    assert ev is None or isinstance(ev, LinkEvent | AddressEvent | RouteEvent)
