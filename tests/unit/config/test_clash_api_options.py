"""`experimental.clash_api`: the options, and what `check` refuses (an API beyond loopback
without a secret could list and close every flow and switch the mode for anyone)."""

from __future__ import annotations

import textwrap

import pytest

from ztun.config.loader import load_config_text
from ztun.config.options import build_options
from ztun.config.validate import split_controller, validate
from ztun.errors import Diagnostic

BASE = """\
outbounds: [{type: direct, tag: direct}]
experimental:
  clash_api: %s
"""


def check(api: str) -> list[Diagnostic]:
    loaded = load_config_text(textwrap.dedent(BASE % api), env={})
    assert loaded.diagnostics == []
    return [d for d in validate(loaded) if d.severity == "error"]


@pytest.mark.parametrize("controller", ["127.0.0.1:9090", "[::1]:9090", "localhost:9090",
                                        "127.0.0.2:9090"])  # fmt: skip
def test_loopback_needs_no_secret(controller: str) -> None:
    assert check(f'{{external_controller: "{controller}"}}') == []


OPEN = ["0.0.0.0:9090", ":9090", "198.51.100.1:9090", "[::]:9090", "[2001:db8::1]:9090",
        "router.example:9090"]  # fmt: skip


@pytest.mark.parametrize("controller", OPEN)
def test_beyond_loopback_without_a_secret_is_refused(controller: str) -> None:
    (d,) = check(f'{{external_controller: "{controller}"}}')
    assert d.path == ("experimental", "clash_api", "external_controller")
    assert "no secret" in d.message and "experimental.clash_api.secret" in d.message


def test_beyond_loopback_with_a_secret_is_fine() -> None:
    assert check('{external_controller: "0.0.0.0:9090", secret: "long-random"}') == []


@pytest.mark.parametrize("controller", ["9090", "127.0.0.1", "::1:9090", "host:0", "h:99999"])
def test_not_host_port(controller: str) -> None:
    (d,) = check(f'{{external_controller: "{controller}"}}')
    assert "is not host:port" in d.message


def test_split_controller() -> None:
    assert split_controller("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert split_controller("[::1]:80") == ("::1", 80)
    assert split_controller(":9090") == ("", 9090)
    assert split_controller("::1:80") is None


def test_unknown_keys_and_options() -> None:
    assert check('{external_controller: "127.0.0.1:9090", external_ui_download_url: x}')
    text = BASE % '{external_controller: "127.0.0.1:1", default_mode: Global, secret: s}'
    loaded = load_config_text(textwrap.dedent(text), env={})
    api = build_options(loaded.data).experimental.clash_api
    assert (api.external_controller, api.default_mode, api.secret) == ("127.0.0.1:1", "Global", "s")
    assert build_options({}).experimental.clash_api.external_controller == ""
