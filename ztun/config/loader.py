"""Reading ztun config files: YAML with positions, `include:` merging and `${VAR}` substitution.

Owns the step from files on disk to plain Python data (`LoadedConfig.data`) plus, for every key and
list item, the file:line:column where it was written (`LoadedConfig.marks`), so later checks can
point at the exact place of a mistake even when it came from an included file.

Reading rules (documented for users in docs/profiles.md):
- Plain (unquoted) scalars follow the YAML 1.2 core schema: `yes`/`no`/`on`/`off` stay strings and
  `10:20` is a string, not a base-60 number. Quoted scalars are always strings.
- A mapping value that is null (`key:` with nothing after it) counts as absent; in an including
  file it removes the value an include set.
- Relative paths in path fields of included files are rewritten to be relative to the top file's
  directory (`base_dir`), so the merged data has a single base for every relative path.
- `${VAR}` reads the environment only in the user's own files (the top file and what it includes
  by path, outside ztun's package). A shipped profile (a file under ztun/resources/profiles,
  however it was included) may read only `ZTUN_*` variables, the names it documents; any other
  `${VAR}` in it is an error and is not read. So a profile ztun did not get from the user cannot
  copy `${HOME}`, `${AWS_SECRET_ACCESS_KEY}` or the like into a server name or URL.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ztun.errors import ConfigError, ConfigPath, Diagnostic, Mark
from ztun.resources import PROFILE_DIR

#: Lists whose items are merged by `tag` across includes.
TAGGED_LISTS: frozenset[ConfigPath] = frozenset(
    {("inbounds",), ("outbounds",), ("route", "rule_set"), ("dns", "servers")}
)
#: Rule lists: the including file's rules come first, then the included files' rules.
RULE_LISTS: frozenset[ConfigPath] = frozenset({("route", "rules"), ("dns", "rules")})

# Upper bound on values built from one file, so alias bombs ("billion laughs") stop early.
_MAX_VALUES = 1_000_000
#: Flow collections ([…], {…}) nested deeper than this are refused (found by the fuzz run).
_MAX_FLOW_NESTING = 100
_PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_VAR_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.S)
#: The only variables a shipped profile may read (see the module docstring).
SHIPPED_VARIABLE_PREFIX = "ZTUN_"

_PLAIN_TAG = "tag:ztun,2024:plain"
_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"

_INT_RE = re.compile(r"[-+]?[0-9]+")
_OCT_RE = re.compile(r"0o[0-7]+")
_HEX_RE = re.compile(r"0x[0-9a-fA-F]+")
_FLOAT_RE = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_TRUES = frozenset({"true", "True", "TRUE"})
_FALSES = frozenset({"false", "False", "FALSE"})


def resolve_plain_scalar(text: str) -> Any:
    """The value of an unquoted YAML scalar under the YAML 1.2 core schema (as ztun reads it)."""
    if text in _NULLS:
        return None
    if text in _TRUES:
        return True
    if text in _FALSES:
        return False
    try:
        if _INT_RE.fullmatch(text):
            return int(text)
        if _OCT_RE.fullmatch(text):
            return int(text[2:], 8)
        if _HEX_RE.fullmatch(text):
            return int(text[2:], 16)
        if _FLOAT_RE.fullmatch(text):
            value = float(text)
            # an overflowing float would not survive a format/load round trip: keep the text
            return text if abs(value) == float("inf") else value
    except ValueError:  # e.g. more digits than Python's int() accepts
        return text
    return text


class _YAMLLoader(yaml.SafeLoader):
    """A SafeLoader that tags every plain scalar with one marker tag, so ztun resolves it itself."""

    yaml_implicit_resolvers: ClassVar[dict[Any, list[tuple[str, re.Pattern[str]]]]] = {}

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # PyYAML's scanner walks every open flow level for each token: `[[[[…` is quadratic
        # (3000 levels: ~1 s, 14 s under the fuzzer), so deep flow nesting is refused early.
        if self.flow_level >= _MAX_FLOW_NESTING:
            problem = f"[ and {{ nested too deeply (over {_MAX_FLOW_NESTING})"
            raise yaml.scanner.ScannerError(None, None, problem, self.get_mark())
        super().fetch_flow_collection_start(TokenClass)


_YAMLLoader.add_implicit_resolver(_PLAIN_TAG, re.compile(r".*", re.S), None)


# --- values with positions ------------------------------------------------------------------------


@dataclass(slots=True)
class _Scalar:
    value: Any
    mark: Mark


@dataclass(slots=True)
class _Seq:
    items: list[_Node]
    mark: Mark


@dataclass(slots=True)
class _Map:
    #: key -> (mark of the key, value)
    entries: dict[str, tuple[Mark, _Node]]
    mark: Mark


_Node = _Scalar | _Seq | _Map


@dataclass
class LoadedConfig:
    """A config after reading, including and substituting; not yet validated."""

    #: the merged config as plain data (dicts, lists, str, int, float, bool, None)
    data: dict[str, Any]
    #: where each key (its key) or list item was written, through includes too
    marks: dict[ConfigPath, Mark] = field(default_factory=dict)
    #: every file read, the top file first
    files: list[str] = field(default_factory=list)
    #: problems found while loading (unset ${VAR}, duplicate keys, ...)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    #: directory of the top file: relative paths inside `data` are relative to it
    base_dir: Path = field(default_factory=Path)
    #: the top file, as given
    path: str = ""

    def mark_for(self, path: Iterable[str | int]) -> Mark | None:
        """The mark of `path`, or of its nearest ancestor that has one."""
        key = tuple(path)
        while True:
            mark = self.marks.get(key)
            if mark is not None or not key:
                return mark
            key = key[:-1]

    def resolve_path(self, value: str) -> Path:
        """A path value from `data` (e.g. route.geoip.path) as a path usable from anywhere."""
        p = Path(value)
        return p if p.is_absolute() else self.base_dir / p


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read a config file with its includes.

    Raises ConfigError (with file:line:col) when a file cannot be read or parsed, an include is
    missing or forms a cycle. Softer problems (unset variables, duplicate keys) are returned in
    `LoadedConfig.diagnostics`.
    """
    shown = str(path)
    return _Loader(env).load_top(Path(path), shown, None)


def load_config_text(
    text: str,
    *,
    name: str = "<string>",
    base_dir: str | Path = ".",
    env: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Like load_config, for config text already in memory; includes are relative to base_dir."""
    return _Loader(env).load_top(Path(base_dir) / "__text__.yaml", name, text)


def list_profiles(directory: Path | None = None) -> list[tuple[str, str, Path]]:
    """The shipped profiles (or the configs in `directory`) as (name, description, path)."""
    out: list[tuple[str, str, Path]] = []
    where = PROFILE_DIR if directory is None else directory
    if not where.is_dir():
        return out
    for path in sorted(where.glob("*.yaml")):
        try:
            root = _Loader({}).parse_file(path, str(path), None)
        except ConfigError as exc:
            out.append((path.stem, f"(unreadable: {exc})", path))
            continue
        entry = root.entries.get("description")
        desc = entry[1].value if entry and isinstance(entry[1], _Scalar) else ""
        out.append((path.stem, desc if isinstance(desc, str) else str(desc), path))
    return out


# --- loading --------------------------------------------------------------------------------------


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False also where that raises (a name over the system's length limit:
    found by the fuzz run, it escaped as a traceback)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _fail(message: str, mark: Mark | None, path: ConfigPath = ()) -> ConfigError:
    return ConfigError([Diagnostic(message, path, mark)])


def _mark(file: str, ymark: yaml.Mark | None) -> Mark:
    if ymark is None:
        return Mark(file, 1, 1)
    return Mark(file, ymark.line + 1, ymark.column + 1)


def _position(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


class _Loader:
    """One load: shared environment, diagnostics and list of files read."""

    def __init__(self, env: Mapping[str, str] | None) -> None:
        # The process environment is the caller's to pass (ztun.check does): the config layer
        # reads the files it is handed and nothing else of the process.
        self.env: Mapping[str, str] = {} if env is None else env
        self.diagnostics: list[Diagnostic] = []
        self.files: list[str] = []
        self.base_dir = Path(".")

    def load_top(self, path: Path, shown: str, text: str | None) -> LoadedConfig:
        self.base_dir = path.parent
        try:
            tree = self._load_tree(path, shown, text, [], None, top=True)
            marks: dict[ConfigPath, Mark] = {(): tree.mark}
            data = _flatten(tree, (), marks)
        except RecursionError:
            raise _fail("the config is nested too deeply", Mark(shown, 1, 1)) from None
        assert isinstance(data, dict)
        return LoadedConfig(
            data=data,
            marks=marks,
            files=self.files,
            diagnostics=self.diagnostics,
            base_dir=self.base_dir,
            path=shown,
        )

    def _load_tree(
        self,
        path: Path,
        shown: str,
        text: str | None,
        chain: list[tuple[Path, str]],
        at: Mark | None,
        *,
        top: bool,
    ) -> _Map:
        real = path.resolve() if text is None else path
        if any(real == p for p, _ in chain):
            names = [s for _, s in chain] + [shown]
            raise _fail("include cycle: " + " -> ".join(names), at)
        root = self.parse_file(path, shown, text, at)
        include = root.entries.pop("include", None)
        if not top:
            root.entries.pop("description", None)
            self._rebase_paths(root, path.parent)
        merged: _Map | None = None
        if include is not None:
            for name, mark in self._include_names(include):
                target, target_shown = self._find_include(name, path.parent, mark)
                sub = self._load_tree(
                    target, target_shown, None, [*chain, (real, shown)], mark, top=False
                )
                merged = sub if merged is None else _merge_map(merged, sub, ())
        return root if merged is None else _merge_map(merged, root, ())

    def parse_file(self, path: Path, shown: str, text: str | None, at: Mark | None = None) -> _Map:
        """Read and parse one file into a mapping with marks (no includes)."""
        # Text in memory is the caller's (the user's); a file is shipped by where it lies.
        shipped = text is None and _is_shipped(path)
        if text is None:
            try:
                raw = path.read_bytes()
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise _fail(f"cannot read {shown}: {reason}", at or Mark(shown, 1, 1)) from None
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                line, col = _position(raw[: exc.start].decode("utf-8", "replace"), exc.start)
                raise _fail(f"{shown} is not UTF-8 text", Mark(shown, line, col)) from None
        if shown not in self.files:
            self.files.append(shown)
        try:
            node = yaml.compose(text, Loader=_YAMLLoader)
        except yaml.MarkedYAMLError as exc:
            raise _fail(
                _yaml_message(exc), _mark(shown, exc.problem_mark or exc.context_mark)
            ) from None
        except yaml.reader.ReaderError as exc:
            line, col = _position(text, exc.position)
            raise _fail(f"YAML: {exc.reason}", Mark(shown, line, col)) from None
        except yaml.YAMLError as exc:
            raise _fail(f"YAML: {exc}", Mark(shown, 1, 1)) from None
        except RecursionError:
            raise _fail("the YAML is nested too deeply", Mark(shown, 1, 1)) from None
        if node is None:
            return _Map({}, Mark(shown, 1, 1))
        built = _Builder(shown, self.env, self.diagnostics, shipped=shipped).build(node)
        if isinstance(built, _Scalar) and built.value is None:
            return _Map({}, built.mark)
        if not isinstance(built, _Map):
            raise _fail(
                "the top level of a config must be a mapping of sections "
                "(description, log, include, inbounds, outbounds, dns, route)",
                built.mark,
            )
        return built

    def _include_names(self, include: tuple[Mark, _Node]) -> Iterator[tuple[str, Mark]]:
        _, node = include
        items: list[_Node]
        if isinstance(node, _Scalar) and node.value is None:
            return
        items = node.items if isinstance(node, _Seq) else [node]
        for item in items:
            if not isinstance(item, _Scalar) or not isinstance(item.value, str) or not item.value:
                raise _fail(
                    "include must be a list of file paths or profile names", item.mark, ("include",)
                )
            yield item.value, item.mark

    def _find_include(self, name: str, here: Path, mark: Mark) -> tuple[Path, str]:
        if _PROFILE_NAME.fullmatch(name):
            target = PROFILE_DIR / f"{name}.yaml"
            if not _is_file(target):
                known = ", ".join(p.stem for p in sorted(PROFILE_DIR.glob("*.yaml"))) or "none"
                raise _fail(
                    f"include {name!r}: no shipped profile of that name (profiles: {known}); "
                    "to include a file, write its path, e.g. ./" + name + ".yaml",
                    mark,
                    ("include",),
                )
            return target, str(target)
        target = Path(name) if Path(name).is_absolute() else here / name
        shown = posixpath.normpath(str(target))
        if not _is_file(target):
            raise _fail(f"include {name!r}: no such file {shown}", mark, ("include",))
        return target, shown

    def _rebase_paths(self, root: _Map, file_dir: Path) -> None:
        """Make relative path values of an included file relative to the top file's directory."""
        for node in _path_fields(root):
            value = node.value
            if isinstance(value, str) and value and not Path(value).is_absolute():
                node.value = _rebase(file_dir / value, self.base_dir)


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    problem = exc.problem or "invalid YAML"
    if exc.context and exc.context_mark is not None and exc.problem_mark is not None:
        return f"YAML syntax error: {problem} ({exc.context} at line {exc.context_mark.line + 1})"
    if exc.context:
        return f"YAML syntax error: {exc.context}: {problem}"
    return f"YAML syntax error: {problem}"


def _rebase(target: Path, base: Path) -> str:
    """`target` relative to `base` (with '..'), or absolute when they share only the root."""
    t = Path(posixpath.normpath(target.absolute()))
    b = Path(posixpath.normpath(base.absolute()))
    common = 0
    for x, y in zip(t.parts, b.parts, strict=False):
        if x != y:
            break
        common += 1
    if common <= 1:
        return str(t)
    rel = [".."] * (len(b.parts) - common) + list(t.parts[common:])
    return "/".join(rel) if rel else "."


def _path_fields(root: _Map) -> Iterator[_Scalar]:
    """Scalars holding file paths: route.geoip.path, local rule sets, hosts files, log.output,
    the cache file."""

    def get(node: _Node | None, *keys: str) -> _Node | None:
        for key in keys:
            if not isinstance(node, _Map) or key not in node.entries:
                return None
            node = node.entries[key][1]
        return node

    def scalars(node: _Node | None) -> Iterator[_Scalar]:
        if isinstance(node, _Scalar):
            yield node
        elif isinstance(node, _Seq):
            yield from (n for n in node.items if isinstance(n, _Scalar))

    yield from scalars(get(root, "route", "geoip", "path"))
    yield from scalars(get(root, "log", "output"))
    yield from scalars(get(root, "experimental", "cache_file", "path"))
    rule_sets = get(root, "route", "rule_set")
    if isinstance(rule_sets, _Seq):
        for item in rule_sets.items:
            kind = get(item, "type")
            if isinstance(kind, _Scalar) and kind.value == "local":
                yield from scalars(get(item, "path"))
    servers = get(root, "dns", "servers")
    if isinstance(servers, _Seq):
        for item in servers.items:
            kind = get(item, "type")
            if isinstance(kind, _Scalar) and kind.value == "hosts":
                yield from scalars(get(item, "path"))


# --- building values from YAML nodes --------------------------------------------------------------


def _is_shipped(path: Path) -> bool:
    """True for a file of ztun's shipped profiles (not the user's own)."""
    try:
        return path.resolve().is_relative_to(PROFILE_DIR.resolve())
    except OSError:
        return False


class _Builder:
    """Turns one file's YAML node graph into marked values, substituting ${VAR} on the way."""

    def __init__(
        self,
        file: str,
        env: Mapping[str, str],
        diagnostics: list[Diagnostic],
        *,
        shipped: bool = False,
    ) -> None:
        self.file = file
        self.env = env
        #: a shipped profile: only ZTUN_* variables are read
        self.shipped = shipped
        self.diagnostics = diagnostics
        self.count = 0
        self.active: set[int] = set()

    def mark(self, node: yaml.Node) -> Mark:
        return _mark(self.file, node.start_mark)

    def report(self, message: str, mark: Mark) -> None:
        self.diagnostics.append(Diagnostic(message, (), mark))

    def build(self, node: yaml.Node) -> _Node:
        self.count += 1
        if self.count > _MAX_VALUES:
            raise _fail("too many values (an alias expanding too often?)", self.mark(node))
        if isinstance(node, yaml.ScalarNode):
            return _Scalar(self.scalar(node), self.mark(node))
        if id(node) in self.active:
            raise _fail("an alias refers to a node that contains it", self.mark(node))
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return _Seq([self.build(item) for item in node.value], self.mark(node))
            assert isinstance(node, yaml.MappingNode)
            return self.mapping(node)
        finally:
            self.active.discard(id(node))

    def mapping(self, node: yaml.MappingNode) -> _Map:
        entries: dict[str, tuple[Mark, _Node]] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.report(
                    "a key must be a plain name, not a list or mapping", self.mark(key_node)
                )
                continue
            if key_node.tag == _PLAIN_TAG and key_node.value == "<<":
                merges.append(value_node)
                continue
            # keys are taken as written: `on:` or `80:` are the strings "on" and "80"
            key = key_node.value
            key_mark = self.mark(key_node)
            value = self.build(value_node)
            if key in entries:
                first = entries[key][0]
                self.report(
                    f"duplicate key {key!r} (first at line {first.line}); the later value is used",
                    key_mark,
                )
            entries[key] = (key_mark, value)
        for merge_node in merges:
            self.merge_key(entries, merge_node)
        return _Map(entries, self.mark(node))

    def merge_key(self, entries: dict[str, tuple[Mark, _Node]], node: yaml.Node) -> None:
        """YAML `<<: *anchor` merge keys: copy keys the mapping does not set itself."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        for source in sources:
            built = self.build(source)
            if not isinstance(built, _Map):
                self.report(
                    "'<<' (merge key) needs a mapping or a list of mappings", self.mark(source)
                )
                continue
            for key, entry in built.entries.items():
                entries.setdefault(key, entry)

    def scalar(self, node: yaml.ScalarNode) -> Any:
        mark = self.mark(node)
        if node.tag == _PLAIN_TAG:
            value = resolve_plain_scalar(node.value)
            if isinstance(value, str):
                return self.substitute(value, mark, plain=True)
            return value
        if node.tag == _STR:
            return self.substitute(node.value, mark, plain=False)
        if node.tag in (_INT, _FLOAT, _BOOL, _NULL):
            value = resolve_plain_scalar(node.value)
            wanted = {_INT: int, _FLOAT: (int, float), _BOOL: bool, _NULL: type(None)}[node.tag]
            if isinstance(value, wanted) and not (node.tag == _INT and isinstance(value, bool)):
                return float(value) if node.tag == _FLOAT else value
            self.report(f"{node.value!r} cannot be read as {node.tag.rsplit(':', 1)[-1]}", mark)
            return node.value
        self.report(f"unsupported YAML tag {node.tag!r}; the value is read as a string", mark)
        return node.value

    def substitute(self, text: str, mark: Mark, *, plain: bool) -> Any:
        """Expand ${VAR} and ${VAR:-default}; `$${` is a literal `${`."""
        if "$" not in text:
            return text
        out: list[str] = []
        i = 0
        n = len(text)
        whole = False
        failed = False
        while i < n:
            j = text.find("$", i)
            if j < 0:
                out.append(text[i:])
                break
            out.append(text[i:j])
            if text.startswith("$${", j):
                out.append("${")
                i = j + 3
                continue
            if not text.startswith("${", j):
                out.append("$")
                i = j + 1
                continue
            end = text.find("}", j + 2)
            if end < 0:
                self.report("unterminated ${...}: add '}' (or write $${ for a literal ${)", mark)
                out.append(text[j:])
                failed = True
                break
            match = _VAR_BODY.fullmatch(text, j + 2, end)
            if match is None:
                self.report(
                    f"{text[j : end + 1]!r} is not a variable reference like ${{NAME}} or "
                    "${NAME:-default} (write $${ for a literal ${)",
                    mark,
                )
                out.append(text[j : end + 1])
                failed = True
            else:
                name, default = match["name"], match["default"]
                if self.shipped and not name.startswith(SHIPPED_VARIABLE_PREFIX):
                    self.report(
                        f"${{{name}}}: a shipped profile may read only "
                        f"{SHIPPED_VARIABLE_PREFIX}* environment variables, so {name} is not "
                        "read (see docs/profiles.md)",
                        mark,
                    )
                    out.append(text[j : end + 1])
                    failed = True
                    i = end + 1
                    continue
                value = self.env.get(name)
                if value is None or (value == "" and default is not None):
                    if default is None:
                        self.report(
                            f"environment variable {name} is not set "
                            f"(set it, or give a default: ${{{name}:-value}})",
                            mark,
                        )
                        value = text[j : end + 1]
                        failed = True
                    else:
                        value = default
                out.append(value)
                whole = j == 0 and end == n - 1
            i = end + 1
        result = "".join(out)
        if plain and whole and not failed:
            # an unquoted value that is only ${VAR} reads as if its text had been written there
            return resolve_plain_scalar(result)
        return result


# --- merging --------------------------------------------------------------------------------------


def _merge_map(base: _Map, over: _Map, path: ConfigPath) -> _Map:
    merged = _merge(base, over, path)
    assert isinstance(merged, _Map)
    return merged


def _merge(base: _Node, over: _Node, path: ConfigPath) -> _Node:
    """`over` (the including file, or a later include) on top of `base`."""
    if isinstance(base, _Map) and isinstance(over, _Map):
        entries = dict(base.entries)
        for key, (key_mark, value) in over.entries.items():
            if key in entries:
                entries[key] = (key_mark, _merge(entries[key][1], value, (*path, key)))
            else:
                entries[key] = (key_mark, value)
        return _Map(entries, over.mark)
    if isinstance(base, _Seq) and isinstance(over, _Seq):
        if path in TAGGED_LISTS:
            return _Seq(_merge_tagged(base.items, over.items), over.mark)
        if path in RULE_LISTS:
            return _Seq(over.items + base.items, over.mark)
    return over


def _tag_of(node: _Node) -> str | None:
    if isinstance(node, _Map) and "tag" in node.entries:
        tag = node.entries["tag"][1]
        if isinstance(tag, _Scalar) and isinstance(tag.value, str):
            return tag.value
    return None


def _merge_tagged(base: list[_Node], over: list[_Node]) -> list[_Node]:
    result = list(base)
    where: dict[str, int] = {}
    for index, item in enumerate(result):
        tag = _tag_of(item)
        if tag is not None:
            where.setdefault(tag, index)
    for item in over:
        tag = _tag_of(item)
        if tag is not None and tag in where:
            # replace the included entry whole, keeping its place; a second entry with the same
            # tag is appended so validation reports the duplicate
            result[where.pop(tag)] = item
        else:
            result.append(item)
    return result


def _flatten(node: _Node, path: ConfigPath, marks: dict[ConfigPath, Mark]) -> Any:
    if isinstance(node, _Scalar):
        return node.value
    if isinstance(node, _Seq):
        out_list = []
        for index, item in enumerate(node.items):
            marks[(*path, index)] = item.mark
            out_list.append(_flatten(item, (*path, index), marks))
        return out_list
    out: dict[str, Any] = {}
    for key, (key_mark, value) in node.entries.items():
        if isinstance(value, _Scalar) and value.value is None:
            continue  # an empty value counts as absent (and removes an included one)
        marks[(*path, key)] = key_mark
        out[key] = _flatten(value, (*path, key), marks)
    return out
