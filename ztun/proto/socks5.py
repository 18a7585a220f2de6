"""SOCKS5 (RFC 1928, RFC 1929) and SOCKS4/4a wire formats, without I/O.

Owns: the server side of the mixed inbound (greeting, username/password sub-negotiation, request,
replies, SOCKS4/4a requests), the UDP datagram header (RFC 1928 §7), and the client handshake
state machine the socks outbound uses for UDP ASSOCIATE (python-socks has no UDP support) and,
pipelined, for CONNECT (python-socks cannot pipeline).

Parsers take the bytes received so far and return `(value, consumed)` or None when more bytes
are needed; malformed input raises `RemoteProtocolError` (a host name that cannot exist:
`BadNameError`, see `ztun.address.name_problem`). Builders return bytes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum

from ztun.address import MAX_NAME, Address, ip_or_none, peer_host
from ztun.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

VERSION5 = 0x05
VERSION4 = 0x04
USERPASS_VERSION = 0x01


class AuthMethod(IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERPASS = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks4Reply(IntEnum):
    GRANTED = 0x5A
    REJECTED = 0x5B


@dataclass(frozen=True, slots=True)
class Greeting:
    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UserPass:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class Request:
    command: Command
    address: Address


@dataclass(frozen=True, slots=True)
class Socks4Request:
    command: Command
    address: Address
    user_id: str


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    frag: int
    address: Address
    payload: bytes


class ReplyError(ProtocolError):
    """The SOCKS5 server answered a request with a failure code."""

    def __init__(self, code: int) -> None:
        try:
            name = Reply(code).name.lower().replace("_", " ")
        except ValueError:
            name = f"unknown reply {code:#04x}"
        super().__init__(f"SOCKS5 server replied: {name}")
        self.code = code


class AuthFailedError(ProtocolError):
    """The SOCKS5 server refused the credentials, or wants a method we do not speak."""


# ---------------------------------------------------------------------------------------------
# Addresses


def parse_address(
    buf: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[Address, int] | None:
    """ATYP, address and port at `offset`; returns the address and the offset just after it."""
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    pos = offset + 1
    if atyp == AddressType.IPV4:
        end = pos + 4
        if len(buf) < end + 2:
            return None
        # Dotted decimal straight from the bytes: what str(IPv4Address) gives, 10× cheaper.
        host = f"{buf[pos]}.{buf[pos + 1]}.{buf[pos + 2]}.{buf[pos + 3]}"
    elif atyp == AddressType.IPV6:
        end = pos + 16
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[pos:end])))
    elif atyp == AddressType.DOMAIN:
        if len(buf) <= pos:
            return None
        n = buf[pos]
        end = pos + 1 + n
        if len(buf) < end + 2:
            return None
        host = peer_host(bytes(buf[pos + 1 : end]), "socks5")
    else:
        raise RemoteProtocolError(f"SOCKS5: unknown address type {atyp:#04x}")
    port = int.from_bytes(buf[end : end + 2], "big")
    return Address(host, port), end + 2


def build_address(addr: Address) -> bytes:
    """ATYP, address and port for `addr`: an IP literal goes as an IP, anything else as a name."""
    if not 0 <= addr.port <= 0xFFFF:
        raise LocalProtocolError(f"port out of range: {addr.port}")
    ip = ip_or_none(addr.host)
    port = addr.port.to_bytes(2, "big")
    if ip is None:
        try:
            raw = addr.host.encode("idna") if not addr.host.isascii() else addr.host.encode()
        except UnicodeError:
            raise LocalProtocolError(f"not a valid domain name: {addr.host!r}") from None
        if not 0 < len(raw) < 256:
            raise LocalProtocolError(f"domain name too long or empty: {addr.host!r}")
        return bytes((AddressType.DOMAIN, len(raw))) + raw + port
    if ip.version == 4:
        return bytes((AddressType.IPV4,)) + ip.packed + port
    return bytes((AddressType.IPV6,)) + ip.packed + port


# ---------------------------------------------------------------------------------------------
# Server side


def parse_greeting(buf: bytes | bytearray) -> tuple[Greeting, int] | None:
    """VER NMETHODS METHODS."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION5:
        raise RemoteProtocolError(f"SOCKS5: bad version {buf[0]:#04x} in greeting")
    n = buf[1]
    if n == 0:
        raise RemoteProtocolError("SOCKS5: greeting offers no methods")
    if len(buf) < 2 + n:
        return None
    return Greeting(tuple(buf[2 : 2 + n])), 2 + n


def build_method_selection(method: int) -> bytes:
    return bytes((VERSION5, method))


def parse_userpass(buf: bytes | bytearray) -> tuple[UserPass, int] | None:
    """RFC 1929: VER ULEN UNAME PLEN PASSWD."""
    if len(buf) < 2:
        return None
    if buf[0] != USERPASS_VERSION:
        raise RemoteProtocolError(f"SOCKS5: bad username/password version {buf[0]:#04x}")
    ulen = buf[1]
    if len(buf) < 2 + ulen + 1:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    user = bytes(buf[2 : 2 + ulen]).decode("utf-8", "replace")
    password = bytes(buf[3 + ulen : end]).decode("utf-8", "replace")
    return UserPass(user, password), end


def build_userpass_reply(ok: bool) -> bytes:
    return bytes((USERPASS_VERSION, 0x00 if ok else 0x01))


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """VER CMD RSV ATYP DST.ADDR DST.PORT."""
    if len(buf) < 4:
        return None
    if buf[0] != VERSION5:
        raise RemoteProtocolError(f"SOCKS5: bad version {buf[0]:#04x} in request")
    try:
        cmd = Command(buf[1])
    except ValueError:
        raise RemoteProtocolError(f"SOCKS5: unknown command {buf[1]:#04x}") from None
    parsed = parse_address(buf, 3)
    if parsed is None:
        return None
    addr, end = parsed
    return Request(cmd, addr), end


def build_reply(code: int, bound: Address | None = None) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT (0.0.0.0:0 when no bound address is known)."""
    return bytes((VERSION5, code, 0x00)) + build_address(bound or Address("0.0.0.0", 0))


def parse_socks4_request(buf: bytes | bytearray) -> tuple[Socks4Request, int] | None:
    """VN CD DSTPORT DSTIP USERID NUL [DOMAIN NUL] (SOCKS4, and SOCKS4a when DSTIP is 0.0.0.x)."""
    if len(buf) < 9:
        return None
    if buf[0] != VERSION4:
        raise RemoteProtocolError(f"SOCKS4: bad version {buf[0]:#04x}")
    if buf[1] == Command.CONNECT:
        cmd = Command.CONNECT
    elif buf[1] == Command.BIND:
        cmd = Command.BIND
    else:
        raise RemoteProtocolError(f"SOCKS4: unknown command {buf[1]:#04x}")
    port = int.from_bytes(buf[2:4], "big")
    ip = bytes(buf[4:8])
    nul = bytes(buf[: 8 + 256]).find(b"\x00", 8)
    if nul < 0:
        if len(buf) > 8 + 255:
            raise RemoteProtocolError("SOCKS4: user id too long")
        return None
    user_id = bytes(buf[8:nul]).decode("utf-8", "replace")
    end = nul + 1
    if ip[:3] == b"\x00\x00\x00" and ip[3] != 0:
        # Only a name's worth is searched: a longer one is refused as soon as it has arrived.
        dnul = bytes(buf[end : end + MAX_NAME + 2]).find(b"\x00")
        if dnul < 0:
            if len(buf) > end + MAX_NAME + 1:
                peer_host(bytes(buf[end : end + MAX_NAME + 2]), "socks4a")  # raises: too long
            return None
        dnul += end
        host = peer_host(bytes(buf[end:dnul]), "socks4a")
        end = dnul + 1
    else:
        host = str(ipaddress.IPv4Address(ip))
    return Socks4Request(cmd, Address(host, port), user_id), end


def build_socks4_reply(granted: bool) -> bytes:
    code = Socks4Reply.GRANTED if granted else Socks4Reply.REJECTED
    return bytes((0x00, code)) + b"\x00" * 6


# ---------------------------------------------------------------------------------------------
# UDP datagrams (RFC 1928 §7): RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA


def parse_udp_datagram(data: bytes | bytearray | memoryview) -> UdpDatagram:
    """One whole datagram; a UDP datagram is never partial, so short input is an error."""
    if len(data) < 4:
        raise RemoteProtocolError("SOCKS5 UDP: datagram shorter than its header")
    if data[0] != 0 or data[1] != 0:
        raise RemoteProtocolError("SOCKS5 UDP: reserved bytes are not zero")
    frag = data[2]
    parsed = parse_address(data, 3)
    if parsed is None:
        raise RemoteProtocolError("SOCKS5 UDP: truncated address")
    addr, end = parsed
    return UdpDatagram(frag, addr, bytes(data[end:]))


def build_udp_header(addr: Address) -> bytes:
    return b"\x00\x00\x00" + build_address(addr)


def build_udp_datagram(addr: Address, payload: bytes) -> bytes:
    return build_udp_header(addr) + payload


# ---------------------------------------------------------------------------------------------
# Client side: a handshake state machine (h11 style: feed bytes, collect bytes to send)


class ClientHandshake:
    """SOCKS5 client handshake for one request (CONNECT or UDP ASSOCIATE).

    Call `data_to_send()` after construction and after each `receive_data()`; when `done` is
    true, `bound` is the address the server gave and `leftover` any bytes after its reply.

    `pipeline=True` sends the request without waiting for the server's answer to the message
    before it: with no credentials the greeting (offering only "no auth") and the request go
    out together; with credentials the username/password and the request go out together once
    the server has chosen username/password. The server must read them in order from its
    socket, which RFC 1928 servers (sing-box among them) do. Nothing after the request is ever
    sent early: some servers drop bytes that arrive before their reply.

    `need` is how many more bytes certainly belong to the server's answers, so a caller can
    read exactly that many and never take bytes of the relayed stream that follows the reply.
    """

    def __init__(
        self,
        command: Command,
        address: Address,
        username: str | None = None,
        password: str | None = None,
        *,
        pipeline: bool = False,
    ) -> None:
        self.command = command
        self.address = address
        self._user = username
        self._password = password
        self._pipeline = pipeline
        self._state = "greeting"
        self._buf = bytearray()
        self._out = bytearray()
        self._request_sent = False
        self.bound: Address | None = None
        self.leftover = b""
        methods = [AuthMethod.NO_AUTH]
        if username is not None:
            methods.append(AuthMethod.USERPASS)
        self._out += bytes((VERSION5, len(methods), *methods))
        if pipeline and username is None:
            # Only "no auth" is offered, so the server's choice cannot change what comes next.
            self._append_request()

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def need(self) -> int:
        """Bytes the server still owes for certain (at least 1 until done)."""
        if self._state == "done":
            return 0
        have = len(self._buf)
        if self._state == "greeting":
            # METHOD reply, then (request already sent) the shortest possible request reply.
            return max(2 - have, 1) + (_MIN_REPLY if self._request_sent else 0)
        if self._state == "auth":
            return max(2 - have, 1) + (_MIN_REPLY if self._request_sent else 0)
        return max(_reply_length(self._buf) - have, 1)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self._state == "done":
            raise LocalProtocolError("SOCKS5 handshake already finished")
        if not data:
            raise RemoteProtocolError("SOCKS5 server closed the connection during the handshake")
        self._buf += data
        while self._step():
            pass

    def _step(self) -> bool:
        buf = self._buf
        if self._state == "greeting":
            if len(buf) < 2:
                return False
            if buf[0] != VERSION5:
                raise RemoteProtocolError(f"SOCKS5 server sent version {buf[0]:#04x}")
            method = buf[1]
            del buf[:2]
            if method == AuthMethod.NO_AUTH:
                self._send_request()
            elif method == AuthMethod.USERPASS and self._user is not None:
                user = (self._user or "").encode()
                pw = (self._password or "").encode()
                if len(user) > 255 or len(pw) > 255:
                    raise LocalProtocolError("SOCKS5 username or password longer than 255 bytes")
                self._out += bytes((USERPASS_VERSION, len(user))) + user + bytes((len(pw),)) + pw
                self._state = "auth"
                if self._pipeline:
                    self._append_request()
            elif method == AuthMethod.NO_ACCEPTABLE:
                raise AuthFailedError("SOCKS5 server accepts none of the offered auth methods")
            else:
                raise AuthFailedError(f"SOCKS5 server chose an unoffered auth method {method:#04x}")
            return True
        if self._state == "auth":
            if len(buf) < 2:
                return False
            status = buf[1]
            del buf[:2]
            if status != 0:
                raise AuthFailedError("SOCKS5 server refused the username/password")
            self._send_request()
            return True
        if self._state == "request":
            if len(buf) < 2:
                return False
            if buf[0] != VERSION5:
                raise RemoteProtocolError(f"SOCKS5 server sent version {buf[0]:#04x} in reply")
            code = buf[1]
            if code != Reply.SUCCEEDED:
                # Known from the first two bytes; servers that close after a short reply exist.
                raise ReplyError(code)
            if len(buf) < 4:
                return False
            parsed = parse_address(buf, 3)
            if parsed is None:
                return False
            self.bound, end = parsed
            self.leftover = bytes(buf[end:])
            buf.clear()
            self._state = "done"
            return False
        return False

    def _send_request(self) -> None:
        self._append_request()
        self._state = "request"

    def _append_request(self) -> None:
        if not self._request_sent:
            self._out += bytes((VERSION5, self.command, 0x00)) + build_address(self.address)
            self._request_sent = True


#: The shortest request reply: VER REP RSV ATYP=domain LEN=1 NAME(1) PORT(2).
_MIN_REPLY = 8


def _reply_length(buf: bytes | bytearray) -> int:
    """Length of the request reply at the start of `buf`, as far as its first bytes tell."""
    if len(buf) < 4:
        return _MIN_REPLY
    atyp = buf[3]
    if atyp == AddressType.IPV4:
        return 10
    if atyp == AddressType.IPV6:
        return 22
    if atyp == AddressType.DOMAIN and len(buf) >= 5:
        return 7 + buf[4]
    return max(len(buf) + 1, _MIN_REPLY)
