"""The Linux TUN device: open `/dev/net/tun`, name it, give it addresses, MTU and link state.

The device is non-persistent: it exists while ztun holds its file descriptor, so even a
SIGKILL takes it (and every route through it) away. Addresses and link state go through
pyroute2 (rtnetlink); the device itself through `fcntl.ioctl(TUNSETIFF)`.

With `offload` the device is opened with IFF_VNET_HDR and told (TUNSETOFFLOAD) that ztun
takes TCP super-packets and unfinished checksums (CSUM|TSO4|TSO6, as sing-tun and
wireguard-go do): every read and write then starts with a virtio-net header
(ztun.packet.virtio). A kernel that refuses is met with a plain device and one log line.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

from ztun.errors import ZtunError
from ztun.packet.virtio import HEADER_LEN

T = TypeVar("T")
log = logging.getLogger("ztun.tun")

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETFEATURES = 0x800454CF
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
#: What ztun takes from the kernel: unfinished checksums and TCP super-packets.
OFFLOAD = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
#: And UDP super-packets (Linux 6.2+), asked for first: an application's UDP_SEGMENT burst
#: then arrives in one read, and replies go back into the TUN many datagrams per write
#: (ztun.packet.gso.build_udp_super); a kernel that refuses gets OFFLOAD alone.
OFFLOAD_USO = OFFLOAD | TUN_F_USO4 | TUN_F_USO6
IFA_F_NODAD = 0x02
#: Packets the kernel queues for ztun to read (the default is 500). At 500 Mbit/s of 1400-byte
#: datagrams 500 is 11 ms: a pause of the Python loop longer than that (a burst of new flows,
#: a garbage collection, another process on the core) dropped about a tenth of them at the
#: TUN (`ip -s link`: TX dropped; 13972 of 133905 in one run, none with 4096). The queue is
#: the bound: the TUN detaches queued packets from their senders' socket buffers.
TXQUEUELEN = 4096
IFNAMSIZ = 16

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class TunError(ZtunError):
    """The TUN device cannot be made or configured; the message says what to do."""


class TunDevice:
    """An open TUN device. `fd` is non-blocking; one read or write is one IP packet, preceded
    by a virtio-net header when `vnet_hdr` is set."""

    def __init__(
        self, fd: int, name: str, index: int, vnet_hdr: bool = False, uso: bool = False
    ) -> None:
        self.fd = fd
        self.name = name
        self.index = index
        self.vnet_hdr = vnet_hdr
        #: UDP super-packets both ways (TUN_F_USO4/6 accepted)
        self.uso = uso

    @classmethod
    def open(
        cls, name: str, addresses: list[Interface], mtu: int, offload: bool = False
    ) -> TunDevice:
        fd = _open_tun(name)
        try:
            # Asked before TUNSETIFF, which can be done once per descriptor.
            vnet = offload and _try_offload(fd, name)
            real = _set_iff(fd, name, IFF_VNET_HDR if vnet else 0)
            uso = _set_offload(fd) if vnet else False
            index = _configure(real, addresses, mtu)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, real, index, vnet, uso)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _open_tun(name: str) -> int:
    try:
        return os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError(
            f"{TUN_PATH} does not exist: load the tun module (modprobe tun) or, in a "
            "container, pass the device in (--device /dev/net/tun)"
        ) from None
    except PermissionError:
        raise TunError(
            f"cannot open {TUN_PATH}: the tun inbound needs root (or CAP_NET_ADMIN)"
        ) from None
    except OSError as e:
        raise TunError(f"cannot open {TUN_PATH}: {e.strerror}") from None


def _try_offload(fd: int, name: str) -> bool:
    """Whether the kernel offers IFF_VNET_HDR and the offloads; one log line when not."""
    feats = array.array("I", [0])
    try:
        fcntl.ioctl(fd, TUNGETFEATURES, feats, True)
    except OSError as e:
        log.info("tun %s: no offload (TUNGETFEATURES: %s); one packet per read", name or "?",
                 e.strerror)  # fmt: skip
        return False
    if not feats[0] & IFF_VNET_HDR:
        log.info("tun %s: the kernel has no IFF_VNET_HDR; one packet per read", name or "?")
        return False
    return True


def _set_offload(fd: int) -> bool:
    """Header size and offloads on a device opened with IFF_VNET_HDR; whether UDP super-
    packets (USO) were accepted. A refusal of the offloads leaves a working device (headers,
    no super-packets); only the size must hold."""
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HEADER_LEN))
    except OSError as e:
        raise TunError(f"cannot set the TUN's virtio-net header size: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOAD_USO)
        return True
    except OSError:
        pass  # before Linux 6.2
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOAD)
    except OSError as e:
        log.info("tun: offload refused (TUNSETOFFLOAD: %s); one packet per read", e.strerror)
    return False


def _set_iff(fd: int, name: str, extra: int = 0) -> str:
    if len(name.encode()) >= IFNAMSIZ:
        raise TunError(f"interface_name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    ifr = struct.pack("16sH22x", (name or "tun%d").encode(), IFF_TUN | IFF_NO_PI | extra)
    try:
        out = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        if e.errno == errno.EPERM:
            raise TunError("creating a TUN device needs root (or CAP_NET_ADMIN)") from None
        if e.errno == errno.EBUSY:
            raise TunError(
                f"interface {name!r} is in use (another ztun or VPN holds it); "
                "choose another interface_name"
            ) from None
        if e.errno == errno.EINVAL:
            raise TunError(
                f"interface {name!r} exists and is not a TUN device; choose another interface_name"
            ) from None
        raise TunError(f"cannot create TUN device {name!r}: {e.strerror}") from None
    return out[:IFNAMSIZ].rstrip(b"\0").decode()


def in_netlink_thread(fn: Callable[[], T]) -> T:
    """Run `fn` (which uses pyroute2's synchronous API) on a thread of its own.

    pyroute2's synchronous API drives an asyncio loop internally and refuses to run inside a
    running one (ztun's), so netlink work happens on a short-lived thread; the caller waits
    for it, which is fine for the few calls at start and stop. Without a running loop in this
    thread `fn` runs right here: at interpreter exit (atexit) Python 3.12+ refuses to start a
    thread, and routes must still be removed then.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=work, name="ztun-netlink")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _configure(name: str, addresses: list[Interface], mtu: int) -> int:
    return in_netlink_thread(lambda: _configure_sync(name, addresses, mtu))


def _configure_sync(name: str, addresses: list[Interface], mtu: int) -> int:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            index = int(ipr.link_lookup(ifname=name)[0])
            ipr.link("set", index=index, mtu=mtu, txqlen=TXQUEUELEN)
            for a in addresses:
                if a.version == 6:
                    # No duplicate address detection: the address is needed at once, and
                    # nobody else is on a point-to-point TUN link.
                    ipr.addr("add", index=index, address=str(a.ip), prefixlen=a.network.prefixlen,
                             family=socket.AF_INET6, flags=IFA_F_NODAD)  # fmt: skip
                else:
                    ipr.addr("add", index=index, address=str(a.ip), prefixlen=a.network.prefixlen)
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise TunError(f"cannot configure TUN device {name}: {os.strerror(e.code)}") from None
        except IndexError:
            raise TunError(f"TUN device {name} vanished while being configured") from None
    return index
