"""The run file: how `ztun reload` finds the ztun that runs a config, and hears how a reload
went.

`ztun run CONFIG` writes `run-<hash of CONFIG's absolute path>.json` into the state directory
(ztun.platform.linux.state: private, atomic, no symlinks followed) with its pid and start time,
the config's path, where its Clash API listens (null without one) and in which network
namespace (127.0.0.1 of another namespace is another host), and the outcome of its last reload
(a counter, whether it was applied, the problems). `ztun reload CONFIG` reads it, signals
only the exact process that wrote it (pid and start time, so a recycled pid is never signalled)
and, after a SIGHUP, waits for the counter to move. The file goes when that ztun exits; one left
by a killed ztun names a dead process and is ignored, and the next `ztun run` removes it
(whichever config it names).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

from ztun.platform.linux import state


def run_file(config: str | Path) -> Path:
    """The run file of the ztun that runs `config` (a path as given: made absolute here)."""
    key = hashlib.sha256(os.fsencode(os.path.abspath(config))).hexdigest()[:16]
    return state.state_dir() / f"run-{key}.json"


def netns() -> int:
    """The inode of this process's network namespace (0 when it cannot be read)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


#: At most this many run files are looked at for leftovers of killed runs per start.
STALE_SCAN_LIMIT = 256


def remove_stale_run_files() -> int:
    """Remove the run files of ztuns that no longer run (a SIGKILL leaves its file); how
    many."""
    removed = 0
    with contextlib.suppress(OSError):
        for i, path in enumerate(state.state_dir().glob("run-*.json")):
            if i >= STALE_SCAN_LIMIT:
                break
            try:
                data = state.read_state(path)
            except state.StateError:
                return removed
            pid = data.get("pid") if isinstance(data, dict) else None
            started = data.get("start_time") if isinstance(data, dict) else None
            if isinstance(pid, int) and isinstance(started, int) and state.is_running(pid, started):
                continue
            state.remove_state(path)
            removed += 1
    return removed


def write_run_file(config: str | Path, api: str | None, reloads: int = 0,
                   last: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Record this process as the ztun that runs `config`; StateError when it cannot."""
    pid = os.getpid()
    state.write_state(run_file(config), {
        "pid": pid,
        "start_time": state.start_time(pid) or 0,
        "config": os.path.abspath(config),
        "api": api,
        "netns": netns(),
        "reloads": reloads,
        "last_reload": last,
    })  # fmt: skip


def read_run_file(config: str | Path) -> dict[str, Any] | None:
    """What the live ztun running `config` wrote, or None when none runs it."""
    try:
        data = state.read_state(run_file(config))
    except state.StateError:
        return None
    if not isinstance(data, dict):
        return None
    pid, started = data.get("pid"), data.get("start_time")
    if not isinstance(pid, int) or not isinstance(started, int):
        return None
    if not state.is_running(pid, started):
        return None
    return data


def remove_run_file(config: str | Path) -> None:
    """Remove the run file if this process wrote it (a newer ztun's is left alone)."""
    with contextlib.suppress(state.StateError):
        data = state.read_state(run_file(config))
        if isinstance(data, dict) and data.get("pid") == os.getpid():
            state.remove_state(run_file(config))
