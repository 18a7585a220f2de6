"""A long-lived flow for the group tests, run inside the client namespace.

hold SOCKS_PORT HOST PORT   SOCKS5 CONNECT through ztun's mixed inbound to the TCP echo at
                            HOST:PORT; prints "open" once an echo came back, then one JSON
                            line when the connection ends ({"ended": "eof"|"reset", "after": s})
                            or {"ended": "no"} after 30 s.
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


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        hold(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
