"""What `ztun status` and `ztun top` print, from the API's JSON: text in, text out.

`top` keeps the previous snapshot to show rates (bytes per second per connection), sorts by
them, and fits the table to the terminal; the CLI clears the screen and reprints.
"""

from __future__ import annotations

from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human(n: float) -> str:
    i = 0
    while n >= 1024 and i < len(_UNITS) - 1:
        n /= 1024
        i += 1
    return f"{n:.1f} {_UNITS[i]}" if i else f"{int(n)} B"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for row in [header, *rows]:
        cells = [str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
                 for i, c in enumerate(row)]  # fmt: skip
        out.append("  ".join(cells).rstrip())
    return out


def status_text(status: dict[str, Any]) -> str:
    """`ztun status`: flows, totals per outbound, DNS counters."""
    lines = [
        f"ztun {status.get('version', '?')}, up {duration(status.get('uptime', 0))}, "
        f"mode {status.get('mode', '?')}",
        f"connections: {status.get('connections', 0)} open, "
        f"{status.get('connectionsTotal', 0)} since start "
        f"({status.get('closedByApi', 0)} closed through the API)",
        f"traffic: up {human(status.get('uploadTotal', 0))}, "
        f"down {human(status.get('downloadTotal', 0))}",
        "",
    ]
    outbounds = status.get("outbounds") or {}
    rows = [[tag, str(o.get("connections", 0)), human(o.get("upload", 0)),
             human(o.get("download", 0))] for tag, o in sorted(outbounds.items())]  # fmt: skip
    lines += _table(["outbound", "open", "upload", "download"], rows, {1, 2, 3}) if rows else [
        "no traffic yet"
    ]
    dns = status.get("dns") or {}
    lines.append("")
    if dns:
        keys = ["queries", "cache_hits", "answers", "timeouts", "errors"]
        rows = [[tag, *(str(d.get(k, 0)) for k in keys)] for tag, d in sorted(dns.items())]
        lines += _table(["dns server", "queries", "cache hits", "answers", "timeouts", "errors"],
                        rows, {1, 2, 3, 4, 5})  # fmt: skip
    else:
        lines.append("dns: ztun's DNS module is not running")
    return "\n".join(lines)


class Top:
    """`ztun top`: one screen per snapshot, rates from the previous one."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}
        self._last_totals: tuple[int, int] | None = None

    def screen(self, connections: dict[str, Any], status: dict[str, Any], interval: float,
               width: int = 120, height: int = 40) -> str:  # fmt: skip
        interval = max(interval, 1e-3)
        totals = (int(connections.get("uploadTotal", 0)), int(connections.get("downloadTotal", 0)))
        up_rate = down_rate = 0.0
        if self._last_totals is not None:
            up_rate = max(totals[0] - self._last_totals[0], 0) / interval
            down_rate = max(totals[1] - self._last_totals[1], 0) / interval
        self._last_totals = totals
        rows = []
        seen: dict[str, tuple[int, int]] = {}
        for c in connections.get("connections") or []:
            up, down = int(c.get("upload", 0)), int(c.get("download", 0))
            before = self._last.get(c.get("id", ""), (up, down))
            seen[c.get("id", "")] = (up, down)
            rate = (max(up - before[0], 0) + max(down - before[1], 0)) / interval
            m = c.get("metadata") or {}
            host = f"{m.get('host') or m.get('destinationIP', '')}:{m.get('destinationPort', '')}"
            rows.append((rate, [
                human(rate) + "/s", m.get("network", ""), m.get("inbound") or m.get("type", ""),
                " > ".join(c.get("chains") or []), human(up), human(down), c.get("rule", ""),
                host,
            ]))  # fmt: skip
        self._last = seen
        rows.sort(key=lambda r: -r[0])
        head = [
            f"ztun {status.get('version', '?')}  up {duration(status.get('uptime', 0))}  "
            f"mode {status.get('mode', '?')}  connections {len(rows)}  "
            f"total up {human(totals[0])} down {human(totals[1])}",
            f"now: up {human(up_rate)}/s  down {human(down_rate)}/s    (q or Ctrl-C quits)",
            "",
        ]
        room = max(height - len(head) - 2, 1)
        shown = [r[1] for r in rows[:room]]
        table = _table(["rate", "net", "inbound", "outbound", "up", "down", "rule", "host"],
                       shown, {0, 4, 5})  # fmt: skip
        if len(rows) > room:
            table.append(f"… {len(rows) - room} more")
        return "\n".join(line[:width] for line in head + table)
