"""auto_route on Linux: policy routing in the style of sing-box, and putting it all back.

Per address family that has a TUN address, ztun adds (priorities from `rule_index`, 9000):

    9000  fwmark <mark> lookup main        ztun's own sockets (all of them: runtime/dial.py)
                                           never enter the TUN
    9001  to <cidr> lookup main            route_exclude_address
    9002  lookup main suppress_prefixlength 0
                                           more specific routes (the LAN) win; not with
                                           strict_route
    9003  lookup 2022                      everything else: table 2022 sends it to the TUN

and table `table_index` (2022) holds `route_address` (default: 0.0.0.0/0 and ::/0) via the
TUN. With `strict_route`, a family without a TUN address gets `9004 unreachable`, so it
cannot leak around the TUN. sing-box also skips `iif tun`; ztun does not need to (everything
it writes into the TUN is addressed to a local address, which the `local` table takes first),
and leaving it out keeps reverse-path filtering happy.

Everything added is first written to a state file (`$ZTUN_STATE_DIR`, default /run/ztun,
one file per network namespace; see ztun.platform.linux.state for how it is kept safe), so
that the next start after a SIGKILL removes exactly the leftovers of the crashed run before it
adds anything. Before anything in such a file is deleted, every entry must have exactly the
shape `plan` gives it, with ztun's own priorities (9000-9004) and tables (main for the bypass
rules, 2022 for the rest): a file that names anything else is ignored as a whole. Its writer
still running (the same pid *and* start time) means another ztun owns these routes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztun.config.validate import DEFAULT_AUTO_ROUTE_MARK
from ztun.errors import ZtunError
from ztun.platform.linux import state
from ztun.platform.linux.state import state_dir
from ztun.platform.linux.tun_device import in_netlink_thread

log = logging.getLogger("ztun.route")

TABLE_INDEX = 2022
RULE_INDEX = 9000
#: `route.default_mark` when absent; `ztun check` reasons about it too (routing_mark loops).
DEFAULT_MARK = DEFAULT_AUTO_ROUTE_MARK
MAIN_TABLE = 254

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RouteError(ZtunError):
    """auto_route could not be set up (or a previous run's leftovers not removed)."""


def netns_id() -> int:
    """The inode of this process's network namespace: tells namespaces apart."""
    return os.stat("/proc/self/ns/net").st_ino


@dataclass
class RoutePlan:
    """Exactly what auto_route adds: rules and routes as pyroute2 keyword arguments."""

    interface: str
    rules: list[dict[str, Any]] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)


def plan(
    *,
    interface: str,
    index: int,
    tun_networks: list[Network],
    route_address: list[Network],
    route_exclude_address: list[Network],
    bypass: list[Network] | None = None,
    mark: int,
    strict_route: bool,
    table: int = TABLE_INDEX,
    rule_index: int = RULE_INDEX,
) -> RoutePlan:
    """The rules and routes for one TUN (pure; `apply` adds them)."""
    p = RoutePlan(interface)
    families = {n.version for n in tun_networks}
    for version in (4, 6):
        fam = socket.AF_INET if version == 4 else socket.AF_INET6
        if version not in families:
            if strict_route:
                p.rules.append({"family": fam, "priority": rule_index + 4,
                                "action": "FR_ACT_UNREACHABLE"})  # fmt: skip
            continue
        p.rules.append({"family": fam, "priority": rule_index, "fwmark": mark,
                        "table": MAIN_TABLE})  # fmt: skip
        excluded = [n for n in (*route_exclude_address, *(bypass or ())) if n.version == version]
        for n in _unique(excluded):
            p.rules.append({"family": fam, "priority": rule_index + 1,
                            "dst": str(n.network_address), "dst_len": n.prefixlen,
                            "table": MAIN_TABLE})  # fmt: skip
        if not strict_route:
            p.rules.append({"family": fam, "priority": rule_index + 2, "table": MAIN_TABLE,
                            "suppress_prefixlen": 0})  # fmt: skip
        p.rules.append({"family": fam, "priority": rule_index + 3, "table": table})
        wanted = [n for n in route_address if n.version == version]
        if not wanted:
            wanted = [ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")]
        for n in _unique(wanted):
            p.routes.append({"family": fam, "dst": str(n.network_address), "dst_len": n.prefixlen,
                             "oif": index, "table": table})  # fmt: skip
    return p


def _unique(nets: Iterable[Network]) -> list[Network]:
    out: list[Network] = []
    for n in nets:
        if n not in out:
            out.append(n)
    return out


class AutoRoute:
    """Adds a plan's rules and routes and removes them again, recorded in a state file."""

    def __init__(self, p: RoutePlan) -> None:
        self.plan = p
        self.path = state_dir() / f"auto-route-{netns_id()}.json"
        self.active = False

    def apply(self) -> None:
        in_netlink_thread(self._apply)

    def _apply(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            cleanup_leftovers(self.path)
            self._write_state()
        except state.StateError as e:
            raise RouteError(f"auto_route: {e}") from None
        self.active = True
        with IPRoute() as ipr:
            try:
                for r in self.plan.routes:
                    ipr.route("add", **r)
                for r in self.plan.rules:
                    ipr.rule("add", **r)
            except NetlinkError as e:
                self.remove()
                raise RouteError(
                    f"auto_route: cannot add {_describe(r)}: {os.strerror(e.code)}"
                ) from None
        log.info("auto_route: %d rule(s) and %d route(s) added (table %s)",
                 len(self.plan.rules), len(self.plan.routes),
                 self.plan.routes[0]["table"] if self.plan.routes else "-")  # fmt: skip

    def _write_state(self) -> None:
        pid = os.getpid()
        state.write_state(self.path, {
            "pid": pid,
            "start_time": state.start_time(pid) or 0,
            "netns": netns_id(),
            "interface": self.plan.interface,
            "rules": self.plan.rules,
            "routes": self.plan.routes,
        })  # fmt: skip

    def remove(self) -> None:
        """Delete everything added; safe to call twice and after a partial apply."""
        if not self.active:
            return
        _delete(self.plan.rules, self.plan.routes)
        state.remove_state(self.path)
        self.active = False


def _describe(kw: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in kw.items() if k != "family")


def _delete(rules: list[dict[str, Any]], routes: list[dict[str, Any]]) -> None:
    in_netlink_thread(lambda: _delete_sync(rules, routes))


def _delete_sync(rules: list[dict[str, Any]], routes: list[dict[str, Any]]) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for r in rules:
            with contextlib.suppress(NetlinkError):  # already gone
                ipr.rule("del", **r)
        for r in routes:
            # A route through the TUN went away with the TUN.
            with contextlib.suppress(NetlinkError):
                ipr.route("del", **r)


def cleanup_leftovers(path: Path) -> bool:
    """Remove what a crashed run recorded in `path`; True if there was something."""
    data = state.read_state(path)
    if data is None:
        return False
    record = _leftovers(data)
    if isinstance(record, str):
        log.warning("auto_route: ignoring state file %s: %s; nothing in it deleted", path, record)
        state.remove_state(path)
        return False
    pid, started, rules, routes = record
    # Written by this very process (an earlier start that failed) is ours to undo.
    ours = pid == os.getpid() and started == state.start_time(pid)
    if not ours and state.is_running(pid, started):
        raise RouteError(
            f"another ztun (pid {pid}) already manages auto_route in this network namespace"
        )
    log.warning("auto_route: removing leftovers of a previous run (pid %d)", pid)
    _delete(rules, routes)
    state.remove_state(path)
    return True


# -- what a state file may name ---------------------------------------------------------------

_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 6}
#: Lists longer than this are not a plan ztun made (each route_exclude_address is one rule).
MAX_ENTRIES = 16384
Leftovers = tuple[int, int, list[dict[str, Any]], list[dict[str, Any]]]


def _is_int(v: Any, lo: int, hi: int = -1) -> bool:
    """An int (not a bool, not a float) in [lo, hi]; [lo, lo] when `hi` is left out."""
    return type(v) is int and lo <= v <= (lo if hi == -1 else hi)


def _is_prefix(entry: dict[str, Any], version: int) -> bool:
    if not isinstance(entry["dst"], str):
        return False
    try:
        ip = ipaddress.ip_address(entry["dst"])
    except ValueError:
        return False
    return ip.version == version and _is_int(entry["dst_len"], 0, 32 if version == 4 else 128)


def _rule_ok(r: Any) -> bool:
    """Exactly one of the shapes `plan` makes, with ztun's priority and table."""
    if not isinstance(r, dict) or type(r.get("family")) is not int or \
            r["family"] not in _FAMILIES or type(r.get("priority")) is not int:  # fmt: skip
        return False
    version, keys, prio = _FAMILIES[r["family"]], set(r), r["priority"]
    if prio == RULE_INDEX:
        return keys == {"family", "priority", "fwmark", "table"} and \
            _is_int(r["fwmark"], 1, 0xFFFFFFFF) and _is_int(r["table"], MAIN_TABLE)  # fmt: skip
    if prio == RULE_INDEX + 1:
        return keys == {"family", "priority", "dst", "dst_len", "table"} and \
            _is_int(r["table"], MAIN_TABLE) and _is_prefix(r, version)  # fmt: skip
    if prio == RULE_INDEX + 2:
        return keys == {"family", "priority", "table", "suppress_prefixlen"} and \
            _is_int(r["table"], MAIN_TABLE) and _is_int(r["suppress_prefixlen"], 0)  # fmt: skip
    if prio == RULE_INDEX + 3:
        return keys == {"family", "priority", "table"} and _is_int(r["table"], TABLE_INDEX)
    if prio == RULE_INDEX + 4:
        return keys == {"family", "priority", "action"} and r["action"] == "FR_ACT_UNREACHABLE"
    return False


def _route_ok(r: Any) -> bool:
    if not isinstance(r, dict) or type(r.get("family")) is not int or r["family"] not in _FAMILIES:
        return False
    return set(r) == {"family", "dst", "dst_len", "oif", "table"} and \
        _is_int(r["table"], TABLE_INDEX) and _is_int(r["oif"], 1, 0x7FFFFFFF) and \
        _is_prefix(r, _FAMILIES[r["family"]])  # fmt: skip


def _leftovers(data: Any) -> Leftovers | str:
    """(pid, start time, rules, routes) of a state file, or what is wrong with it."""
    keys = {"pid", "start_time", "netns", "interface", "rules", "routes"}
    if not isinstance(data, dict) or set(data) != keys:
        return "not the layout ztun writes"
    if not _is_int(data["pid"], 1, 1 << 22) or not _is_int(data["start_time"], 0, 1 << 63):
        return "no valid pid and start time"
    if not _is_int(data["netns"], netns_id()):
        return "written in another network namespace"
    name = data["interface"]
    if not isinstance(name, str) or not 0 < len(name.encode()) < 16 or \
            any(c in name for c in "/ \t\n\0"):  # fmt: skip
        return "no valid interface name"
    rules, routes = data["rules"], data["routes"]
    if not isinstance(rules, list) or not isinstance(routes, list) or \
            len(rules) > MAX_ENTRIES or len(routes) > MAX_ENTRIES:  # fmt: skip
        return "rule and route lists missing or too long"
    bad = next((r for r in rules if not _rule_ok(r)), None) or \
        next((r for r in routes if not _route_ok(r)), None)  # fmt: skip
    if bad is not None:
        return f"{str(bad)[:120]} is not a rule or route of ztun's"
    return data["pid"], data["start_time"], rules, routes
