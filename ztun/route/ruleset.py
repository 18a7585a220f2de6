"""Rule-set file parsers: text in, headless rules in sing-box *source* form out.

Three formats are understood:

- `source`: sing-box's rule-set source JSON (`{"version": N, "rules": [...]}`, versions 1 to 5,
  with the comments and trailing commas sing-box tolerates);
- `clash`: Clash/mihomo rule-provider files (YAML with a top-level `payload:` list, or the plain
  text form) in the `domain`, `ipcidr` and `classical` behaviours;
- `domains`: a plain list of domain names, one per line.

Every parser returns a `ParsedRuleSet`: headless rules as plain dicts whose listable fields are
always lists (`{"domain_suffix": ["a.com"]}`), plus warnings for things skipped. Malformed input
raises `RuleSetError` naming the line (or the JSON path) of the mistake. Pure: no file or network
access here (ztun.provider.ruleset does the I/O).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ztun.errors import ZtunError
from ztun.route.compact import prefix_span
from ztun.route.regex import pattern_error

ClashBehavior = Literal["domain", "ipcidr", "classical"]
RuleSetFormat = Literal["source", "clash", "domains"]

#: Source versions sing-box 1.14 reads. They differ only in which fields sing-box's *compiler*
#: may write to a binary .srs file; the source JSON of every version is read the same way.
SOURCE_VERSIONS = (1, 2, 3, 4, 5)
#: Logical rules nested deeper than this are refused (a guard against hostile files).
MAX_DEPTH = 32
#: YAML collections nested deeper than this are refused (a Clash provider needs two levels).
MAX_YAML_DEPTH = 100

# Headless-rule fields ztun understands, by the kind of value each takes.
_STRING_FIELDS = frozenset({
    "domain", "domain_suffix", "domain_keyword", "domain_regex", "geoip", "source_geoip",
    "port_range", "source_port_range", "network", "protocol", "auth_user",
    "process_name", "process_path", "process_path_regex",
})  # fmt: skip
_CIDR_FIELDS = frozenset({"ip_cidr", "source_ip_cidr"})
_PORT_FIELDS = frozenset({"port", "source_port"})
_BOOL_FIELDS = frozenset({"ip_is_private", "source_ip_is_private", "invert"})
_NETWORKS = frozenset({"tcp", "udp", "icmp"})
#: Fields sing-box accepts in a headless rule that ztun cannot evaluate.
_SINGBOX_ONLY_FIELDS = frozenset({
    "package_name", "package_name_regex",
    "wifi_ssid", "wifi_bssid", "network_type", "network_is_expensive", "network_is_constrained",
    "network_interface_address", "default_interface_address",
})  # fmt: skip
HEADLESS_FIELDS = frozenset(
    _STRING_FIELDS
    | _CIDR_FIELDS
    | _PORT_FIELDS
    | _BOOL_FIELDS
    | {"type", "query_type", "ip_version"}
)
_LOGICAL_FIELDS = frozenset({"type", "mode", "rules", "invert"})
_DOMAIN_ENTRY_FIELDS = ("domain", "domain_suffix", "domain_keyword")


class RuleSetError(ZtunError):
    """A rule-set file that cannot be read; `line` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.message = message
        self.line = line


@dataclass
class ParsedRuleSet:
    """Headless rules (sing-box source form) and warnings about what was skipped."""

    rules: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_rule_set(
    text: str, fmt: RuleSetFormat = "source", behavior: ClashBehavior = "classical"
) -> ParsedRuleSet:
    """Parse `text` in format `fmt` (`behavior` is used by the clash format only)."""
    if fmt == "source":
        return parse_source(text)
    if fmt == "clash":
        return parse_clash(text, behavior)
    if fmt == "domains":
        return parse_domains(text)
    raise RuleSetError(f"unknown rule-set format '{fmt}' (expected source, clash or domains)")


# ---------------------------------------------------------------------------------------------
# sing-box source JSON


def parse_source(text: str) -> ParsedRuleSet:
    """sing-box rule-set source JSON → headless rules.

    Comments (`//`, `/* */`, `#`) and trailing commas are accepted, as sing-box accepts them.
    Unknown fields are errors, as in sing-box; fields sing-box knows but ztun cannot evaluate
    (package_name, wifi_ssid, ...) are errors too, because dropping them would widen a rule.
    """
    try:
        data = json.loads(_strip_json_extensions(text))
    except json.JSONDecodeError as exc:
        raise RuleSetError(f"not valid JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None
    except RecursionError:
        raise RuleSetError("JSON nested too deeply") from None
    except ValueError as exc:  # e.g. integers with too many digits
        raise RuleSetError(f"not valid JSON: {exc}") from None
    return source_from_data(data)


def source_from_data(data: Any) -> ParsedRuleSet:
    """The decoded JSON of a source rule set → headless rules (what `parse_source` does after
    decoding; `route.source_stream` decodes differently and shares this)."""
    if not isinstance(data, dict):
        raise RuleSetError("a sing-box rule set is a JSON object with 'version' and 'rules'")
    warnings: list[str] = []
    for key in data:
        if key not in ("version", "rules"):
            raise RuleSetError(f"unknown top-level field '{key}' (expected version and rules)")
    version = data.get("version")
    if version is None:
        raise RuleSetError("missing 'version' (sing-box rule sets have version 1 to 5)")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RuleSetError(f"'version' must be an integer, not {json.dumps(version)}")
    if version not in SOURCE_VERSIONS:
        raise RuleSetError(f"unknown rule-set version {version} (ztun reads versions 1 to 5)")
    raw_rules = data.get("rules")
    if raw_rules is None:
        warnings.append("the rule set has no rules; it matches nothing")
        return ParsedRuleSet([], warnings)
    if not isinstance(raw_rules, list):
        raise RuleSetError("'rules' must be a list of rules")
    rules = normalize_headless_rules(raw_rules, warnings=warnings)
    if not rules:
        warnings.append("the rule set has no rules; it matches nothing")
    return ParsedRuleSet(rules, warnings)


def normalize_headless_rules(
    rules: list[Any], *, warnings: list[str] | None = None, where: str = "rules"
) -> list[dict[str, Any]]:
    """Check headless rules and return copies with every listable field as a list.

    Raises RuleSetError naming the path of the first bad value (e.g. `rules[3].ip_cidr[0]`).
    """
    sink = warnings if warnings is not None else []
    return [_normalize_rule(rule, f"{where}[{i}]", 0, sink) for i, rule in enumerate(rules)]


def _normalize_rule(rule: Any, where: str, depth: int, warnings: list[str]) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise RuleSetError(f"{where}: logical rules nested more than {MAX_DEPTH} deep")
    if not isinstance(rule, dict):
        raise RuleSetError(f"{where}: a rule must be a JSON object")
    kind = rule.get("type")
    if kind == "logical":
        return _normalize_logical(rule, where, depth, warnings)
    if kind not in (None, "", "default"):  # sing-box reads a missing or empty type as default
        raise RuleSetError(f"{where}.type: unknown rule type {json.dumps(kind)} "
                           "(expected default or logical)")  # fmt: skip
    out: dict[str, Any] = {}
    for key, value in rule.items():
        path = f"{where}.{key}"
        if key == "type":
            continue
        if key not in HEADLESS_FIELDS:
            raise RuleSetError(_unknown_field_message(key, path))
        if value is None:  # sing-box treats null as "not set"
            continue
        normalized = _normalize_value(key, value, path)
        if normalized is None:
            continue
        out[key] = normalized
    for key in _DOMAIN_ENTRY_FIELDS:
        for entry in out.get(key, []):
            if entry != entry.lower():
                warnings.append(
                    f"{where}.{key}: '{entry}' has upper-case letters: sing-box never "
                    "matches it (it compares with the lower-cased name); ztun folds it to "
                    "lower case"
                )
                break
    if not any(k != "invert" for k in out):
        raise RuleSetError(f"{where}: the rule has no match fields")
    return out


def _normalize_logical(
    rule: dict[str, Any], where: str, depth: int, warnings: list[str]
) -> dict[str, Any]:
    for key in rule:
        if key not in _LOGICAL_FIELDS:
            raise RuleSetError(f"{where}.{key}: unknown field in a logical rule "
                               "(expected type, mode, rules, invert)")  # fmt: skip
    mode = rule.get("mode")
    if mode not in ("and", "or"):
        raise RuleSetError(f"{where}.mode: {json.dumps(mode)} is not a logical mode "
                           "(expected and or or)")  # fmt: skip
    subs = rule.get("rules")
    if not isinstance(subs, list) or not subs:
        raise RuleSetError(f"{where}.rules: a logical rule needs a non-empty list of rules")
    invert = rule.get("invert", False)
    if invert is None:
        invert = False
    if not isinstance(invert, bool):
        raise RuleSetError(f"{where}.invert: must be true or false")
    out: dict[str, Any] = {
        "type": "logical",
        "mode": mode,
        "rules": [
            _normalize_rule(sub, f"{where}.rules[{i}]", depth + 1, warnings)
            for i, sub in enumerate(subs)
        ],
    }
    if invert:
        out["invert"] = True
    return out


def _unknown_field_message(key: str, path: str) -> str:
    if key in _SINGBOX_ONLY_FIELDS:
        return f"{path}: sing-box's '{key}' is not supported by ztun"
    if key in ("inbound", "outbound", "action", "rule_set", "rule_set_ip_cidr_match_source"):
        return f"{path}: '{key}' is a route-rule field; rules inside a rule set cannot use it"
    lowered = key.lower()
    if lowered in HEADLESS_FIELDS:
        # sing-box's JSON decoder ignores the case of field names; ztun does not.
        return f"{path}: unknown field '{key}' (did you mean '{lowered}'?)"
    return f"{path}: unknown field '{key}'"


def _listable(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _normalize_value(key: str, value: Any, path: str) -> Any:
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise RuleSetError(f"{path}: must be true or false, not {json.dumps(value)}")
        return value
    if key == "ip_version":
        if isinstance(value, bool) or value not in (4, 6):
            raise RuleSetError(f"{path}: must be 4 or 6, not {json.dumps(value)}")
        return value
    values = _listable(value)
    if not values:  # an empty list is the same as no field, as in sing-box
        return None
    for i, item in enumerate(values):
        item_path = f"{path}[{i}]" if isinstance(value, list) else path
        _check_item(key, item, item_path)
    return list(values)


def _check_item(key: str, item: Any, path: str) -> None:
    if key in _PORT_FIELDS:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= 65535:
            raise RuleSetError(f"{path}: {json.dumps(item)} is not a port (0 to 65535)")
        return
    if key == "query_type":
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise RuleSetError(f"{path}: {json.dumps(item)} is not a DNS query type")
        return
    if not isinstance(item, str):
        raise RuleSetError(f"{path}: must be a string, not {json.dumps(item)}")
    if not item:
        raise RuleSetError(f"{path}: empty strings are not allowed")
    if key in _CIDR_FIELDS and not _is_cidr(item):
        raise RuleSetError(f"{path}: '{item}' is not an IP address or CIDR prefix")
    if key == "network" and item not in _NETWORKS:
        raise RuleSetError(f"{path}: '{item}' is not a network (tcp, udp or icmp)")


def _is_cidr(text: str) -> bool:
    try:
        # Host bits may be set ("10.1.2.3/8"), as sing-box (Go's netip.ParsePrefix) allows.
        if text == text.strip():
            prefix_span(text)  # the same answers, without an object per entry (~5x faster)
        else:
            ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


# A string token ends at its closing quote or, unterminated, at the end of its line: it always
# matches where it starts, so no quote is scanned twice (with the closing quote required, a line
# of escaped quotes made every quote rescan the rest of the line: quadratic). An unterminated
# string is invalid JSON either way, and json.loads reports it at the same place.
_JSON_STRING = r'"(?:[^"\\\n]|\\.)*"?'
_JSON_COMMENTS = re.compile(_JSON_STRING + r"|//[^\n]*|#[^\n]*|/\*[\s\S]*?\*/|/\*[\s\S]*")
_JSON_TRAILING_COMMA = re.compile(_JSON_STRING + r"|,(?=\s*[\]}])")
_NOT_NEWLINE = re.compile(r"[^\n]")
_MAYBE_TRAILING_COMMA = re.compile(r",\s*[\]}]")


def _strip_json_extensions(text: str) -> str:
    """Blank out comments and trailing commas, keeping every line and column in place."""

    def comment(m: re.Match[str]) -> str:
        token = m.group()
        return token if token[0] == '"' else _NOT_NEWLINE.sub(" ", token)

    def comma(m: re.Match[str]) -> str:
        token = m.group()
        return token if token[0] == '"' else " "

    # Source files of several MB are common: skip each pass when it cannot change anything
    # (a `/` alone is every CIDR; only `//` and `/*` start a comment).
    if "//" in text or "/*" in text or "#" in text:
        text = _JSON_COMMENTS.sub(comment, text)
    if _MAYBE_TRAILING_COMMA.search(text):
        text = _JSON_TRAILING_COMMA.sub(comma, text)
    return text


# ---------------------------------------------------------------------------------------------
# Clash / mihomo rule providers

_YAML_HEAD = re.compile(r"^(payload|rules)[ \t]*:", re.MULTILINE)
#: libyaml's loader when PyYAML has it: ten times faster on 100k-entry providers.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_REGEX_SPECIAL = frozenset("\\.^$|?*+()[]{}")
#: Characters of one domain label (after IDNA conversion); `_` occurs in real names.
_DOMAIN_CHARS = re.compile(r"[a-z0-9_-]+")


def parse_clash(text: str, behavior: str = "classical") -> ParsedRuleSet:
    """A Clash/mihomo rule-provider file (YAML `payload:` list or plain text) → headless rules.

    `behavior` is the provider's: `domain` (Clash wildcard domains), `ipcidr` (CIDRs) or
    `classical` (`TYPE,value[,params]` lines). Entries of one kind are merged into one rule.
    """
    if behavior not in ("domain", "ipcidr", "classical"):
        raise RuleSetError(f"unknown clash behavior '{behavior}' "
                           "(expected domain, ipcidr or classical)")  # fmt: skip
    entries = _clash_entries(text)
    if behavior == "domain":
        result = _clash_domains(entries)
    elif behavior == "ipcidr":
        result = _clash_cidrs(entries)
    else:
        result = _clash_classical(entries)
    if not result.rules:
        result.warnings.append("the rule set has no usable entries; it matches nothing")
    return result


def _clash_entries(text: str) -> list[tuple[int, str]]:
    """(line number, entry) pairs from either form of a rule-provider file."""
    if _YAML_HEAD.search(text):
        return _clash_yaml_entries(text)
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "//")):
            continue
        entries.append((number, line))
    return entries


def _clash_yaml_entries(text: str) -> list[tuple[int, str]]:
    try:
        _check_yaml_depth(text)
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise RuleSetError(f"not valid YAML: {problem}", line) from None
    except RecursionError:
        raise RuleSetError("YAML nested too deeply") from None
    except (UnicodeError, ValueError) as exc:  # e.g. lone surrogates, which libyaml refuses
        raise RuleSetError(f"not valid YAML: {exc}") from None
    if not isinstance(root, yaml.MappingNode):
        raise RuleSetError("a Clash rule provider in YAML needs a top-level 'payload:' list")
    payload = None
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value in ("payload", "rules"):
            payload = value
    if payload is None or (isinstance(payload, yaml.ScalarNode) and payload.value in ("", "~")):
        return []
    if not isinstance(payload, yaml.SequenceNode):
        raise RuleSetError("'payload' must be a list", payload.start_mark.line + 1)
    entries = []
    for node in payload.value:
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.ScalarNode):
            raise RuleSetError("payload entries must be strings", line)
        if node.tag.endswith(":null") or (node.style is None and node.value in ("", "~", "null")):
            continue
        value = node.value.strip()
        if value:
            entries.append((line, value))
    return entries


def _check_yaml_depth(text: str) -> None:
    """RuleSetError when collections nest deeper than MAX_YAML_DEPTH. libyaml's parser is
    iterative, its composer recursive in C: ~40k nested `[` or `- ` (a 100 KB file) crashed the
    process with a segfault (found by the fuzz run), and deep flow nesting is quadratic there.
    Reading the events first costs ~20% of a 100k-entry provider's parse."""
    depth = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise RuleSetError("YAML nested too deeply", event.start_mark.line + 1)
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            depth -= 1


def _clash_domain(pattern: str, line: int) -> tuple[str, str]:
    """A Clash wildcard domain → (sing-box field, value).

    `+.a.com`: a.com and all its subdomains; `.a.com`: subdomains only; `*` as a whole label:
    exactly one label (anywhere in the name); anything else: that exact name.
    """
    text = _ascii_domain(pattern.lower(), line)
    if text.endswith("."):
        raise RuleSetError(f"'{pattern}': a domain pattern cannot end with a dot", line)
    labels = text.split(".")
    prefix = ""
    if labels[0] == "+":
        prefix, labels = "+", labels[1:]
    elif labels[0] == "" and len(labels) > 1:
        prefix, labels = ".", labels[1:]
    if not labels or any(not label for label in labels):
        if prefix == "+" and not labels:
            return "domain_regex", "^.+$"  # "+" alone: every name
        raise RuleSetError(f"'{pattern}' is not a valid domain pattern (empty label)", line)
    for label in labels:
        if label != "*" and not _DOMAIN_CHARS.fullmatch(label):
            raise RuleSetError(f"'{pattern}' is not a valid domain pattern", line)
    rest = ".".join(labels)
    if "*" not in labels:
        if prefix == "+":
            return "domain_suffix", rest
        if prefix == ".":
            return "domain_suffix", "." + rest
        return "domain", rest
    body = r"\.".join("[^.]+" if label == "*" else _regex_escape(label) for label in labels)
    head = {"+": r"(?:.+\.)?", ".": r".+\.", "": ""}[prefix]
    return "domain_regex", f"^{head}{body}$"


def _ascii_domain(text: str, line: int) -> str:
    if text.isascii():
        return text
    labels = []
    for label in text.split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(label.encode("idna").decode("ascii"))
        except UnicodeError:
            raise RuleSetError(f"'{text}' is not a valid internationalised domain", line) from None
    return ".".join(labels)


def _regex_escape(text: str) -> str:
    """Escape for both Python `re` and Go RE2 (re.escape's output is not always valid RE2)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def _dedupe(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _domain_rule(fields: dict[str, list[str]]) -> list[dict[str, Any]]:
    rule = {k: _dedupe(v) for k, v in fields.items() if v}
    return [rule] if rule else []


def _clash_domains(entries: list[tuple[int, str]]) -> ParsedRuleSet:
    fields: dict[str, list[str]] = {"domain": [], "domain_suffix": [], "domain_regex": []}
    for line, entry in entries:
        kind, value = _clash_domain(entry, line)
        fields[kind].append(value)
    return ParsedRuleSet(_domain_rule(fields), [])


def _cidr(text: str, line: int) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise RuleSetError(f"'{text}' is not an IP address or CIDR prefix", line) from None


def _clash_cidrs(entries: list[tuple[int, str]]) -> ParsedRuleSet:
    cidrs = [_cidr(entry, line) for line, entry in entries]
    return ParsedRuleSet([{"ip_cidr": _dedupe(cidrs)}] if cidrs else [], [])


class _Unsupported(Exception):
    """A classical rule ztun cannot express; the line is skipped with a warning."""


#: Classical types ztun skips; the value says why (shown in the warning).
_CLASSICAL_UNSUPPORTED = {
    "IP-SUFFIX": "IP-SUFFIX has no sing-box equivalent",
    "SRC-IP-SUFFIX": "SRC-IP-SUFFIX has no sing-box equivalent",
    "IP-ASN": "ASN matching is not supported",
    "SRC-IP-ASN": "ASN matching is not supported",
    "GEOSITE": "geosite is not supported (use a rule set instead)",
    "DOMAIN-WILDCARD": "DOMAIN-WILDCARD is not supported (use the domain behavior)",
    "RULE-SET": "rule sets cannot refer to other rule sets",
    "SUB-RULE": "SUB-RULE is not allowed in a rule provider",
    "MATCH": "MATCH is not allowed in a rule provider",
}


def _clash_classical(entries: list[tuple[int, str]]) -> ParsedRuleSet:
    warnings: list[str] = []
    # Rules of one group OR together inside a single sing-box rule, so lines of the same group
    # merge into one rule; different groups must stay separate rules (a rule ANDs its groups).
    groups: dict[str, dict[str, list[Any]]] = {}
    logical: list[dict[str, Any]] = []
    for line, entry in entries:
        try:
            rule = _classical_rule(entry, line, warnings)
        except _Unsupported as exc:
            warnings.append(f"line {line}: skipped '{entry}': {exc}")
            continue
        if rule.get("type") == "logical":
            logical.append(rule)
            continue
        group = groups.setdefault(_group_of(rule), {})
        for key, values in rule.items():
            group.setdefault(key, []).extend(values)
    rules: list[dict[str, Any]] = []
    for name in ("destination", "source", "port", "source_port", "network", *_PROCESS_FIELDS):
        if name in groups:
            rules.append({k: _dedupe(v) for k, v in groups[name].items()})
    rules.extend(logical)
    return ParsedRuleSet(rules, warnings)


def _group_of(rule: dict[str, Any]) -> str:
    key = next(iter(rule))
    if key.startswith("source_port"):
        return "source_port"
    if key.startswith("source_"):
        return "source"
    if key.startswith("port"):
        return "port"
    if key == "network" or key in _PROCESS_FIELDS:
        return key  # each its own item in sing-box: ANDed, so a rule of its own
    return "destination"


_PROCESS_FIELDS = ("process_name", "process_path", "process_path_regex")


def _classical_rule(entry: str, line: int, warnings: list[str]) -> dict[str, Any]:
    """One `TYPE,value[,params]` line (or a logical AND/OR/NOT line) → one headless rule."""
    kind, sep, rest = entry.partition(",")
    kind = kind.strip().upper()
    if not sep:
        raise RuleSetError(f"'{entry}' is not a rule: expected TYPE,value (e.g. "
                           "DOMAIN-SUFFIX,example.com)", line)  # fmt: skip
    if kind in ("AND", "OR", "NOT"):
        return _classical_logical(kind, rest.strip(), line, warnings)
    value, *params = (p.strip() for p in rest.split(","))
    if not value:
        raise RuleSetError(f"'{entry}': empty value", line)
    source = "src" in params
    ignored = [p for p in params if p and p not in ("src", "no-resolve")]
    if ignored:
        # one warning per line, not per parameter: each quotes the line, and a 46 KB line of
        # 17k commas made 780 MB of warnings in 2 s (found by the fuzz run)
        shown = ", ".join(f"'{p}'" for p in ignored[:3])
        more = f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
        warnings.append(f"line {line}: ignored parameter {shown}{more} in '{entry}'")
    if kind in _CLASSICAL_UNSUPPORTED:
        raise _Unsupported(_CLASSICAL_UNSUPPORTED[kind])
    build = _CLASSICAL_BUILDERS.get(kind)
    if build is None:
        raise _Unsupported(f"rule type {kind} is not supported by ztun")
    return build(value, line, source)


def _regex_rule(value: str, line: int, source: bool) -> dict[str, Any]:
    # mihomo matches DOMAIN-REGEX ignoring case; sing-box lower-cases the name only.
    pattern = f"(?i){value}" if any("A" <= c <= "Z" for c in value) else value
    # Checked here as the compiler will (RE2), so the error names the file's line.
    if (why := pattern_error(pattern)) is not None:
        raise RuleSetError(f"'{value}' is not a regular expression ztun can match (RE2 "
                           f"syntax): {why}", line)  # fmt: skip
    return {"domain_regex": [pattern]}


def _process_path_regex(value: str, line: int, source: bool) -> dict[str, Any]:
    if (why := pattern_error(value)) is not None:
        raise RuleSetError(f"'{value}' is not a regular expression ztun can match (RE2 "
                           f"syntax): {why}", line)  # fmt: skip
    return {"process_path_regex": [value]}


def _plain_domain(value: str, line: int) -> str:
    text = _ascii_domain(value.lower(), line)
    if any(c.isspace() for c in text):
        raise RuleSetError(f"'{value}' is not a domain name", line)
    return text


def _ports(value: str, line: int, source: bool) -> dict[str, Any]:
    """mihomo port lists: `80`, `80-90`, `80/443/1000-2000`."""
    prefix = "source_" if source else ""
    ports: list[int] = []
    ranges: list[str] = []
    for part in value.split("/"):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            a = int(low)
            b = int(high) if dash else a
        except ValueError:
            raise RuleSetError(f"'{value}' is not a port or port range", line) from None
        if not (0 <= a <= 65535 and 0 <= b <= 65535) or a > b:
            raise RuleSetError(f"'{value}' is not a port or port range (0 to 65535)", line)
        if dash:
            ranges.append(f"{a}:{b}")
        else:
            ports.append(a)
    if not ports and not ranges:
        raise RuleSetError(f"'{value}' is not a port or port range", line)
    rule: dict[str, Any] = {}
    if ports:
        rule[f"{prefix}port"] = ports
    if ranges:
        rule[f"{prefix}port_range"] = ranges
    return rule


def _geoip(value: str, line: int, source: bool) -> dict[str, Any]:
    code = value.lower()
    if code == "lan":  # mihomo's name for private/local addresses
        code = "private"
    elif not re.fullmatch(r"[a-z]{2}", code):
        raise RuleSetError(f"'{value}' is not a two-letter country code", line)
    return {"source_geoip" if source else "geoip": [code]}


def _network(value: str, line: int, source: bool) -> dict[str, Any]:
    network = value.lower()
    if network not in ("tcp", "udp"):
        raise RuleSetError(f"'{value}' is not a network (tcp or udp)", line)
    return {"network": [network]}


_Builder = Callable[[str, int, bool], dict[str, Any]]
_CLASSICAL_BUILDERS: dict[str, _Builder] = {
    "DOMAIN": lambda v, n, s: {"domain": [_plain_domain(v, n)]},
    "DOMAIN-SUFFIX": lambda v, n, s: {"domain_suffix": [_plain_domain(v, n)]},
    "DOMAIN-KEYWORD": lambda v, n, s: {"domain_keyword": [v.lower()]},
    "DOMAIN-REGEX": _regex_rule,
    "IP-CIDR": lambda v, n, s: {"source_ip_cidr" if s else "ip_cidr": [_cidr(v, n)]},
    "IP-CIDR6": lambda v, n, s: {"source_ip_cidr" if s else "ip_cidr": [_cidr(v, n)]},
    "SRC-IP-CIDR": lambda v, n, s: {"source_ip_cidr": [_cidr(v, n)]},
    "DST-PORT": lambda v, n, s: _ports(v, n, False),
    "SRC-PORT": lambda v, n, s: _ports(v, n, True),
    "GEOIP": _geoip,
    "SRC-GEOIP": lambda v, n, s: _geoip(v, n, True),
    "NETWORK": _network,
    "PROCESS-NAME": lambda v, n, s: {"process_name": [v]},
    "PROCESS-PATH": lambda v, n, s: {"process_path": [v]},
    "PROCESS-PATH-REGEX": _process_path_regex,
}


def _classical_logical(
    kind: str, payload: str, line: int, warnings: list[str], depth: int = 0
) -> dict[str, Any]:
    """`AND,((DOMAIN,a.com),(NETWORK,UDP))` and friends → a sing-box logical rule."""
    if depth > MAX_DEPTH:
        raise RuleSetError(f"logical rules nested more than {MAX_DEPTH} deep", line)
    parts = _split_logical_payload(payload, line)
    if kind == "NOT" and len(parts) != 1:
        raise RuleSetError("NOT takes exactly one rule: NOT,((TYPE,value))", line)
    subs = []
    for part in parts:
        sub_kind, sep, sub_rest = part.partition(",")
        sub_kind = sub_kind.strip().upper()
        if sub_kind in ("AND", "OR", "NOT") and sep:
            subs.append(_classical_logical(sub_kind, sub_rest.strip(), line, warnings, depth + 1))
        else:
            subs.append(_classical_rule(part, line, warnings))
    rule: dict[str, Any] = {"type": "logical", "mode": "or" if kind == "OR" else "and",
                            "rules": subs}  # fmt: skip
    if kind == "NOT":
        rule["invert"] = True
    return rule


def _split_logical_payload(payload: str, line: int) -> list[str]:
    """`((A,x),(B,y))` → ["A,x", "B,y"]: the top-level parenthesised groups."""
    text = payload.strip()
    if not (text.startswith("(") and text.endswith(")")):
        raise RuleSetError(f"'{payload}': expected ((TYPE,value),...)", line)
    inner = text[1:-1].strip()
    parts: list[str] = []
    depth = 0
    start = -1
    for i, c in enumerate(inner):
        if c == "(":
            if depth == 0:
                start = i + 1
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise RuleSetError(f"'{payload}': unbalanced parentheses", line)
            if depth == 0:
                parts.append(inner[start:i].strip())
        elif depth == 0 and not (c == "," or c.isspace()):
            raise RuleSetError(f"'{payload}': expected ((TYPE,value),...)", line)
    if depth != 0:
        raise RuleSetError(f"'{payload}': unbalanced parentheses", line)
    if not parts or any(not p for p in parts):
        raise RuleSetError(f"'{payload}': a logical rule needs at least one (TYPE,value)", line)
    return parts


# ---------------------------------------------------------------------------------------------
# Plain domain lists


def parse_domains(text: str) -> ParsedRuleSet:
    """One domain per line → one rule with `domain` and `domain_suffix` lists.

    `example.com` matches that name only; `.example.com` matches its subdomains only;
    `+.example.com` matches the name and all its subdomains. `#` starts a comment (whole line
    or after the name); blank lines are skipped; a trailing root dot is dropped; upper case is
    folded to lower case; non-ASCII names are converted to their xn-- form.
    """
    domains: list[str] = []
    suffixes: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if any(c.isspace() for c in line):
            raise RuleSetError(f"'{line}': one domain per line (hosts-file lines are not "
                               "supported)", number)  # fmt: skip
        name = line.lower()
        kind = "domain"
        if name.startswith("+."):
            kind, name = "both", name[2:]
        elif name.startswith("."):
            kind, name = "under", name[1:]
        if name.endswith(".") and len(name) > 1:
            name = name[:-1]
        name = _ascii_domain(name, number)
        labels = name.split(".")
        if not all(_DOMAIN_CHARS.fullmatch(label) for label in labels):
            hint = " (wildcards need format: clash, behavior: domain)" if "*" in name else ""
            raise RuleSetError(f"'{line}' is not a domain name{hint}", number)
        if kind == "domain":
            domains.append(name)
        elif kind == "under":
            suffixes.append("." + name)
        else:
            suffixes.append(name)
    rules = _domain_rule({"domain": domains, "domain_suffix": suffixes})
    warnings = [] if rules else ["the list has no domains; it matches nothing"]
    return ParsedRuleSet(rules, warnings)
