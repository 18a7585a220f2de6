"""UserAuth (stack/auth.py): constant-time matching, throttling per source, the table's bound."""

from __future__ import annotations

from ztun.stack.auth import UserAuth, source_key

USERS = [("alice", "wonderland"), ("bob", "builder")]


def test_right_and_wrong_credentials() -> None:
    auth = UserAuth(USERS)
    assert auth.check("203.0.113.1", "alice", "wonderland", 0)
    assert auth.check("203.0.113.1", "bob", "builder", 0)
    assert not auth.check("203.0.113.1", "alice", "builder", 0)  # another user's password
    assert not auth.check("203.0.113.1", "carol", "wonderland", 0)
    assert not auth.check("203.0.113.1", "alice", "wonderland\0", 0)
    assert not auth.check("203.0.113.1", "", "", 0)
    assert not UserAuth([]).enabled and auth.enabled


def test_throttled_after_max_failures_then_released() -> None:
    auth = UserAuth(USERS, max_failures=3, window=10, block=30)
    for t in range(3):
        assert not auth.check("203.0.113.1", "alice", "guess", t)
    # blocked: even the right password fails, and is not checked
    assert auth.blocked_for("203.0.113.1", 3) == 29
    assert not auth.check("203.0.113.1", "alice", "wonderland", 3)
    assert auth.throttled == 1
    # another source is not affected
    assert auth.check("203.0.113.2", "alice", "wonderland", 3)
    # released after the block
    assert auth.blocked_for("203.0.113.1", 32) == 0
    assert auth.check("203.0.113.1", "alice", "wonderland", 32)
    assert len(auth) == 0  # a success forgets the source


def test_failures_outside_the_window_do_not_add_up() -> None:
    auth = UserAuth(USERS, max_failures=3, window=10, block=30)
    for t in (0, 11, 22, 33):
        assert not auth.check("203.0.113.1", "alice", "guess", t)
    assert auth.blocked_for("203.0.113.1", 34) == 0


def test_ipv6_counts_per_64() -> None:
    auth = UserAuth(USERS, max_failures=2)
    assert not auth.check("2001:db8::1", "a", "b", 0)
    assert not auth.check("2001:db8::ffff:2", "a", "b", 1)  # same /64: blocked now
    assert auth.blocked_for("2001:db8::3", 1) > 0
    assert auth.blocked_for("2001:db8:0:1::1", 1) == 0
    assert source_key("::ffff:203.0.113.7") == "203.0.113.7"


def test_table_is_bounded() -> None:
    auth = UserAuth(USERS, max_sources=100)
    for i in range(10_000):
        auth.check(f"2001:db8:{i:x}::1", "x", "y", i * 0.001)
        assert len(auth) <= 100
    assert auth.evicted == 10_000 - 100
