"""`experimental.cache_file`: the one state file that outlives a run.

Owns where the file is (`cache_path`) and writing one part of it without losing the others
(`update_state`): the DNS module keeps its FakeIP table under "fakeip", the selector groups
their choices under "selected". JSON, as the DNS module already wrote it: a handful of small
entries that a person can read and fix, no sqlite schema or migrations for them. Every write
goes to a temporary file renamed over the old one, so a crash never leaves half a file
(`write_atomic`, which the rule-set downloads and the compiled cache use too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ztun.config.options import CacheFileOptions

log = logging.getLogger("ztun")

#: A cache file bigger than this is not read (a FakeIP table of 65536 names is ~3 MiB).
MAX_BYTES = 64 * 1024 * 1024


def cache_path(options: CacheFileOptions, base_dir: str | Path | None) -> Path | None:
    """The file, relative paths from the config's directory; None when it is not enabled."""
    if not options.enabled:
        return None
    path = Path(options.path)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def read_state(path: Path, what: str = "") -> dict[str, Any] | None:
    """The file's content; None (with a warning when it exists) if it cannot be read."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"bigger than {MAX_BYTES} bytes")
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cache file %s cannot be read (%s)%s", path, e, what)
        return None
    return state if isinstance(state, dict) else None


def update_state(path: Path, key: str, value: Any) -> bool:
    """Set `key` in the file, keeping the other keys; False (logged) when it cannot be
    written."""
    state = read_state(path) or {}
    state[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, [json.dumps(state).encode("utf-8")])
    except OSError as e:
        log.warning("cache file %s cannot be written: %s", path, e)
        return False
    return True


def write_atomic(path: Path, chunks: Sequence[bytes | memoryview]) -> None:
    """`chunks` as the file at `path`: written to a temporary file beside it (`<name>…tmp`),
    then renamed over it, so a crash or a concurrent reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
