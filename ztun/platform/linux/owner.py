"""Who owns a flow's source socket: its user (uid) and, when asked, its process.

For the rule items `user`, `user_id`, `process_name`, `process_path`, `process_path_regex`.
`OwnerFinder.find(network, src_ip, src_port, dst_ip, dst_port)` is the one call every inbound
makes (the 5-tuple as the local application's socket sees it: its own address first):

1. netlink `sock_diag` names the socket: its inode and uid, in one exact lookup (6 µs; done on
   the caller's thread, since the kernel answers inside `send`). The uid alone serves `user`
   and `user_id`: configs with only those items never touch /proc.
2. Only when a rule needs the process: which process holds an fd linking to
   `socket:[inode]`. First, on the caller's thread with a budget of `INLINE_PROBES` fd links
   (procfs answers from memory: about 3 µs a link, never a wait), the processes that owned
   recent flows, probing their free fd numbers first (a new socket takes the lowest free one)
   and then the fds whose socket was seen longest ago (the first to have closed and been
   reused). A client opening many flows is found in a few links. Only a miss goes to a worker
   thread, awaited with a deadline: every process of the socket's uid, newest first, each
   listed and probed, bounded in time and links. The path is /proc/PID/exe.

Whatever fails (no such socket: gone, or in another network namespace; /proc unreadable; the
deadline) gives `UNKNOWN` or an owner with only what was found: never an error to the flow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
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
#: Socket inodes remembered from searches (inode → pid), and processes tried first.
MAX_INODES = 8192
MAX_RECENT_PIDS = 16
MAX_USER_NAMES = 1024
#: fd links the inline step may read per lookup (about 3 µs each) before the worker takes over.
INLINE_PROBES = 64
#: The inline step lists a recent process's fds (to find ones opened since) only up to this
#: many (listing costs about 1 µs an fd); a bigger table is the worker's.
MAX_INLINE_LISTING = 256
#: A recent process's fd numbers past the highest it had that the inline step probes too.
PROBE_PAST_MAX = 1


class _Process:
    """A process that owned a recent flow: its open /proc/PID and /proc/PID/fd directories
    (valid for that process only, whatever reuses its pid later) and what its fds linked to
    when last read."""

    __slots__ = ("dir_fd", "fd_dir", "max_fd", "others", "pid", "sockets")

    def __init__(self, pid: int, dir_fd: int, fd_dir: int) -> None:
        self.pid = pid
        self.dir_fd = dir_fd
        self.fd_dir = fd_dir
        #: fd → socket inode, oldest reading first; and the fds that were no socket
        self.sockets: dict[int, int] = {}
        self.others: set[int] = set()
        self.max_fd = -1

    def probe(self, inode: int, budget: int) -> tuple[bool, int]:
        """Whether this process holds socket `inode`, reading at most `budget` fd links: its
        free fd numbers first (a new socket takes the lowest), then its sockets seen longest
        ago (the likeliest to have closed and had their fd reused), then its other fds, then
        fds it opened since its last listing; and the links left."""
        sockets, others = self.sockets, self.others
        # Lazily: the budget, not the size of the fd table, bounds what is looked at.
        free = (fd for fd in range(self.max_fd + 1 + PROBE_PAST_MAX)
                if fd not in sockets and fd not in others)  # fmt: skip
        order = chain(free, list(sockets), list(others))
        found, budget = self._read(inode, order, budget)
        if found or budget <= 0 or len(sockets) + len(others) > MAX_INLINE_LISTING:
            return found, budget  # a big fd table is listed by the worker, not inline
        try:
            listed = [int(n) for n in os.listdir(self.fd_dir)]
        except (OSError, ValueError):
            return False, budget
        new = [fd for fd in listed if fd not in sockets and fd not in others]
        return self._read(inode, new, budget)

    def _read(self, inode: int, order: Any, budget: int) -> tuple[bool, int]:
        sockets, others = self.sockets, self.others
        for fd in order:
            if budget <= 0:
                return False, 0
            budget -= 1
            try:
                link = os.readlink(str(fd), dir_fd=self.fd_dir)
            except OSError:
                sockets.pop(fd, None)
                others.discard(fd)
                continue
            if fd > self.max_fd:
                self.max_fd = fd
            ino = parse_socket_link(link)
            if ino is None:
                sockets.pop(fd, None)
                others.add(fd)
                continue
            others.discard(fd)
            if sockets.get(fd) != ino:
                sockets.pop(fd, None)
                sockets[fd] = ino  # a new reading goes to the end
            if ino == inode:
                return True, budget
        return False, budget

    def alive(self) -> bool:
        try:
            os.stat("stat", dir_fd=self.dir_fd)
        except OSError:
            return False
        return True

    def exe(self) -> str | None:
        try:
            return parse_exe_link(os.readlink("exe", dir_fd=self.dir_fd))
        except OSError:
            return None  # gone meanwhile, or a kernel thread

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
        #: processes of recent flows, for the inline step (touched on the caller's thread only)
        self._procs: OrderedDict[int, _Process] = OrderedDict()
        self._users: dict[int, str | None] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0
        self._seq = 0
        #: lookups by outcome, for tests and the stop line
        self.found = 0
        self.unknown = 0
        self.timeouts = 0

    def warm_up(self) -> None:
        """Ask once for a socket nobody has, TCP and UDP, at start-up: the kernel may load its
        sock_diag modules on a first request, which should not happen on the event loop."""
        for network in ("tcp", "udp"):
            self.socket_of(network, "127.0.0.1", 0, "127.0.0.1", 0)

    # -- the call every inbound makes ------------------------------------------------------

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
        if user is not ...:
            if not self.process:
                self.found += 1
                return Owner(uid, user)  # type: ignore[arg-type]
            quick = self._recent_owner(uid, user, inode)  # type: ignore[arg-type]
            if quick is not None:
                self.found += 1
                return quick
        if self._pending >= MAX_PENDING:
            self.timeouts += 1
            return Owner(uid, None if user is ... else user)  # type: ignore[arg-type]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ztun-owner")
        self._pending += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, self.process_of, uid, inode
            )
            owner = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            self.timeouts += 1
            return Owner(uid, None if user is ... else user)  # type: ignore[arg-type]
        finally:
            self._pending -= 1
        self.found += 1
        if owner.pid is not None:
            self._track(owner.pid)
        return owner

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
        owner = self.process_of(uid, inode)
        if owner.pid is not None:
            self._track(owner.pid)
        return owner

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for proc in self._procs.values():
            proc.close()
        self._procs.clear()

    # -- the inline step: processes of recent flows (caller's thread only) -----------------

    def _recent_owner(self, uid: int, user: str | None, inode: int) -> Owner | None:
        budget = INLINE_PROBES
        for pid in reversed(self._procs):
            proc = self._procs[pid]
            found, budget = proc.probe(inode, budget)
            if found:
                self._procs.move_to_end(pid)
                return Owner(uid, user, pid, proc.exe())
            if not proc.sockets and not proc.others and not proc.alive():
                del self._procs[pid]  # it exited: probing it again would only waste links
                proc.close()
            if budget <= 0:
                break
        return None

    def _track(self, pid: int) -> None:
        """Remember a process that owned a flow, for the inline step."""
        if pid in self._procs:
            self._procs.move_to_end(pid)
            return
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
        self._procs[pid] = _Process(pid, dir_fd, fd_dir)
        while len(self._procs) > MAX_RECENT_PIDS:
            _, old = self._procs.popitem(last=False)
            old.close()

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
        user = self._user_name(uid)
        if not self.process:
            return Owner(uid, user)
        pid = self._pid_of(uid, inode)
        if pid is None:
            return Owner(uid, user)
        try:
            path = parse_exe_link(os.readlink(f"{self.proc}/{pid}/exe"))
        except OSError:
            path = None  # gone meanwhile, or a kernel thread
        return Owner(uid, user, pid, path)

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

    def _pid_of(self, uid: int, inode: int) -> int | None:
        with self._lock:
            pid = self._inodes.get(inode)
        deadline = time.monotonic() + SCAN_DEADLINE
        budget = [MAX_LINKS_PER_SCAN]
        if pid is not None and self._scan(pid, inode, deadline, budget):
            return pid
        try:
            names = os.listdir(self.proc)
        except OSError:
            return None
        pids = sorted((int(n) for n in names if n.isdigit()), reverse=True)
        for pid in pids:
            if budget[0] <= 0 or time.monotonic() > deadline:
                return None
            try:
                if os.stat(f"{self.proc}/{pid}").st_uid != uid:
                    continue  # only the socket's user's processes can hold it (as a rule)
            except OSError:
                continue
            if self._scan(pid, inode, deadline, budget):
                return pid
        return None

    def _scan(self, pid: int, inode: int, deadline: float, budget: list[int]) -> bool:
        """Whether process `pid` has socket `inode` open; every socket inode passed on the
        way is remembered for later lookups."""
        fd_dir = f"{self.proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return False
        seen: list[int] = []
        found = False
        for i, fd in enumerate(fds):
            if i % 256 == 255 and time.monotonic() > deadline:
                break
            budget[0] -= 1
            if budget[0] < 0:
                break
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            ino = parse_socket_link(link)
            if ino is None:
                continue
            seen.append(ino)
            if ino == inode:
                found = True
                break
        with self._lock:
            inodes = self._inodes
            for ino in seen:
                inodes[ino] = pid
                inodes.move_to_end(ino)
            while len(inodes) > MAX_INODES:
                inodes.popitem(last=False)
        return found

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

