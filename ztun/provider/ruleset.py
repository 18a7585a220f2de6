"""Loading `route.rule_set` entries: inline rules, local files, and remote files with a cache.

This is the I/O half of rule sets (the parsers in ztun.route.ruleset are pure). Remote rule sets
are downloaded with urllib (bounded time and size) and cached in the cache directory: the body
in `rule-set-<hash of url>.data`, and a JSON sidecar `rule-set-<hash>.json` holding the fetch
time and the ETag / Last-Modified validators for conditional requests. A cached copy younger
than `update_interval` is used without asking the server; an older one is revalidated; when the
server cannot be reached the cached copy is used with a warning. Every connection, direct or
through a socks detour, carries auto_route's own mark when it is set (`runtime/dial.py`).
`ztun run` never waits for the
network when a copy is cached: it starts on that copy and `RuleSetRefresher` revalidates it in a
background thread (a refreshed copy is used from the next start).

A download has one overall deadline (`DOWNLOAD_TIMEOUT`): at that moment the caller gets an error
and every socket of the download is shut down, so a server that trickles a byte every few
seconds, in its headers or its body, cannot extend it. It never holds more than
`MAX_RULE_SET_BYTES` of a body in memory. sing-box has no option for either; both are constants.

Every problem becomes a `Diagnostic` whose path points at the rule-set entry in the config
(e.g. `("route", "rule_set", 2, "url")`); nothing here raises for a user mistake.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ztun import __version__
from ztun.config.duration import parse_duration
from ztun.errors import ConfigPath, Diagnostic
from ztun.provider.compiled_cache import CompiledCache
from ztun.route.compact import pack_rules
from ztun.route.compiled import cache_key
from ztun.route.ruleset import RuleSetError, parse_rule_set
from ztun.route.source_stream import parse_source_bytes
from ztun.route.srs import is_binary, parse_binary
from ztun.runtime.cache_file import write_atomic
from ztun.runtime.child import in_child
from ztun.runtime.dial import OWN

if TYPE_CHECKING:
    import urllib.request


#: Larger rule-set files are refused (local and remote).
MAX_RULE_SET_BYTES = 64 * 1024 * 1024
#: One download (name lookup, connect, TLS, headers, body), start to end, in seconds.
DOWNLOAD_TIMEOUT = 10.0
#: sing-box's default `update_interval`.
DEFAULT_UPDATE_INTERVAL = 86400.0
USER_AGENT = f"ztun/{__version__}"
log = logging.getLogger("ztun.provider")
FORMATS = ("source", "binary", "clash", "domains")
BEHAVIORS = ("domain", "ipcidr", "classical")

HeadlessRules = list[dict[str, Any]]


@dataclass
class RuleSetLoadResult:
    """Each loaded set's headless rules by tag, and every problem met on the way.

    A set that could not be loaded is still present (with no rules) so that rules naming it
    do not also report an unknown tag; its error is in `diagnostics`.
    """

    sets: dict[str, HeadlessRules] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    #: remote sets to revalidate in the background (`RuleSetRefresher`), when asked for
    refresh: list[RuleSetRefresh] = field(default_factory=list)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ztun, or ~/.cache/ztun (a relative XDG_CACHE_HOME is ignored, per XDG)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "ztun"


def load_rule_sets(
    entries: Sequence[Mapping[str, Any]],
    *,
    base_dir: Path,
    cache_dir: Path,
    now: float | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
    offline: bool = False,
    outbounds: Sequence[Mapping[str, Any]] = (),
    refresh_in_background: bool = False,
) -> RuleSetLoadResult:
    """Load every `route.rule_set` entry.

    `base_dir` resolves relative `path`s (the config file's directory); `now` is the wall-clock
    time used for cache ages (default: the current time); `timeout` bounds each download as a
    whole; `offline=True` never downloads (remote sets come from the cache or are skipped with
    a warning), which is what `ztun check` uses. `outbounds` are the config's outbounds, for
    `download_detour`. With `refresh_in_background=True` (`ztun run`) a cached copy is used
    whatever its age, and every remote set is listed in `result.refresh` for a
    `RuleSetRefresher`; only a set with no cached copy is downloaded here.
    """
    loader = _RuleSetLoader(
        base_dir=Path(base_dir),
        cache_dir=Path(cache_dir),
        now=time.time() if now is None else now,
        timeout=timeout,
        offline=offline,
        outbounds={str(o.get("tag")): o for o in outbounds if isinstance(o, Mapping)},
        refresh_in_background=refresh_in_background,
    )
    for index, entry in enumerate(entries):
        loader.load(index, entry)
    return loader.result


@dataclass
class _Cached:
    data: bytes
    fetched_at: float
    etag: str | None
    last_modified: str | None


@dataclass
class _Response:
    status: int
    body: bytes = b""
    etag: str | None = None
    last_modified: str | None = None


class _DownloadError(Exception):
    """A download that failed; the message says why, for the user."""


@dataclass
class _RuleSetLoader:
    base_dir: Path
    cache_dir: Path
    now: float
    timeout: float
    offline: bool
    outbounds: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    refresh_in_background: bool = False
    result: RuleSetLoadResult = field(default_factory=RuleSetLoadResult)

    def error(self, message: str, path: ConfigPath) -> None:
        self.result.diagnostics.append(Diagnostic(message, path))

    def warn(self, message: str, path: ConfigPath) -> None:
        self.result.diagnostics.append(Diagnostic(message, path, severity="warning"))

    # -- one entry ----------------------------------------------------------------------------

    def load(self, index: int, entry: Mapping[str, Any]) -> None:
        where: ConfigPath = ("route", "rule_set", index)
        if not isinstance(entry, Mapping):
            self.error("a rule set must be a mapping", where)
            return
        tag = entry.get("tag")
        if not isinstance(tag, str) or not tag:
            self.error("a rule set needs a tag", (*where, "tag"))
            return
        if tag in self.result.sets:
            self.error(f"rule set tag '{tag}' is used twice", (*where, "tag"))
            return
        self.result.sets[tag] = []
        kind = entry.get("type")
        if kind == "inline":
            rules = entry.get("rules")
            if isinstance(rules, list):
                self.result.sets[tag] = list(rules)
            else:
                self.error("an inline rule set needs 'rules': a list of rules", (*where, "rules"))
            return
        if kind not in ("local", "remote"):
            self.error(f"'{kind}' is not a rule-set type (inline, local or remote)",
                       (*where, "type"))  # fmt: skip
            return
        location_key = "path" if kind == "local" else "url"
        location = entry.get(location_key)
        if not isinstance(location, str) or not location:
            self.error(f"a {kind} rule set needs '{location_key}'", (*where, location_key))
            return
        fmt = entry.get("format")
        if fmt is None:
            # sing-box picks the format from the extension; .json and anything else is source.
            fmt = "binary" if _extension(location) == ".srs" else "source"
        if fmt not in FORMATS:
            self.error(f"'{fmt}' is not a rule-set format (source, binary, clash or domains)",
                       (*where, "format"))  # fmt: skip
            return
        behavior = entry.get("behavior", "classical")
        if behavior not in BEHAVIORS:
            self.error(f"'{behavior}' is not a clash behavior (domain, ipcidr or classical)",
                       (*where, "behavior"))  # fmt: skip
            return
        if "behavior" in entry and fmt != "clash":
            self.warn("'behavior' only applies to format: clash; ignored", (*where, "behavior"))
        reread = None
        if kind == "local":
            source = [self._read_local(location, (*where, "path"))]
            reread = partial(self._read_local, location, (*where, "path"))
        else:
            source = [self._remote(entry, location, fmt, behavior, where)]
        if source[0] is not None:
            rules = self._parse(source, fmt, behavior, location, (*where, location_key), reread)
            if rules is not None:
                self.result.sets[tag] = rules

    def _parse(
        self, source: list[bytes | None], fmt: str, behavior: str, label: str, path: ConfigPath,
        reread: Callable[[], bytes | None] | None = None,
    ) -> HeadlessRules | None:  # fmt: skip
        # A big set whose source did not change is read back compiled (`compiled_cache`);
        # otherwise parsed, its big lists packed (`route.compact`), and cached for next time.
        data = source.pop()  # the only reference to the bytes from here on
        assert data is not None
        cache = CompiledCache(self.cache_dir)
        key = cache_key(data, fmt, behavior) if cache.wanted(data) else None
        hit = None
        if key is not None and reread is not None and cache.path(key).is_file():
            # A local file can be read again: its bytes go before the compiled file is read,
            # so a warm start's peak is that file and its tables, not the source as well
            # (22 MiB less per million entries). Only a compiled file that turns out unusable
            # costs a second read.
            del data
            hit = cache.load(key)
            if hit is None:
                data = reread()
                if data is None:
                    return None
                key = cache_key(data, fmt, behavior) if cache.wanted(data) else None
        elif key is not None:
            hit = cache.load(key)
        if hit is None and key is not None and _parse_in_child(cache, key, data, fmt, behavior):
            hit = cache.load(key)  # None only if the file went away since: parse here
        if hit is not None:
            rules, warnings = hit
        else:
            try:
                parsed = _parse_packed(data, fmt, behavior)
            except RuleSetError as exc:
                self.error(f"{label}: {exc}", path)
                return None
            rules, warnings = parsed.rules, parsed.warnings
            if key is not None:
                cache.store(key, rules, warnings)
        for warning in warnings:
            self.warn(f"{label}: {warning}", path)
        return rules

    # -- local files ----------------------------------------------------------------------------

    def _read_local(self, location: str, path: ConfigPath) -> bytes | None:
        file = Path(location).expanduser()
        if not file.is_absolute():
            file = self.base_dir / file
        try:
            with file.open("rb") as f:
                data = f.read(MAX_RULE_SET_BYTES + 1)  # one more byte tells "too large"
        except OSError as exc:
            reason = exc.strerror or str(exc)
            self.error(f"cannot read rule-set file {file}: {reason}", path)
            return None
        if len(data) > MAX_RULE_SET_BYTES:
            self.error(f"rule-set file {file} is larger than "
                       f"{MAX_RULE_SET_BYTES // (1024 * 1024)} MiB", path)  # fmt: skip
            return None
        return data

    # -- remote files ---------------------------------------------------------------------------

    def _remote(
        self,
        entry: Mapping[str, Any],
        url: str,
        fmt: str,
        behavior: str,
        where: ConfigPath,
    ) -> bytes | None:
        url_path = (*where, "url")
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            self.error(f"'{url}' is not an http:// or https:// URL", url_path)
            return None
        interval = DEFAULT_UPDATE_INTERVAL
        if "update_interval" in entry:
            try:
                interval = parse_duration(entry["update_interval"])
            except ValueError as exc:
                self.error(str(exc), (*where, "update_interval"))
                return None
        socks = None
        detour = entry.get("download_detour")
        if detour not in (None, ""):
            outbound = self.outbounds.get(str(detour))
            kind = outbound.get("type") if outbound is not None else None
            if kind == "socks":
                socks = outbound
            elif kind == "block":
                self.error(f"download_detour '{detour}' is a block outbound: the rule set "
                           "could never be downloaded", (*where, "download_detour"))  # fmt: skip
                return None
            # direct (or an unknown tag, which the validator reports): download directly
        job = RuleSetRefresh(str(entry.get("tag")), url, fmt, behavior, interval, socks,
                             _Cache(self.cache_dir, url), self.timeout)  # fmt: skip
        cached = job.cache.load()
        if self.offline:
            if cached is None:
                self.warn("remote rule set not cached yet; not checked", url_path)
            return cached.data if cached else None
        if cached is not None:
            fresh = 0 <= self.now - cached.fetched_at < interval
            if fresh or self.refresh_in_background:
                # Start-up never waits for the network when a copy is cached.
                job.next_at = cached.fetched_at + interval if fresh else self.now
                if self.refresh_in_background:
                    self.result.refresh.append(job)
                return cached.data
        data, findings = job.fetch(cached, self.now)
        for severity, message in findings:
            self.result.diagnostics.append(Diagnostic(message, url_path, severity=severity))
        if self.refresh_in_background:
            job.next_at = self.now + interval
            self.result.refresh.append(job)
        return data


@dataclass
class RuleSetRefresh:
    """One remote rule set: how to download it, and when it is due again (wall clock)."""

    tag: str
    url: str
    fmt: str
    behavior: str
    interval: float
    socks: Mapping[str, Any] | None
    cache: _Cache
    timeout: float = DOWNLOAD_TIMEOUT
    next_at: float = 0.0

    def fetch(self, cached: _Cached | None, now: float) -> tuple[bytes | None, list[Finding]]:
        """Download (conditionally on `cached`), check and cache the set: the copy to use
        (None: none) and what to tell the user, as (severity, message) pairs."""
        url = self.url
        try:
            response = _download(
                url,
                etag=cached.etag if cached else None,
                last_modified=cached.last_modified if cached else None,
                timeout=self.timeout,
                socks=self.socks,
            )
        except _DownloadError as exc:
            if cached is None:
                return None, [("error", f"cannot download {url}: {exc}; there is no cached copy")]
            return cached.data, [("warning", f"cannot download {url}: {exc}; using the copy "
                                  f"cached {_age(now - cached.fetched_at)} ago")]  # fmt: skip
        if response.status == 304 and cached is not None:
            problem = self._store(cached.data, now, cached.etag, cached.last_modified,
                                  meta_only=True)  # fmt: skip
            return cached.data, problem
        if response.status == 304:
            # A 304 we did not ask for (no validators sent): nothing usable.
            return None, [("error", f"cannot download {url}: the server answered 304 Not "
                           "Modified to an unconditional request")]  # fmt: skip
        try:
            parsed = _parse_packed(response.body, self.fmt, self.behavior)
        except RuleSetError as exc:
            if cached is None:
                return response.body, []  # the caller reports the parse error
            return cached.data, [("warning", f"{url}: the downloaded copy is unusable ({exc}); "
                                  f"using the copy cached {_age(now - cached.fetched_at)} "
                                  "ago")]  # fmt: skip
        problem = self._store(response.body, now, response.etag, response.last_modified)
        # Parsed already: compiled now, the loader (and the next start) reads it back.
        cache = CompiledCache(self.cache.directory)
        if cache.wanted(response.body):
            cache.store(cache_key(response.body, self.fmt, self.behavior), parsed.rules,
                        parsed.warnings)  # fmt: skip
        return response.body, problem

    def _store(self, data: bytes, now: float, etag: str | None, last_modified: str | None,
               *, meta_only: bool = False) -> list[Finding]:  # fmt: skip
        # A read-only or full cache directory costs the cache, never the rule set.
        try:
            self.cache.store(data, now, etag, last_modified, meta_only=meta_only)
        except OSError as exc:
            return [("warning", f"cannot write the rule-set cache in {self.cache.directory}: "
                     f"{exc.strerror or exc}; the set is used without caching it")]  # fmt: skip
        return []

    def refresh(self, now: float) -> list[Finding]:
        """Revalidate the cached copy now (background refresh); what to log."""
        self.next_at = now + self.interval
        cached = self.cache.load()
        data, findings = self.fetch(cached, now)
        if not findings and data is not None and cached is not None and data != cached.data:
            findings.append(("info", f"rule set '{self.tag}' updated from {self.url}; the new "
                             "copy is used from the next start"))  # fmt: skip
        return findings


Finding = tuple[str, str]


class RuleSetRefresher:
    """Revalidates remote rule sets in a daemon thread: each at once when its cached copy is
    stale, then every `update_interval`. Downloads are bounded by their deadline, so `stop()`
    returns at once and the process never waits for the network on exit."""

    def __init__(self, jobs: Sequence[RuleSetRefresh], *, clock: Any = time.time) -> None:
        self.jobs = list(jobs)
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.jobs and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ztun-rule-set-refresh",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end (tests); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def run_due(self) -> None:
        """Refresh every set that is due, logging what happened."""
        for job in self.jobs:
            if self._stop.is_set():
                return
            if self._clock() >= job.next_at:
                for severity, message in job.refresh(self._clock()):
                    level = {"error": logging.WARNING, "warning": logging.WARNING}.get(
                        severity, logging.INFO)  # fmt: skip
                    log.log(level, "rule set '%s': %s", job.tag, message)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
            except Exception:  # a bug here must not end the refreshing silently
                log.exception("rule-set refresh failed")
            wait = min(job.next_at for job in self.jobs) - self._clock()
            if self._stop.wait(min(max(wait, 1.0), 3600.0)):
                return


def guess_format(location: str, data: bytes = b"") -> str:
    """The format sing-box assumes for a file: binary for a .srs name (or bytes starting with
    `SRS`), source otherwise."""
    return "binary" if _extension(location) == ".srs" or is_binary(data) else "source"


def read_rule_set_file(path: Path) -> bytes:
    """A rule-set file's bytes, refusing one larger than `MAX_RULE_SET_BYTES`.
    Raises RuleSetError naming the file."""
    try:
        with Path(path).expanduser().open("rb") as f:
            data = f.read(MAX_RULE_SET_BYTES + 1)
    except OSError as exc:
        raise RuleSetError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_RULE_SET_BYTES:
        raise RuleSetError(f"{path} is larger than {_size(MAX_RULE_SET_BYTES)}")
    return data


def parse_rule_set_bytes(data: bytes, fmt: str, behavior: str = "classical") -> Any:
    """A file's bytes in format `fmt` → `ParsedRuleSet`; RuleSetError when it does not parse."""
    if fmt not in FORMATS:
        raise RuleSetError(f"'{fmt}' is not a rule-set format (source, binary, clash or domains)")
    return _parse_bytes(data, fmt, behavior)


#: Sources at least this big are parsed in a child process on a first start (see
#: `_parse_in_child`).
CHILD_PARSE_BYTES = 4 * 1024 * 1024


def _parse_in_child(cache: CompiledCache, key: bytes, data: bytes, fmt: str,
                    behavior: str) -> bool:  # fmt: skip
    """Parse a big source in a forked child that writes the compiled cache, so this process
    reads the compiled form as on a warm start; True when the compiled file is there.

    Why: parsing leaves the heap fragmented by millions of short-lived objects, which no
    collection or malloc_trim hands back; at 1.8M entries a first start ended 12.6 MiB above
    a restart of the same config (84.7 against 72.1 MiB), and its peak stayed in the process.
    In a child (ztun.runtime.child: only where a fork is safe; a reload runs in a thread and
    parses here) both go when it exits. A child that fails, or a cache that cannot be
    written, leaves the parse to this process, so every error reads as before.
    """
    if len(data) < CHILD_PARSE_BYTES:
        return False

    def parse() -> bool:
        parsed = _parse_packed(data, fmt, behavior)
        cache.store(key, parsed.rules, parsed.warnings)
        return cache.path(key).is_file()

    return in_child(parse) and cache.path(key).is_file()


def _parse_packed(data: bytes, fmt: str, behavior: str) -> Any:
    """`_parse_bytes` with the big lists packed (`compact.pack_rules`). A source set is read
    as a stream (`route.source_stream`): its entries are never all objects at once, so a
    1.8M-entry set peaks at ~90 MiB instead of ~275."""
    parsed = parse_source_bytes(data) if fmt == "source" and not is_binary(data) else None
    if parsed is None:
        parsed = _parse_bytes(data, fmt, behavior)
    pack_rules(parsed.rules)
    return parsed


def _parse_bytes(data: bytes, fmt: str, behavior: str) -> Any:
    if fmt == "binary":
        return parse_binary(data)
    if is_binary(data):
        raise RuleSetError("this is a sing-box binary rule set (.srs): set `format: binary`")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RuleSetError(f"not UTF-8 text (bad byte at offset {exc.start})") from None
    return parse_rule_set(text, fmt, behavior)  # type: ignore[arg-type]


def _extension(location: str) -> str:
    path = urllib.parse.urlsplit(location).path if "://" in location else location
    return Path(path).suffix.lower()


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


class _Cache:
    """One URL's cached body and its sidecar (fetch time and HTTP validators)."""

    def __init__(self, directory: Path, url: str) -> None:
        self.url = url
        self.directory = directory
        name = "rule-set-" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]
        self.data_path = directory / f"{name}.data"
        self.meta_path = directory / f"{name}.json"

    def load(self) -> _Cached | None:
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            data = self.data_path.read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("url") != self.url:
            return None
        fetched_at = meta.get("fetched_at")
        if isinstance(fetched_at, bool) or not isinstance(fetched_at, int | float):
            return None
        etag = meta.get("etag")
        last_modified = meta.get("last_modified")
        return _Cached(
            data,
            float(fetched_at),
            etag if isinstance(etag, str) else None,
            last_modified if isinstance(last_modified, str) else None,
        )

    def store(
        self,
        data: bytes,
        fetched_at: float,
        etag: str | None,
        last_modified: str | None,
        *,
        meta_only: bool = False,
    ) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not meta_only:
            write_atomic(self.data_path, [data])
        meta = {"url": self.url, "fetched_at": fetched_at, "etag": etag,
                "last_modified": last_modified, "size": len(data)}  # fmt: skip
        write_atomic(self.meta_path, [json.dumps(meta, indent=1).encode("utf-8")])




class _Deadline:
    """The sockets of one download, shut down together when its deadline passes.

    Shutting a socket down wakes a thread blocked on it at once (its recv reads end of file),
    so the download thread ends soon after the deadline too, and its buffer with it. Each
    socket is held as a duplicate taken when it connects: TLS wrapping detaches the original
    socket object, but a shutdown through any descriptor of a socket reaches it, in the middle
    of a handshake too.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: list[socket.socket] = []
        self.expired = False

    def track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            if not self.expired:
                self._handles.append(sock.dup())
                return sock
        sock.close()
        raise TimeoutError("deadline passed")

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            handles, self._handles = self._handles, []
        for handle in handles:
            with contextlib.suppress(OSError):
                handle.shutdown(socket.SHUT_RDWR)
            handle.close()


def _opener(deadline: _Deadline, socks: Mapping[str, Any] | None) -> urllib.request.OpenerDirector:
    """A urllib opener whose every connection `deadline` can cut; through the `socks` outbound
    when one is given (python-socks' synchronous client does the SOCKS handshake, the domain
    goes to the proxy unresolved; urllib keeps doing HTTP, TLS, redirects and conditional
    requests; start-up code is synchronous, so the asyncio outbound is not used here).
    urllib.request and http.client are imported here, at the first download: with the email
    package they bring, 2 MiB of RSS a config without remote rule sets never needs."""
    import http.client
    import urllib.request

    through_proxy = _proxy_connector(socks) if socks is not None else None

    def connect(address: tuple[str, int], timeout: Any = None, *args: Any) -> socket.socket:
        if through_proxy is not None:
            return deadline.track(through_proxy(address[0], address[1], timeout))
        return deadline.track(OWN.create_connection(address, timeout, *args))

    # http.client opens every connection (and a CONNECT tunnel's) through _create_connection,
    # then wraps it for TLS: tracking it there covers the TLS handshake too.
    class TrackedHTTP(http.client.HTTPConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class TrackedHTTPS(http.client.HTTPSConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class HTTPTracked(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(TrackedHTTP, req)

    class HTTPSTracked(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(TrackedHTTPS, req, context=self._context)  # type: ignore[attr-defined]

    if through_proxy is None:
        # As urlopen: the environment's proxy variables apply to a direct download.
        return urllib.request.build_opener(HTTPTracked(), HTTPSTracked())
    # No ProxyHandler: environment proxy variables must not reroute a configured detour.
    opener = urllib.request.OpenerDirector()
    for handler in (
        HTTPTracked(),
        HTTPSTracked(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),
    ):
        opener.add_handler(handler)  # fmt: skip
    return opener


class _MarkedDialer:
    """python-socks' `forward` hook: the TCP connection to the proxy, marked."""

    def connect(self, dest_host: str, dest_port: int, timeout: float | None = None,
                **_: Any) -> Any:  # fmt: skip
        return OWN.create_connection((dest_host, dest_port), timeout)


def _proxy_connector(outbound: Mapping[str, Any]) -> Any:
    """(host, port, timeout) → a socket connected through the `socks` outbound `outbound`."""
    from python_socks import ProxyError, ProxyType
    from python_socks.sync import Proxy

    version = str(outbound.get("version", "5"))
    proxy = Proxy(
        ProxyType.SOCKS5 if version == "5" else ProxyType.SOCKS4,
        str(outbound.get("server")),
        int(outbound.get("server_port", 1080)),
        username=outbound.get("username"),
        password=outbound.get("password"),
        rdns=version != "4",
        # python-socks opens its own connection to the proxy; `forward` (the proxy that
        # reaches this one) is the only way to hand it one that carries the own mark.
        forward=_MarkedDialer(),  # type: ignore[arg-type]
    )

    def through_proxy(host: str, port: int, timeout: float | None) -> Any:
        try:
            return proxy.connect(host, port, timeout=timeout)
        except ProxyError as exc:  # a SOCKS reply refusing us; urllib only handles OSError
            raise OSError(f"via SOCKS5 proxy {outbound.get('tag')}: {exc}") from None

    return through_proxy


def _size(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _download(
    url: str,
    *,
    etag: str | None,
    last_modified: str | None,
    timeout: float,
    socks: Mapping[str, Any] | None = None,
) -> _Response:
    """GET `url` (conditionally when validators are given), all of it within `timeout` seconds.

    The transfer runs in a daemon thread and this one waits for it at most `timeout` seconds:
    the name lookup cannot be interrupted, and the socket timeout alone is per recv, so a byte
    every few seconds would renew it forever. At the deadline every socket of the transfer is
    shut down and the caller gets an error.
    """
    deadline = _Deadline()
    outcome: list[_Response | _DownloadError] = []
    done = threading.Event()

    def transfer() -> None:
        try:
            outcome.append(_transfer(url, etag, last_modified, timeout, _opener(deadline, socks)))
        except _DownloadError as exc:
            outcome.append(exc)
        except Exception as exc:  # a bug must become a message, not a hang of the caller
            outcome.append(_DownloadError(str(exc) or type(exc).__name__))
        finally:
            done.set()

    threading.Thread(target=transfer, name="ztun-rule-set-download", daemon=True).start()
    finished = done.wait(timeout)
    if not finished:
        deadline.expire()
        raise _DownloadError(f"no complete answer within {timeout:g}s")
    deadline.expire()  # nothing left open on any path
    result = outcome[0]
    if isinstance(result, _DownloadError):
        raise result
    return result


def _transfer(
    url: str,
    etag: str | None,
    last_modified: str | None,
    timeout: float,
    opener: urllib.request.OpenerDirector,
) -> _Response:
    import http.client
    import urllib.error
    import urllib.request

    limit = MAX_RULE_SET_BYTES
    too_large = f"refused: the file is larger than the {_size(limit)} limit for rule sets"
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if etag:
        request.add_header("If-None-Match", etag)
    if last_modified:
        request.add_header("If-Modified-Since", last_modified)
    try:
        with opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise _DownloadError(too_large)
            chunks: list[bytes] = []
            size = 0
            while True:
                # Never more than one byte past the limit in memory.
                chunk = response.read(min(1 << 16, limit + 1 - size))
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise _DownloadError(too_large)
                chunks.append(chunk)
            return _Response(
                response.status,
                b"".join(chunks),
                response.headers.get("ETag"),
                response.headers.get("Last-Modified"),
            )
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return _Response(304)
        raise _DownloadError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _DownloadError(str(exc.reason)) from None
    except TimeoutError:
        # The socket's own timeout equals the overall deadline, and either may fire first:
        # one message for both.
        raise _DownloadError(f"no complete answer within {timeout:g}s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _DownloadError(str(exc) or type(exc).__name__) from None
