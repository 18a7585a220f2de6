"""The whole check pipeline survives any config shape: diagnostics out, never an exception."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztun.check import check_file

KEYS = ["type", "tag", "rules", "rule_set", "outbound", "path", "format", "domain", "ip_cidr",
        "port", "port_range", "geoip", "final", "mode", "action", "invert", "url", "server",
        "server_port", "behavior", "outbounds", "route", "inbounds"]  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.sampled_from(
        ["direct", "local", "inline", "remote", "logical", "and", "source", "clash", "domains",
         "10.0.0.0/8", "1:2", "x.json", "a.example", "block", "reject", "sniff", "cn"]
    ),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)
CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        "outbounds": st.lists(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4),
                              max_size=3),
        "route": st.dictionaries(st.sampled_from(["rules", "rule_set", "final", "geoip"]), VALUES,
                                 max_size=4),
        "dns": st.dictionaries(st.sampled_from(["servers", "rules", "final", "strategy"]), VALUES,
                               max_size=4),
    },
)  # fmt: skip


#: ZTUN_FUZZ=3000 for a longer run
FUZZ_EXAMPLES = int(os.environ.get("ZTUN_FUZZ", "150"))


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(CONFIGS)
def test_check_never_raises(tmp_path: Path, data: dict) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    result = check_file(path)
    for d in result.diagnostics:
        assert d.message
    if result.errors:
        assert result.router is None
