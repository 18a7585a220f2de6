"""Loading `route.rule_set` entries: inline rules, local files, and remote files with a cache.

This is the I/O half of rule sets (the parsers in ztun.route.ruleset are pure). Remote rule sets
are downloaded with urllib (bounded time and size) and cached in the cache directory: the body
in `rule-set-<hash of url>.data`, and a JSON sidecar `rule-set-<hash>.json` holding the fetch
time and the ETag / Last-Modified validators for conditional requests. A cached copy younger
than `update_interval` is used without asking the server; an older one is revalidated; when the
server cannot be reached the cached copy is used with a warning. Every connection, direct or
through a socks detour, carries auto_route's own mark when it is set (`runtime/dial.py`).

Every problem becomes a `Diagnostic` whose path points at the rule-set entry in the config
(e.g. `("route", "rule_set", 2, "url")`); nothing here raises for a user mistake.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztun import __version__
from ztun.config.duration import parse_duration
from ztun.errors import ConfigPath, Diagnostic
from ztun.route.ruleset import RuleSetError, parse_rule_set
from ztun.runtime.dial import OWN

#: Larger rule-set files are refused (local and remote).
MAX_RULE_SET_BYTES = 64 * 1024 * 1024
#: sing-box's default `update_interval`.
DEFAULT_UPDATE_INTERVAL = 86400.0
USER_AGENT = f"ztun/{__version__}"
BINARY_HINT = (
    "binary .srs rule sets are not supported; use `sing-box rule-set decompile` to get the "
    "source JSON"
)
FORMATS = ("source", "clash", "domains")
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
    timeout: float = 10.0,
    offline: bool = False,
    outbounds: Sequence[Mapping[str, Any]] = (),
) -> RuleSetLoadResult:
    """Load every `route.rule_set` entry.

    `base_dir` resolves relative `path`s (the config file's directory); `now` is the wall-clock
    time used for cache ages (default: the current time); `timeout` bounds each download as a
    whole; `offline=True` never downloads (remote sets come from the cache or are skipped with
    a warning), which is what `ztun check` uses. `outbounds` are the config's outbounds, for
    `download_detour`.
    """
    loader = _RuleSetLoader(
        base_dir=Path(base_dir),
        cache_dir=Path(cache_dir),
        now=time.time() if now is None else now,
        timeout=timeout,
        offline=offline,
        outbounds={str(o.get("tag")): o for o in outbounds if isinstance(o, Mapping)},
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
        if fmt == "binary":
            key = "format" if "format" in entry else location_key
            self.error(BINARY_HINT, (*where, key))
            return
        if fmt not in FORMATS:
            self.error(f"'{fmt}' is not a rule-set format (source, clash or domains)",
                       (*where, "format"))  # fmt: skip
            return
        behavior = entry.get("behavior", "classical")
        if behavior not in BEHAVIORS:
            self.error(f"'{behavior}' is not a clash behavior (domain, ipcidr or classical)",
                       (*where, "behavior"))  # fmt: skip
            return
        if "behavior" in entry and fmt != "clash":
            self.warn("'behavior' only applies to format: clash; ignored", (*where, "behavior"))
        if kind == "local":
            data = self._read_local(location, (*where, "path"))
        else:
            data = self._remote(entry, location, fmt, behavior, where)
        if data is not None:
            rules = self._parse(data, fmt, behavior, location, (*where, location_key))
            if rules is not None:
                self.result.sets[tag] = rules

    def _parse(
        self, data: bytes, fmt: str, behavior: str, label: str, path: ConfigPath
    ) -> HeadlessRules | None:
        try:
            parsed = _parse_bytes(data, fmt, behavior)
        except RuleSetError as exc:
            self.error(f"{label}: {exc}", path)
            return None
        for warning in parsed.warnings:
            self.warn(f"{label}: {warning}", path)
        return parsed.rules

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
        opener = _direct_opener()
        detour = entry.get("download_detour")
        if detour not in (None, ""):
            outbound = self.outbounds.get(str(detour))
            kind = outbound.get("type") if outbound is not None else None
            if kind == "socks":
                opener = _socks_opener(outbound)  # type: ignore[arg-type]
            elif kind == "block":
                self.error(f"download_detour '{detour}' is a block outbound: the rule set "
                           "could never be downloaded", (*where, "download_detour"))  # fmt: skip
                return None
            # direct (or an unknown tag, which the validator reports): download directly
        cache = _Cache(self.cache_dir, url)
        cached = cache.load()
        if self.offline:
            if cached is None:
                self.warn("remote rule set not cached yet; not checked", url_path)
            return cached.data if cached else None
        if cached is not None and 0 <= self.now - cached.fetched_at < interval:
            return cached.data
        try:
            response = _download(
                url,
                etag=cached.etag if cached else None,
                last_modified=cached.last_modified if cached else None,
                timeout=self.timeout,
                opener=opener,
            )
        except _DownloadError as exc:
            if cached is None:
                self.error(f"cannot download {url}: {exc}; there is no cached copy", url_path)
                return None
            self.warn(f"cannot download {url}: {exc}; using the copy cached "
                      f"{_age(self.now - cached.fetched_at)} ago", url_path)  # fmt: skip
            return cached.data
        if response.status == 304 and cached is not None:
            cache.store(cached.data, self.now, cached.etag, cached.last_modified, meta_only=True)
            return cached.data
        if response.status == 304:
            # A 304 we did not ask for (no validators sent): nothing usable.
            self.error(f"cannot download {url}: the server answered 304 Not Modified "
                       "to an unconditional request", url_path)  # fmt: skip
            return None
        try:
            _parse_bytes(response.body, fmt, behavior)
        except RuleSetError as exc:
            if cached is None:
                return response.body  # the caller reports the parse error
            self.warn(f"{url}: the downloaded copy is unusable ({exc}); using the copy "
                      f"cached {_age(self.now - cached.fetched_at)} ago", url_path)  # fmt: skip
            return cached.data
        try:
            cache.store(response.body, self.now, response.etag, response.last_modified)
        except OSError as exc:
            self.warn(f"cannot write the rule-set cache in {self.cache_dir}: "
                      f"{exc.strerror or exc}", url_path)  # fmt: skip
        return response.body


def _parse_bytes(data: bytes, fmt: str, behavior: str) -> Any:
    if data.startswith(b"SRS"):
        raise RuleSetError(BINARY_HINT)
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
            _write_atomic(self.data_path, data)
        meta = {"url": self.url, "fetched_at": fetched_at, "etag": etag,
                "last_modified": last_modified, "size": len(data)}  # fmt: skip
        _write_atomic(self.meta_path, json.dumps(meta, indent=1).encode("utf-8"))


def _write_atomic(path: Path, data: bytes) -> None:
    # Write then rename, so a crash or a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _MarkedDialer:
    """python-socks' `forward` hook: the TCP connection to the proxy, marked."""

    def connect(self, dest_host: str, dest_port: int, timeout: float | None = None,
                **_: Any) -> Any:  # fmt: skip
        return OWN.create_connection((dest_host, dest_port), timeout)


class _MarkedHTTP(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # http.client's documented seam for how the socket is made.
        self._create_connection = OWN.create_connection  # type: ignore[method-assign]


class _MarkedHTTPS(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = OWN.create_connection  # type: ignore[method-assign]


def _direct_opener() -> urllib.request.OpenerDirector:
    """urllib's default opener (environment proxies included), its sockets marked."""

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(_MarkedHTTP, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(_MarkedHTTPS, req, context=self._context)  # type: ignore[attr-defined]

    return urllib.request.build_opener(HTTP(), HTTPS())


def _socks_opener(outbound: Mapping[str, Any]) -> urllib.request.OpenerDirector:
    """A urllib opener whose connections go through the `socks` outbound `outbound`.

    python-socks' synchronous client does the SOCKS handshake (the domain goes to the proxy
    unresolved); urllib keeps doing HTTP, TLS, redirects and conditional requests. Start-up
    code is synchronous, so the asyncio outbound is not used here.
    """
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

    class ProxiedHTTP(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = through_proxy(self.host, self.port, self.timeout)

    class ProxiedHTTPS(http.client.HTTPSConnection):
        def connect(self) -> None:
            raw = through_proxy(self.host, self.port, self.timeout)
            self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]

    class HTTPViaSocks(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(ProxiedHTTP, req)

    class HTTPSViaSocks(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(ProxiedHTTPS, req, context=self._context)  # type: ignore[attr-defined]

    # No ProxyHandler: environment proxy variables must not reroute a configured detour.
    opener = urllib.request.OpenerDirector()
    for handler in (HTTPViaSocks(), HTTPSViaSocks(), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler()):
        opener.add_handler(handler)  # fmt: skip
    return opener


def _download(
    url: str,
    *,
    etag: str | None,
    last_modified: str | None,
    timeout: float,
    opener: urllib.request.OpenerDirector | None = None,
) -> _Response:
    """GET `url` (conditionally when validators are given) within `timeout` seconds overall."""
    limit = MAX_RULE_SET_BYTES
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if etag:
        request.add_header("If-None-Match", etag)
    if last_modified:
        request.add_header("If-Modified-Since", last_modified)
    deadline = time.monotonic() + timeout
    try:
        open_url = opener.open if opener is not None else urllib.request.urlopen
        with open_url(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise _DownloadError(f"the file is larger than {limit // (1024 * 1024)} MiB")
            chunks: list[bytes] = []
            size = 0
            while True:
                # A server that trickles bytes must not hold ztun's start-up forever.
                if time.monotonic() > deadline:
                    raise _DownloadError(f"timed out after {timeout:g}s")
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise _DownloadError(f"the file is larger than {limit // (1024 * 1024)} MiB")
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
        raise _DownloadError(f"timed out after {timeout:g}s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _DownloadError(str(exc) or type(exc).__name__) from None
