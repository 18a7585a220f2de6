"""Run inside the client namespace by test_tun_api.py: flows through ztun's TUN (TCP and UDP
to the echo server), then ztun's API (on the namespace's loopback) lists and closes them.
Prints one JSON object with what it saw."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.request
from typing import Any

API = "http://127.0.0.1:" + sys.argv[1]
TARGET = sys.argv[2]
SIZE = 200_000


def call(method: str, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(API + path, method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        raw = r.read()
        return r.status, json.loads(raw) if raw else None


def connections(network: str) -> list[dict[str, Any]]:
    found = call("GET", "/connections")[1]["connections"]
    return [c for c in found if c["metadata"]["network"] == network
            and c["metadata"]["destinationIP"] == TARGET]  # fmt: skip


def wait(pred: Any, timeout: float = 5.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    return pred()


out: dict[str, Any] = {}
tcp = socket.create_connection((TARGET, 7), 5)
payload = bytes(range(256)) * (SIZE // 256) + b"x" * (SIZE % 256)
tcp.sendall(payload)
echoed = b""
while len(echoed) < SIZE:
    echoed += tcp.recv(65536)
out["tcp_echo_exact"] = echoed == payload

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(2)
udp.sendto(b"hello", (TARGET, 7))
out["udp_echo"] = udp.recv(100).decode()

flows = wait(lambda: [c for c in connections("tcp") if c["download"] == SIZE])
out["tcp_listed"] = flows
out["udp_listed"] = wait(lambda: connections("udp"))

if flows:
    t0 = time.monotonic()
    out["tcp_delete"] = call("DELETE", "/connections/" + flows[0]["id"])[0]
    tcp.settimeout(3)
    try:
        out["tcp_after_delete"] = repr(tcp.recv(100))
    except OSError as e:
        out["tcp_after_delete"] = type(e).__name__
    out["tcp_ended_in"] = time.monotonic() - t0
    out["tcp_gone"] = bool(wait(lambda: not connections("tcp")))
if out["udp_listed"]:
    out["udp_delete"] = call("DELETE", "/connections/" + out["udp_listed"][0]["id"])[0]
    out["udp_gone"] = bool(wait(lambda: not connections("udp")))
out["status"] = call("GET", "/ztun/status")[1]
print(json.dumps(out))
