"""Regression tests for what the fuzz run (bench/fuzz/run.py) found: each input it reported as
a crash, refused the documented way and within its bound now. Bounds are generous (the
machine is shared); the fuzz run itself allows 100 ms of CPU per input."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest

from ztun.errors import ZtunError
from ztun.route.ruleset import parse_source


def _cpu(fn: Callable[..., object], *args: object) -> float:
    """CPU seconds of this thread for `fn(*args)`, a documented refusal included."""
    start = time.thread_time()
    with contextlib.suppress(ZtunError):
        fn(*args)
    return time.thread_time() - start


@pytest.mark.parametrize(
    "text",
    [
        # the fuzzer's input (ruleset_source), reduced: a comment, then a line that opens a
        # string of escaped quotes and never closes it
        '{"version": 2, # c\n "rules": [{"domain_keyword": ["say ' + '\\"hiay ' * 9000,
        # the same class: one unterminated string of escaped quotes before a slash
        '"' + '\\"' * 32000 + "/",
        # and before a trailing comma
        '{"a": "' + '\\"' * 32000 + ",]}",
    ],
    ids=["fuzzer-input", "slash-after", "trailing-comma-after"],
)
def test_source_json_with_unterminated_strings_is_refused_in_linear_time(text: str) -> None:
    # 64 KB here took 3.4 s (16 KB: 0.24 s) before the fix; 15 ms after.
    assert len(text) >= 60_000
    assert _cpu(parse_source, text) < 0.5
