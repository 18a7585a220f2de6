"""`domain_regex` patterns: RE2, the syntax and linear-time guarantee of sing-box's Go regexp.

sing-box compiles `domain_regex` with Go's `regexp`, which is RE2: no backreferences, no
lookaround, and matching time linear in the name's length whatever the pattern. Python's `re`
backtracks, so a pattern like `(a+)+$` from a downloaded rule set could hold the event loop for
minutes on one long name, and it accepts patterns sing-box refuses. ztun therefore matches with
RE2 (the `google-re2` package) and refuses what RE2 refuses.

All of a rule's patterns go into one `RE2::Set`, which finds every matching pattern in a single
pass over the name: for three patterns, 0.5 µs per name against 2 µs for three searches through
`re2.compile(...).search` (whose wrapper converts offsets on each call). The `Set` and `RE2`
classes come from the package's binding module `re2._re2`, the layer its own `re2` module
is written on.

If `google-re2` cannot be imported, `ENGINE` is `"re"` and Python's `re` is used instead;
`FALLBACK_WARNING` is what `ztun check` and `ztun run` then say.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from typing import Any

#: Which engine matches `domain_regex`: "re2", or "re" when google-re2 is missing. Only looked
#: up here: the binding itself (~2.4 MiB resident) loads with the first pattern (`_binding`), so
#: a config without `domain_regex` never pays for it.
ENGINE = "re2" if importlib.util.find_spec("re2") is not None else "re"
_re2: Any = None


def _binding() -> Any:
    global _re2
    if _re2 is None:
        from re2 import _re2 as binding

        _re2 = binding
    return _re2


FALLBACK_WARNING = (
    "the google-re2 package is not installed: domain_regex is matched with Python's re, which "
    "accepts patterns sing-box refuses and can take exponential time on a hostile pattern; "
    "install google-re2"
)
#: Memory RE2 may use for one pattern (its default) and for one rule's set of patterns. A
#: pattern over the limit is refused ("pattern too large"); a set over it falls back to one
#: RE2 per pattern.
PATTERN_MAX_MEM = 8 << 20
SET_MAX_MEM = 64 << 20


def _options(max_mem: int) -> Any:
    options = _binding().RE2.Options()
    options.log_errors = False  # RE2 would print every refused pattern to stderr
    options.never_capture = True
    options.max_mem = max_mem
    return options


def pattern_error(pattern: str, *, engine: str | None = None) -> str | None:
    """Why `pattern` cannot be a `domain_regex` (RE2's words), or None when it can."""
    if (engine or ENGINE) == "re2":
        text = pattern.encode("utf-8", "surrogatepass")
        compiled = _binding().RE2(text, _options(PATTERN_MAX_MEM))
        if compiled.ok():
            return None
        error = compiled.error()
        return error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return None


class RegexSet:
    """Patterns (each already accepted by `pattern_error`) matched together, unanchored.

    `first(name)` is the index of the first pattern that matches somewhere in `name` (Go's
    `MatchString`), or None.
    """

    __slots__ = ("_engine", "_patterns", "_set", "_singles")

    def __init__(self, patterns: Iterable[str], *, engine: str | None = None) -> None:
        self._engine = engine or ENGINE
        self._patterns = list(patterns)
        self._set: Any = None
        self._singles: list[Any] = []
        if self._engine != "re2":
            self._singles = [re.compile(p) for p in self._patterns]
            return
        re2 = _binding()
        unanchored = re2.RE2.Anchor.UNANCHORED
        candidate = re2.Set(unanchored, _options(SET_MAX_MEM))
        for pattern in self._patterns:
            if candidate.Add(_utf8(pattern)) < 0:
                raise ValueError(f"not an RE2 pattern: {pattern!r}")
        if self._patterns and candidate.Compile():
            self._set = candidate
        else:
            self._singles = [re2.RE2(_utf8(p), _options(PATTERN_MAX_MEM)) for p in self._patterns]

    def first(self, name: str) -> int | None:
        if self._engine != "re2":
            for index, pattern in enumerate(self._singles):
                if pattern.search(name):
                    return index
            return None
        data = _utf8(name)
        if self._set is not None:
            hits = self._set.Match(data)
            return min(hits) if hits else None
        unanchored = _re2.RE2.Anchor.UNANCHORED
        for index, pattern in enumerate(self._singles):
            if pattern.Match(unanchored, data, 0, len(data))[0][0] >= 0:
                return index
        return None


def _utf8(text: str) -> bytes:
    # A sniffed name may hold anything; a lone surrogate must not raise in the matcher.
    return text.encode("utf-8", "replace")
