"""Printing a loaded config as normalised YAML (what `ztun format` shows).

Owns the canonical text form of a merged config: keys in the order the schema lists them (unknown
keys last, as written), listable fields always written as lists, empty values dropped, `${` escaped
as `$${`, and a yaml-language-server line on top so editors pick up the schema. Loading the output
again gives the same data as `normalise(loaded.data)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ztun.config.loader import LoadedConfig, resolve_plain_scalar
from ztun.config.validate import SCHEMA_PATH, load_schema

_DEFS_PREFIX = "#/$defs/"


def format_config(loaded: LoadedConfig, *, schema_ref: str | None = None) -> str:
    """The merged config as YAML text.

    `schema_ref` is the schema location written in the yaml-language-server line; by default the
    schema file relative to the top config's directory (where the output is meant to live).
    """
    ref = schema_ref if schema_ref is not None else _relative(SCHEMA_PATH, loaded.base_dir)
    body = yaml.dump(
        _escape(normalise(loaded.data)),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=1 << 16,  # never fold long strings: a one-line description stays one line
    )
    if body.strip() == "{}":
        body = ""
    return f"# yaml-language-server: $schema={ref}\n{body}"


def normalise(data: Any) -> Any:
    """`data` in canonical form: schema key order, listables as lists, no null mapping values."""
    schema = load_schema()
    return _normalise(data, schema, schema)


# --- normalising ----------------------------------------------------------------------------------


def _resolve(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < 32:
        ref = schema["$ref"]
        if not ref.startswith(_DEFS_PREFIX):
            break
        target = root.get("$defs", {}).get(ref[len(_DEFS_PREFIX) :])
        if not isinstance(target, dict):
            break
        schema = target
        seen += 1
    return schema if isinstance(schema, dict) else {}


def _applies(condition: Any, value: Any) -> bool:
    if not isinstance(condition, dict):
        return bool(condition)
    from jsonschema import Draft202012Validator  # only when formatting (`ztun format`)

    try:
        return bool(Draft202012Validator(condition).is_valid(value))
    except Exception:  # an odd value must not stop formatting
        return False


def _properties(schema: Any, value: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Property name -> schema for an object, following $ref, allOf and if/then/else."""
    out: dict[str, Any] = {}
    stack = [schema]
    while stack:
        node = _resolve(stack.pop(0), root)
        for name, sub in node.get("properties", {}).items():
            if isinstance(sub, dict) and "not" in sub:
                continue  # "only used with ..." guards say nothing about shape or order
            out[name] = sub
        stack.extend(node.get("allOf", []))
        if "if" in node:
            branch = node.get("then") if _applies(node["if"], value) else node.get("else")
            if branch is not None:
                stack.append(branch)
    return out


def _normalise(value: Any, schema: Any, root: dict[str, Any]) -> Any:
    node = _resolve(schema, root)
    if node.get("x-listable") and value is not None:
        item_schema = node.get("anyOf", [{}])[0]
        items = value if isinstance(value, list) else [value]
        return [_normalise(item, item_schema, root) for item in items]
    if isinstance(value, dict):
        props = _properties(node, value, root)
        extra = node.get("additionalProperties")
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if name in value and value[name] is not None:
                out[name] = _normalise(value[name], sub, root)
        for name, item in value.items():
            if name not in out and item is not None:
                out[name] = _normalise(item, extra if isinstance(extra, dict) else {}, root)
        return out
    if isinstance(value, list):
        return [_normalise(item, node.get("items", {}), root) for item in value]
    return value


def _escape(value: Any) -> Any:
    """Write `${` as `$${` so loading the text does not substitute it again."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, list):
        return [_escape(item) for item in value]
    if isinstance(value, dict):
        return {key: _escape(item) for key, item in value.items()}
    return value


def _relative(target: Path, start: Path) -> str:
    t = target.resolve().parts
    s = start.resolve().parts
    common = 0
    for x, y in zip(t, s, strict=False):
        if x != y:
            break
        common += 1
    if common <= 1:
        return str(target.resolve())
    return "/".join([".."] * (len(s) - common) + list(t[common:]))


# --- YAML output ----------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style with indented lists; quotes strings that ztun would read as something else."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


_ODD_BREAKS = frozenset("\x85\u2028\u2029\r\ufeff")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # PyYAML quotes strings that YAML 1.1 would read as other types; ztun reads YAML 1.2 core,
    # which differs (0o17, 1e5), so quote those too
    # PyYAML may also write YAML 1.1 line breaks (NEL, LS, PS) raw inside quotes, where reading
    # folds them to spaces; double quotes escape them
    if not isinstance(resolve_plain_scalar(value), str) or any(c in _ODD_BREAKS for c in value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_str(value)


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.SequenceNode:
    # short lists of plain values read best on one line: `address: [172.19.0.1/30, fdfe::1/126]`
    short = all(not isinstance(v, dict | list) for v in value) and len(repr(value)) <= 72
    return dumper.represent_sequence(
        "tag:yaml.org,2002:seq", value, flow_style=short and bool(value)
    )


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(list, _represent_list)
