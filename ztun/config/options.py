"""The validated config as frozen dataclasses whose field names are the config keys.

Owns the step from validated config data (`LoadedConfig.data`) to typed options, done once by
the config layer (`build_options`), so that everything after it (box, inbounds, outbounds)
reads attributes instead of digging through mappings. Names follow sing-box's `option/`
package: `MixedInboundOptions`, `SocksOutboundOptions`, `DefaultRuleOptions`, …

Values come out parsed: durations as seconds (float), marks as int, TUN addresses as
`ipaddress` interfaces and networks, listable fields ("one value or a list") as tuples.
The schema has already checked shapes, so nothing here re-validates them; a conversion that
can still fail (a duration the schema's pattern lets through, an address like 999.0.0.1/30)
raises `ConfigError` with the path of the value, in config words.

Absent and null keys both take the field's default (the loader treats `key:` as absent).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from ztun.config.duration import parse_duration
from ztun.config.legacy_dns import is_legacy_server, legacy_server
from ztun.config.validate import format_path
from ztun.errors import ConfigError, ConfigPath, Diagnostic

T = TypeVar("T")
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: A converter turns one validated config value (at a path) into its typed form.
Converter = Callable[[Any, ConfigPath], Any]

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_UDP_TIMEOUT = 60.0
#: The tun inbound's `busy_poll` (runtime/busy_poll.py). Measured on the UDP echo through the
#: TUN: 100 µs never opened a window (the gaps without polling were longer), 200 µs did.
DEFAULT_BUSY_POLL = 200e-6
DEFAULT_TUN_MTU = 9000


def _fail(path: ConfigPath, message: str) -> ConfigError:
    return ConfigError([Diagnostic(f"{format_path(path)}: {message}", path)])


# -- converters (value, path) → typed value ------------------------------------------------


def _listable(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _strings(value: Any, path: ConfigPath) -> tuple[str, ...]:
    return tuple(str(v) for v in _listable(value))


def _ints(value: Any, path: ConfigPath) -> tuple[int, ...]:
    return tuple(int(v) for v in _listable(value))


def _items(value: Any, path: ConfigPath) -> tuple[Any, ...]:
    """A listable whose items stay as written (query types: names or numbers)."""
    return tuple(_listable(value))


def _duration(value: Any, path: ConfigPath) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _fail(path, str(e)) from None


def _mark(value: Any, path: ConfigPath) -> int:
    try:
        return int(value, 0) if isinstance(value, str) else int(value)
    except ValueError:
        raise _fail(path, f"{value!r} is not a routing mark") from None


def _interfaces(value: Any, path: ConfigPath) -> tuple[Interface, ...]:
    out = []
    for i, v in enumerate(_listable(value)):
        try:
            out.append(ipaddress.ip_interface(str(v)))
        except ValueError:
            where = (*path, i) if isinstance(value, list) else path
            raise _fail(where, f"{v!r} is not an address with a prefix length") from None
    return tuple(out)


def _networks(value: Any, path: ConfigPath) -> tuple[Network, ...]:
    out = []
    for i, v in enumerate(_listable(value)):
        try:
            # Host bits are allowed, as sing-box's netip.ParsePrefix(...).Masked() does.
            out.append(ipaddress.ip_network(str(v), strict=False))
        except ValueError:
            where = (*path, i) if isinstance(value, list) else path
            raise _fail(where, f"{v!r} is not an IP address or CIDR prefix") from None
    return tuple(out)


def _network(value: Any, path: ConfigPath) -> Network:
    return _networks(value, path)[0]


def _string_table(value: Any, path: ConfigPath) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({str(k): _strings(v, (*path, k)) for k, v in value.items()})


def _one(cls: type[Any]) -> Converter:
    return lambda value, path: build(cls, value, path)


def _many(cls: type[Any]) -> Converter:
    return lambda value, path: tuple(build(cls, v, (*path, i)) for i, v in enumerate(value))


def _by_type(table: Mapping[str, type[Any]], default: str | None = None) -> Converter:
    """A list of mappings whose class is chosen by their `type` key."""

    def convert(value: Any, path: ConfigPath) -> tuple[Any, ...]:
        return tuple(by_type(table, v, (*path, i), default) for i, v in enumerate(value))

    return convert


def _conv(convert: Converter, default: Any = None) -> Any:
    """A field read through `convert` (an immutable default; else use `field` itself, so that
    ruff still sees the default)."""
    return field(default=default, metadata={"convert": convert})


def _conv_factory(convert: Converter, factory: Callable[[], Any]) -> Any:
    return field(default_factory=factory, metadata={"convert": convert})


def _conv_required(convert: Converter) -> Any:
    return field(metadata={"convert": convert})


def build(cls: type[T], data: Mapping[str, Any], path: ConfigPath = ()) -> T:
    """An options object of `cls` from one validated mapping at `path`.

    Each field reads the config key of its own name; a field with a `convert` in its metadata
    gets its value through it. Keys the class does not know are ignored (the validator has
    reported them).
    """
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        value = data.get(f.name)
        if value is None:
            if f.default is MISSING and f.default_factory is MISSING:
                raise _fail(path, f"missing '{f.name}'")
            continue
        convert = f.metadata.get("convert")
        kwargs[f.name] = convert(value, (*path, f.name)) if convert else value
    return cls(**kwargs)


def by_type(
    table: Mapping[str, type[T]], data: Mapping[str, Any], path: ConfigPath, default: str | None
) -> T:
    """Options of the class that `table` has for the mapping's `type`."""
    kind = data.get("type", default)
    cls = table.get(str(kind))
    if cls is None:
        raise _fail((*path, "type"), f"unknown type {kind!r}")
    return build(cls, data, path)


# -- log ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LogOptions:
    level: str = "info"
    disabled: bool = False
    timestamp: bool = True  # as ztun has always logged; the schema and docs say so
    output: str | None = None


# -- inbounds -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class UserOptions:
    username: str
    password: str = ""


@dataclass(frozen=True, kw_only=True)
class MixedInboundOptions:
    type: Literal["mixed"] = "mixed"
    tag: str
    listen: str = "127.0.0.1"
    listen_port: int
    users: tuple[UserOptions, ...] = _conv(_many(UserOptions), ())
    #: ztun's own: listening beyond loopback without users (an open proxy) is asked for.
    allow_unauthenticated_remote: bool = False


#: RFC 4787 behaviour of the TUN's UDP NAT (sing-box's `udp_mapping` / `udp_filtering`).
UdpNatBehaviour = Literal["endpoint_independent", "address_dependent", "address_and_port_dependent"]


@dataclass(frozen=True, kw_only=True)
class TunInboundOptions:
    type: Literal["tun"] = "tun"
    tag: str
    interface_name: str = ""
    address: tuple[Interface, ...] = _conv(_interfaces, ())
    mtu: int = DEFAULT_TUN_MTU
    auto_route: bool = False
    auto_redirect: bool = False
    strict_route: bool = False
    route_address: tuple[Network, ...] = _conv(_networks, ())
    route_exclude_address: tuple[Network, ...] = _conv(_networks, ())
    stack: str = "system"
    udp_timeout: float = _conv(_duration, DEFAULT_UDP_TIMEOUT)
    udp_mapping: UdpNatBehaviour = "address_and_port_dependent"
    udp_filtering: UdpNatBehaviour = "address_dependent"
    icmp: Literal["reply", "drop"] = "reply"
    #: ztun's own: how long the loop may poll for the next packet before it sleeps
    #: (runtime/busy_poll.py); 0 turns it off.
    busy_poll: float = _conv(_duration, DEFAULT_BUSY_POLL)


InboundOptions = MixedInboundOptions | TunInboundOptions

#: Inbound `type` → options class: every inbound type the schema accepts.
INBOUND_OPTIONS: Mapping[str, type[InboundOptions]] = MappingProxyType({
    "mixed": MixedInboundOptions,
    "tun": TunInboundOptions,
})  # fmt: skip


# -- outbounds ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DirectOutboundOptions:
    type: Literal["direct"] = "direct"
    tag: str
    bind_interface: str | None = None
    routing_mark: int | None = _conv(_mark)
    connect_timeout: float = _conv(_duration, DEFAULT_CONNECT_TIMEOUT)
    domain_strategy: Literal["prefer_ipv4", "prefer_ipv6", "ipv4_only", "ipv6_only"] | None = None


@dataclass(frozen=True, kw_only=True)
class SocksOutboundOptions:
    type: Literal["socks"] = "socks"
    tag: str
    server: str
    server_port: int
    version: Literal["5", "4", "4a"] = "5"
    username: str | None = None
    password: str | None = None
    network: Literal["tcp", "udp"] | None = None
    connect_timeout: float = _conv(_duration, DEFAULT_CONNECT_TIMEOUT)
    udp_timeout: float = _conv(_duration, DEFAULT_UDP_TIMEOUT)
    #: ztun's own: the SOCKS5 CONNECT request goes out without waiting for the greeting's answer
    pipeline: bool = False


@dataclass(frozen=True, kw_only=True)
class BlockOutboundOptions:
    type: Literal["block"] = "block"
    tag: str


#: sing-box's urltest defaults
DEFAULT_URLTEST_URL = "https://www.gstatic.com/generate_204"
DEFAULT_URLTEST_INTERVAL = 180.0
DEFAULT_URLTEST_TOLERANCE_MS = 50
DEFAULT_URLTEST_IDLE_TIMEOUT = 1800.0


@dataclass(frozen=True, kw_only=True)
class SelectorOutboundOptions:
    type: Literal["selector"] = "selector"
    tag: str
    outbounds: tuple[str, ...] = _conv(_strings, ())
    default: str | None = None
    interrupt_exist_connections: bool = False


@dataclass(frozen=True, kw_only=True)
class URLTestOutboundOptions:
    type: Literal["urltest"] = "urltest"
    tag: str
    outbounds: tuple[str, ...] = _conv(_strings, ())
    url: str = DEFAULT_URLTEST_URL
    interval: float = _conv(_duration, DEFAULT_URLTEST_INTERVAL)
    #: milliseconds, as in sing-box
    tolerance: int = DEFAULT_URLTEST_TOLERANCE_MS
    idle_timeout: float = _conv(_duration, DEFAULT_URLTEST_IDLE_TIMEOUT)
    interrupt_exist_connections: bool = False


GroupOutboundOptions = SelectorOutboundOptions | URLTestOutboundOptions
OutboundOptions = (
    DirectOutboundOptions | SocksOutboundOptions | BlockOutboundOptions | GroupOutboundOptions
)

#: Outbound `type` → options class: every outbound type the schema accepts.
OUTBOUND_OPTIONS: Mapping[str, type[OutboundOptions]] = MappingProxyType({
    "direct": DirectOutboundOptions,
    "socks": SocksOutboundOptions,
    "block": BlockOutboundOptions,
    "selector": SelectorOutboundOptions,
    "urltest": URLTestOutboundOptions,
})  # fmt: skip


# -- rules ----------------------------------------------------------------------------------
# Match fields are shared by route, DNS and rule-set (headless) rules, as in sing-box; action
# fields sit on the rule itself, as they do in the config. Nested rules of a logical rule use
# the same classes with their action fields left at the defaults (sing-box does the same).


@dataclass(frozen=True, kw_only=True)
class _MatchFields:
    domain: tuple[str, ...] = _conv(_strings, ())
    domain_suffix: tuple[str, ...] = _conv(_strings, ())
    domain_keyword: tuple[str, ...] = _conv(_strings, ())
    domain_regex: tuple[str, ...] = _conv(_strings, ())
    # CIDRs stay text: the rule compiler parses them and reports each bad one by its path.
    ip_cidr: tuple[str, ...] = _conv(_strings, ())
    ip_is_private: bool = False
    source_ip_cidr: tuple[str, ...] = _conv(_strings, ())
    source_ip_is_private: bool = False
    geoip: tuple[str, ...] = _conv(_strings, ())
    source_geoip: tuple[str, ...] = _conv(_strings, ())
    port: tuple[int, ...] = _conv(_ints, ())
    port_range: tuple[str, ...] = _conv(_strings, ())
    source_port: tuple[int, ...] = _conv(_ints, ())
    source_port_range: tuple[str, ...] = _conv(_strings, ())
    network: tuple[str, ...] = _conv(_strings, ())
    protocol: tuple[str, ...] = _conv(_strings, ())
    ip_version: Literal[4, 6] | None = None
    auth_user: tuple[str, ...] = _conv(_strings, ())
    # the local process that owns the flow's source socket (Linux)
    process_name: tuple[str, ...] = _conv(_strings, ())
    process_path: tuple[str, ...] = _conv(_strings, ())
    process_path_regex: tuple[str, ...] = _conv(_strings, ())
    invert: bool = False


@dataclass(frozen=True, kw_only=True)
class _RouteRuleFields:
    """What a route rule can reference beyond headless fields."""

    inbound: tuple[str, ...] = _conv(_strings, ())
    # the user that owns the flow's source socket (Linux; not in rule sets, as in sing-box)
    user: tuple[str, ...] = _conv(_strings, ())
    user_id: tuple[int, ...] = _conv(_ints, ())
    rule_set: tuple[str, ...] = _conv(_strings, ())
    rule_set_ip_cidr_match_source: bool = False


@dataclass(frozen=True, kw_only=True)
class _RouteActionFields:
    action: Literal["route", "reject", "hijack-dns", "sniff", "route-options"] = "route"
    outbound: str | None = None
    method: Literal["default", "drop", "reply"] = "default"
    no_drop: bool = False
    sniffer: tuple[str, ...] = _conv(_strings, ())
    timeout: float | None = _conv(_duration)
    override_destination: bool = False
    override_address: str | None = None
    override_port: int | None = None
    udp_timeout: float | None = _conv(_duration)
    udp_connect: bool | None = None


@dataclass(frozen=True, kw_only=True)
class _DNSActionFields:
    action: Literal["route", "route-options", "reject", "predefined"] = "route"
    server: str | None = None
    disable_cache: bool = False
    rewrite_ttl: int | None = None
    strategy: Literal["prefer_ipv4", "prefer_ipv6", "ipv4_only", "ipv6_only"] | None = None
    # DNS rejects answer REFUSED or nothing: sing-box has no `reply` for DNS
    method: Literal["default", "drop"] = "default"
    no_drop: bool = False
    rcode: str = "NOERROR"
    answer: tuple[str, ...] = _conv(_strings, ())
    ns: tuple[str, ...] = _conv(_strings, ())
    extra: tuple[str, ...] = _conv(_strings, ())


@dataclass(frozen=True, kw_only=True)
class DefaultHeadlessRuleOptions(_MatchFields):
    """One rule of a rule set: match fields only."""

    type: Literal["default"] = "default"
    query_type: tuple[int | str, ...] = _conv(_items, ())


@dataclass(frozen=True, kw_only=True)
class LogicalHeadlessRuleOptions:
    type: Literal["logical"] = "logical"
    mode: Literal["and", "or"]
    rules: tuple[HeadlessRuleOptions, ...] = _conv_required(
        lambda v, p: _by_type(HEADLESS_RULES, "default")(v, p)
    )
    invert: bool = False


HeadlessRuleOptions = DefaultHeadlessRuleOptions | LogicalHeadlessRuleOptions


@dataclass(frozen=True, kw_only=True)
class DefaultRuleOptions(_RouteActionFields, _RouteRuleFields, _MatchFields):
    type: Literal["default"] = "default"
    #: the Clash API's mode this rule needs
    clash_mode: str | None = None


@dataclass(frozen=True, kw_only=True)
class LogicalRuleOptions(_RouteActionFields):
    type: Literal["logical"] = "logical"
    mode: Literal["and", "or"]
    rules: tuple[RuleOptions, ...] = _conv_required(lambda v, p: _by_type(RULES, "default")(v, p))
    invert: bool = False


RuleOptions = DefaultRuleOptions | LogicalRuleOptions


@dataclass(frozen=True, kw_only=True)
class DefaultDNSRuleOptions(_DNSActionFields, _RouteRuleFields, _MatchFields):
    type: Literal["default"] = "default"
    query_type: tuple[int | str, ...] = _conv(_items, ())
    #: the outbound the flow behind the query was routed to ("any": whichever)
    outbound: tuple[str, ...] = _conv(_strings, ())
    #: the Clash API's mode this rule needs (the same mode route rules read)
    clash_mode: str | None = None


@dataclass(frozen=True, kw_only=True)
class LogicalDNSRuleOptions(_DNSActionFields):
    type: Literal["logical"] = "logical"
    mode: Literal["and", "or"]
    rules: tuple[DNSRuleOptions, ...] = _conv_required(
        lambda v, p: _by_type(DNS_RULES, "default")(v, p)
    )
    invert: bool = False


DNSRuleOptions = DefaultDNSRuleOptions | LogicalDNSRuleOptions

HEADLESS_RULES: Mapping[str, type[HeadlessRuleOptions]] = MappingProxyType({
    "default": DefaultHeadlessRuleOptions,
    "logical": LogicalHeadlessRuleOptions,
})  # fmt: skip
RULES: Mapping[str, type[RuleOptions]] = MappingProxyType({
    "default": DefaultRuleOptions,
    "logical": LogicalRuleOptions,
})  # fmt: skip
DNS_RULES: Mapping[str, type[DNSRuleOptions]] = MappingProxyType({
    "default": DefaultDNSRuleOptions,
    "logical": LogicalDNSRuleOptions,
})  # fmt: skip


# -- rule sets ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InlineRuleSetOptions:
    type: Literal["inline"] = "inline"
    tag: str
    rules: tuple[HeadlessRuleOptions, ...] = _conv_required(_by_type(HEADLESS_RULES, "default"))


@dataclass(frozen=True, kw_only=True)
class LocalRuleSetOptions:
    type: Literal["local"] = "local"
    tag: str
    format: Literal["source", "binary", "clash", "domains"] = "source"
    path: str
    behavior: Literal["domain", "ipcidr", "classical"] = "classical"


@dataclass(frozen=True, kw_only=True)
class RemoteRuleSetOptions:
    type: Literal["remote"] = "remote"
    tag: str
    format: Literal["source", "binary", "clash", "domains"] = "source"
    url: str
    update_interval: float = _conv(_duration, 86400.0)
    download_detour: str | None = None
    behavior: Literal["domain", "ipcidr", "classical"] = "classical"


RuleSetOptions = InlineRuleSetOptions | LocalRuleSetOptions | RemoteRuleSetOptions

RULE_SETS: Mapping[str, type[RuleSetOptions]] = MappingProxyType({
    "inline": InlineRuleSetOptions,
    "local": LocalRuleSetOptions,
    "remote": RemoteRuleSetOptions,
})  # fmt: skip


# -- route ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GeoIPOptions:
    path: str


_GEOIP = _one(GeoIPOptions)


@dataclass(frozen=True, kw_only=True)
class RouteOptions:
    """The `route` section (not the `route-options` rule action: see ztun.route.action)."""

    rules: tuple[RuleOptions, ...] = _conv(_by_type(RULES, "default"), ())
    rule_set: tuple[RuleSetOptions, ...] = _conv(_by_type(RULE_SETS), ())
    final: str | None = None
    auto_detect_interface: bool = False
    default_interface: str | None = None
    default_mark: int | None = _conv(_mark)
    geoip: GeoIPOptions | None = field(default=None, metadata={"convert": _GEOIP})


# -- DNS ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class UDPDNSServerOptions:
    type: Literal["udp"] = "udp"
    tag: str
    server: str
    server_port: int = 53
    detour: str | None = None


@dataclass(frozen=True, kw_only=True)
class TCPDNSServerOptions:
    type: Literal["tcp"] = "tcp"
    tag: str
    server: str
    server_port: int = 53
    detour: str | None = None


@dataclass(frozen=True, kw_only=True)
class DNSServerTLSOptions:
    """The `tls` block of a DoT or DoH server."""

    server_name: str | None = None
    insecure: bool = False


_DNS_TLS = _one(DNSServerTLSOptions)


@dataclass(frozen=True, kw_only=True)
class TLSDNSServerOptions:
    type: Literal["tls"] = "tls"
    tag: str
    server: str
    server_port: int = 853
    detour: str | None = None
    tls: DNSServerTLSOptions = field(
        default_factory=DNSServerTLSOptions, metadata={"convert": _DNS_TLS}
    )


@dataclass(frozen=True, kw_only=True)
class HTTPSDNSServerOptions:
    type: Literal["https"] = "https"
    tag: str
    server: str
    server_port: int = 443
    detour: str | None = None
    path: str = "/dns-query"
    tls: DNSServerTLSOptions = field(
        default_factory=DNSServerTLSOptions, metadata={"convert": _DNS_TLS}
    )


@dataclass(frozen=True, kw_only=True)
class LocalDNSServerOptions:
    type: Literal["local"] = "local"
    tag: str


@dataclass(frozen=True, kw_only=True)
class HostsDNSServerOptions:
    type: Literal["hosts"] = "hosts"
    tag: str
    path: tuple[str, ...] = _conv(_strings, ())
    predefined: Mapping[str, tuple[str, ...]] = _conv_factory(
        _string_table, lambda: MappingProxyType({})
    )


_FAKEIP4 = ipaddress.ip_network("198.18.0.0/15")
_FAKEIP6 = ipaddress.ip_network("fc00::/18")


@dataclass(frozen=True, kw_only=True)
class FakeIPDNSServerOptions:
    type: Literal["fakeip"] = "fakeip"
    tag: str
    inet4_range: Network = field(default=_FAKEIP4, metadata={"convert": _network})
    inet6_range: Network = field(default=_FAKEIP6, metadata={"convert": _network})


DNSServerOptions = (
    UDPDNSServerOptions | TCPDNSServerOptions | TLSDNSServerOptions | HTTPSDNSServerOptions
    | LocalDNSServerOptions | HostsDNSServerOptions | FakeIPDNSServerOptions
)  # fmt: skip

DNS_SERVERS: Mapping[str, type[DNSServerOptions]] = MappingProxyType({
    "udp": UDPDNSServerOptions,
    "tcp": TCPDNSServerOptions,
    "tls": TLSDNSServerOptions,
    "https": HTTPSDNSServerOptions,
    "local": LocalDNSServerOptions,
    "hosts": HostsDNSServerOptions,
    "fakeip": FakeIPDNSServerOptions,
})  # fmt: skip


def _dns_servers(value: Any, path: ConfigPath) -> tuple[DNSServerOptions, ...]:
    """dns.servers, the legacy `address:` form read as the typed one."""
    out = []
    for i, item in enumerate(value):
        if is_legacy_server(item):
            try:
                item = legacy_server(item)
            except ValueError as exc:
                raise _fail((*path, i, "address"), str(exc)) from None
        out.append(by_type(DNS_SERVERS, item, (*path, i), None))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class DNSOptions:
    servers: tuple[DNSServerOptions, ...] = _conv(_dns_servers, ())
    rules: tuple[DNSRuleOptions, ...] = _conv(_by_type(DNS_RULES, "default"), ())
    final: str | None = None
    strategy: Literal["prefer_ipv4", "prefer_ipv6", "ipv4_only", "ipv6_only"] | None = None
    disable_cache: bool = False
    cache_capacity: int = 1024
    #: each server keeps its own cached answers (sing-box's `independent_cache`)
    independent_cache: bool = False
    reverse_mapping: bool = False


# -- experimental ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CacheFileOptions:
    enabled: bool = False
    path: str = "cache.json"
    store_fakeip: bool = False


@dataclass(frozen=True, kw_only=True)
class ClashApiOptions:
    #: "host:port"; empty: no API
    external_controller: str = ""
    #: a dashboard directory of the user's, served at /ui instead of the built-in page
    external_ui: str = ""
    secret: str = ""
    default_mode: str = "Rule"


@dataclass(frozen=True, kw_only=True)
class ExperimentalOptions:
    cache_file: CacheFileOptions = field(
        default_factory=CacheFileOptions, metadata={"convert": _one(CacheFileOptions)}
    )
    clash_api: ClashApiOptions = field(
        default_factory=ClashApiOptions, metadata={"convert": _one(ClashApiOptions)}
    )


# -- the whole config -----------------------------------------------------------------------


_LOG = _one(LogOptions)
_INBOUNDS = _by_type(INBOUND_OPTIONS)
_OUTBOUNDS = _by_type(OUTBOUND_OPTIONS)
_DNS = _one(DNSOptions)
_ROUTE = _one(RouteOptions)


@dataclass(frozen=True, kw_only=True)
class Options:
    """The config's top-level sections (`include` is gone: the loader merged it)."""

    log: LogOptions = field(default_factory=LogOptions, metadata={"convert": _LOG})
    inbounds: tuple[InboundOptions, ...] = _conv(_INBOUNDS, ())
    outbounds: tuple[OutboundOptions, ...] = _conv(_OUTBOUNDS, ())
    dns: DNSOptions = field(default_factory=DNSOptions, metadata={"convert": _DNS})
    route: RouteOptions = field(default_factory=RouteOptions, metadata={"convert": _ROUTE})
    experimental: ExperimentalOptions = field(
        default_factory=ExperimentalOptions, metadata={"convert": _one(ExperimentalOptions)}
    )
    #: ztun's own: processes that accept mixed and auto_redirect connections, the main one
    #: included; "auto" or a count (0 and 1: in-process). See ztun/stack/workers.py.
    workers: int | Literal["auto"] = "auto"


def build_options(data: Mapping[str, Any]) -> Options:
    """Typed options from validated config data; ConfigError if a value cannot be converted."""
    return build(Options, data)


def inbound_options(data: Mapping[str, Any], path: ConfigPath = ("inbounds", 0)) -> InboundOptions:
    """Options of one inbound (what `build_options` does for each item of `inbounds`)."""
    return by_type(INBOUND_OPTIONS, data, path, None)


def outbound_options(
    data: Mapping[str, Any], path: ConfigPath = ("outbounds", 0)
) -> OutboundOptions:
    """Options of one outbound (what `build_options` does for each item of `outbounds`)."""
    return by_type(OUTBOUND_OPTIONS, data, path, None)


def route_options(data: Mapping[str, Any], path: ConfigPath = ("route",)) -> RouteOptions:
    """Options of the `route` section."""
    return build(RouteOptions, data, path)
