"""Who owns a flow's source socket: its user (uid) and, when asked, its process.

For the rule items `user`, `user_id`, `process_name`, `process_path`, `process_path_regex`.
`OwnerFinder.find(network, src_ip, src_port, dst_ip, dst_port)` is the one call every inbound
makes (the 5-tuple as the local application's socket sees it: its own address first):

1. netlink `sock_diag` names the socket: its inode and uid, in one exact lookup (about 8 µs; done on
   the caller's thread, since the kernel answers inside `send`). The uid alone serves `user`
   and `user_id`: configs with only those items never touch /proc.
2. Only when a rule needs the process: which process holds an fd linking to
   `socket:[inode]`. Linux has no index from a socket to its process; each fd link read costs
   about 3 µs (procfs answers from memory, never a wait), so the search is about reading as
   few links as possible. On the caller's thread, within `INLINE_PROBES` links:
   - the index of sockets already seen in the fd tables of the processes of recent flows
     (a socket read on the way to an earlier one): no link at all if it was read within
     `INDEX_TRUST`, else one to confirm it is still there;
   - otherwise those processes' fds, likeliest first: just after where the last socket was
     found (a client's burst of new sockets takes free fds in ascending order), the lowest
     fds seen closed (a new socket takes the lowest free fd), past the highest fd, then its
     sockets oldest first.
   When those miss and the latest flows all came from one process (a busy client), its
   whole fd table is read, if small (a sweep: under load the lookups lag and it finds the
   dozens of sockets made since, which the next lookups find in the index). Only then does
   a worker thread search, awaited with a deadline: the recent processes, then every
   process of the socket's uid, newest first, listed and probed, bounded in time and links;
   the process it finds, with its fd table as read there, goes to the inline step, so its
   next sockets are found inline. A miss while such a search runs waits for it first (the
   first flows of a new client come together, and that search is likely to find their
   process too). The path is /proc/PID/exe.

Measured with bench/bench_owner.py (a client process keeping 64 loopback connections busy,
as bench_tun.py's load does; 2-core machine shared with other jobs): 24-40 µs of CPU a
lookup (sock_diag about 8 µs of it), 2-3 links read, under 0.1 % of lookups searched by the
worker, against about 330 µs of ztun's CPU per TUN connection. Before the index and the
walks: 91 links and 20 % searched, 350 µs. The hard case is a process closing its sockets in
random order (any fd may hold the new one): 39 links a lookup with 64 sockets open.

Bounds of a wrong owner: a process found is one that held the socket when its fd link was
read, at most `INDEX_TRUST` (1 s) ago; a /proc/PID directory opened earlier fails once that
process exits, whatever reuses the pid, and a table the worker read is never believed without
a link read again on this side. So a socket passed to another process (over a Unix socket, or
kept across a fork by the child only) is named after its first holder for at most 1 s; a
socket held by two processes names whichever was found, as `ss -p` would. The executable path
of a process is read again after `EXE_TTL` (1 s): a process that `execve`s keeps its fds and
pid, and is named by its old path for at most that long. A process that exits before its
lookup leaves no socket: the flow is "unknown".

Whatever fails (no such socket: gone, or in another network namespace; /proc unreadable; the
deadline) gives `UNKNOWN` or an owner with only what was found: never an error to the flow.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import pwd
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import chain, islice
from typing import Any

from ztun.platform.linux.owner_parse import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    NETLINK_SOCK_DIAG,
    DiagAnswer,
    diag_request,
    parse_diag_reply,
    parse_exe_link,
    parse_socket_link,
    process_name,
)

log = logging.getLogger("ztun.owner")

#: How long a flow waits for its owner at most; after that it is routed as unknown.
LOOKUP_TIMEOUT = 0.5
#: The /proc search of one lookup stops after this long, or after this many fd links.
SCAN_DEADLINE = 0.4
MAX_LINKS_PER_SCAN = 50_000
#: Lookups waiting for the worker at most; more are answered at once with the uid only.
MAX_PENDING = 256
#: Socket inodes remembered: by the worker's searches (inode → pid), and by the inline step
#: (inode → process and fd); processes the inline step tries.
MAX_INODES = 8192
MAX_RECENT_PIDS = 16
MAX_USER_NAMES = 1024
#: fd links the inline step may read per lookup (about 3 µs each) before the worker takes over.
INLINE_PROBES = 64
#: A process's fd table is read whole (by the worker, or by the inline step's sweep) or
#: listed by the inline step only up to this many fds (listing costs about 0.5 µs an fd).
MAX_INLINE_LISTING = 256
#: The most of a process's fd table the worker hands over (its highest fds), and the most
#: closed fds remembered per process.
MAX_SEED = 1024
MAX_CLOSED = 256
#: Flows in a row from one process after which a miss reads its whole fd table inline.
SWEEP_STREAK = 8
#: fds in a row without a new socket that end one of the inline step's walks.
WALK_MISSES = 2
#: How long the inline step believes a socket it saw in a process's fd table without reading
#: the link again (a socket passed to another process keeps its first owner that long).
INDEX_TRUST = 1.0
#: How long a recent process's executable path is used before it is read again.
EXE_TTL = 1.0

#: What a read fd link gives besides a socket's inode: another kind of file, or no fd.
_NOT_SOCKET = 0
_CLOSED = -1
#: fd numbers as the text readlink takes, made once (str() of an int costs a tenth of a link)
_FD_NAME_COUNT = 1024
_FD_NAMES = [str(n) for n in range(_FD_NAME_COUNT)]


class _Process:
    """A process that owned a recent flow: its open /proc/PID and /proc/PID/fd directories
    (valid for that process only: once it exits they fail, whatever reuses its pid later) and
    what its fds linked to when last read."""

    __slots__ = ("closed", "cursor", "dir_fd", "exe_at", "exe_path", "fd_dir", "max_fd",
                 "others", "owner", "pid", "sockets")  # fmt: skip

    def __init__(self, pid: int, dir_fd: int, fd_dir: int) -> None:
        self.pid = pid
        self.dir_fd = dir_fd
        self.fd_dir = fd_dir
        #: fd → socket inode, in the order each fd's current socket was first seen (the
        #: oldest socket, the likeliest to have closed and had its fd reused, first)
        self.sockets: dict[int, int] = {}
        #: fds that linked to something else, and fds found closed
        self.others: set[int] = set()
        self.closed: set[int] = set()
        #: where the last socket looked up was found
        self.cursor = -1
        self.max_fd = -1
        self.exe_path: str | None = None
        self.exe_at = float("-inf")
        #: the last answer given for this process
        self.owner: Owner | None = None

    def read(self, fd: int) -> int:
        """The inode of the socket fd `fd` links to now, `_NOT_SOCKET` or `_CLOSED`."""
        try:
            link = os.readlink(_FD_NAMES[fd] if fd < _FD_NAME_COUNT else str(fd),
                               dir_fd=self.fd_dir)  # fmt: skip
        except OSError:
            return _CLOSED  # closed meanwhile, or the process is gone
        return parse_socket_link(link) or _NOT_SOCKET

    def alive(self) -> bool:
        try:
            os.stat("stat", dir_fd=self.dir_fd)
        except OSError:
            return False
        return True

    def exe(self, now: float) -> str | None:
        """The executable's path, read again once it is `EXE_TTL` old (`execve` keeps the
        pid and the fds: a path read before it is wrong for at most that long)."""
        if now - self.exe_at >= EXE_TTL:
            try:
                self.exe_path = parse_exe_link(os.readlink("exe", dir_fd=self.dir_fd))
            except OSError:
                self.exe_path = None  # gone meanwhile, or a kernel thread
            self.exe_at = now
        return self.exe_path

    def close(self) -> None:
        os.close(self.dir_fd)
        os.close(self.fd_dir)


@dataclass(frozen=True, slots=True)
class Owner:
    """What is known of a flow's local owner; None fields are unknown."""

    user_id: int | None = None
    user: str | None = None
    pid: int | None = None
    path: str | None = None

    @property
    def name(self) -> str | None:
        return process_name(self.path) if self.path else None


UNKNOWN = Owner()

#: What the worker's search gives: the owner, and the fd table of its process as read there
#: (fd → socket inode or `_NOT_SOCKET`), for the inline step.
_Searched = tuple[Owner, dict[int, int] | None]


class OwnerFinder:
    """Finds the owner of local sockets; `process=False` stops at the user (no /proc)."""

    def __init__(
        self, *, process: bool, timeout: float = LOOKUP_TIMEOUT, proc: str = "/proc"
    ) -> None:
        self.process = process
        self.timeout = timeout
        self.proc = proc
        self._local = threading.local()
        self._lock = threading.Lock()
        self._inodes: OrderedDict[int, int] = OrderedDict()
        #: processes of recent flows, for the inline step, and the socket inodes their fds
        #: linked to when last read (both touched on the caller's thread only)
        self._procs: OrderedDict[int, _Process] = OrderedDict()
        self._where: dict[int, tuple[_Process, int, float]] = {}
        #: the fds one probe has read already (kept to save making one per lookup)
        self._tried: set[int] = set()
        self._users: dict[int, str | None] = {}
        self._executor: ThreadPoolExecutor | None = None
        #: the worker's search last started, while it runs
        self._searching: asyncio.Future[_Searched] | None = None
        self._pending = 0
        self._seq = 0
        #: lookups by outcome, for tests and the stop line; fd links the inline step read
        self.found = 0
        self.unknown = 0
        self.timeouts = 0
        #: flows in a row found in the same process (the latest in `_procs`)
        self._streak = 0
        self.searches = 0
        self.sweeps = 0
        self.links = 0

    def warm_up(self) -> None:
        """Ask once for a socket nobody has, TCP and UDP, at start-up: the kernel may load its
        sock_diag modules on a first request, which should not happen on the event loop."""
        for network in ("tcp", "udp"):
            self.socket_of(network, "127.0.0.1", 0, "127.0.0.1", 0)

    # -- the call every inbound makes ------------------------------------------------------

    def _known(self, uid: int, user: Any, inode: int) -> Owner | None:
        """The owner without a search: the user's name known (`...` when it is not yet), and
        the process not wanted or found inline among recent ones; None when it takes one."""
        if user is ...:
            return None
        if not self.process:
            self.found += 1
            return Owner(uid, user)
        quick = self._recent_owner(uid, user, inode)
        if quick is not None:
            self.found += 1
        return quick

    async def find(
        self, network: str, src_ip: Any, src_port: int, dst_ip: Any, dst_port: int
    ) -> Owner:
        """The owner of the local socket `src_ip:src_port` talking to `dst_ip:dst_port`
        (`network` "tcp" or "udp"; addresses as text or `ipaddress` objects), within
        `timeout`; `UNKNOWN` when it cannot be found."""
        answer = self.socket_of(network, src_ip, src_port, dst_ip, dst_port)
        if answer is None:
            self.unknown += 1
            return UNKNOWN
        uid, inode = answer
        user = self._users.get(uid, ...)
        quick = self._known(uid, user, inode)
        if quick is not None:
            return quick
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        searching = self._searching
        if searching is not None and searching.get_loop() is loop:
            # The first flows of a new client come together: the search running for one
            # of them is likely to find this socket's process (and user) too, and then the
            # inline step finds the socket in a link or two instead of a search of its own.
            await asyncio.wait((searching,), timeout=self.timeout)
            user = self._users.get(uid, ...)
            quick = self._known(uid, user, inode)
            if quick is not None:
                return quick
        if self._pending >= MAX_PENDING or loop.time() >= deadline:
            self.timeouts += 1
            return Owner(uid, None if user is ... else user)  # type: ignore[arg-type]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ztun-owner")
        self._pending += 1
        self.searches += 1
        future = loop.run_in_executor(self._executor, self._search, uid, inode,
                                      list(reversed(self._procs)))  # fmt: skip
        # First of the future's callbacks: the process is tracked before anyone waiting
        # for this search looks again.
        future.add_done_callback(partial(self._searched, inode))
        self._searching = future
        try:
            owner, _ = await asyncio.wait_for(future, deadline - loop.time())
        except TimeoutError:
            self.timeouts += 1
            return Owner(uid, None if user is ... else user)  # type: ignore[arg-type]
        finally:
            self._pending -= 1
        self.found += 1
        return owner

    def _searched(self, inode: int, future: asyncio.Future[_Searched]) -> None:
        if self._searching is future:
            self._searching = None
        if future.cancelled() or future.exception() is not None:
            return
        owner, table = future.result()
        if owner.pid is not None:
            self._track(owner.pid, table, inode)

    def lookup(
        self, network: str, src_ip: str, src_port: int, dst_ip: str, dst_port: int
    ) -> Owner:
        """`find` on the caller's thread (blocking up to the scan deadline): for tests and
        tools, never for the event loop."""
        answer = self.socket_of(network, src_ip, src_port, dst_ip, dst_port)
        if answer is None:
            return UNKNOWN
        uid, inode = answer
        if self.process:
            quick = self._recent_owner(uid, self._user_name(uid), inode)
            if quick is not None:
                return quick
        self.searches += 1
        owner, table = self._search(uid, inode, list(reversed(self._procs)))
        if owner.pid is not None:
            self._track(owner.pid, table, inode)
        return owner

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for proc in list(self._procs.values()):
            self._forget(proc)

    # -- the inline step: processes of recent flows (caller's thread only) -----------------

    def _recent_owner(self, uid: int, user: str | None, inode: int) -> Owner | None:
        """The owner of socket `inode` among the processes of recent flows, reading at most
        `INLINE_PROBES` fd links; None when the worker has to search."""
        budget = INLINE_PROBES
        known = self._where.get(inode)
        if known is not None:
            # Seen already: a new socket read on the way to an earlier one (about half the
            # lookups of a client churning connections), or in a table the worker read.
            # Believed for `INDEX_TRUST` after its link was read here; older, one link says
            # whether the process holds it still.
            proc, fd, read_at = known
            now = time.monotonic()
            if now - read_at <= INDEX_TRUST:
                proc.cursor = fd
                return self._found(proc, uid, user, now)
            budget -= 1
            if self._read(proc, fd) == inode:
                proc.cursor = fd
                return self._found(proc, uid, user, now)
        for proc in list(reversed(self._procs.values())):
            found, budget = self._probe(proc, inode, budget)
            if found:
                return self._found(proc, uid, user)
            if not proc.alive():
                self._forget(proc)  # it exited: probing it again would only waste links
            if budget <= 0:
                break
        if self._streak >= SWEEP_STREAK and self._procs:
            # The latest flows all came from one process: most likely this one too.
            proc = next(reversed(self._procs.values()))
            if self._sweep(proc, inode):
                return self._found(proc, uid, user)
        return None

    def _sweep(self, proc: _Process, inode: int) -> bool:
        """Read every fd of `proc`, the process of the latest flow, when the guesses missed
        and its table is small: under load ztun looks sockets up milliseconds after they
        were made, when a client has made dozens more, and this one read finds all of them
        (the next lookups are index hits). Cheaper than the worker's search, which reads
        the same links on another thread and hands them over, and keeps the flows that
        miss meanwhile waiting: in a TUN under load, a search per 150 flows cost about
        10 µs a flow, and a flow in 14 waited."""
        try:
            listed = os.listdir(proc.fd_dir)
        except OSError:
            return False
        if len(listed) > MAX_INLINE_LISTING:
            return False
        self.sweeps += 1
        open_fds = {int(n) for n in listed if n.isdigit()}
        for fd in [fd for fd in chain(proc.sockets, proc.others) if fd not in open_fds]:
            self._note(proc, fd, _CLOSED, time.monotonic())
        found = False
        for fd in sorted(open_fds):
            if self._read(proc, fd) == inode:
                proc.cursor = fd
                found = True
        return found

    def _found(
        self, proc: _Process, uid: int, user: str | None, now: float | None = None
    ) -> Owner:
        procs = self._procs
        if next(reversed(procs)) == proc.pid:
            self._streak += 1
        else:
            self._streak = 1
            procs.move_to_end(proc.pid)
        path = proc.exe(time.monotonic() if now is None else now)
        owner = proc.owner
        # The same answer for each flow of a process: made once (a frozen dataclass costs
        # about 1.5 µs to make).
        if owner is None or owner.user_id != uid or owner.path != path or owner.user != user:
            owner = proc.owner = Owner(uid, user, proc.pid, path)
        return owner

    def _probe(self, proc: _Process, inode: int, budget: int) -> tuple[bool, int]:
        """Whether `proc` holds socket `inode`, reading at most `budget` fd links, the
        likeliest first; and the links left.

        A new socket takes the lowest free fd, so a client's burst of them fills free fds
        in ascending order. First three walks upwards, each going on while it finds new
        sockets (the burst) and stopping where it finds none: from just after where the
        last socket was found, from the lowest fd seen closed, from just past the highest fd
        seen (a growing table). Then the sockets oldest first (the likeliest to have closed
        and had their fd reused), fd numbers never read, the other fds, the closed ones,
        and last the fds opened since, from a listing. Against a client churning 64
        connections, oldest-first alone read 8 links a lookup and missed 3 % (each miss a
        search by the worker); with the walks first, under 3 links and 0.5 %."""
        self._tried.clear()
        cursor = proc.cursor
        if cursor >= 0:  # nine lookups in ten end here, in one link
            found, budget = self._walk(proc, inode, range(cursor + 1, cursor + 1 + budget), budget)
            if found or budget <= 0:
                return found, budget
        if proc.closed:
            found, budget = self._walk(proc, inode, heapq.nsmallest(budget, proc.closed), budget)
            if found or budget <= 0:
                return found, budget
        top = proc.max_fd + 1
        found, budget = self._walk(proc, inode, range(top, top + budget), budget)
        if found or budget <= 0:
            return found, budget
        sockets, others, closed = proc.sockets, proc.others, proc.closed
        # Lazily: the budget, not the size of the fd table, bounds what is looked at.
        rest = chain(
            list(islice(sockets, budget)),
            (fd for fd in range(top)
             if fd not in sockets and fd not in others and fd not in closed),
            list(islice(others, budget)),
            list(islice(closed, budget)),
        )  # fmt: skip
        found, budget = self._walk(proc, inode, rest, budget, None)
        if found or budget <= 0 or len(sockets) + len(others) + len(closed) > MAX_INLINE_LISTING:
            return found, budget  # a big fd table is listed by the worker, not inline
        try:
            listed = [int(n) for n in os.listdir(proc.fd_dir)]
        except (OSError, ValueError):
            return False, budget
        return self._walk(proc, inode, (fd for fd in listed if fd not in sockets), budget, None)

    def _walk(
        self, proc: _Process, inode: int, fds: Iterable[int], budget: int,
        misses_allowed: int | None = WALK_MISSES,
    ) -> tuple[bool, int]:  # fmt: skip
        """Read `fds` in turn while they hold sockets not seen there before (a burst of new
        sockets); up to `misses_allowed` fds in a row that do not (closed, or as before) end
        the walk (None: every fd of `fds` is read, within `budget`)."""
        tried, sockets = self._tried, proc.sockets
        misses = 0
        for fd in fds:
            if fd in tried:
                continue
            if budget <= 0:
                return False, 0
            tried.add(fd)
            budget -= 1
            before = sockets.get(fd)
            ino = self._read(proc, fd)
            if ino == inode:
                proc.cursor = fd
                return True, budget
            if misses_allowed is None:
                continue
            if ino > 0 and ino != before:
                misses = 0
            else:
                misses += 1
                if misses >= misses_allowed:
                    break
        return False, budget

    def _read(self, proc: _Process, fd: int) -> int:
        """`proc.read(fd)`, noted."""
        self.links += 1
        ino = proc.read(fd)
        self._note(proc, fd, ino, time.monotonic())
        return ino

    def _note(self, proc: _Process, fd: int, ino: int, read_at: float) -> None:
        """What fd `fd` of `proc` links to now (read at `read_at`; -inf for a reading not
        to be believed without another): a new socket goes to the end of the process's
        order and into the index, a closed fd to the closed ones."""
        sockets = proc.sockets
        old = sockets.get(fd)
        where = self._where
        if ino == old:
            entry = where.get(ino)
            if entry is not None and entry[0] is proc and entry[1] == fd:
                where[ino] = (proc, fd, read_at)
            return  # the same socket as before: its place in the order stays
        if old is not None:
            del sockets[fd]
            entry = where.get(old)
            if entry is not None and entry[0] is proc and entry[1] == fd:
                del where[old]
        if ino == _CLOSED:
            proc.others.discard(fd)
            if fd <= proc.max_fd and len(proc.closed) < MAX_CLOSED:
                proc.closed.add(fd)
            return
        proc.closed.discard(fd)
        if fd > proc.max_fd:
            proc.max_fd = fd
        if ino == _NOT_SOCKET:
            proc.others.add(fd)
            return
        proc.others.discard(fd)
        if len(where) < MAX_INODES:
            sockets[fd] = ino
            where[ino] = (proc, fd, read_at)

    def _track(self, pid: int, table: dict[int, int] | None = None, inode: int = 0) -> None:
        """Remember a process that owned a flow (socket `inode`), for the inline step, with
        its fd table when the worker read it."""
        proc = self._procs.get(pid)
        if proc is None:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            try:
                dir_fd = os.open(f"{self.proc}/{pid}", flags)
            except OSError:
                return
            try:
                fd_dir = os.open("fd", flags, dir_fd=dir_fd)
            except OSError:
                os.close(dir_fd)
                return
            proc = self._procs[pid] = _Process(pid, dir_fd, fd_dir)
            self._streak = 1
            while len(self._procs) > MAX_RECENT_PIDS:
                self._forget(next(iter(self._procs.values())))
        else:
            if next(reversed(self._procs)) != pid:
                self._streak = 1
            self._procs.move_to_end(pid)
        if table:
            # Read on another thread a moment ago (by a pid that may even be reused since):
            # a guide for the order of reading, never believed without a link read here.
            # The listing was in ascending order: below its last fd, what it lacked was closed.
            never = float("-inf")
            low, last = min(table), max(table)
            gone = [fd for fd in chain(proc.sockets, proc.others)
                    if low < fd < last and fd not in table]  # fmt: skip
            for fd in gone:
                self._note(proc, fd, _CLOSED, never)
            for fd, ino in sorted(table.items()):
                self._note(proc, fd, ino, never)
            known = self._where.get(inode)
            if known is not None and known[0] is proc:
                proc.cursor = known[1]

    def _forget(self, proc: _Process) -> None:
        """Drop a process from the inline step: its entries leave the index before its
        directory fds close (their numbers may be reused by any other file)."""
        where = self._where
        for fd, ino in proc.sockets.items():
            entry = where.get(ino)
            if entry is not None and entry[0] is proc and entry[1] == fd:
                del where[ino]
        if next(reversed(self._procs)) == proc.pid:
            self._streak = 0
        del self._procs[proc.pid]
        proc.close()

    # -- step 1: the socket, through sock_diag ---------------------------------------------

    def socket_of(
        self, network: str, src_ip: Any, src_port: int, dst_ip: Any, dst_port: int
    ) -> tuple[int, int] | None:
        """(uid, inode) of the local socket, or None. An IPv4 flow of a dual-stack IPv6
        socket is found too: the kernel's lookup by IPv4 address covers those."""
        src, dst = _packed(src_ip), _packed(dst_ip)
        if src is None or dst is None or len(src) != len(dst):
            return None
        family = AF_INET if len(src) == 4 else AF_INET6
        if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF):
            return None
        if network == "tcp":
            request = (IPPROTO_TCP, src, src_port, dst, dst_port)
        elif network == "udp":
            # The UDP lookup is by the datagram that would reach the socket: remote first.
            request = (IPPROTO_UDP, dst, dst_port, src, src_port)
        else:
            return None
        answer = self._ask(family, *request)
        if answer is None or answer.errno or answer.inode == 0:
            return None
        return answer.uid, answer.inode

    def _ask(
        self, family: int, protocol: int, src: bytes, sport: int, dst: bytes, dport: int
    ) -> DiagAnswer | None:
        sock = getattr(self._local, "sock", None)
        try:
            if sock is None:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                     NETLINK_SOCK_DIAG)  # fmt: skip
                sock.bind((0, 0))
                self._local.sock = sock
            self._seq = seq = (self._seq + 1) & 0x7FFFFFFF
            sock.send(diag_request(family, protocol, src, sport, dst, dport, seq))
            # An exact request is answered inside send(): the reply is queued already, so
            # this never waits (MSG_DONTWAIT makes sure of it).
            for _ in range(4):
                answer = parse_diag_reply(sock.recv(8192, socket.MSG_DONTWAIT))
                if answer is not None and answer.seq == seq:
                    return answer
        except OSError as e:
            log.debug("sock_diag: %s", e)
            if sock is not None:
                sock.close()
                self._local.sock = None
        return None

    # -- step 2: the process, through /proc (worker thread) --------------------------------

    def process_of(self, uid: int, inode: int) -> Owner:
        """The owner of socket `inode` of user `uid`: its user name, and its process unless
        `process` is off or the search finds none by the deadline."""
        return self._search(uid, inode)[0]

    def _search(self, uid: int, inode: int, first: list[int] | None = None) -> _Searched:
        """`process_of`, with the processes `first` searched first, and the fd table of the
        process found as read."""
        user = self._user_name(uid)
        if not self.process:
            return Owner(uid, user), None
        found = self._pid_of(uid, inode, first or [])
        if found is None:
            return Owner(uid, user), None
        pid, table = found
        if len(table) > MAX_SEED:
            # Read in ascending order up to this socket's fd: the highest fds, where new
            # sockets go, are what the inline step needs.
            table = dict(list(table.items())[-MAX_SEED:])
        try:
            path = parse_exe_link(os.readlink(f"{self.proc}/{pid}/exe"))
        except OSError:
            path = None  # gone meanwhile, or a kernel thread
        return Owner(uid, user, pid, path), table

    def _user_name(self, uid: int) -> str | None:
        name = self._users.get(uid, ...)
        if name is not ...:
            return name  # type: ignore[return-value]
        try:
            found: str | None = pwd.getpwuid(uid).pw_name
        except KeyError:
            found = None  # a uid with no name: `user_id` still matches
        if len(self._users) >= MAX_USER_NAMES:
            self._users.clear()
        self._users[uid] = found
        return found

    def _pid_of(
        self, uid: int, inode: int, first: list[int]
    ) -> tuple[int, dict[int, int]] | None:
        """The process holding socket `inode`, and its fd table as read: the process a
        search passed it in, the processes `first`, then every process of user `uid`."""
        with self._lock:
            passed = self._inodes.get(inode)
        deadline = time.monotonic() + SCAN_DEADLINE
        budget = [MAX_LINKS_PER_SCAN]
        tried: set[int] = set()
        for pid in ([] if passed is None else [passed]) + first:
            if pid in tried:
                continue
            tried.add(pid)
            table = self._scan(pid, inode, deadline, budget)
            if table is not None:
                return pid, table
        try:
            names = os.listdir(self.proc)
        except OSError:
            return None
        pids = sorted((int(n) for n in names if n.isdigit()), reverse=True)
        for pid in pids:
            if budget[0] <= 0 or time.monotonic() > deadline:
                return None
            if pid in tried:
                continue
            try:
                if os.stat(f"{self.proc}/{pid}").st_uid != uid:
                    continue  # only the socket's user's processes can hold it (as a rule)
            except OSError:
                continue
            table = self._scan(pid, inode, deadline, budget)
            if table is not None:
                return pid, table
        return None

    def _scan(
        self, pid: int, inode: int, deadline: float, budget: list[int]
    ) -> dict[int, int] | None:
        """None unless process `pid` has socket `inode` open; if it has, its fds as read
        (fd → socket inode or `_NOT_SOCKET`): the whole table when it has at most
        `MAX_INLINE_LISTING` fds, else those up to `inode`'s. Every socket inode passed on
        the way is remembered for later searches."""
        fd_dir = f"{self.proc}/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return None
        whole = len(names) <= MAX_INLINE_LISTING
        table: dict[int, int] = {}
        seen: list[int] = []
        found = False
        for i, name in enumerate(names):
            if i % 256 == 255 and time.monotonic() > deadline:
                break
            budget[0] -= 1
            if budget[0] < 0:
                break
            try:
                link = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            ino = parse_socket_link(link)
            if name.isdigit():
                table[int(name)] = ino or _NOT_SOCKET
            if ino is None:
                continue
            seen.append(ino)
            if ino == inode:
                found = True
                if not whole:
                    break
        with self._lock:
            inodes = self._inodes
            for ino in seen:
                inodes[ino] = pid
                inodes.move_to_end(ino)
            while len(inodes) > MAX_INODES:
                inodes.popitem(last=False)
        return table if found else None


def _packed(ip: Any) -> bytes | None:
    """An address as packed bytes: from an `ipaddress` object, or text (inet_pton: a tenth of
    the cost of `ipaddress.ip_address` here)."""
    packed = getattr(ip, "packed", None)
    if packed is not None:
        return packed  # type: ignore[no-any-return]
    text = str(ip)
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):
        return None


def owner_finder(needs: frozenset[str] | set[str]) -> OwnerFinder | None:
    """The finder a config's rules need ("user", "process"), or None when they need none."""
    if not needs:
        return None
    finder = OwnerFinder(process="process" in needs)
    finder.warm_up()
    return finder

