"""The one rule for a test that cannot run here: skip locally, fail under CI.

Every skip in the suite goes through `need`, so "CI is green" means every test ran: a missing
tool, binary or privilege on a CI runner is a failure there, never a silently skipped test.
"""

from __future__ import annotations

import os
from typing import TypeVar

import pytest

T = TypeVar("T")


def need(value: T | None, what: str) -> T:
    """`value` when present (truthy); otherwise skip the test, or fail it when `CI` is set."""
    if value:
        return value
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI (CI is set), so this is a failure")
    pytest.skip(f"{what} not available")
