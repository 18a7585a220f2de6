"""Group outbounds (selector, urltest) in the config: defaults, members, cycles, with lines."""

from __future__ import annotations

import textwrap

from ztun.config.loader import load_config_text
from ztun.config.options import (
    SelectorOutboundOptions,
    URLTestOutboundOptions,
    build_options,
)
from ztun.config.validate import validate
from ztun.errors import Diagnostic

HEAD = """\
outbounds:
  - {type: direct, tag: direct}
  - {type: socks, tag: a, server: 198.51.100.1, server_port: 1080}
  - {type: socks, tag: b, server: 198.51.100.2, server_port: 1080}
"""


def config(text: str) -> str:
    return HEAD + textwrap.indent(textwrap.dedent(text), "  ")


def check(text: str) -> list[Diagnostic]:
    loaded = load_config_text(config(text), env={})
    assert loaded.diagnostics == []
    return validate(loaded)


def errors(text: str) -> list[str]:
    return [f"{d.mark.line}:{d.mark.column} {d.message}" for d in check(text)
            if d.severity == "error" and d.mark is not None]  # fmt: skip


def test_sing_box_defaults() -> None:
    loaded = load_config_text(config("""\
      - {type: urltest, tag: auto, outbounds: [a, b]}
      - {type: selector, tag: pick, outbounds: [auto, direct]}
    """), env={})  # fmt: skip
    assert validate(loaded) == []
    options = build_options(loaded.data)
    auto, pick = options.outbounds[3], options.outbounds[4]
    assert isinstance(auto, URLTestOutboundOptions)
    assert auto.outbounds == ("a", "b")
    assert auto.url == "https://www.gstatic.com/generate_204"
    assert (auto.interval, auto.tolerance, auto.idle_timeout) == (180.0, 50, 1800.0)
    assert auto.interrupt_exist_connections is False
    assert isinstance(pick, SelectorOutboundOptions)
    assert pick.default is None and pick.outbounds == ("auto", "direct")


def test_unknown_member_at_its_line() -> None:
    assert errors("""\
      - {type: selector, tag: s, outbounds: [a, c]}
    """) == ["5:45 outbounds[3].outbounds[1]: no outbound tagged 'c' (outbounds: direct, a, b, s)"]


def test_empty_group() -> None:
    found = errors("""\
      - type: urltest
        tag: u
        outbounds: []
    """)
    assert found == ["7:5 outbounds[3].outbounds: a group needs 'outbounds': a list of at least "
                     "one outbound tag"]  # fmt: skip


def test_missing_members() -> None:
    found = errors("""\
      - {type: selector, tag: s}
    """)
    assert len(found) == 1 and "outbounds" in found[0] and found[0].startswith("5:")


def test_default_must_be_a_member() -> None:
    assert errors("""\
      - {type: selector, tag: s, outbounds: [a], default: b}
    """) == ["5:46 outbounds[3].default: 'b' is not a member of group 's' (members: a)"]


def test_cycle_through_two_groups_reported_once() -> None:
    found = errors("""\
      - {type: selector, tag: s, outbounds: [a, u]}
      - {type: urltest, tag: u, outbounds: [b, s]}
    """)
    assert found == ["6:44 outbounds[4].outbounds[1]: group cycle s → u → s: a group cannot "
                     "contain itself, directly or through other groups"]  # fmt: skip


def test_group_containing_itself() -> None:
    found = errors("""\
      - {type: selector, tag: s, outbounds: [s]}
    """)
    assert len(found) == 1 and "group cycle s → s" in found[0]


def test_nested_groups_without_cycle_are_fine() -> None:
    assert check("""\
      - {type: urltest, tag: u1, outbounds: [a, b]}
      - {type: urltest, tag: u2, outbounds: [b, a]}
      - {type: selector, tag: s, outbounds: [u1, u2, u1x]}
      - {type: selector, tag: u1x, outbounds: [u1, u2]}
    """) == []


def test_a_member_twice_is_a_warning() -> None:
    found = check("""\
      - {type: selector, tag: s, outbounds: [a, a]}
    """)
    assert [(d.severity, d.message) for d in found] == [
        ("warning", "outbounds[3].outbounds[1]: 'a' is already a member of group 's'")
    ]


def test_urltest_fields() -> None:
    found = errors("""\
      - {type: urltest, tag: u, outbounds: [a], url: "ftp://x", tolerance: -1, interval: soon}
    """)
    assert len(found) == 3, found
    assert any("is not an http:// or https:// URL" in f for f in found)
