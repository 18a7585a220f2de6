"""The pure half of finding a flow's local owner: the `sock_diag` netlink request and reply,
and the texts /proc gives (an fd link, an exe link).

Pure: bytes and text in, values out; every parser takes arbitrary input and returns None for
what it cannot read (tests/unit/platform/test_owner_parse.py throws random bytes at them).
The I/O around it is `ztun.platform.linux.owner`.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

#: netlink: NETLINK_SOCK_DIAG protocol, SOCK_DIAG_BY_FAMILY message, NLMSG_ERROR / NLMSG_DONE
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
#: INET_DIAG_NOCOOKIE: "any socket", not one named by its cookie
_NO_COOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
IPPROTO_TCP = 6
IPPROTO_UDP = 17
AF_INET = 2
AF_INET6 = 10

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
# The whole request in one pack (a third of the cost of packing its parts): the netlink
# header; inet_diag_req_v2: family, protocol, ext, pad, states; inet_diag_sockid: sport,
# dport (big-endian, as bytes), src[16], dst[16], interface, cookie[2]
_REQUEST = struct.Struct("=IHHIIBBBBI2s2s16s16sIII")
REQUEST_LEN = _REQUEST.size
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue,
# uid, inode
_MSG_UID_INODE = struct.Struct("=II")
_MSG_UID_OFFSET = 4 + 48 + 12
MSG_MIN_LEN = _MSG_UID_OFFSET + _MSG_UID_INODE.size


def diag_request(
    family: int, protocol: int, src: bytes, sport: int, dst: bytes, dport: int, seq: int
) -> bytes:
    """An exact `SOCK_DIAG_BY_FAMILY` lookup of the socket with local `src:sport` and remote
    `dst:dport` (packed addresses of `family`).

    Not a dump: an exact request is one hash lookup in the kernel (6 µs here), a dump walks
    every bucket of the socket table (3 ms on this machine with 60 sockets). The UDP lookup
    takes the addresses the other way round ("src and dst are swapped for historical
    reasons", the kernel's udp_diag.c says): it looks for the socket that would receive a
    datagram from `src` to `dst`, so the caller passes the flow's remote end as `src`."""
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError("port out of range")
    if len(src) not in (4, 16) or len(dst) not in (4, 16):
        raise ValueError("not a packed IPv4 or IPv6 address")
    return _REQUEST.pack(
        REQUEST_LEN, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0,
        family, protocol, 0, 0, _ALL_STATES,
        sport.to_bytes(2, "big"), dport.to_bytes(2, "big"), src, dst, 0, _NO_COOKIE, _NO_COOKIE,
    )  # fmt: skip


class DiagAnswer(NamedTuple):
    """The kernel's answer to one `diag_request`: the socket's owner uid and inode, or
    `errno` (ENOENT: no such socket in this namespace). A named tuple: made once per flow,
    at a third of a frozen dataclass's cost."""

    seq: int
    uid: int = -1
    inode: int = 0
    errno: int = 0


def parse_diag_reply(data: bytes) -> DiagAnswer | None:
    """The first netlink message of `data`: a socket (uid, inode), an error, or None for
    anything else (truncated, another type, a done message)."""
    if len(data) < _NLMSG.size:
        return None
    length, kind, _flags, seq, _port = _NLMSG.unpack_from(data, 0)
    if length < _NLMSG.size or length > len(data):
        return None
    if kind == NLMSG_ERROR:
        if length < _NLMSG.size + 4:
            return None
        (code,) = struct.unpack_from("=i", data, _NLMSG.size)
        return DiagAnswer(seq, errno=-code if code < 0 else code)
    if kind != SOCK_DIAG_BY_FAMILY or length < _NLMSG.size + MSG_MIN_LEN:
        return None
    uid, inode = _MSG_UID_INODE.unpack_from(data, _NLMSG.size + _MSG_UID_OFFSET)
    return DiagAnswer(seq, uid, inode)


#: What an fd link to a socket reads: "socket:[12345]".
_SOCKET_PREFIX = "socket:["
#: Linux appends this to the exe link of a process whose executable was deleted or replaced.
_DELETED = " (deleted)"
#: The longest path Linux gives (PATH_MAX).
MAX_PATH = 4096


def parse_socket_link(link: str) -> int | None:
    """The inode of `socket:[N]` (an fd link of /proc/PID/fd), or None for any other link."""
    if not link.startswith(_SOCKET_PREFIX) or not link.endswith("]") or len(link) > 40:
        return None
    digits = link[len(_SOCKET_PREFIX) : -1]
    if not digits.isascii() or not digits.isdigit():
        return None
    return int(digits)


def parse_exe_link(link: str) -> str | None:
    """The executable's path from a /proc/PID/exe link (without " (deleted)"), or None when
    the text is no absolute path."""
    if link.endswith(_DELETED):
        link = link[: -len(_DELETED)]
    if not link.startswith("/") or len(link) > MAX_PATH or "\0" in link:
        return None
    return link


def process_name(path: str) -> str:
    """sing-box's process name: the last element of the executable's path."""
    return path.rsplit("/", 1)[-1]
