"""ztun.config.loader: YAML with marks, include merging, ${VAR} substitution, profiles."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztun.config.loader import (
    PROFILE_DIR,
    LoadedConfig,
    list_profiles,
    load_config,
    load_config_text,
    resolve_plain_scalar,
)
from ztun.errors import ConfigError, Mark

FIXTURES = Path(__file__).parent / "fixtures"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_text(text: str, tmp_path: Path | None = None, **env: str) -> LoadedConfig:
    return load_config_text(textwrap.dedent(text), base_dir=tmp_path or ".", env=env)


def only_error(exc: pytest.ExceptionInfo[ConfigError]) -> tuple[str, Mark | None]:
    assert len(exc.value.diagnostics) == 1
    d = exc.value.diagnostics[0]
    return d.message, d.mark


# --- positions ------------------------------------------------------------------------------------


def test_marks_point_at_keys_and_items_through_two_levels_of_includes() -> None:
    loaded = load_config(FIXTURES / "top.yaml", env={})
    top = str(FIXTURES / "top.yaml")
    level1 = str(FIXTURES / "level1.yaml")
    level2 = str(FIXTURES / "sub" / "level2.yaml")
    assert loaded.files == [top, level1, level2]
    assert loaded.diagnostics == []
    assert loaded.base_dir == FIXTURES
    # included entries first (level2, then level1), the top file's own last
    assert [o["tag"] for o in loaded.data["outbounds"]] == ["block", "direct", "proxy"]
    marks = loaded.marks
    assert marks[("description",)] == Mark(top, 1, 1)
    assert marks[("outbounds", 0)] == Mark(level2, 3, 5)
    assert marks[("outbounds", 0, "tag")] == Mark(level2, 4, 5)
    assert marks[("outbounds", 1, "type")] == Mark(level1, 4, 5)
    assert marks[("outbounds", 2, "server_port")] == Mark(top, 8, 5)
    # the including file's rules first, then the nearer include's, then the deeper one's
    rules = loaded.data["route"]["rules"]
    assert [r["outbound"] for r in rules] == ["proxy", "direct", "block"]
    assert marks[("route", "rules", 0, "domain_suffix", 0)] == Mark(top, 11, 23)
    assert marks[("route", "rules", 1, "port")] == Mark(level1, 8, 7)
    assert marks[("route", "rules", 2, "ip_cidr")] == Mark(level2, 9, 7)
    assert marks[("route", "rules", 2, "ip_cidr", 1)] == Mark(level2, 11, 11)
    assert marks[("route", "final")] == Mark(level2, 13, 3)
    # a key present in several files is marked where the winning value was written
    assert marks[("route",)] == Mark(top, 9, 1)


def test_mark_for_falls_back_to_the_nearest_ancestor() -> None:
    loaded = load_config(FIXTURES / "top.yaml", env={})
    rule = loaded.marks[("route", "rules", 0)]
    assert loaded.mark_for(("route", "rules", 0, "no_such_key", 3)) == rule
    assert loaded.mark_for(()) == loaded.marks[()]
    assert loaded.mark_for(["outbounds", 2]) == loaded.marks[("outbounds", 2)]


def test_included_description_and_include_are_not_merged() -> None:
    loaded = load_config(FIXTURES / "top.yaml", env={})
    assert loaded.data["description"] == "top of a two-level include chain"
    assert "include" not in loaded.data


def test_relative_paths_of_included_files_are_rebased_on_the_top_directory() -> None:
    loaded = load_config(FIXTURES / "top.yaml", env={})
    assert loaded.data["route"]["geoip"]["path"] == "sub/geo.mmdb"
    assert loaded.resolve_path("sub/geo.mmdb") == FIXTURES / "sub" / "geo.mmdb"


def test_flow_style_positions(tmp_path: Path) -> None:
    loaded = load_text(
        """\
        outbounds: [{type: direct, tag: direct}, {type: block, tag: b}]
        """,
        tmp_path,
    )
    assert loaded.marks[("outbounds", 1)] == Mark("<string>", 1, 42)
    assert loaded.marks[("outbounds", 1, "tag")] == Mark("<string>", 1, 56)


# --- merge rules ----------------------------------------------------------------------------------


def test_maps_merge_recursively_and_scalars_are_replaced(tmp_path: Path) -> None:
    write(
        tmp_path,
        "base.yaml",
        """\
        log: {level: warn, timestamp: true}
        route: {auto_detect_interface: true, final: a}
        """,
    )
    loaded = load_text(
        """\
        include: [base.yaml]
        log: {level: debug}
        route: {final: b}
        """,
        tmp_path,
    )
    assert loaded.data["log"] == {"level": "debug", "timestamp": True}
    assert loaded.data["route"] == {"auto_detect_interface": True, "final": "b"}


def test_later_includes_override_earlier_ones(tmp_path: Path) -> None:
    write(tmp_path, "one.yaml", "log: {level: warn, output: one.log}\n")
    write(tmp_path, "two.yaml", "log: {level: error}\n")
    loaded = load_text("include: [one.yaml, two.yaml]\n", tmp_path)
    assert loaded.data["log"] == {"level": "error", "output": "one.log"}


@pytest.mark.parametrize(
    "section",
    [("inbounds",), ("outbounds",), ("route", "rule_set"), ("dns", "servers")],
)
def test_tagged_lists_merge_by_tag(tmp_path: Path, section: tuple[str, ...]) -> None:
    def nest(items: list[dict[str, object]]) -> dict[str, object]:
        return {section[0]: items} if len(section) == 1 else {section[0]: {section[1]: items}}

    import yaml

    included = [{"tag": "a", "x": 1, "keep": True}, {"tag": "b", "x": 2}, {"tag": "c", "x": 3}]
    own = [{"tag": "d", "x": 4}, {"tag": "b", "x": 20}]
    write(tmp_path, "inc.yaml", yaml.safe_dump(nest(included)))
    loaded = load_text("include: [inc.yaml]\n" + yaml.safe_dump(nest(own)), tmp_path)
    merged = loaded.data[section[0]] if len(section) == 1 else loaded.data[section[0]][section[1]]
    # b is replaced whole (no "keep" merging) in its place; d is appended
    assert merged == [{"tag": "a", "x": 1, "keep": True}, {"tag": "b", "x": 20},
                      {"tag": "c", "x": 3}, {"tag": "d", "x": 4}]  # fmt: skip
    path = (*section, 1)
    assert loaded.marks[path].file == "<string>"
    assert loaded.marks[(*section, 0)].file.endswith("inc.yaml")


@pytest.mark.parametrize("section", ["route", "dns"])
def test_rule_lists_put_the_including_files_rules_first(tmp_path: Path, section: str) -> None:
    write(tmp_path, "one.yaml", f"{section}: {{rules: [{{domain: one}}]}}\n")
    write(tmp_path, "two.yaml", f"{section}: {{rules: [{{domain: two}}, {{domain: two-b}}]}}\n")
    loaded = load_text(f"include: [one.yaml, two.yaml]\n{section}: {{rules: [{{domain: own}}]}}\n",
                       tmp_path)  # fmt: skip
    rules = loaded.data[section]["rules"]
    assert [r["domain"] for r in rules] == ["own", "two", "two-b", "one"]
    assert loaded.marks[(section, "rules", 3)].file.endswith("one.yaml")
    assert loaded.marks[(section, "rules", 1)].file.endswith("two.yaml")


def test_other_lists_are_replaced_whole(tmp_path: Path) -> None:
    write(
        tmp_path,
        "inc.yaml",
        """\
        inbounds:
          - {type: tun, tag: t, address: [172.19.0.1/30, fdfe::1/126]}
        custom: [1, 2, 3]
        """,
    )
    loaded = load_text(
        """\
        include: [inc.yaml]
        custom: [9]
        """,
        tmp_path,
    )
    assert loaded.data["custom"] == [9]
    assert loaded.data["inbounds"][0]["address"] == ["172.19.0.1/30", "fdfe::1/126"]


def test_a_null_value_removes_an_included_one(tmp_path: Path) -> None:
    write(tmp_path, "inc.yaml", "log: {level: warn, output: x.log}\n")
    loaded = load_text("include: [inc.yaml]\nlog: {output: null}\n", tmp_path)
    assert loaded.data["log"] == {"level": "warn"}
    assert ("log", "output") not in loaded.marks


def test_empty_values_count_as_absent(tmp_path: Path) -> None:
    loaded = load_text("log:\ninbounds:\nroute: {final: ~}\n", tmp_path)
    assert loaded.data == {"route": {}}


def test_includes_nest_and_diamonds_are_not_cycles(tmp_path: Path) -> None:
    write(tmp_path, "common.yaml", "outbounds: [{type: direct, tag: direct}]\n")
    write(tmp_path, "left.yaml", "include: [common.yaml]\nlog: {level: warn}\n")
    write(tmp_path, "right.yaml", "include: [common.yaml]\nlog: {timestamp: true}\n")
    loaded = load_text("include: [left.yaml, right.yaml]\n", tmp_path)
    assert loaded.data == {"outbounds": [{"type": "direct", "tag": "direct"}],
                           "log": {"level": "warn", "timestamp": True}}  # fmt: skip


def test_include_may_be_a_single_string(tmp_path: Path) -> None:
    write(tmp_path, "inc.yaml", "log: {level: warn}\n")
    assert load_text("include: inc.yaml\n", tmp_path).data == {"log": {"level": "warn"}}


def test_include_names_a_shipped_profile() -> None:
    loaded = load_config_text("include: [bypass-private]\n", env={})
    assert loaded.files[1] == str(PROFILE_DIR / "bypass-private.yaml")
    assert loaded.data["outbounds"] == [{"type": "direct", "tag": "direct"}]
    assert "description" not in loaded.data


def test_a_shipped_profile_path_is_rebased_to_the_config_dir(tmp_path: Path) -> None:
    # Relative or absolute depends on where the checkout and tmp_path are; the file is the same.
    loaded = load_config_text("include: [geoip-split]\n", base_dir=tmp_path, env={})
    path = loaded.data["route"]["geoip"]["path"]
    expected = (PROFILE_DIR.parent / "data" / "geoip-sample.mmdb").resolve()
    assert loaded.resolve_path(path).resolve() == expected


def test_unknown_profile_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config_text("include:\n  - no-such-profile\n", env={})
    message, mark = only_error(exc)
    assert "no shipped profile" in message and "bypass-private" in message
    assert mark == Mark("<string>", 2, 5)


def test_missing_include_points_at_the_include_item(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text("include:\n  - ./missing.yaml\n", tmp_path)
    message, mark = only_error(exc)
    assert "no such file" in message and "missing.yaml" in message
    assert mark == Mark("<string>", 2, 5)


def test_include_cycle_names_the_chain() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(FIXTURES / "cycle_a.yaml", env={})
    message, mark = only_error(exc)
    assert message.startswith("include cycle: ")
    assert message.count("cycle_a.yaml") == 2 and "cycle_b.yaml" in message
    assert mark is not None and mark.file.endswith("cycle_b.yaml") and mark.line == 1


def test_a_file_including_itself_is_a_cycle(tmp_path: Path) -> None:
    path = write(tmp_path, "self.yaml", "include: [self.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(path, env={})


def test_include_must_name_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text("include: [{a: 1}]\n", tmp_path)
    assert "include must be a list" in only_error(exc)[0]


def test_errors_inside_an_include_point_into_that_file(tmp_path: Path) -> None:
    write(tmp_path, "bad.yaml", "log: {level: [\n")
    with pytest.raises(ConfigError) as exc:
        load_text("include: [bad.yaml]\n", tmp_path)
    _, mark = only_error(exc)
    assert mark is not None and mark.file.endswith("bad.yaml")


# --- errors ---------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_a_position() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(FIXTURES / "syntax_error.yaml", env={})
    message, mark = only_error(exc)
    assert message.startswith("YAML syntax error")
    assert mark == Mark(str(FIXTURES / "syntax_error.yaml"), 4, 6)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    message, mark = only_error(exc)
    assert "cannot read" in message and "nope.yaml" in message
    assert mark == Mark(str(tmp_path / "nope.yaml"), 1, 1)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"log:\n  output: caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message, mark = only_error(exc)
    assert "UTF-8" in message and mark is not None and mark.line == 2


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "5\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config_text(text, env={})


def test_empty_file_is_an_empty_config() -> None:
    assert load_config_text("", env={}).data == {}
    assert load_config_text("# only a comment\n", env={}).data == {}


def test_several_documents_are_an_error() -> None:
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config_text("log: {}\n---\nlog: {}\n", env={})


def test_alias_bomb_is_stopped() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    with pytest.raises(ConfigError, match="too many values"):
        load_config_text("\n".join(lines) + "\n", env={})


def test_recursive_alias_is_an_error() -> None:
    with pytest.raises(ConfigError, match="alias"):
        load_config_text("a: &x [1, *x]\n", env={})


def test_deep_nesting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config_text("a: " + "[" * 5000 + "]" * 5000 + "\n", env={})


# --- keys and scalars -----------------------------------------------------------------------------


def test_duplicate_keys_are_reported_at_the_second(tmp_path: Path) -> None:
    loaded = load_text(
        """\
        log:
          level: warn
          level: debug
        """,
        tmp_path,
    )
    assert loaded.data == {"log": {"level": "debug"}}
    [d] = loaded.diagnostics
    assert d.mark == Mark("<string>", 3, 3)
    assert "duplicate key 'level'" in d.message and "line 2" in d.message


def test_yaml_1_2_scalars() -> None:
    loaded = load_config_text(
        textwrap.dedent("""\
        a: yes
        b: off
        c: 10:20
        d: 0x1F
        e: 0o17
        f: 1.5
        g: 1e3
        h: ~
        i: True
        j: "5"
        k: '0x10'
        l: 007
        on: key
        80: port
        m: 2001:db8::1
        n: .inf
        """),
        env={},
    )
    assert loaded.data == {
        "a": "yes", "b": "off", "c": "10:20", "d": 31, "e": 15, "f": 1.5, "g": 1000.0,
        "i": True, "j": "5", "k": "0x10", "l": 7, "on": "key", "80": "port",
        "m": "2001:db8::1", "n": ".inf",
    }  # fmt: skip


def test_explicit_tags() -> None:
    loaded = load_config_text("a: !!str 5\nb: !!int '7'\nc: !!float 2\nd: !!int x\n", env={})
    assert loaded.data == {"a": "5", "b": 7, "c": 2.0, "d": "x"}
    assert len(loaded.diagnostics) == 1 and "cannot be read as int" in str(loaded.diagnostics[0])


def test_merge_keys() -> None:
    loaded = load_config_text(
        textwrap.dedent("""\
        base: &base {type: socks, server: 198.51.100.1, server_port: 1080}
        outbounds:
          - <<: *base
            tag: one
          - <<: *base
            tag: two
            server_port: 1081
        """),
        env={},
    )
    assert loaded.data["outbounds"][1] == {"type": "socks", "server": "198.51.100.1",
                                           "server_port": 1081, "tag": "two"}  # fmt: skip


def test_resolve_plain_scalar_never_raises_on_long_numbers() -> None:
    assert resolve_plain_scalar("9" * 5000) == "9" * 5000
    assert resolve_plain_scalar("1e999") == "1e999"


# --- ${VAR} ---------------------------------------------------------------------------------------


def test_env_whole_value_is_typed_when_unquoted() -> None:
    env = {"PORT": "2080", "FLAG": "true", "RATIO": "0.5", "NAME": "proxy", "EMPTY": ""}
    loaded = load_config_text(
        textwrap.dedent("""\
        port: ${PORT}
        quoted: "${PORT}"
        flag: ${FLAG}
        ratio: ${RATIO}
        name: ${NAME}
        default: ${UNSET:-1080}
        empty: ${UNSET:-}
        also_empty: ${EMPTY}
        """),
        env=env,
    )
    assert loaded.data == {"port": 2080, "quoted": "2080", "flag": True, "ratio": 0.5,
                           "name": "proxy", "default": 1080}  # fmt: skip
    assert loaded.diagnostics == []


def test_env_inside_a_string_stays_a_string() -> None:
    loaded = load_config_text("a: ${HOST}:${PORT:-1080}\nb: x${N}y\n", env={"HOST": "h", "N": "1"})
    assert loaded.data == {"a": "h:1080", "b": "x1y"}


def test_env_default_is_used_for_an_empty_variable() -> None:
    loaded = load_config_text("a: ${V:-fallback}\n", env={"V": ""})
    assert loaded.data == {"a": "fallback"}


def test_env_escape_and_lone_dollars() -> None:
    loaded = load_config_text("a: $${HOME}\nb: cost $5\nc: 'a$$${V}'\nd: $\n", env={"V": "v"})
    assert loaded.data == {"a": "${HOME}", "b": "cost $5", "c": "a$${V}", "d": "$"}
    assert loaded.diagnostics == []


def test_env_unset_without_default_is_an_error_at_the_scalar() -> None:
    loaded = load_config_text("outbounds:\n  - server: x-${ZTUN_TEST_UNSET}\n", env={})
    [d] = loaded.diagnostics
    assert d.severity == "error" and "ZTUN_TEST_UNSET is not set" in d.message
    assert d.mark == Mark("<string>", 2, 13)
    assert loaded.data["outbounds"][0]["server"] == "x-${ZTUN_TEST_UNSET}"


@pytest.mark.parametrize("text", ["a: ${1BAD}\n", "a: ${A B}\n", "a: ${OPEN\n", "a: '${}'\n"])
def test_env_malformed_references_are_errors(text: str) -> None:
    loaded = load_config_text(text, env={})
    assert len(loaded.diagnostics) == 1
    assert loaded.diagnostics[0].mark == Mark("<string>", 1, 4)


def test_env_is_not_applied_to_keys() -> None:
    loaded = load_config_text("${K}: ${ZTUN_TEST_VALUE}\n", env={"ZTUN_TEST_VALUE": "from-env"})
    assert loaded.data == {"${K}": "from-env"}


def test_the_process_environment_comes_from_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pure loader reads no environment of its own; `ztun check`/`run` pass the process's.
    from ztun.check import check_file

    monkeypatch.setenv("ZTUN_TEST_LEVEL", "warn")
    write(tmp_path, "c.yaml", "log:\n  level: ${ZTUN_TEST_LEVEL}\n")
    assert load_config(tmp_path / "c.yaml").diagnostics  # unset here: reported
    result = check_file(tmp_path / "c.yaml")
    assert result.loaded is not None and result.loaded.data["log"] == {"level": "warn"}


def test_env_in_include_names(tmp_path: Path) -> None:
    write(tmp_path, "chosen.yaml", "log: {level: warn}\n")
    # in a flow list ([...]) a ${...} value must be quoted: YAML reads { and } as flow syntax
    loaded = load_config_text("include:\n  - ${WHICH}.yaml\n  - '${WHICH}.yaml'\n",
                              base_dir=tmp_path, env={"WHICH": "chosen"})  # fmt: skip
    assert loaded.data == {"log": {"level": "warn"}}


# --- profiles -------------------------------------------------------------------------------------


def test_list_profiles() -> None:
    found = {name: (desc, path) for name, desc, path in list_profiles()}
    for name in ["bypass-private", "global-proxy", "geoip-split", "block-ads", "split-dns"]:
        desc, path = found[name]
        assert desc and "\n" not in desc
        assert path == PROFILE_DIR / f"{name}.yaml"


# --- never anything but ConfigError ---------------------------------------------------------------

YAMLISH = st.lists(
    st.sampled_from([*"abc:-[]{},&*!|>'\"#%@`$?~ \n\t.0123456789<", "${", "\x00", "- "]),
    max_size=80,
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), YAMLISH))
def test_loader_raises_only_config_error(text: str) -> None:
    try:
        loaded = load_config_text(text, base_dir=FIXTURES / "sub", env={"a": "1"})
    except ConfigError as exc:
        assert exc.diagnostics and all(d.mark is not None for d in exc.diagnostics)
        return
    assert isinstance(loaded.data, dict)
    for path in loaded.marks:
        assert isinstance(path, tuple)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_loader_raises_only_config_error_for_bytes(data: bytes) -> None:
    import contextlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(data)
        with contextlib.suppress(ConfigError):
            load_config(path, env={})


# --- ${VAR} in files that are not the user's own ---------------------------------------------


def test_shipped_profile_reads_only_ztun_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ztun.config.loader as loader_module

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "leaky.yaml").write_text(
        "outbounds:\n"
        "  - {type: socks, tag: p, server: '${SECRET_TOKEN}.example', server_port: 1080}\n"
        "  - {type: direct, tag: d, bind_interface: '${ZTUN_IFACE:-eth0}'}\n"
    )
    monkeypatch.setattr(loader_module, "PROFILE_DIR", profiles)
    env = {"SECRET_TOKEN": "hunter2", "ZTUN_IFACE": "wlan0", "HOME": "/root"}
    own = tmp_path / "own.yaml"
    own.write_text("include: [leaky, ./mine.yaml]\n")
    (tmp_path / "mine.yaml").write_text("log: {output: '${HOME}/ztun.log'}\n")
    loaded = load_config(own, env=env)
    outbounds = {o["tag"]: o for o in loaded.data["outbounds"]}
    assert outbounds["p"]["server"] == "${SECRET_TOKEN}.example"  # not read
    assert "hunter2" not in repr(loaded.data)
    assert outbounds["d"]["bind_interface"] == "wlan0"  # ZTUN_* is read
    assert loaded.data["log"]["output"] == "/root/ztun.log"  # the user's own file reads any
    (d,) = loaded.diagnostics
    assert d.mark is not None and d.mark.file.endswith("leaky.yaml") and d.mark.line == 2
    assert "a shipped profile may read only ZTUN_* environment variables" in d.message
    # Included by path instead of by name, it is still a shipped file.
    own.write_text(f"include: [{profiles / 'leaky.yaml'}]\n")
    loaded = load_config(own, env=env)
    assert "hunter2" not in repr(loaded.data) and len(loaded.diagnostics) == 1


def test_real_shipped_profiles_read_only_ztun_variables() -> None:
    for path in PROFILE_DIR.glob("*.yaml"):
        names = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text())
        assert all(n.startswith("ZTUN_") for n in names), (path.name, names)
