"""What `ztun run` does when the network changes: carries out a `route.network.Decision`.

Owns: the default interface of outgoing sockets (`route.default_interface`, or the egress
`auto_detect_interface` found, set in `runtime/dial.py`), ending the outbounds' UDP sessions
(SOCKS5 associations with their control connections, direct UDP sockets) and the inbounds' UDP
flows (the TUN's UDP NAT) when the uplink changed, and the log line that says what changed and
what was done. The TUN, its routes and every TCP flow are left as they are: a TCP flow whose
path went away ends by itself, one whose path is still there goes on.

The monitor (`platform/linux/monitor.py`) decides when; `route/network.py` decides what.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ztun.route.network import Decision
from ztun.runtime import dial

log = logging.getLogger("ztun.monitor")

#: The reason UDP flows and sessions end with, in their log lines.
RESET_REASON = "network changed"


class NetworkFollower:
    """Applies each decision to the running outbounds and inbounds (in ztun's loop)."""

    def __init__(
        self, outbounds: Mapping[str, Any], inbounds: Iterable[Any], *, auto_detect: bool
    ) -> None:
        self.outbounds = outbounds
        self.inbounds = list(inbounds)
        self.auto_detect = auto_detect
        #: decisions that acted (not counting the first), for tests and a later API
        self.changes = 0

    def __call__(self, decision: Decision) -> None:
        done: list[str] = []
        egress = decision.egress
        if decision.rebind and self.auto_detect:
            dial.set_default_interface(egress.name if egress else None, detected=True)
            done.append(f"new connections bound to {egress.name}" if egress else
                        "new connections fail at once (no egress)")  # fmt: skip
        if decision.reset:
            sessions = sum(_call(o, "reset_network", RESET_REASON)
                           for o in self.outbounds.values())  # fmt: skip
            flows = sum(_call(i, "reset_udp", RESET_REASON) for i in self.inbounds)
            done.append(
                f"UDP: {sessions} outbound session(s) closed (SOCKS5 associations with their "
                f"control connections), {flows} more flow(s) reset; each flow's next datagram "
                "opens a new session"
            )
        before = str(decision.before) if decision.before else "none"
        after = str(egress) if egress else "none"
        if decision.initial and egress is None and self.auto_detect:
            log.warning("network: no egress (no default route on a link that is up): new "
                        "flows fail at once until one appears")  # fmt: skip
            return
        if decision.initial:
            log.info("network: egress %s%s", after,
                     "" if self.auto_detect else " (auto_detect_interface is off: "
                     "sockets are not bound to it)")  # fmt: skip
            return
        changes = "; ".join(decision.changes) or "tables read again"
        if not decision.acts:
            log.debug("network: %s; egress stays %s", changes, after)
            return
        self.changes += 1
        level = logging.WARNING if egress is None else logging.INFO
        moved = f"egress {before} → {after}" if decision.rebind else f"egress {after} renumbered"
        log.log(level, "network: %s; %s; %s", changes, moved, "; ".join(done) or "nothing to do")


def _call(obj: Any, method: str, why: str) -> int:
    """`obj.method(why)` where `obj` has it (a capability, not a type test), else 0."""
    fn = getattr(obj, method, None)
    if fn is None:
        return 0
    try:
        return int(fn(why))
    except Exception as e:  # one failing reset must not stop the others
        log.error("network: %s of %s failed: %s", method, getattr(obj, "tag", obj), e)
        return 0
