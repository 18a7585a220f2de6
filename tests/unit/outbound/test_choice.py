"""ztun.outbound.choice: which member a urltest group uses, from probe results, flow failures
and `now` (no sockets, no clock)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztun.outbound.choice import UrlTestChoice

MEMBERS = ("a", "b", "c")


def choice(tolerance: int = 50, interval: float = 180.0) -> UrlTestChoice:
    return UrlTestChoice(MEMBERS, tolerance_ms=tolerance, interval=interval, backoff=1.0)


def test_first_member_before_any_probe_and_every_member_due() -> None:
    c = choice()
    assert c.now == "a" and c.pick() == "a"
    assert c.due(0.0) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        UrlTestChoice((), tolerance_ms=50, interval=1.0)


def test_fastest_wins_then_tolerance_keeps_the_current_one() -> None:
    c = choice()
    assert c.probed("a", 300, 0.0) is False  # a is in use and the only one known
    assert c.probed("b", 100, 0.0) is True and c.now == "b"
    assert c.probed("c", 120, 0.0) is False  # within 50 ms of b: no flapping
    assert c.probed("b", 180, 1.0) is True and c.now == "c"  # now b is 60 ms behind c
    assert c.probed("b", 160, 2.0) is False and c.now == "c"  # c itself stays in use


def test_tolerance_compares_with_the_fastest() -> None:
    c = choice(tolerance=0)
    c.probed("a", 100, 0.0)
    assert c.probed("b", 99, 0.0) is True and c.now == "b"


def test_probes_come_back_every_interval() -> None:
    c = choice(interval=60.0)
    for m in MEMBERS:
        c.probed(m, 10, 5.0)
    assert c.due(64.9) == [] and c.next_due(5.0) == pytest.approx(60.0)
    assert c.due(65.0) == ["a", "b", "c"]


def test_a_failed_flow_moves_the_group_at_once() -> None:
    c = choice()
    c.probed("a", 10, 0.0)
    c.probed("b", 50, 0.0)
    c.probed("c", 90, 0.0)
    assert c.flow_failed("a", 1.0) is True and c.now == "b"
    assert c.is_down("a") and not c.is_down("b")
    assert c.flow_failed("a", 1.1) is False  # a second report changes nothing


def test_a_down_member_is_probed_again_with_backoff_and_comes_back() -> None:
    c = choice(interval=10.0)
    c.probed("b", 100, 0.0)
    c.probed("a", None, 0.0)  # down at 0: next probe at 1, then 1+2, then 3+4, 7+8 → 10 cap
    assert c.now == "b"
    assert c.state["a"].next_probe == 1.0
    c.probed("a", None, 1.0)
    assert c.state["a"].next_probe == 3.0
    c.probed("a", None, 3.0)
    assert c.state["a"].next_probe == 7.0
    c.probed("a", None, 7.0)
    assert c.state["a"].next_probe == 15.0
    c.probed("a", None, 15.0)
    assert c.state["a"].next_probe == 25.0  # capped at the interval
    assert c.probed("a", 10, 25.0) is True and c.now == "a" and not c.is_down("a")
    assert c.state["a"].next_probe == 35.0


def test_pick_for_a_retry_takes_the_best_other_live_member() -> None:
    c = choice()
    c.probed("a", 10, 0.0)
    c.probed("b", 90, 0.0)
    c.probed("c", 50, 0.0)
    assert c.pick({"a"}) == "c"
    c.flow_failed("c", 0.0)
    assert c.pick({"a"}) == "b"
    assert c.pick({"a", "b"}) is None


def test_all_down_uses_the_first_member() -> None:
    c = choice()
    c.probed("b", 10, 0.0)
    for m in MEMBERS:
        c.probed(m, None, 1.0)
    assert c.now == "a" and c.pick() == "a"
    assert c.pick({"a"}) is None


def test_unprobed_live_member_is_kept_until_a_probed_one_exists() -> None:
    c = choice()
    c.flow_failed("a", 0.0)
    assert c.now == "b"  # the next live one, in config order
    assert c.probed("c", 200, 1.0) is True and c.now == "c"  # b has no delay yet


events = st.lists(st.tuples(st.sampled_from(MEMBERS),
                            st.one_of(st.none(), st.integers(1, 2000), st.just(-1))),
                  max_size=40)  # fmt: skip


@given(events, st.integers(0, 300))
def test_never_a_down_member_while_a_live_one_exists(steps: list, tolerance: int) -> None:
    c = choice(tolerance=tolerance)
    for t, (member, result) in enumerate(steps):
        if result == -1:
            c.flow_failed(member, float(t))
        else:
            c.probed(member, result, float(t))
        live = [m for m in MEMBERS if not c.is_down(m)]
        if live:
            assert c.now in live
            known = [c.state[m].delay for m in live if c.state[m].delay is not None]
            own = c.state[c.now].delay
            if known and own is not None:
                assert own <= min(known) + tolerance
        else:
            assert c.now == "a"
        assert c.next_due(float(t)) >= 0.0
