"""The URL test: one timed HTTP request through an outbound's own dial.

Owns `url_delay` (what urltest groups and the Clash API's delay endpoints run), its bounds
(one deadline for connect, TLS, request and status line; a cap on probes running at once,
process-wide) and the delay history each probed outbound keeps for `/proxies`.

The request goes through `Outbound.connect_tcp`, so it leaves exactly as a flow through that
member would: a `socks` member's proxy, a `direct` member's interface, and ztun's own mark on
every socket (runtime/dial.py), so a probe never loops back into the TUN. A group member is
probed through the group (its own choice). Any HTTP status counts as an answer: a captive
portal's 302 still proves the path works, as in sing-box.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ztun.address import Address, ip_or_none
from ztun.errors import ZtunError
from ztun.route.metadata import FlowMeta

#: Probes running at once in the whole process; more wait their turn (flows never do).
MAX_CONCURRENT_PROBES = 8
#: A probe's deadline when the caller gives none (sing-box's URL test uses the same 5 s).
DEFAULT_TIMEOUT = 5.0
#: Bytes of the status line read at most.
MAX_STATUS_LINE = 4096
#: Probe results kept per outbound (Clash shows the last ones).
HISTORY_LENGTH = 10

_slots: asyncio.Semaphore | None = None
_slots_loop: asyncio.AbstractEventLoop | None = None


class ProbeError(ZtunError):
    """A probe that got no HTTP answer; `str()` says why, in one line."""


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ProbeError(f"{url!r} is not an http:// or https:// URL")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise ProbeError(f"{url!r} has a bad port") from None
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(scheme, parts.hostname, port, path)


@dataclass(frozen=True, slots=True)
class Delay:
    """One probe result: when (seconds since the epoch) and how long (ms; 0: it failed,
    as Clash shows a failed test)."""

    time: float
    delay: int


#: outbound tag → its last probe results, newest last
HISTORY: dict[str, deque[Delay]] = {}


def record(tag: str, delay_ms: int | None) -> None:
    history = HISTORY.get(tag)
    if history is None:
        history = HISTORY[tag] = deque(maxlen=HISTORY_LENGTH)
    history.append(Delay(time.time(), delay_ms or 0))


def _semaphore() -> asyncio.Semaphore:
    global _slots, _slots_loop
    loop = asyncio.get_running_loop()
    if _slots is None or _slots_loop is not loop:
        _slots, _slots_loop = asyncio.Semaphore(MAX_CONCURRENT_PROBES), loop
    return _slots


async def url_delay(outbound: Any, url: str, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Milliseconds from the start of the connection through `outbound` to the status line
    of the answer to `GET url`; ProbeError when none came within `timeout` seconds (the
    wait for a free probe slot included)."""
    target = Target.parse(url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    writer: asyncio.StreamWriter | None = None
    sock = None
    try:
        async with asyncio.timeout_at(deadline), _semaphore():
            start = loop.time()
            ip = ip_or_none(target.host)
            meta = FlowMeta(network="tcp", destination=ip, destination_port=target.port,
                            domain=None if ip is not None else target.host)  # fmt: skip
            sock = await outbound.connect_tcp(Address(target.host, target.port), meta)
            context = ssl.create_default_context() if target.scheme == "https" else None
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=context, server_hostname=target.host if context else None,
                limit=MAX_STATUS_LINE,
            )  # fmt: skip
            host = target.host if ":" not in target.host else f"[{target.host}]"
            writer.write(
                f"GET {target.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ztun\r\n"
                "Connection: close\r\n\r\n".encode("ascii", "replace")
            )
            line = await reader.readline()
            if not line.startswith(b"HTTP/"):
                raise ProbeError("no HTTP answer" if not line else "not an HTTP answer")
            return max(1, round((loop.time() - start) * 1000))
    except TimeoutError:
        raise ProbeError(f"no answer within {timeout:g}s") from None
    except ZtunError as e:
        raise ProbeError(str(e)) from None
    except (OSError, ssl.SSLError, ValueError, asyncio.IncompleteReadError) as e:
        raise ProbeError(str(e) or type(e).__name__) from None
    finally:
        if writer is None and sock is not None:
            sock.close()
        if writer is not None:
            writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 0.1)
