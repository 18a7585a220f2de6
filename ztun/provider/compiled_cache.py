"""The compiled rule-set cache: a set whose source did not change is read back, not parsed.

Beside the downloaded copies in the cache directory (`ztun.provider.ruleset`), one file per
source: `compiled-<key>.ztrs` (layout in `ztun.route.compiled`), keyed by the source's bytes,
its format and behavior, and the compiled format's version. A warm start reads the file, checks
its checksum and copies the packed arrays out: no parse, no per-entry work.

The file is read, not mapped. An `mmap` would save one copy (~30 ms for 1.8M entries), but the
checksum pass touches every page anyway, and a file truncated in place under a live mapping
kills the process with SIGBUS on the next lookup (a test that truncated it did just that).

Writes are atomic (a temporary file renamed into place) in a private directory (0700 when this
module creates it). The files together stay under `MAX_CACHE_BYTES`: after each write the
least recently used ones (by modification time, which a hit refreshes) are removed. A file that
is damaged, truncated, foreign or of another version is ignored and replaced by the next write.
Nothing here raises for a cache problem: a cache that cannot be read or written costs time only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from ztun.route import compiled
from ztun.runtime.cache_file import write_atomic

#: All compiled files together stay under this many bytes (oldest removed first).
MAX_CACHE_BYTES = 256 * 1024 * 1024
#: Sources smaller than this are parsed every time: they take milliseconds.
MIN_SOURCE_BYTES = 64 * 1024
#: A compiled file larger than this is not read (a source is at most 64 MiB; its compiled
#: form is smaller).
MAX_FILE_BYTES = 256 * 1024 * 1024
_PREFIX = "compiled-"
_SUFFIX = ".ztrs"
#: Leftover temporary files (a crash mid-write) older than this are removed with the oldest.
_STALE_TMP_SECONDS = 600.0
log = logging.getLogger("ztun.provider")

Rules = list[dict[str, Any]]


class CompiledCache:
    """Compiled rule sets in `directory`, at most `max_bytes` of them together."""

    def __init__(self, directory: Path, *, max_bytes: int = MAX_CACHE_BYTES,
                 min_source_bytes: int = MIN_SOURCE_BYTES) -> None:  # fmt: skip
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.min_source_bytes = min_source_bytes

    def wanted(self, source: bytes) -> bool:
        """Whether a source this big is worth caching."""
        return len(source) >= self.min_source_bytes

    def path(self, key: bytes) -> Path:
        return self.directory / f"{_PREFIX}{key.hex()[:40]}{_SUFFIX}"

    def load(self, key: bytes) -> tuple[Rules, list[str]] | None:
        """The rules and warnings compiled for `key`, or None (absent, damaged, foreign)."""
        path = self.path(key)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError:
            return None
        if len(data) > MAX_FILE_BYTES:
            return None
        try:
            result = compiled.decode(memoryview(data), key)
        except compiled.CompiledFormatError as exc:
            log.info("ignoring compiled rule set %s: %s", path, exc)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        return result

    def store(self, key: bytes, rules: Rules, warnings: list[str]) -> None:
        """Write the compiled form of `rules`; a failure is logged, never raised."""
        try:
            chunks = compiled.encode(key, rules, warnings)
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.path(key)
            write_atomic(path, chunks)
            self.evict(keep=path)
        except (OSError, ValueError) as exc:
            log.info("cannot cache the compiled rule set in %s: %s", self.directory, exc)

    def evict(self, keep: Path | None = None) -> None:
        """Remove the least recently used files until the rest fit in `max_bytes`; a file
        larger than the bound on its own goes too."""
        files = []
        now = time.time()
        for entry in os.scandir(self.directory):
            if not entry.name.startswith(_PREFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.name.endswith(".tmp"):
                if now - st.st_mtime > _STALE_TMP_SECONDS:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                continue
            if entry.name.endswith(_SUFFIX):
                files.append((st.st_mtime, entry.path, st.st_size))
        total = sum(size for _, _, size in files)
        # Oldest first; what was just written goes last, only when it alone is over the bound.
        for _mtime, file, size in sorted(files, key=lambda f: (str(keep) == f[1], f[0])):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                os.unlink(file)
                total -= size


