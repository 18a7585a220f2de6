"""The worker processes' decisions (pure): how many processes accept the mixed and auto_redirect
connections of a config, how long a dead worker waits before it is started again, and the
messages the processes exchange.

The I/O is in `runtime/workers.py` (the main process's side), `runtime/supervisor.py` (the
process that forks, reaps and restarts workers) and `runtime/worker.py` (one worker).

Why "auto" is 1 for some configs: a worker is a process of its own, so whatever the main process
keeps in a table is not shared with it. Where that table is a feature, spreading connections
would quietly weaken the feature, so "auto" stays in-process and an explicit count says what it
costs:
- the Clash API lists and closes the flows of the main process only (totals are forwarded);
- a mixed inbound's users: failed attempts are counted per source in each process, so a source
  gets one block-free budget per process;
- FakeIP and reverse mapping: the names live in the main process's DNS module, and a worker
  could not give a flow its name. Never spread, even when asked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztun.config.options import FakeIPDNSServerOptions, MixedInboundOptions, Options

#: Processes "auto" starts at most: connection setup scales to about this many cores before
#: the kernel's accept and the relays' splice calls, not Python, are what takes the time.
AUTO_CAP = 4
#: The schema's bound on an explicit count.
MAX_WORKERS = 64
#: The largest message between the processes (a datagram of a SOCK_SEQPACKET pair).
MAX_MESSAGE = 60_000


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """What `ztun run` does about workers."""

    #: processes that accept connections, the main one included; 1: all in-process
    count: int
    #: tags of the inbounds whose connections are spread
    inbounds: tuple[str, ...]
    #: (level, sentence) pairs to log at start: why fewer than asked, what a count costs
    notes: tuple[tuple[str, str], ...] = ()

    @property
    def forks(self) -> int:
        """Worker processes besides the main one."""
        return max(0, self.count - 1)


def spread_inbounds(options: Options) -> tuple[str, ...]:
    """The inbounds whose accepted connections workers can take: every mixed inbound, and a
    tun inbound's auto_redirect listener (TCP only; the TUN itself stays in the main process)."""
    tags: list[str] = []
    for inbound in options.inbounds:
        redirect = getattr(inbound, "auto_redirect", False) and getattr(inbound, "auto_route",
                                                                        False)
        if isinstance(inbound, MixedInboundOptions) or redirect:
            tags.append(inbound.tag)
    return tuple(tags)


def gives_names(options: Options) -> bool:
    """Whether the DNS module will give IP flows names (FakeIP, reverse mapping)."""
    return bool(options.dns.reverse_mapping) or any(
        isinstance(s, FakeIPDNSServerOptions) for s in options.dns.servers
    )


def plan_workers(options: Options, cores: int, *, platform_ok: bool = True) -> WorkerPlan:
    """How many processes accept connections under `options.workers` on `cores` usable cores."""
    setting: Any = options.workers
    auto = setting == "auto"
    asked = min(max(int(cores), 1), AUTO_CAP) if auto else max(1, int(setting))
    tags = spread_inbounds(options)
    one = WorkerPlan(1, tags)
    if asked <= 1:
        return one
    if not tags:
        if auto:
            return one
        return WorkerPlan(1, tags, (("warning", f"workers: {setting} has nothing to spread (no "
                                     "mixed inbound, no tun inbound with auto_redirect)"),))
    if not platform_ok:
        if auto:
            return one
        return WorkerPlan(1, tags, (("warning", "workers: SO_REUSEPORT listeners need Linux; "
                                     "every connection is handled in-process"),))
    if gives_names(options):
        return WorkerPlan(1, tags, (("info" if auto else "warning",
                                     "workers: every connection is handled in-process, because "
                                     "FakeIP and reverse-mapped names live in the main "
                                     "process"),))  # fmt: skip
    api = bool(options.experimental.clash_api.external_controller)
    users = any(isinstance(inbound, MixedInboundOptions) and inbound.users
                for inbound in options.inbounds)  # fmt: skip
    if auto and (api or users):
        why = "the Clash API lists and closes the main process's flows only" if api else (
            "a mixed inbound's failed logins are counted per process")
        return WorkerPlan(1, tags, (("info", f"workers: auto is 1 here ({why}); set workers: N "
                                     "to spread connections anyway"),))  # fmt: skip
    notes: list[tuple[str, str]] = []
    if api:
        notes.append(("warning", f"workers: {asked}: the Clash API lists and closes only the "
                      "flows of the main process; totals include every process's"))  # fmt: skip
    if users:
        notes.append(("warning", f"workers: {asked}: failed logins are counted per process, so "
                      f"a source gets up to {asked} times the attempts before it is blocked"))
    return WorkerPlan(asked, tags, tuple(notes))


class RestartBackoff:
    """The delay before a dead worker is started again: 0.1 s, doubling with each death of a
    worker that lived less than `stable` seconds, at most `cap`; a worker that lived longer
    starts the count again. So a worker killed once is back at once, and one that crashes at
    start costs a fork every `cap` seconds, not a busy loop."""

    __slots__ = ("cap", "failures", "first", "stable")

    def __init__(self, first: float = 0.1, cap: float = 10.0, stable: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.stable = stable
        self.failures = 0

    def delay(self, lived: float) -> float:
        """Seconds to wait before a restart, given how long the dead worker ran."""
        if lived >= self.stable:
            self.failures = 0
        delay = min(self.cap, self.first * (2 ** min(self.failures, 30)))
        self.failures += 1
        return delay


def encode(message: Mapping[str, Any]) -> bytes:
    """A message as one datagram; ValueError when it would not fit."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes (at most {MAX_MESSAGE})")
    return data


def decode(data: bytes) -> dict[str, Any] | None:
    """A message, or None for anything that is not one (bounded, never raises)."""
    if not data or len(data) > MAX_MESSAGE:
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def add_totals(totals: dict[str, list[int]], update: Any) -> int:
    """Add a worker's per-outbound byte totals ({tag: [up, down]}) to `totals`; how many
    entries were taken (malformed ones are skipped)."""
    if not isinstance(update, dict):
        return 0
    taken = 0
    for tag, pair in list(update.items())[:4096]:
        if (not isinstance(tag, str) or not isinstance(pair, list) or len(pair) != 2
                or not all(type(v) is int and v >= 0 for v in pair)):  # fmt: skip
            continue
        row = totals.setdefault(tag, [0, 0])
        row[0] += pair[0]
        row[1] += pair[1]
        taken += 1
    return taken
