"""The `selector` outbound: a group whose member is chosen by hand.

Owns the choice: `default` (the first member when absent) at start, unless
`experimental.cache_file` kept another one from an earlier run; `select` (the Clash API's
`PUT /proxies/{tag}`, the status page) changes it, writes it to the cache file, and with
`interrupt_exist_connections` ends the flows open through the member it left.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ztun.config.options import SelectorOutboundOptions
from ztun.errors import ZtunError
from ztun.outbound.group import GroupOutbound
from ztun.runtime.cache_file import read_state, update_state

log = logging.getLogger("ztun")

#: the cache file's key: {group tag: chosen member}
CACHE_KEY = "selected"


class SelectorOutbound(GroupOutbound):
    type = "selector"
    clash_type = "Selector"

    def __init__(self, options: SelectorOutboundOptions, cache_file: Path | None = None) -> None:
        super().__init__(options.tag, options.outbounds, options.interrupt_exist_connections)
        self.options = options
        self.cache_file = cache_file
        self._now = options.default or options.outbounds[0]
        if cache_file is not None:
            kept = (read_state(cache_file) or {}).get(CACHE_KEY)
            choice = kept.get(self.tag) if isinstance(kept, dict) else None
            if isinstance(choice, str) and choice in self.member_tags:
                self._now = choice
            elif choice is not None:
                log.info("group %s: the cache file's choice %r is no member any more; using %s",
                         self.tag, choice, self._now)  # fmt: skip

    @property
    def now(self) -> str:
        return self._now

    def follow(self, member: str) -> None:
        """Use `member` as the main process's selector does (a worker process,
        runtime/worker.py): as `select`, without writing the cache file, which the main
        process keeps."""
        if member in self.member_tags and member != self._now:
            old, self._now = self._now, member
            self.switched(old, member, "selected")

    def select(self, member: str) -> None:
        """Use `member` from now on; ZtunError when it is no member of the group."""
        if member not in self.member_tags:
            raise ZtunError(f"{member!r} is not a member of group {self.tag!r} "
                            f"(members: {', '.join(self.member_tags)})")  # fmt: skip
        old, self._now = self._now, member
        if old == member:
            return
        if self.cache_file is not None:
            state = read_state(self.cache_file) or {}
            kept = state.get(CACHE_KEY)
            kept = dict(kept) if isinstance(kept, dict) else {}
            kept[self.tag] = member
            update_state(self.cache_file, CACHE_KEY, kept)
        self.switched(old, member, "selected")
