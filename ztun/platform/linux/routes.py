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
one file per network namespace), so that the next start after a SIGKILL removes exactly the
leftovers of the crashed run before it adds anything.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztun.config.validate import DEFAULT_AUTO_ROUTE_MARK
from ztun.errors import ZtunError
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


def state_dir() -> Path:
    return Path(os.environ.get("ZTUN_STATE_DIR") or "/run/ztun")


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

        cleanup_leftovers(self.path)
        self._write_state()
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
        data = {
            "pid": os.getpid(),
            "netns": netns_id(),
            "interface": self.plan.interface,
            "rules": self.plan.rules,
            "routes": self.plan.routes,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.path)
        except OSError as e:
            raise RouteError(f"auto_route: cannot write {self.path}: {e.strerror}") from None

    def remove(self) -> None:
        """Delete everything added; safe to call twice and after a partial apply."""
        if not self.active:
            return
        _delete(self.plan.rules, self.plan.routes)
        with contextlib.suppress(OSError):
            self.path.unlink()
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


def _ztun_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ztun" in cmd


def cleanup_leftovers(path: Path) -> bool:
    """Remove what a crashed run recorded in `path`; True if there was something."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        log.warning("auto_route: ignoring unreadable state file %s", path)
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    if data.get("netns") != netns_id():
        return False
    pid = int(data.get("pid") or 0)
    if _ztun_alive(pid):
        raise RouteError(
            f"another ztun (pid {pid}) already manages auto_route in this network namespace"
        )
    log.warning("auto_route: removing leftovers of a previous run (pid %d)", pid)
    _delete(list(data.get("rules") or []), list(data.get("routes") or []))
    with contextlib.suppress(OSError):
        path.unlink()
    return True
