"""The shared log rate limiter: a flood of one kind of line costs one line per interval."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ztun import log as ztun_log
from ztun.box import setup_logging
from ztun.config.options import LogOptions
from ztun.log import RateLimiter, limited


def test_one_line_per_interval_per_key() -> None:
    now = [0.0]
    r = RateLimiter(interval=1.0, max_keys=3, clock=lambda: now[0])
    assert r.allow("a") == 0
    assert [r.allow("a") for _ in range(1000)] == [None] * 1000
    assert r.allow("b") == 0  # another key is not held back
    now[0] = 1.5
    assert r.allow("a") == 1000  # and says how many were held back
    assert r.suppressed == 1000
    for k in "cdefg":
        r.allow(k)
    assert len(r._keys) == 3  # bounded


def test_limited_writes_the_held_back_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    monkeypatch.setattr(ztun_log, "LIMITER", RateLimiter(clock=lambda: now[0]))
    logger = logging.getLogger("ztun.test")
    with caplog.at_level(logging.WARNING, logger="ztun.test"):
        written = sum(limited(logger, logging.WARNING, "k", "evicted %d", i) for i in range(10000))
        now[0] = 2.0
        limited(logger, logging.WARNING, "k", "evicted %d", 1)
    assert written == 1
    assert [r.getMessage() for r in caplog.records] == [
        "evicted 0", "evicted 1 (9999 similar line(s) held back)"]  # fmt: skip


def test_log_output_follows_logrotate(tmp_path: Path) -> None:
    """log.output is reopened after logrotate moves it away (no copytruncate, no signal)."""
    path = tmp_path / "ztun.log"
    root = logging.getLogger("ztun")
    saved = (root.handlers[:], root.propagate, root.level)
    setup_logging(LogOptions(output=str(path), timestamp=False))
    try:
        logger = logging.getLogger("ztun.test")
        logger.warning("before")
        path.rename(tmp_path / "ztun.log.1")
        logger.warning("after")
        assert (tmp_path / "ztun.log.1").read_text() == "WARNING before\n"
        assert path.read_text() == "WARNING after\n"
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], root.propagate, root.level = saved
