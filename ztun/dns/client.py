"""The DNS module at run time: a query in, an answer out, through DNS rules, cache and servers.

Owns: `DnsClient` — parse the query (a malformed one gets FORMERR, or nothing), ask the DNS
rules (reject, predefined answer, or a server), answer from the cache, send ONE upstream query
for any number of identical ones in flight, apply the strategy, store in the cache, record the
reverse map, and answer with the query's id; `lookup(name)` for outbounds that connect to a
domain; per-server counters. It never raises from `exchange`: an upstream failure or timeout
is a SERVFAIL after a bounded wait.

The fast path: a plain query (`ztun.dns.wire.read_question`) that the rules send to a server
as it is (no reject, predefined answer, rewrite_ttl or family filtering) is answered without
dnspython: from the cache's stored wire (id and TTLs patched), or by forwarding the query and
checking the answer with `wire.scan_response`. `answer_cached` gives a cache hit synchronously,
so the hijack needs no task for it. Everything else takes the dnspython path.

Bounds: the in-flight table (queries beyond it are answered SERVFAIL rather than piled up)
and the number of upstream queries running at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from ztun.address import IPAddress, ip_or_none
from ztun.config.options import DirectOutboundOptions, DNSOptions, FakeIPDNSServerOptions
from ztun.dns import message
from ztun.dns import wire as dnswire
from ztun.dns.cache import DnsCache
from ztun.dns.transport import (
    DnsTimeoutError,
    DnsTransportError,
    Transport,
    default_transports,
)
from ztun.errors import ZtunError
from ztun.outbound.base import ErrorKind, Outbound, OutboundError
from ztun.route.metadata import FlowMeta

log = logging.getLogger("ztun.dns")

#: Distinct queries waiting for an upstream answer at once.
MAX_IN_FLIGHT = 4096
#: Upstream exchanges running at once (the rest wait their turn within their time).
MAX_CONCURRENT = 256

_A = int(dns.rdatatype.A)
_AAAA = int(dns.rdatatype.AAAA)
_IN = int(dns.rdataclass.IN)

#: (server, name, qtype, qclass, strategy), with a "wire" tag first for the fast path's
#: bytes: what makes two queries the same upstream one
_FlightKey = tuple[Any, ...]
_T = TypeVar("_T")


class _Abandoned(Exception):
    """The caller asking upstream for several identical queries was cancelled: the others ask
    again themselves."""
#: strategies that change answers (the slow path filters the other family out)
_FILTERING = frozenset({"ipv4_only", "ipv6_only"})


@dataclass(slots=True)
class FastMiss:
    """A plain query on its way upstream (`DnsClient.answer_cached` found no answer yet);
    `DnsClient.fetch` completes it."""

    query: bytes
    question: dnswire.Question
    decision: Any
    server: str
    transport: Transport
    strategy: str | None
    use_cache: bool


@dataclass(slots=True)
class _Flight:
    """One fast-path upstream query and everyone waiting on its answer."""

    miss: FastMiss
    #: each waiter's own query (for its id, or its SERVFAIL) and where its answer goes
    waiters: list[tuple[bytes, Callable[[bytes], object]]]
    #: counted in `DnsClient._upstream_now` (a callback query, not a task's)
    holds_slot: bool = False


@dataclass
class ServerCounters:
    """What one server did: `queries` routed to it (cache hits included), `cache_hits`,
    `answers` received from it, `timeouts`, `errors` (failures other than timeouts and
    answers that did not parse)."""

    queries: int = 0
    answers: int = 0
    timeouts: int = 0
    cache_hits: int = 0
    errors: int = 0


@dataclass
class DnsResult:
    """One query's way through the module, for `exchange` and for `ztun dns` to show."""

    #: the answer's wire bytes, or None to send nothing (malformed query, reject-drop)
    wire: bytes | None
    decision: Any = None
    #: the server asked (or that would have been), None for rejects and predefined answers
    server: str | None = None
    cached: bool = False
    #: the response as parsed (id set), when there is one
    response: dns.message.Message | None = None
    #: why the answer is a SERVFAIL or FORMERR, for the log and `ztun dns`
    error: str | None = None
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# -- reading a DNS decision --------------------------------------------------------------------
# The rule engine's DnsDecision names its parts; these readers are the one place that knows
# them, so the client's logic reads as "reject / predefined / route".


def _reject_method(decision: Any) -> str | None:
    """The method ("default", "drop" or "reply") when the decision rejects, else None."""
    reject = getattr(decision, "reject", None)
    if reject is None or reject is False:
        return None
    if isinstance(reject, str):
        return reject
    method = getattr(reject, "method", None) or getattr(decision, "method", None)
    return str(method or "default")


def _predefined(decision: Any) -> Any:
    return getattr(decision, "predefined", None)


def _rule_disables_cache(decision: Any) -> bool:
    return bool(getattr(decision, "disable_cache", False))


def _strategy(decision: Any, default: str | None) -> str | None:
    """A rule's own strategy (route / route-options) wins over dns.strategy."""
    return getattr(decision, "strategy", None) or default


def _rewrite_ttl(decision: Any) -> int | None:
    value = getattr(decision, "rewrite_ttl", None)
    return None if value is None else int(value)


def _rewrite(response: dns.message.Message, ttl: int) -> None:
    for section in (response.answer, response.authority, response.additional):
        for rrset in section:
            rrset.ttl = ttl


def _with_id(wire: bytes, qid: int) -> bytes:
    return qid.to_bytes(2, "big") + wire[2:]


class DnsClient:
    """The DNS module; build one per config (box.py, `ztun dns`), close it at the end."""

    def __init__(
        self,
        options: DNSOptions,
        router: Any,
        outbounds: Mapping[str, Outbound],
        *,
        reverse: Any = None,
        fakeip: Any = None,
        timeout: float = 5.0,
        default_outbound: Outbound | None = None,
        transports: Mapping[str, Transport] | None = None,
        base_dir: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_concurrent: int = MAX_CONCURRENT,
    ) -> None:
        if not options.servers and transports is None:
            raise ZtunError("dns: no servers to ask")
        self.options = options
        self.set_router(router)
        self.timeout = timeout
        self.clock = clock
        self.reverse = reverse
        if fakeip is None:
            fake = next((s for s in options.servers if isinstance(s, FakeIPDNSServerOptions)), None)
            if fake is not None:
                from ztun.dns.fakeip import FakeIPPool

                fakeip = FakeIPPool(fake.inet4_range, fake.inet6_range)  # type: ignore[arg-type]
        self.fakeip = fakeip
        if default_outbound is None:
            default_outbound = _default_outbound(outbounds)
        self.default_outbound = default_outbound
        if transports is None:
            transports = default_transports(
                options.servers, outbounds, default_outbound, fakeip=fakeip, base_dir=base_dir
            )
        self.transports: dict[str, Transport] = dict(transports)
        self.final = options.final or next(iter(self.transports))
        # dns.independent_cache (sing-box's): per server, so one server's answers never serve
        # a query a rule sends to another; shared otherwise, as sing-box does by default.
        independent = bool(getattr(options, "independent_cache", False))
        self.cache = (
            None
            if options.disable_cache
            else DnsCache(options.cache_capacity, independent=independent)
        )
        self.counters: dict[str, ServerCounters] = {t: ServerCounters() for t in self.transports}
        self._in_flight: dict[_FlightKey, asyncio.Future[Any]] = {}
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_concurrent)
        #: the fast path's upstream queries in flight, and how many hold a callback slot
        self._flights: dict[_FlightKey, _Flight] = {}
        self._upstream_now = 0
        self._max_concurrent = max_concurrent
        self._tasks: set[asyncio.Task[None]] = set()
        self.overloaded = 0

    # -- the query path --------------------------------------------------------------------

    def set_router(self, router: Any) -> None:
        """The DNS rules to decide with (a reload swaps them: queries already asked finish
        with the rules they started with)."""
        # Without DNS rules (or before the rule engine is wired), every query goes to final.
        self.router = router if router is not None else _NoRules()
        self._has_rules = bool(getattr(self.router, "rules", True))
        self._no_rules_decision = (
            None if self._has_rules else self.router.decide(FlowMeta(network="udp"))
        )

    async def exchange(self, query: bytes, meta: FlowMeta) -> bytes | None:
        """The answer to `query` (with its id), or None when nothing is to be sent back."""
        now = self.answer_cached(query, meta)
        if isinstance(now, bytes):
            return now
        if now is not None:
            return await self.fetch(now)
        return (await self.resolve(query, meta)).wire

    def answer_cached(self, query: bytes, meta: FlowMeta) -> bytes | FastMiss | None:
        """Without waiting: the answer to a plain query when the cache has it (bytes), the
        query's way upstream when it does not (for `fetch`), or None when the query takes the
        dnspython path (`exchange` or `resolve`). Never raises."""
        try:
            miss = self._plan(query, meta, True)
            if miss is None:
                return None
            hit = self._cached(miss)
        except Exception:  # a bug must cost the fast path, not the query
            log.exception("DNS fast path failed")
            return None
        return miss if hit is None else hit

    async def fetch(self, miss: FastMiss) -> bytes:
        """The upstream answer to a query `answer_cached` could not answer, or a SERVFAIL."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.fetch_soon(miss, lambda answer: fut.done() or fut.set_result(answer))
        return await fut

    def fetch_soon(self, miss: FastMiss, on_answer: Callable[[bytes], object]) -> None:
        """`fetch` without a task: `on_answer` gets the answer (with the query's id) or a
        SERVFAIL exactly once, later (at once when nothing can be asked). Identical queries
        in flight share one upstream query; the flight belongs to no asker, so one that goes
        away takes nothing from the others."""
        q = miss.question
        key = ("wire", miss.server, q.name, q.qtype, q.qclass, miss.strategy)
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters.append((miss.query, on_answer))
            return
        if len(self._flights) + len(self._in_flight) >= self.max_in_flight:
            self.overloaded += 1
            self.counters[miss.server].errors += 1
            on_answer(self._fast_servfail(miss.query))
            return
        flight = _Flight(miss, [(miss.query, on_answer)])
        self._flights[key] = flight
        send = getattr(miss.transport, "query_soon", None)
        if send is not None and self._upstream_now < self._max_concurrent:
            # The usual way: a UDP server answers through a callback, no task per query.
            self._upstream_now += 1
            flight.holds_slot = True
            send(miss.query, self.timeout, lambda wire, error: self._land(key, flight, wire, error))
            return
        task = asyncio.get_running_loop().create_task(self._ask_in_task(key, flight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask_in_task(self, key: _FlightKey, flight: _Flight) -> None:
        """A flight over a transport without callbacks (TCP, DoT, DoH, in-process), or beyond
        the callback slots: asked as the dnspython path asks, within the slots."""
        miss = flight.miss
        try:
            wire = await self._exchange_upstream(miss.server, miss.transport, miss.query)
        except DnsTransportError as e:
            self._land(key, flight, None, e, counted=True)
        except asyncio.CancelledError:
            self._land(key, flight, None, DnsTransportError(miss.server, "closed"), counted=True)
            raise
        else:
            self._land(key, flight, wire, None)

    def _land(
        self, key: _FlightKey, flight: _Flight, wire: bytes | None,
        error: DnsTransportError | None, *, counted: bool = False,
    ) -> None:  # fmt: skip
        """A flight's upstream answer (or failure) reaches everyone waiting on it."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        if flight.holds_slot:
            flight.holds_slot = False
            self._upstream_now -= 1
        miss = flight.miss
        answer: bytes | None = None
        if wire is not None:
            try:
                answer = self._take_answer(miss, wire)
            except DnsTransportError:
                pass
            except Exception:  # a bug costs these answers, not the module
                log.exception("DNS answer handling failed")
        elif error is not None and not counted:
            counters = self.counters[miss.server]
            if isinstance(error, DnsTimeoutError):
                counters.timeouts += 1
            else:
                counters.errors += 1
        for query, on_answer in flight.waiters:
            reply = query[:2] + answer[2:] if answer is not None else self._fast_servfail(query)
            try:
                on_answer(reply)
            except Exception:
                log.exception("DNS answer delivery failed")

    def _fast_servfail(self, query: bytes) -> bytes:
        servfail = self._servfail_of(query)
        assert servfail is not None  # the query parsed on the fast path: it has a header
        return servfail

    def _plan(self, query: bytes, meta: FlowMeta, allow_fakeip: bool) -> FastMiss | None:
        q = dnswire.read_question(query)
        if q is None:
            return None
        # Without DNS rules every query gets final's decision: no flow description to build.
        decision = (
            self.router.decide(meta.for_query(q.name or None, q.qtype), allow_fakeip=allow_fakeip)
            if self._has_rules
            else self._no_rules_decision
        )
        if decision is not None and (
            _reject_method(decision) is not None
            or _predefined(decision) is not None
            or _rewrite_ttl(decision) is not None
        ):
            return None
        server = getattr(decision, "server", None) or self.final
        transport = self.transports.get(server)
        strategy = _strategy(decision, self.options.strategy)
        if transport is None or strategy in _FILTERING:
            return None  # a missing server's SERVFAIL and the filtering are the slow path's
        self.counters[server].queries += 1
        use_cache = (
            self.cache is not None and transport.cacheable and not _rule_disables_cache(decision)
        )
        return FastMiss(query, q, decision, server, transport, strategy, use_cache)

    def _cached(self, miss: FastMiss) -> bytes | None:
        if not miss.use_cache:
            return None
        assert self.cache is not None
        q = miss.question
        hit = self.cache.get_wire(miss.server, q.name, q.qtype, q.qclass, self.clock(), q.id)
        if hit is not None:
            self.counters[miss.server].cache_hits += 1
        return hit

    async def _shared(
        self, key: _FlightKey, server: str, ask: Callable[[], Awaitable[_T]]
    ) -> _T:
        """The dnspython path's sharing (the fast path's is `fetch_soon`): `ask()` once for
        all identical queries in flight (same `key`): the first caller asks upstream itself,
        the others wait on its future, shielded so that one waiter giving up cancels
        nothing for the rest. If the asker itself is cancelled (its flow went away), those
        waiting ask again rather than fail with it. Raises DnsTransportError."""
        while (shared := self._in_flight.get(key)) is not None:
            try:
                return await asyncio.shield(shared)  # type: ignore[no-any-return]
            except _Abandoned:
                continue
        if len(self._in_flight) >= self.max_in_flight:
            self.overloaded += 1
            self.counters[server].errors += 1
            raise DnsTransportError(server, "too many queries in flight")
        fut: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = fut
        try:
            result = await ask()
        except BaseException as e:
            if not fut.done():  # close() may have cancelled it
                fut.set_exception(_Abandoned() if isinstance(e, asyncio.CancelledError) else e)
                fut.exception()  # retrieved: a failure with nobody else waiting is no error
            raise
        else:
            if not fut.done():
                fut.set_result(result)
        finally:
            if self._in_flight.get(key) is fut:
                del self._in_flight[key]
        return result

    def _take_answer(self, miss: FastMiss, wire: bytes) -> bytes:
        """A fast-path query's upstream answer, checked, cached and recorded in the reverse
        map; what every waiter gets (each with its own id). Raises DnsTransportError for an
        answer that does not parse."""
        server, q = miss.server, miss.question
        counters = self.counters[server]
        scan = dnswire.scan_response(wire, q)
        now = self.clock()
        if scan is None:
            # Unusual (or malformed): read it as the slow path would, so it fares the same.
            try:
                response = message.parse_response(wire)
            except ZtunError as e:
                counters.errors += 1
                raise DnsTransportError(server, f"bad answer: {e}") from None
            counters.answers += 1
            if miss.use_cache and self.cache is not None:
                self.cache.put(server, q.name, q.qtype, q.qclass, response, now)
            if self.options.reverse_mapping and self.reverse is not None:
                self.reverse.record_response(response, now)
            return bytes(response.to_wire())
        counters.answers += 1
        if miss.use_cache and self.cache is not None:
            self.cache.put_wire(server, q.name, q.qtype, q.qclass, wire, scan, now)
        if scan.addresses and q.name and self.options.reverse_mapping and self.reverse is not None:
            for ip, ttl in scan.addresses:
                self.reverse.record(ipaddress.ip_address(ip), q.name, ttl, now)
        return wire

    async def resolve(
        self, query: bytes, meta: FlowMeta | None = None, *, allow_fakeip: bool = True
    ) -> DnsResult:
        """`exchange` with everything that happened on the way (never raises).
        `allow_fakeip=False`: for ztun's own lookups (see `DnsRouter.decide`)."""
        start = self.clock()
        try:
            result = await self._resolve(query, meta or FlowMeta(network="udp"), allow_fakeip)
        except Exception as e:  # a bug must cost one answer, not the DNS module
            log.exception("DNS query failed")
            result = DnsResult(self._servfail_of(query), error=f"internal error: {e}")
        if result.response is None and result.wire is not None:
            # REFUSED, SERVFAIL and FORMERR too: whoever shows the result reads one message.
            with contextlib.suppress(ZtunError):
                result.response = message.parse_response(result.wire)
        result.elapsed = self.clock() - start
        return result

    def _servfail_of(self, query: bytes) -> bytes | None:
        try:
            return message.servfail(message.parse_query(query))
        except ZtunError:
            return message.formerr_for(query)

    async def _resolve(self, query: bytes, meta: FlowMeta, allow_fakeip: bool) -> DnsResult:
        try:
            msg = message.parse_query(query)
        except ZtunError as e:
            return DnsResult(message.formerr_for(query), error=str(e))
        name, qtype, qclass = message.question(msg)
        meta = meta.for_query(name or None, qtype)
        decision = self.router.decide(meta, allow_fakeip=allow_fakeip)
        method = _reject_method(decision)
        if method is not None:
            if method == "drop":
                return DnsResult(None, decision)
            return DnsResult(message.refused(msg), decision)
        pre = _predefined(decision)
        if pre is not None:
            wire = message.predefined(
                msg, str(getattr(pre, "rcode", "NOERROR")), tuple(getattr(pre, "answer", ())),
                tuple(getattr(pre, "ns", ())), tuple(getattr(pre, "extra", ())),
            )  # fmt: skip
            return DnsResult(wire, decision, response=message.parse_response(wire))
        server = getattr(decision, "server", None) or self.final
        transport = self.transports.get(server)
        if transport is None:
            return DnsResult(
                message.servfail(msg), decision, server, error=f"no DNS server {server!r}"
            )
        counters = self.counters[server]
        counters.queries += 1
        strategy = _strategy(decision, self.options.strategy)
        if message.blocked_by_strategy(qtype, strategy):
            wire = message.nodata(msg)
            return DnsResult(wire, decision, server, response=message.parse_response(wire))
        use_cache = (
            self.cache is not None and transport.cacheable and not _rule_disables_cache(decision)
        )
        response: dns.message.Message | None = None
        cached = False
        if use_cache:
            assert self.cache is not None
            response = self.cache.get(server, name, qtype, qclass, self.clock())
            if response is not None:
                counters.cache_hits += 1
                cached = True
        if response is None:
            try:
                response = await self._upstream(server, transport, query, name, qtype, qclass,
                                                use_cache, strategy)  # fmt: skip
            except DnsTransportError as e:
                return DnsResult(message.servfail(msg), decision, server, error=e.reason)
        ttl = _rewrite_ttl(decision)
        if ttl is not None:
            _rewrite(response, ttl)
        response.id = msg.id
        wire = response.to_wire()
        return DnsResult(wire, decision, server, cached=cached, response=response)

    async def _upstream(
        self,
        server: str,
        transport: Transport,
        query: bytes,
        name: str,
        qtype: int,
        qclass: int,
        use_cache: bool,
        strategy: str | None,
    ) -> dns.message.Message:
        """The server's answer: one exchange for all identical queries in flight (each caller
        gets its own copy to change). Raises DnsTransportError."""
        key = (server, name, qtype, qclass, strategy)
        response = await self._shared(
            key,
            server,
            lambda: self._ask(server, transport, query, name, qtype, qclass, use_cache, strategy),
        )
        return dns.message.from_wire(response.to_wire())

    async def _ask(
        self,
        server: str,
        transport: Transport,
        query: bytes,
        name: str,
        qtype: int,
        qclass: int,
        use_cache: bool,
        strategy: str | None,
    ) -> dns.message.Message:
        counters = self.counters[server]
        wire = await self._exchange_upstream(server, transport, query)
        try:
            response = message.parse_response(wire)
        except ZtunError as e:
            counters.errors += 1
            raise DnsTransportError(server, f"bad answer: {e}") from None
        counters.answers += 1
        response = message.apply_strategy(response, strategy)
        now = self.clock()
        if use_cache and self.cache is not None:
            self.cache.put(server, name, qtype, qclass, response, now)
        if self.options.reverse_mapping and self.reverse is not None:
            self.reverse.record_response(response, now)
        return response

    async def _exchange_upstream(self, server: str, transport: Transport, query: bytes) -> bytes:
        """The server's raw answer within the client's timeout; counts timeouts and errors."""
        counters = self.counters[server]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            # Every transport bounds its own exchange by the time it is given (its own timers
            # or asyncio.timeout), so no second timeout is set here: it cost ~5% of a miss.
            async with self._slots:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                return await transport.exchange(query, left)
        except (TimeoutError, DnsTimeoutError):
            counters.timeouts += 1
            # In the client's words: what the transport was given is what was left of it.
            raise DnsTimeoutError(server, f"no answer within {self.timeout:g}s") from None
        except DnsTransportError:
            counters.errors += 1
            raise

    # -- names for outbounds ---------------------------------------------------------------

    async def lookup(
        self, name: str, *, strategy: str | None = None, meta: FlowMeta | None = None
    ) -> list[IPAddress]:
        """The addresses of `name` (A and AAAA through the rules, cache and servers), ordered
        by `strategy` (else dns.strategy): the preferred family first. OutboundError (DNS)
        when there are none."""
        ip = ip_or_none(name)
        if ip is not None:
            return [ip]
        strategy = strategy or self.options.strategy
        qtypes = {"ipv4_only": [_A], "ipv6_only": [_AAAA]}.get(strategy or "", [_A, _AAAA])
        base = meta or FlowMeta(network="udp")
        results = await asyncio.gather(*(self._lookup_one(name, q, base) for q in qtypes))
        v4 = [a for r in results for a, _ttl in r[0] if a.version == 4]
        v6 = [a for r in results for a, _ttl in r[0] if a.version == 6]
        found = v6 + v4 if strategy == "prefer_ipv6" else v4 + v6
        if strategy == "ipv4_only":
            found = v4
        elif strategy == "ipv6_only":
            found = v6
        if not found:
            why = "; ".join(r[1] for r in results if r[1]) or "no address"
            raise OutboundError(ErrorKind.DNS, f"cannot resolve {name}: {why}")
        return list(dict.fromkeys(found))

    async def _lookup_one(
        self, name: str, qtype: int, meta: FlowMeta
    ) -> tuple[list[tuple[IPAddress, int]], str]:
        try:
            query = dns.message.make_query(name, qtype, _IN).to_wire()
        except Exception as e:  # a name dnspython cannot encode (label too long, ...)
            return [], f"bad name: {e}"
        result = await self.resolve(query, meta, allow_fakeip=False)
        if result.wire is None:
            return [], "rejected"
        if result.error is not None:
            return [], result.error
        response = result.response
        if response is None:
            return [], "no answer"
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            return [], dns.rcode.to_text(rcode)
        return message.addresses(response), ""

    async def close(self) -> None:
        # The askers run in their callers' tasks, which their owners cancel; what is left
        # here are the futures others wait on.
        for fut in self._in_flight.values():
            fut.cancel()
        self._in_flight.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for key, flight in list(self._flights.items()):
            self._land(key, flight, None, DnsTransportError(flight.miss.server, "closed"))
        for transport in self.transports.values():
            with contextlib.suppress(Exception):
                await transport.close()


class _NoRules:
    rules = ()

    def decide(self, meta: FlowMeta, *, allow_fakeip: bool = True) -> Any:
        return None


def _default_outbound(outbounds: Mapping[str, Outbound]) -> Outbound:
    """The direct outbound servers without a detour use: the config's first one that resolves
    through the DNS module (so it carries the routing mark auto_route gives it), else a
    private one with default options."""
    for outbound in outbounds.values():
        if hasattr(outbound, "set_resolver"):
            return outbound
    from ztun.outbound.direct import DirectOutbound

    return DirectOutbound(DirectOutboundOptions(tag="dns-direct"))
