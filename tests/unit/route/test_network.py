"""The network monitor's pure state (ztun/route/network.py): synthetic rtnetlink events in,
debounce deadlines and decisions out; and that it survives any sequence of events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.route.network import (
    MAX_DELAY,
    AddressEvent,
    Decision,
    LinkEvent,
    NetworkState,
    RouteEvent,
    Snapshot,
)

ETH0 = LinkEvent(2, "eth0", up=True)
WLAN0 = LinkEvent(3, "wlan0", up=True)
TUN = LinkEvent(4, "ztun0", up=True)
DEF_ETH0 = RouteEvent(4, 2, metric=100, gateway="198.51.100.2")
DEF_WLAN0 = RouteEvent(4, 3, metric=600, gateway="198.51.100.66")
DEF6_WLAN0 = RouteEvent(6, 3, metric=1024, gateway="fe80::1")


def started(*events: object, ignore: tuple[str, ...] = ("ztun0",)) -> NetworkState:
    """A state whose first settle read `events` as the dump."""
    links = tuple(e for e in events if isinstance(e, LinkEvent))
    addrs = tuple(e for e in events if isinstance(e, AddressEvent))
    routes = tuple(e for e in events if isinstance(e, RouteEvent))
    state = NetworkState(ignore=ignore)
    first = state.settle(Snapshot(links, addrs, routes), 0.0)
    assert first.initial and not first.reset
    return state


def test_first_settle_picks_the_best_default_route_and_resets_nothing() -> None:
    state = NetworkState(ignore=["ztun0"])
    assert state.pending() and state.deadline() is None  # the first settle is at once
    d = state.settle(Snapshot((ETH0, WLAN0), (AddressEvent(2, "198.51.100.1"),),
                              (DEF_WLAN0, DEF_ETH0)), 0.0)  # fmt: skip
    assert d.initial and d.rebind and not d.reset
    assert d.egress is not None and d.egress.name == "eth0"
    assert d.egress.gateway == "198.51.100.2" and d.egress.addresses == {"198.51.100.1"}
    assert str(d.egress) == "eth0 via 198.51.100.2"
    assert not state.pending()


def test_ipv4_before_ipv6_then_metric_then_index() -> None:
    state = started(ETH0, WLAN0, DEF6_WLAN0, RouteEvent(6, 2, metric=1))
    assert state.egress is not None and state.egress.name == "eth0"  # metric 1 < 1024
    state = started(ETH0, WLAN0, DEF6_WLAN0, RouteEvent(6, 2, metric=1), DEF_WLAN0)
    assert state.egress is not None and state.egress.name == "wlan0"  # IPv4 wins
    state = started(ETH0, WLAN0, RouteEvent(4, 3, metric=5), RouteEvent(4, 2, metric=5))
    assert state.egress is not None and state.egress.name == "eth0"  # lower index


def test_debounce_waits_for_quiet_but_not_forever() -> None:
    state = started(ETH0, WLAN0, DEF_ETH0, DEF_WLAN0)
    assert state.deadline() is None
    state.event(LinkEvent(2, "eth0", up=False), 10.0)
    assert state.deadline() == 10.0 + state.debounce
    state.event(LinkEvent(3, "wlan0", up=False), 10.2)
    assert state.deadline() == 10.2 + state.debounce
    # a link that keeps flapping: the settle still comes MAX_DELAY after the first event
    t = 10.2
    while t < 20:
        t += 0.1
        state.event(LinkEvent(3, "wlan0", up=round(t * 10) % 2 == 0), t)
    assert state.deadline() == 10.0 + MAX_DELAY


def test_events_that_change_nothing_start_no_settle() -> None:
    state = started(ETH0, DEF_ETH0, AddressEvent(2, "198.51.100.1"))
    for ev in (ETH0, DEF_ETH0, AddressEvent(2, "198.51.100.1"),
               RouteEvent(4, 2, dst_len=24),  # not a default route
               RouteEvent(4, 2, table=2022),  # auto_route's table, not main
               AddressEvent(9, "203.0.113.9"),  # a link never seen
               RouteEvent(4, 2, metric=1, removed=True),  # never there
               LinkEvent(9, "x", up=True, removed=True)):  # fmt: skip
        state.event(ev, 1.0)
    assert state.deadline() is None


def test_egress_link_down_moves_to_the_other_uplink_and_resets() -> None:
    state = started(ETH0, WLAN0, DEF_ETH0, DEF_WLAN0)
    state.event(LinkEvent(2, "eth0", up=False), 5.0)
    d = state.settle(None, 5.3)  # the dump failed: decided from the events
    assert d.before is not None and d.before.name == "eth0"
    assert d.egress is not None and d.egress.name == "wlan0"
    assert d.rebind and d.reset and not d.initial
    assert d.changes == ("link eth0 down",)
    assert state.deadline() is None


def test_settle_trusts_the_dump_over_the_events() -> None:
    """IPv4 routes flushed with a link come without RTM_DELROUTE: the dump at settle has
    them gone, so when the link comes back up, its default route is not assumed back."""
    state = started(ETH0, WLAN0, DEF_ETH0, DEF_WLAN0)
    state.event(LinkEvent(2, "eth0", up=False), 1.0)
    state.settle(Snapshot((LinkEvent(2, "eth0", up=False), WLAN0), (), (DEF_WLAN0,)), 1.3)
    state.event(LinkEvent(2, "eth0", up=True), 2.0)
    d = state.settle(Snapshot((ETH0, WLAN0), (), (DEF_WLAN0,)), 2.3)
    assert d.egress is not None and d.egress.name == "wlan0"
    assert not d.acts  # eth0 is up again, but without a default route nothing changes
    state.event(DEF_ETH0, 3.0)
    d = state.settle(Snapshot((ETH0, WLAN0), (), (DEF_ETH0, DEF_WLAN0)), 3.3)
    assert d.egress is not None and d.egress.name == "eth0" and d.reset
    assert d.changes == ("default route via 198.51.100.2 dev eth0 metric 100 added",)


def test_no_default_route_means_no_egress() -> None:
    state = started(ETH0, DEF_ETH0)
    state.event(RouteEvent(4, 2, metric=100, gateway="198.51.100.2", removed=True), 1.0)
    d = state.settle(None, 1.3)
    assert d.egress is None and d.rebind and d.reset
    assert d.changes == ("default route via 198.51.100.2 dev eth0 metric 100 removed",)
    state.event(DEF_ETH0, 2.0)
    d = state.settle(None, 2.3)
    assert d.before is None and d.egress is not None and d.egress.name == "eth0"


def test_the_tun_and_loopback_are_never_the_egress() -> None:
    state = started(TUN, LinkEvent(1, "lo", up=True), RouteEvent(4, 4), RouteEvent(4, 1))
    assert state.egress is None
    state = started(TUN, ETH0, RouteEvent(4, 4, metric=0), RouteEvent(4, 2, metric=900))
    assert state.egress is not None and state.egress.name == "eth0"


def test_a_new_address_on_the_egress_resets_without_moving() -> None:
    state = started(ETH0, WLAN0, DEF_ETH0, AddressEvent(2, "198.51.100.1"))
    state.event(AddressEvent(2, "198.51.100.1", removed=True), 1.0)
    state.event(AddressEvent(2, "198.51.100.7"), 1.1)
    d = state.settle(None, 1.4)
    assert not d.rebind and d.reset
    assert d.egress is not None and d.egress.addresses == {"198.51.100.7"}


def test_addresses_that_do_not_name_the_network_do_not_reset() -> None:
    state = started(ETH0, WLAN0, DEF_ETH0, AddressEvent(2, "198.51.100.1"))
    state.event(AddressEvent(2, "2001:db8::1234"), 1.0)  # another family than the route
    state.event(AddressEvent(2, "fe80::1"), 1.0)  # link-local: ignored outright
    state.event(AddressEvent(3, "198.51.100.70"), 1.0)  # another link
    d = state.settle(None, 1.3)
    assert not d.acts
    assert "address fe80::1 added to eth0" not in d.changes


def test_a_new_gateway_on_the_same_link_resets() -> None:
    state = started(ETH0, DEF_ETH0)
    state.event(RouteEvent(4, 2, metric=100, gateway="198.51.100.2", removed=True), 1.0)
    state.event(RouteEvent(4, 2, metric=100, gateway="198.51.100.3"), 1.0)
    d = state.settle(None, 1.3)
    assert not d.rebind and d.reset


def test_link_removed_takes_its_routes_and_rename_keeps_them() -> None:
    state = started(ETH0, WLAN0, DEF_ETH0, DEF_WLAN0)
    state.event(LinkEvent(3, "wifi0", up=True), 1.0)
    state.event(LinkEvent(2, "eth0", up=True, removed=True), 1.0)
    d = state.settle(None, 1.3)
    assert d.egress is not None and d.egress.name == "wifi0"
    assert d.changes == ("link wlan0 renamed wifi0", "link eth0 removed")


def test_the_tun_coming_and_going_starts_no_settle() -> None:
    state = started(ETH0, DEF_ETH0)
    state.event(TUN, 1.0)
    state.event(AddressEvent(4, "198.18.0.1"), 1.0)
    state.event(RouteEvent(4, 4), 1.0)  # a default route via the TUN in main: never egress
    state.event(LinkEvent(4, "ztun0", up=False, removed=True), 1.0)
    assert state.deadline() is None


def test_unrelated_link_changes_do_nothing() -> None:
    state = started(ETH0, DEF_ETH0)
    state.event(LinkEvent(7, "docker0", up=True), 1.0)
    state.event(LinkEvent(7, "docker0", up=False), 1.1)
    d = state.settle(None, 1.4)
    assert not d.acts and d.changes == ("link docker0 added (up)", "link docker0 down")


def test_many_changes_are_summed_up() -> None:
    state = started(ETH0, DEF_ETH0)
    for i in range(40):
        state.event(LinkEvent(100 + i, f"v{i}", up=True), 1.0)
    d = state.settle(None, 1.3)
    assert len(d.changes) == 17 and d.changes[-1] == "and 24 more"


def test_changed_forces_a_settle() -> None:
    state = started(ETH0, DEF_ETH0)
    state.changed("netlink messages lost", 4.0)
    assert state.deadline() == 4.0 + state.debounce
    d = state.settle(Snapshot((ETH0,), (), (DEF_ETH0,)), 4.3)
    assert not d.acts and d.changes == ("netlink messages lost",)


# -- any sequence of events ----------------------------------------------------------------

NAMES = ["eth0", "wlan0", "ztun0", "lo", "usb0"]
links = st.builds(LinkEvent, st.integers(1, 6), st.sampled_from(NAMES), st.booleans(),
                  st.booleans())  # fmt: skip
addresses = st.builds(AddressEvent, st.integers(0, 6),
                      st.sampled_from(["198.51.100.1", "198.51.100.9", "2001:db8::1",
                                       "fe80::1", ""]), st.booleans())  # fmt: skip
routes = st.builds(RouteEvent, st.sampled_from([4, 6, 0, 7]), st.integers(-1, 6),
                   st.sampled_from([254, 2022, 255, 0]), st.sampled_from([0, 0, 24, 128]),
                   st.integers(0, 3), st.sampled_from([None, "198.51.100.2", "fe80::1"]),
                   st.booleans())  # fmt: skip
events = st.one_of(links, addresses, routes)
steps = st.lists(st.one_of(events, st.just("settle"), st.just("dump")), max_size=80)


def reference_egress(state: NetworkState) -> str | None:
    """The egress by a naive reading of the tables: every usable default route, sorted."""
    usable = []
    for family, index, metric, gateway in state.routes:
        link = state.links.get(index)
        if link and link.up and link.name not in ("ztun0", "lo"):
            usable.append(((family, metric, index, gateway or ""), link.name))
    return min(usable)[1] if usable else None


@settings(max_examples=300, deadline=None)
@given(steps)
def test_any_event_sequence_is_survived(seq: list[object]) -> None:
    state = NetworkState(ignore=["ztun0"])
    state.settle(None, 0.0)
    now = 0.0
    first_at: float | None = None
    seen: list[object] = []
    for step in seq:
        now += 0.05
        if step == "settle" or step == "dump":
            snap = None
            if step == "dump":
                snap = Snapshot(tuple(e for e in seen if isinstance(e, LinkEvent)),
                                tuple(e for e in seen if isinstance(e, AddressEvent)),
                                tuple(e for e in seen if isinstance(e, RouteEvent)))  # fmt: skip
            before = state.egress
            d = state.settle(snap, now)
            assert isinstance(d, Decision) and not d.initial
            assert d.before == before and d.egress == state.egress
            assert d.rebind == ((before and (before.index, before.name))
                                != (d.egress and (d.egress.index, d.egress.name)))  # fmt: skip
            assert not d.rebind or d.reset  # moving always resets
            assert state.deadline() is None
            first_at = None
        else:
            seen.append(step)
            state.event(step, now)  # type: ignore[arg-type]
            deadline = state.deadline()
            if deadline is not None:
                first_at = now if first_at is None else first_at
                assert deadline <= first_at + state.max_delay + 1e-9
                assert deadline <= now + state.debounce + 1e-9
        egress = state.choose()
        assert (egress.name if egress else None) == reference_egress(state)
        if egress is not None:
            link = state.links[egress.index]
            assert link.up and egress.name not in ("ztun0", "lo")
            assert all(":" not in a or egress.family == 6 for a in egress.addresses)
        assert all(not a.startswith("fe80") for k in state.links.values() for a in k.addresses)
