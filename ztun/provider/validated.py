"""Which configs passed the JSON schema before: one empty marker file per config, so that
`ztun run` need not load jsonschema again for a config it already checked.

jsonschema with its dependencies is about 5 MiB of RSS for the life of the process, more than
anything else at start-up, and a router restarts with the same config far more often than
with a new one. The marker's name is a hash of ztun's version, the schema's text and the merged
config (every include and `${VAR}` resolved), so any change to any of them checks again. Only
a config that produced no finding at all gets a marker; the checks other than the schema
(references, clashes, marks …) run on every start regardless.

Markers live in `<cache dir>/validated/` (private, 0700; markers 0600); at most `MAX_MARKERS`,
the oldest removed first. Any error here just means the schema is checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ztun import __version__
from ztun.config.schema import schema_text

#: Markers kept; one per config a host has run recently.
MAX_MARKERS = 64


def config_key(data: Any) -> str | None:
    """The marker name for merged config `data`, None when it cannot be hashed."""
    try:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None
    h = hashlib.sha256()
    for part in (__version__, schema_text(), text):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def passed_before(directory: Path, key: str) -> bool:
    return (directory / "validated" / key).is_file()


def remember(directory: Path, key: str) -> None:
    """Leave the marker for `key`; drop the oldest beyond `MAX_MARKERS`."""
    where = directory / "validated"
    with contextlib.suppress(OSError):
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(where / key, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        markers = sorted(where.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in markers[:-MAX_MARKERS]:
            old.unlink(missing_ok=True)
