"""`ztun run` skips the JSON schema for a config that passed it unchanged before
(ztun.provider.validated): the schema runs again when the config, an included value or the
schema changes, and a config with a schema finding never gets a marker."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ztun.check import check_file
from ztun.provider import validated

#: the module (`ztun.config.validate` the attribute is the function the package re-exports)
validate_module = importlib.import_module("ztun.config.validate")
check_module = importlib.import_module("ztun.check")

GOOD = """\
inbounds: [{type: mixed, tag: m, listen: 127.0.0.1, listen_port: 1081}]
outbounds: [{type: direct, tag: direct}]
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # in this process, where the counting below can see it (the child is tested apart)
    monkeypatch.setattr(check_module, "_schema_checked_in_child", lambda *_: False)
    return tmp_path / "cache" / "ztun" / "validated"


def schema_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = validate_module._schema_findings

    def counted(data: object) -> object:
        calls.append(1)
        return original(data)

    monkeypatch.setattr(validate_module, "_schema_findings", counted)
    return calls


def test_a_config_that_passed_is_not_checked_against_the_schema_again(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = schema_runs(monkeypatch)
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    first = check_file(path, trust_validated=True)
    assert not first.errors and len(calls) == 1 and len(list(cache.iterdir())) == 1
    second = check_file(path, trust_validated=True)
    assert not second.errors and second.router is not None and len(calls) == 1
    # `ztun check` always runs the schema
    check_file(path)
    assert len(calls) == 2
    # a change anywhere in the merged config: checked again
    path.write_text(GOOD.replace("listen_port: 1081", "listen_port: 1080"))
    check_file(path, trust_validated=True)
    assert len(calls) == 3


def test_a_schema_finding_leaves_no_marker(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = schema_runs(monkeypatch)
    path = tmp_path / "c.yaml"
    path.write_text(GOOD.replace("listen_port: 1081", "listen_port: 1081, sniff_bogus: 1"))
    for _ in range(2):
        assert check_file(path, trust_validated=True).errors
    assert len(calls) == 2 and not cache.exists()


def test_the_markers_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validated, "MAX_MARKERS", 3)
    for i in range(6):
        validated.remember(tmp_path, f"{i:032x}")
    assert len(list((tmp_path / "validated").iterdir())) == 3
    assert validated.config_key({"a": {1, 2}}) is None  # not JSON: never trusted


def test_a_first_start_checks_the_schema_in_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child leaves the marker for a clean config (so jsonschema never enters `ztun
    run`'s process: tests/unit/test_run_memory.py) and none for one with findings."""
    import threading

    monkeypatch.setattr(threading, "active_count", lambda: 1)  # pytest may run threads
    loaded_ok = tmp_path / "ok.yaml"
    loaded_ok.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("listen_port: 1081", "listen_port: 1081, sniff_bogus: 1"))
    from ztun.config.loader import load_config

    for path, clean in ((loaded_ok, True), (bad, False)):
        loaded = load_config(path, env={})
        key = validated.config_key(loaded.data)
        assert key is not None
        assert check_module._schema_checked_in_child(loaded, tmp_path / "c", key) is clean
        assert validated.passed_before(tmp_path / "c", key) is clean
