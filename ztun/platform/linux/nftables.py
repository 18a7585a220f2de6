"""auto_redirect on Linux: ztun's own nftables table that redirects the host's TCP to a local
listener, and putting it all back.

With `auto_redirect` (which needs auto_route) ztun adds one table, `inet ztun`, and nothing
else (Docker's, firewalld's and the user's tables are never read or touched):

    table inet ztun {
        set exclude4 { type ipv4_addr; flags interval; elements = { route_exclude_address } }
        set exclude6 { ... }
        chain output {
            type nat hook output priority dstnat; policy accept;
            meta mark <own mark> return          ztun's own sockets (runtime/dial.py)
            ip daddr @exclude4 return            route_exclude_address
            ip6 daddr @exclude6 return
            oifname "<tun>" meta nfproto ipv4 meta l4proto tcp counter redirect to :<port4>
            oifname "<tun>" meta nfproto ipv6 meta l4proto tcp counter redirect to :<port6>
        }
    }

Why the match is the TUN as output interface: the nat output hook runs after the routing
decision, so "auto_route would send this connection into the TUN" is exactly `oifname`. Every
choice auto_route makes keeps its meaning without being repeated here: `route_address`, the
LAN's own routes winning without `strict_route` (and going through ztun with it), a family that
`strict_route` makes unreachable, ztun's own mark rule. The mark and the excluded prefixes are
matched again all the same, so that a socket of ztun's or an excluded destination is never
redirected whatever else routes it there. UDP and ICMP are not matched: they stay on the TUN.
Only locally generated connections are redirected (the output hook); traffic forwarded through
this host still goes through the TUN.

The redirect sends a connection to 127.0.0.1 (IPv4) or ::1 (IPv6) at the listener's port; the
listener reads the destination the application asked for with SO_ORIGINAL_DST
(ztun.inbound.redirect).

Why libnftables' JSON API (Debian's python3-nftables) and not pyroute2's nftables support:
libnftables applies the whole table in one kernel transaction (all of it or nothing: no half
table after a failure), takes the rules as data that a unit test can read, and is the library
that ships with `nft` itself, so it knows every expression this kernel does. pyroute2's nftables
module is marked a prototype, has no transactions and wants the rules as raw netlink
expressions (registers, payload offsets). The Python module is a small ctypes wrapper that
Debian installs for the system Python only; ztun loads it from there by file location when
`import nftables` finds none (pyenv, a venv), without adding Debian's directory to sys.path.

The table is recorded in a state file (ztun.platform.linux.state) before it is created, like
auto_route's rules, so the next start after a SIGKILL deletes it; a state file that names
anything but ztun's table is ignored, and a table of that name ztun did not record is never
deleted (start-up says so and uses the TUN path).
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztun.errors import ZtunError
from ztun.platform.linux import state
from ztun.platform.linux.state import state_dir

log = logging.getLogger("ztun.route")

FAMILY = "inet"
TABLE = "ztun"
CHAIN = "output"
#: The nat output hook at `dstnat` priority, where a redirect belongs.
PRIORITY = -100
#: Where Debian (and derivatives) install python3-nftables for the system Python.
SYSTEM_MODULE_DIRS = ("/usr/lib/python3/dist-packages/nftables",)
#: The module loaded from there, under a name of ztun's own (sys.modules is not polluted).
PRIVATE_NAME = "_ztun_system_nftables"
#: A state file's table handle is at most this (the kernel's counter is 64-bit).
MAX_HANDLE = (1 << 63) - 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NftablesError(ZtunError):
    """auto_redirect could not be set up; the message is one sentence."""


class NftablesUnavailable(NftablesError):
    """No usable libnftables or python3-nftables on this machine."""


# -- the plan (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RedirectPlan:
    """What auto_redirect adds, as libnftables JSON commands (`commands`)."""

    interface: str
    #: IP version → the listener port TCP of that family is redirected to
    ports: dict[int, int]
    mark: int
    exclude: tuple[Network, ...] = field(default=())

    def commands(self) -> list[dict[str, Any]]:
        """The one transaction that creates the table (`create` fails if it exists)."""
        t = {"family": FAMILY, "table": TABLE}
        out: list[dict[str, Any]] = [
            {"metainfo": {"json_schema_version": 1}},
            {"create": {"table": {"family": FAMILY, "name": TABLE}}},
            {"add": {"chain": {**t, "name": CHAIN, "type": "nat", "hook": "output",
                               "prio": PRIORITY, "policy": "accept"}}},
        ]  # fmt: skip
        rules: list[list[dict[str, Any]]] = []
        if self.mark:
            rules.append([_match({"meta": {"key": "mark"}}, self.mark), {"return": None}])
        for version in (4, 6):
            nets = [n for n in self.exclude if n.version == version]
            if version not in self.ports or not nets:
                continue
            name = f"exclude{version}"
            out.append({"add": {"set": {
                **t, "name": name, "type": "ipv4_addr" if version == 4 else "ipv6_addr",
                "flags": ["interval"],
                "elem": [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
                         for n in _collapse(nets)],
            }}})  # fmt: skip
            proto = "ip" if version == 4 else "ip6"
            rules.append([_match({"payload": {"protocol": proto, "field": "daddr"}}, f"@{name}"),
                          {"return": None}])  # fmt: skip
        for version in (4, 6):
            port = self.ports.get(version)
            if port is None:
                continue
            rules.append([
                _match({"meta": {"key": "oifname"}}, self.interface),
                _match({"meta": {"key": "nfproto"}}, "ipv4" if version == 4 else "ipv6"),
                _match({"meta": {"key": "l4proto"}}, "tcp"),
                # How many connections took this way: `nft list table inet ztun` shows it.
                {"counter": None},
                {"redirect": {"port": port}},
            ])  # fmt: skip
        for expr in rules:
            out.append({"add": {"rule": {**t, "chain": CHAIN, "expr": expr}}})
        return out


def plan(
    *, interface: str, ports: dict[int, int], mark: int, route_exclude_address: list[Network]
) -> RedirectPlan:
    """The table for one TUN whose auto_route sends traffic to `interface` (pure)."""
    if not interface or not ports:
        raise ValueError("auto_redirect needs the TUN's name and at least one listener port")
    for version, port in ports.items():
        if version not in (4, 6) or not 0 < port < 65536:
            raise ValueError(f"bad listener port {port} for IPv{version}")
    return RedirectPlan(interface, dict(ports), mark, tuple(route_exclude_address))


def _match(left: dict[str, Any], right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _collapse(nets: list[Network]) -> list[Network]:
    """Overlapping or adjacent prefixes merged: an interval set refuses overlapping elements."""
    return list(ipaddress.collapse_addresses(nets))  # type: ignore[arg-type]


def delete_commands(handle: int | None) -> list[dict[str, Any]]:
    """Delete ztun's table: by its handle when known (a table of the same name made by
    someone else since cannot be hit), else by name."""
    table: dict[str, Any] = {"family": FAMILY, "name": TABLE}
    if handle is not None:
        table = {"family": FAMILY, "handle": handle}
    return [{"metainfo": {"json_schema_version": 1}}, {"delete": {"table": table}}]


# -- libnftables ------------------------------------------------------------------------------

_library: Any = None


def _load_module() -> Any:
    """The python3-nftables module: an importable one, else Debian's by file location."""
    try:
        import nftables  # type: ignore[import-not-found]

        return nftables
    except ImportError:
        pass
    cached = sys.modules.get(PRIVATE_NAME)
    if cached is not None:
        return cached
    for directory in SYSTEM_MODULE_DIRS:
        init = Path(directory) / "__init__.py"
        if not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location(
            PRIVATE_NAME, init, submodule_search_locations=[directory]
        )
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[PRIVATE_NAME] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[PRIVATE_NAME]
            continue
        return module
    return None


def library() -> Any:
    """A libnftables context with JSON output; NftablesUnavailable says what is missing."""
    global _library
    if _library is not None:
        return _library
    module = _load_module()
    if module is None:
        raise NftablesUnavailable("python3-nftables is not installed")
    try:
        nft = module.Nftables()
    except OSError:
        raise NftablesUnavailable("libnftables is not installed") from None
    except (AttributeError, TypeError):  # a module called nftables that is not this one
        raise NftablesUnavailable(
            f"the module `nftables` at {getattr(module, '__file__', '?')} is not python3-nftables"
        ) from None
    nft.set_json_output(True)
    nft.set_handle_output(True)
    _library = nft
    return nft


def unavailable() -> str | None:
    """Why auto_redirect cannot run on this machine (one clause), or None; for `ztun check`."""
    if not sys.platform.startswith("linux"):
        return "nftables exists only on Linux"
    try:
        library()
    except NftablesUnavailable as e:
        return str(e)
    return None


def _run(commands: list[dict[str, Any]]) -> tuple[int, Any, str]:
    rc, out, err = library().json_cmd({"nftables": commands})
    return rc, out, " ".join(str(err).split())


def table_handle() -> int | None:
    """The handle of table `inet ztun` in this network namespace, or None if there is none."""
    rc, out, _ = _run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
    if rc != 0 or not isinstance(out, dict):
        return None
    for item in out.get("nftables", ()):
        t = item.get("table") if isinstance(item, dict) else None
        if isinstance(t, dict) and t.get("name") == TABLE and t.get("family") == FAMILY:
            h = t.get("handle")
            return h if type(h) is int else None
    return None


def _netns_id() -> int:
    return os.stat("/proc/self/ns/net").st_ino


class AutoRedirect:
    """Creates a plan's table and deletes it again, recorded in a state file."""

    def __init__(self, p: RedirectPlan) -> None:
        self.plan = p
        self.path = state_path()
        self.active = False
        self.handle: int | None = None

    def apply(self) -> None:
        library()  # NftablesUnavailable before anything is written
        try:
            cleanup_leftovers(self.path)
        except state.StateError as e:
            raise NftablesError(f"auto_redirect: {e}") from None
        if table_handle() is not None:
            raise NftablesError(
                f"auto_redirect: an nftables table {FAMILY} {TABLE} exists that this ztun did "
                f"not record (delete it with `nft delete table {FAMILY} {TABLE}` if it is a "
                "leftover)"
            )
        try:
            self._write_state()
        except state.StateError as e:
            raise NftablesError(f"auto_redirect: {e}") from None
        self.active = True
        rc, _, err = _run(self.plan.commands())
        if rc != 0:
            self.active = False
            state.remove_state(self.path)
            raise NftablesError(f"auto_redirect: the kernel refused ztun's nftables table: {err}")
        self.handle = table_handle()
        if self.handle is not None:
            # If this fails the first file (no handle) stays: cleanup then deletes by name.
            with contextlib.suppress(state.StateError):
                self._write_state()
        log.info("auto_redirect: nftables table %s %s added (TCP to %s redirected to %s)",
                 FAMILY, TABLE, self.plan.interface,
                 ", ".join(f"IPv{v} :{p}" for v, p in sorted(self.plan.ports.items())))  # fmt: skip

    def _write_state(self) -> None:
        pid = os.getpid()
        state.write_state(self.path, {
            "pid": pid,
            "start_time": state.start_time(pid) or 0,
            "netns": _netns_id(),
            "table": [FAMILY, TABLE],
            "handle": self.handle,
        })  # fmt: skip

    def remove(self) -> None:
        """Delete the table; safe to call twice and after a failed apply."""
        if not self.active:
            return
        self.active = False
        _delete(self.handle)
        state.remove_state(self.path)


def state_path() -> Path:
    return state_dir() / f"auto-redirect-{_netns_id()}.json"


def _delete(handle: int | None) -> None:
    rc, _, err = _run(delete_commands(handle))
    if rc == 0:
        return
    left = table_handle()
    if left is not None and (handle is None or left == handle):
        log.warning("auto_redirect: cannot delete nftables table %s %s: %s", FAMILY, TABLE, err)


def cleanup_leftovers(path: Path | None = None) -> bool:
    """Delete the table a crashed run recorded; True if there was one. Reads no library when
    there is no state file."""
    path = path or state_path()
    data = state.read_state(path)
    if data is None:
        return False
    record = leftovers(data, _netns_id())
    if isinstance(record, str):
        log.warning("auto_redirect: ignoring state file %s: %s; nothing deleted", path, record)
        state.remove_state(path)
        return False
    pid, started, handle = record
    ours = pid == os.getpid() and started == state.start_time(pid)
    if not ours and state.is_running(pid, started):
        raise NftablesError(
            f"another ztun (pid {pid}) already manages auto_redirect in this network namespace"
        )
    try:
        found = table_handle()
    except NftablesUnavailable:
        log.warning("auto_redirect: state file %s names a table, but nftables is not available "
                    "to delete it", path)  # fmt: skip
        return False
    if found is not None and (handle is None or found == handle):
        log.warning("auto_redirect: removing the nftables table of a previous run (pid %d)", pid)
        _delete(found)
    state.remove_state(path)
    return found is not None


def leftovers(data: Any, netns: int) -> tuple[int, int, int | None] | str:
    """(pid, start time, table handle) of a state file, or what is wrong with it (pure)."""
    keys = {"pid", "start_time", "netns", "table", "handle"}
    if not isinstance(data, dict) or set(data) != keys:
        return "not the layout ztun writes"
    pid, started, handle = data["pid"], data["start_time"], data["handle"]
    if type(pid) is not int or not 0 < pid <= 1 << 22 or type(started) is not int or \
            not 0 <= started <= 1 << 63:  # fmt: skip
        return "no valid pid and start time"
    if data["netns"] != netns or type(data["netns"]) is not int:
        return "written in another network namespace"
    if data["table"] != [FAMILY, TABLE]:
        return f"{str(data['table'])[:60]} is not ztun's table"
    if handle is not None and (type(handle) is not int or not 0 < handle <= MAX_HANDLE):
        return "no valid table handle"
    return pid, started, handle
