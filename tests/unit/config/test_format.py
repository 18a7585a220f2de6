"""ztun.config.format: normalised YAML that loads back to the same data."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztun.config.format import format_config, normalise
from ztun.config.loader import PROFILE_DIR, LoadedConfig, load_config, load_config_text
from ztun.resources import EXAMPLE_DIR


def reload(text: str, base_dir: Path | str = ".") -> dict[str, Any]:
    return load_config_text(text, base_dir=base_dir, env={}).data


def test_schema_line_points_at_the_schema_from_the_config_directory() -> None:
    loaded = load_config(EXAMPLE_DIR / "local-proxy.yaml", env={})
    text = format_config(loaded)
    assert text.splitlines()[0] == "# yaml-language-server: $schema=../schema/ztun.schema.json"
    assert format_config(loaded, schema_ref="x.json").startswith(
        "# yaml-language-server: $schema=x.json\n"
    )


def test_keys_follow_the_schema_order_and_listables_become_lists() -> None:
    loaded = load_config_text(
        textwrap.dedent("""\
        route:
          final: proxy
          rules:
            - outbound: proxy
              port: 443
              domain_suffix: example.com
        outbounds:
          - server_port: 1080
            server: 198.51.100.1
            tag: proxy
            type: socks
        custom: 1
        description: ordering
        """),
        env={},
    )
    text = format_config(loaded, schema_ref="s.json")
    assert text == textwrap.dedent("""\
        # yaml-language-server: $schema=s.json
        description: ordering
        outbounds:
          - type: socks
            tag: proxy
            server: 198.51.100.1
            server_port: 1080
        route:
          rules:
            - domain_suffix: [example.com]
              port: [443]
              outbound: proxy
          final: proxy
        custom: 1
        """)


def test_type_specific_keys_are_ordered_by_their_type() -> None:
    data = {"inbounds": [{"listen_port": 2080, "tag": "m", "type": "mixed", "listen": "127.0.0.1"}],
            "route": {"rules": [{"rules": [{"port": 1}], "mode": "or", "type": "logical",
                                 "outbound": "d"}]}}  # fmt: skip
    out = normalise(data)
    assert list(out["inbounds"][0]) == ["type", "tag", "listen", "listen_port"]
    rule = out["route"]["rules"][0]
    assert list(rule) == ["type", "mode", "rules", "outbound"]
    assert rule["rules"] == [{"port": [1]}]


def test_listables_inside_maps_and_rule_sets() -> None:
    hosts = {"type": "hosts", "tag": "h", "path": "/etc/hosts",
             "predefined": {"a.example": "198.51.100.1"}}  # fmt: skip
    inline = {"type": "inline", "tag": "x", "rules": [{"domain": "a.example", "query_type": "A"}]}
    data = {"dns": {"servers": [hosts]}, "route": {"rule_set": [inline]}}
    out = normalise(data)
    server = out["dns"]["servers"][0]
    assert server["path"] == ["/etc/hosts"]
    assert server["predefined"] == {"a.example": ["198.51.100.1"]}
    assert out["route"]["rule_set"][0]["rules"] == [{"domain": ["a.example"], "query_type": ["A"]}]


def test_dollar_braces_are_escaped_and_look_alike_strings_are_quoted() -> None:
    custom = ["0o17", "1e3", "true", "", "null", "10:20", "yes", "0x1F", "5", "$${X}"]
    data = {"log": {"output": "${HOME}/x.log"}, "custom": custom}
    text = format_config(LoadedConfig(data=data), schema_ref="s.json")
    assert "$${HOME}/x.log" in text
    assert reload(text) == data


def test_empty_config() -> None:
    assert format_config(LoadedConfig(data={}), schema_ref="s") == (
        "# yaml-language-server: $schema=s\n"
    )


def test_shipped_configs_round_trip(tmp_path: Path) -> None:
    files = sorted([*PROFILE_DIR.glob("*.yaml"), *EXAMPLE_DIR.glob("*.yaml")])
    assert files
    for path in files:
        loaded = load_config(path, env={})
        text = format_config(loaded)
        # the output is meant to live next to the top file: relative paths stay valid
        again = load_config_text(text, base_dir=loaded.base_dir, env={})
        assert again.diagnostics == []
        assert again.data == normalise(loaded.data), path
        assert format_config(again) == text, path


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["${A}", "$${", "0o7", "1e5", "~", "on", "<<", "- x", "a: b", "#", "'", '"']),
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
            | st.sampled_from(["type", "tag", "rules", "domain", "<<", "on", "${A}"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=25,
)
TOP_KEYS = st.sampled_from(["description", "log", "inbounds", "outbounds", "dns", "route", "x"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(TOP_KEYS | st.text(max_size=5), JSON, max_size=5))
def test_format_then_load_gives_the_normalised_data(data: dict[str, Any]) -> None:
    text = format_config(LoadedConfig(data=data), schema_ref="s.json")
    expected = normalise(data)
    assert reload(text) == expected
    assert normalise(expected) == expected
