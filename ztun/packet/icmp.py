"""ICMP and ICMPv6: echo replies and "port unreachable" errors.

An error quotes as much of the offending packet as fits the minimum MTU (576 bytes for IPv4,
RFC 1812 §4.3.2.3; 1280 for IPv6, RFC 4443 §2.4), so the sender can match it to its socket.
"""

from __future__ import annotations

from ztun.packet.checksum import Buffer, checksum, pseudo_header_sum
from ztun.packet.ip import Drop, IPHeader, Proto, build_ip

ECHO_REQUEST_V4 = 8
ECHO_REPLY_V4 = 0
UNREACHABLE_V4 = 3
PORT_UNREACHABLE_V4 = 3
UNREACHABLE_V6 = 1
PORT_UNREACHABLE_V6 = 4
ECHO_REQUEST_V6 = 128
ECHO_REPLY_V6 = 129


def _finish(src: bytes, dst: bytes, msg: bytearray) -> bytes:
    if len(src) == 4:
        c = checksum(msg)
        proto = Proto.ICMP
    else:
        c = checksum(msg, pseudo_header_sum(src, dst, Proto.ICMPV6, len(msg)))
        proto = Proto.ICMPV6
    msg[2], msg[3] = c >> 8, c & 0xFF
    return bytes(build_ip(src, dst, proto, len(msg)) + msg)


def is_echo_request(buf: Buffer, h: IPHeader) -> bool:
    if h.end - h.l4 < 8:
        return False
    if h.version == 4:
        return h.proto == Proto.ICMP and buf[h.l4] == ECHO_REQUEST_V4 and buf[h.l4 + 1] == 0
    return h.proto == Proto.ICMPV6 and buf[h.l4] == ECHO_REQUEST_V6 and buf[h.l4 + 1] == 0


def build_echo_reply(buf: Buffer, h: IPHeader) -> bytes | Drop:
    """The echo reply to an echo request, from the address it was sent to."""
    if not is_echo_request(buf, h):
        return Drop.ICMP_TYPE
    msg = bytearray(buf[h.l4 : h.end])
    msg[0] = ECHO_REPLY_V4 if h.version == 4 else ECHO_REPLY_V6
    msg[2] = msg[3] = 0
    return _finish(h.dst, h.src, msg)


def build_port_unreachable(buf: Buffer, h: IPHeader) -> bytes:
    """'Port unreachable' for the packet `buf`, from its destination back to its source."""
    if h.version == 4:
        quote = bytes(buf[: min(h.end, 576 - 28)])
        msg = bytearray(8) + quote
        msg[0], msg[1] = UNREACHABLE_V4, PORT_UNREACHABLE_V4
    else:
        quote = bytes(buf[: min(h.end, 1280 - 48)])
        msg = bytearray(8) + quote
        msg[0], msg[1] = UNREACHABLE_V6, PORT_UNREACHABLE_V6
    return _finish(h.dst, h.src, msg)


def icmp_checksum_ok(buf: Buffer, h: IPHeader) -> bool:
    msg = buf[h.l4 : h.end]
    if h.version == 4:
        return checksum(msg) == 0
    return checksum(msg, pseudo_header_sum(h.src, h.dst, Proto.ICMPV6, len(msg))) == 0
