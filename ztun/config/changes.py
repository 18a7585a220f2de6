"""What a reload changes: two configs' Options in, what must be rebuilt or restarted out.

Owns the decisions of a live reload (`ztun reload`, SIGHUP, `PUT /configs`) that need no
running ztun: which inbounds are kept, restarted, stopped or started (by tag), whether the DNS
module, the network monitor or the outgoing sockets' mark must change, and which sections a
reload does not apply (the Clash API's listener, logging). box.py carries the plan out.

Pure: compares frozen dataclasses; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ztun.config.options import InboundOptions, Options


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    #: inbounds whose options (and what they read of `route`) are the same: left running
    keep: tuple[str, ...] = ()
    #: same tag, other options: stopped, then started again with the new options
    restart: tuple[str, ...] = ()
    #: kept inbounds whose changed options apply without a restart (`LIVE_OPTIONS`): handed
    #: their new options
    retune: tuple[str, ...] = ()
    #: tags the new config no longer has
    stop: tuple[str, ...] = ()
    #: tags only the new config has
    start: tuple[str, ...] = ()
    #: the DNS module is built again (its servers, cache file, or the outbounds it detours
    #: through changed, or whether a route rule hijacks DNS); otherwise it is kept and only
    #: its rules are swapped
    rebuild_dns: bool = False
    #: the network monitor is started again (auto_detect_interface, default_interface,
    #: whether a TUN auto_routes, or the TUN devices it leaves out changed); otherwise it is
    #: kept and handed the new outbounds and inbounds
    rebuild_monitor: bool = False
    #: sections the reload leaves as they were, each with the reason, for the log
    not_applied: tuple[str, ...] = field(default=())

    @property
    def inbounds_changed(self) -> bool:
        return bool(self.restart or self.stop or self.start)


#: Inbound options a running inbound applies when told (`retune`), so that changing only them
#: keeps the inbound, its device and its flows: the TUN's busy polling is a loop setting.
LIVE_OPTIONS: dict[str, tuple[str, ...]] = {"tun": ("busy_poll",)}


def _without_live(inbound: InboundOptions) -> InboundOptions:
    live = LIVE_OPTIONS.get(inbound.type, ())
    return replace(inbound, **{name: None for name in live}) if live else inbound  # type: ignore[arg-type]


def _route_view(inbound: InboundOptions, options: Options) -> object:
    """What an inbound reads of the `route` section besides its own options: a TUN's
    auto_route uses `route.default_mark` for its rules."""
    if getattr(inbound, "auto_route", False):
        return options.route.default_mark
    return None


def _monitored(options: Options) -> tuple[object, ...]:
    """What the network monitor is built from: whether it runs (auto_detect_interface, or a
    TUN's auto_route) and which TUN devices it leaves out."""
    route = options.route
    tuns = tuple(sorted(n for o in options.inbounds if (n := getattr(o, "interface_name", ""))))
    auto_route = any(getattr(o, "auto_route", False) for o in options.inbounds)
    return (route.auto_detect_interface, route.default_interface, auto_route, tuns)


def plan_reload(old: Options, new: Options, *, old_hijacks: bool = False,
                new_hijacks: bool = False) -> ReloadPlan:  # fmt: skip
    """The plan for going from `old` to `new`; `*_hijacks`: a route rule hijacks DNS (the DNS
    module then runs even without `dns.servers`)."""
    before = {o.tag: o for o in old.inbounds}
    after = {o.tag: o for o in new.inbounds}
    keep, retune, restart, start = [], [], [], []
    for tag, options in after.items():
        previous = before.get(tag)
        if previous is None:
            start.append(tag)
        elif _route_view(previous, old) != _route_view(options, new):
            restart.append(tag)
        elif previous == options:
            keep.append(tag)
        elif _without_live(previous) == _without_live(options):
            keep.append(tag)
            retune.append(tag)
        else:
            restart.append(tag)
    stop = [tag for tag in before if tag not in after]

    # Rules are swapped in any case; the module itself is rebuilt only when what it is built
    # from changed (a kept module keeps its cache and its FakeIP and reverse-mapping tables).
    rebuild_dns = (
        replace(old.dns, rules=()) != replace(new.dns, rules=())
        or old.experimental.cache_file != new.experimental.cache_file
        or old.outbounds != new.outbounds
        or old_hijacks != new_hijacks
    )
    rebuild_monitor = _monitored(old) != _monitored(new)
    not_applied = []
    if old.experimental.clash_api != new.experimental.clash_api:
        not_applied.append("experimental.clash_api (the API keeps its listener, secret and "
                           "page; they change at the next start)")  # fmt: skip
    if old.log != new.log:
        not_applied.append("log (applies at the next start)")
    return ReloadPlan(keep=tuple(keep), restart=tuple(restart), retune=tuple(retune),
                      stop=tuple(stop), start=tuple(start), rebuild_dns=rebuild_dns,
                      rebuild_monitor=bool(rebuild_monitor),
                      not_applied=tuple(not_applied))  # fmt: skip
