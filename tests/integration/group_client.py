"""A long-lived flow for the group tests, run inside the client namespace.

hold SOCKS_PORT HOST PORT   SOCKS5 CONNECT through ztun's mixed inbound to the TCP echo at
                            HOST:PORT; prints "open" once an echo came back, then one JSON
                            line when the connection ends ({"ended": "eof"|"reset", "after": s})
                            or {"ended": "no"} after 30 s.
udp SOCKS_PORT HOST PORT    SOCKS5 UDP ASSOCIATE through ztun's mixed inbound; one datagram to
                            the UDP echo at HOST:PORT; prints "open" once its echo came back,
                            then holds the association until a line arrives on stdin.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import time


def hold(socks_port: int, host: str, port: int) -> None:
    s = socket.create_connection(("127.0.0.1", socks_port), 5)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + ipaddress.IPv4Address(host).packed + port.to_bytes(2, "big"))
    reply = s.recv(10)
    assert reply[:2] == b"\x05\x00", reply
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    print("open", flush=True)
    start = time.monotonic()
    s.settimeout(30)
    try:
        data = s.recv(1)
        how = "eof" if not data else "data"
    except TimeoutError:
        print(json.dumps({"ended": "no"}), flush=True)
        return
    except OSError:
        how = "reset"
    print(json.dumps({"ended": how, "after": round(time.monotonic() - start, 3)}), flush=True)


def udp(socks_port: int, host: str, port: int) -> None:
    ctl = socket.create_connection(("127.0.0.1", socks_port), 5)
    ctl.sendall(b"\x05\x01\x00")
    assert ctl.recv(2) == b"\x05\x00"
    ctl.sendall(b"\x05\x03\x00\x01" + bytes(6))  # UDP ASSOCIATE, from any address
    reply = ctl.recv(10)
    assert reply[:2] == b"\x05\x00" and reply[3] == 1, reply
    relay = (str(ipaddress.IPv4Address(reply[4:8])), int.from_bytes(reply[8:10], "big"))
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.settimeout(1.0)
    header = b"\x00\x00\x00\x01" + ipaddress.IPv4Address(host).packed + port.to_bytes(2, "big")
    for _ in range(5):
        u.sendto(header + b"ping", relay)
        try:
            data = u.recv(2048)
        except TimeoutError:
            continue
        assert data == header + b"echo:ping", data
        print("open", flush=True)
        break
    sys.stdin.readline()
    u.close()
    ctl.close()


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        hold(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "udp":
        udp(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
