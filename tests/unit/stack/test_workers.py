"""The worker processes' decisions (stack/workers.py): how many, the restart backoff, the
messages between the processes."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ztun.config.options import build_options
from ztun.stack.workers import (
    AUTO_CAP,
    MAX_MESSAGE,
    RestartBackoff,
    add_totals,
    decode,
    encode,
    plan_workers,
)

MIXED = {"type": "mixed", "tag": "mixed-in", "listen_port": 1080}
TUN = {"type": "tun", "tag": "tun-in", "address": ["198.18.0.1/30"], "auto_route": True,
       "auto_redirect": True}  # fmt: skip


def options(*inbounds: dict[str, Any], **top: Any) -> Any:
    return build_options({"inbounds": list(inbounds),
                          "outbounds": [{"type": "direct", "tag": "direct"}], **top})  # fmt: skip


def test_auto_is_the_cores_up_to_the_cap() -> None:
    assert plan_workers(options(MIXED), 2).count == 2
    assert plan_workers(options(MIXED), 1).count == 1
    assert plan_workers(options(MIXED), 64).count == AUTO_CAP
    plan = plan_workers(options(MIXED, TUN), 3)
    assert plan.count == 3 and plan.forks == 2 and plan.inbounds == ("mixed-in", "tun-in")
    assert not plan.notes


def test_an_explicit_count_is_taken_and_zero_or_one_is_in_process() -> None:
    assert plan_workers(options(MIXED, workers=8), 2).count == 8
    assert plan_workers(options(MIXED, workers=1), 8).count == 1
    assert plan_workers(options(MIXED, workers=0), 8).count == 1


def test_only_mixed_and_auto_redirect_are_spread() -> None:
    tun_only = dict(TUN, auto_redirect=False)
    assert plan_workers(options(tun_only), 4).count == 1  # auto: nothing to say
    plan = plan_workers(options(tun_only, workers=4), 4)
    assert plan.count == 1 and "nothing to spread" in plan.notes[0][1]
    # auto_redirect needs auto_route to do anything
    assert plan_workers(options(dict(TUN, auto_route=False)), 4).inbounds == ()


def test_not_on_other_platforms() -> None:
    assert plan_workers(options(MIXED), 4, platform_ok=False).count == 1
    plan = plan_workers(options(MIXED, workers=3), 4, platform_ok=False)
    assert plan.count == 1 and plan.notes[0][0] == "warning"


def test_names_from_dns_keep_everything_in_process_even_when_asked() -> None:
    fakeip = {"servers": [{"type": "fakeip", "tag": "fake", "inet4_range": "198.18.0.0/15"}]}
    for dns in (fakeip, {"reverse_mapping": True}):
        assert plan_workers(options(MIXED, dns=dns), 4).count == 1
        plan = plan_workers(options(MIXED, dns=dns, workers=4), 4)
        assert plan.count == 1 and plan.notes[0][0] == "warning"
        assert "FakeIP" in plan.notes[0][1]


def test_auto_is_one_with_the_api_or_users_and_a_count_says_what_it_costs() -> None:
    api = {"clash_api": {"external_controller": "127.0.0.1:9090"}}
    users = dict(MIXED, users=[{"username": "u", "password": "p"}])
    plan = plan_workers(options(MIXED, experimental=api), 4)
    assert plan.count == 1 and "Clash API" in plan.notes[0][1]
    plan = plan_workers(options(users), 4)
    assert plan.count == 1 and "failed logins" in plan.notes[0][1]
    plan = plan_workers(options(users, experimental=api, workers=3), 4)
    assert plan.count == 3
    assert [level for level, _ in plan.notes] == ["warning", "warning"]
    assert "3 times the attempts" in plan.notes[1][1]


def test_backoff_doubles_up_to_the_cap_and_starts_again_after_a_stable_run() -> None:
    b = RestartBackoff(first=0.1, cap=2.0, stable=30.0)
    delays = [b.delay(lived=1.0) for _ in range(7)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert b.delay(lived=31.0) == 0.1  # it had run long enough: killed once, back at once
    for _ in range(100):  # no overflow however often it dies
        assert b.delay(lived=0.0) <= 2.0


def test_messages_round_trip_and_are_bounded() -> None:
    msg = {"op": "totals", "up": 1, "down": 2, "by_outbound": {"direct": [1, 2]}}
    assert decode(encode(msg)) == msg
    try:
        encode({"op": "x" * MAX_MESSAGE})
    except ValueError:
        pass
    else:
        raise AssertionError("an oversized message was encoded")
    assert decode(b"") is None and decode(b"[1]") is None and decode(b"{") is None
    assert decode(b"{" * (MAX_MESSAGE + 1)) is None
    assert decode(b"[" * 50_000) is None  # too deep for json: no RecursionError escapes


@given(st.binary(max_size=2048))
def test_decode_survives_arbitrary_bytes(data: bytes) -> None:
    result = decode(data)
    assert result is None or isinstance(result, dict)


def test_totals_are_added_and_malformed_entries_skipped() -> None:
    totals: dict[str, list[int]] = {"direct": [10, 20]}
    taken = add_totals(totals, {"direct": [1, 2], "proxy": [3, 4], "bad": [1], "neg": [-1, 0],
                                "float": [1.5, 2], "bool": [True, 0], "str": "x"})  # fmt: skip
    assert taken == 2
    assert totals == {"direct": [11, 22], "proxy": [3, 4]}
    assert add_totals(totals, None) == 0 and add_totals(totals, [1, 2]) == 0


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                         max_size=3)))  # fmt: skip
def test_add_totals_survives_arbitrary_values(value: Any) -> None:
    totals: dict[str, list[int]] = {}
    add_totals(totals, value)
    assert all(len(v) == 2 and min(v) >= 0 for v in totals.values())
