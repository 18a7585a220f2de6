"""One piece of start-up work in a forked child, so that what it leaves in the heap leaves
with the child: the parse of a big rule set (ztun.provider.ruleset) and a config's first check
against the JSON schema (ztun.check), whose results reach the parent as files (the compiled
cache, the schema marker) that it then reads as on a restart.

Only where a fork is safe: with one thread (start-up, the workers' supervisor). A fork copies
only the calling thread, and a lock another thread held would stay held in the child.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def in_child(work: Callable[[], bool]) -> bool:
    """Run `work` in a forked child and wait for it; True when it returned True. False,
    without forking, where no fork is possible or safe, and when the child failed in any way:
    the caller then does the work itself (and reports its errors as ever)."""
    fork = getattr(os, "fork", None)
    if fork is None or threading.active_count() > 1:
        return False
    pid = fork()
    if pid == 0:  # the child: never runs the parent's exit handlers or flushes its buffers
        code = 1
        try:
            code = 0 if work() else 1
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return False
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
