"""trim_heap hands freed pages back where glibc is there, and never fails where it is not."""

from __future__ import annotations

import ctypes

import pytest

from ztun.platform.linux import memory


def test_trim_heap_returns_a_bool() -> None:
    assert memory.trim_heap() in (True, False)


def test_without_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(name: object) -> object:
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert memory.trim_heap() is False
