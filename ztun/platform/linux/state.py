"""ztun's state files: a private directory, atomic writes that follow no symlink, and the
identity of the process that wrote one.

A state file says what a running ztun changed on the host (auto_route's rules and routes), so
that the next start can undo what a SIGKILLed run left behind. Whatever it says gets deleted,
so it must come from ztun and nobody else:

- the directory (`$ZTUN_STATE_DIR`, default /run/ztun) is created 0700 and opened without
  following a symlink; one owned by another user, or writable by group or others, is refused
  (one readable by them, as an older ztun made it, is tightened to 0700);
- a file is written to a temporary name in that directory (O_CREAT|O_EXCL|O_NOFOLLOW, 0600),
  synced and renamed over the old one, so a reader sees the old or the new file, never half;
- a file is read without following a symlink, and only if it is a regular file of this user
  with mode 0600 and at most `MAX_STATE_BYTES` long; anything else is ignored and removed.
  What it contains is checked by its user (ztun.platform.linux.routes) before anything is
  deleted.

"Is the process that wrote it still alive" compares the exact process: its pid and its start
time (field 22 of /proc/PID/stat, clock ticks since boot), so a recycled pid is not mistaken
for a live ztun, and a live ztun is not mistaken for a dead one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ztun.errors import ZtunError

log = logging.getLogger("ztun.route")

DEFAULT_DIR = "/run/ztun"
#: A state file longer than this is not ztun's (a plan of thousands of rules is ~200 KiB).
MAX_STATE_BYTES = 1 << 20


class StateError(ZtunError):
    """The state directory or a state file cannot be used safely; the message says why."""


def state_dir() -> Path:
    return Path(os.environ.get("ZTUN_STATE_DIR") or DEFAULT_DIR)


@contextlib.contextmanager
def _open_dir(directory: Path, create: bool) -> Iterator[int | None]:
    """The state directory, opened without following a symlink and checked: None if it does
    not exist and `create` is false."""
    if create:
        if not directory.parent.exists():
            os.makedirs(directory.parent, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise
        yield None
        return
    except OSError as e:
        kind = "a symlink" if os.path.islink(directory) else e.strerror
        raise StateError(f"state directory {directory}: {kind}; ztun keeps its state only in "
                         "a real directory of its own (set ZTUN_STATE_DIR)") from None  # fmt: skip
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid():
            raise StateError(
                f"state directory {directory} belongs to uid {st.st_uid}, not to ztun's uid "
                f"{os.geteuid()}: remove it or set ZTUN_STATE_DIR"
            )
        if mode & 0o022:
            raise StateError(
                f"state directory {directory} has mode {mode:04o}, writable by others: "
                "remove it (ztun recreates it 0700) or chmod 700 it"
            )
        if mode & 0o077:
            os.fchmod(fd, 0o700)
            log.info("state directory %s: mode %04o tightened to 0700", directory, mode)
        yield fd
    finally:
        os.close(fd)


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` atomically, mode 0600, following no symlink."""
    text = json.dumps(data, separators=(",", ":")).encode()
    name = path.name
    tmp = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with _open_dir(path.parent, create=True) as dfd:
            assert dfd is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)  # a leftover of this pid's earlier life
            fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(text)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
    except OSError as e:
        raise StateError(f"cannot write {path}: {e.strerror}") from None


def read_state(path: Path) -> Any:
    """The JSON in `path`, or None when there is none or it is not a file ztun wrote (a
    symlink, another owner, a mode other than 0600, too long, not JSON): such a file is
    removed with a warning and its content never used. StateError: the directory is unsafe."""
    name = path.name
    with _open_dir(path.parent, create=False) as dfd:
        if dfd is None:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)  # fmt: skip
        except FileNotFoundError:
            return None
        except OSError as e:
            why = "a symlink" if _is_link(name, dfd) else e.strerror
            return _discard(path, dfd, why)
        try:
            st = os.fstat(fd)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISREG(st.st_mode):
                return _discard(path, dfd, "not a regular file")
            if st.st_uid != os.geteuid():
                return _discard(path, dfd, f"owned by uid {st.st_uid}")
            if mode != 0o600:
                return _discard(path, dfd, f"mode {mode:04o}, not 0600")
            if st.st_size > MAX_STATE_BYTES:
                return _discard(path, dfd, f"{st.st_size} bytes long")
            raw = os.read(fd, MAX_STATE_BYTES + 1)
        except OSError as e:
            return _discard(path, dfd, e.strerror or "unreadable")
        finally:
            os.close(fd)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _discard(path, dfd, "not JSON")


def remove_state(path: Path) -> None:
    """Delete `path` (never what a symlink there points to); no error if it is gone."""
    with contextlib.suppress(OSError), _open_dir(path.parent, create=False) as dfd:
        if dfd is not None:
            os.unlink(path.name, dir_fd=dfd)


def _is_link(name: str, dfd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _discard(path: Path, dfd: int, why: str) -> None:
    log.warning("ignoring state file %s (%s): not written by ztun; removed, nothing in it used",
                path, why)  # fmt: skip
    with contextlib.suppress(OSError):
        os.unlink(path.name, dir_fd=dfd)
    return None


# -- which process --------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22); None if
    there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold ") ": split after the
    # last one. What follows starts at field 3, so field 22 is the 20th.
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_running(pid: int, started: int) -> bool:
    """Whether the process that was `pid` when it started at `started` still runs."""
    return pid > 0 and start_time(pid) == started
