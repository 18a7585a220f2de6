"""A bounded UDP load with checkable datagrams, for the TUN load test; prints one JSON line.

sink HOST... PORT IDLE       receive on PORT of every HOST until nothing came for IDLE seconds
                             (after the first datagram); echo each one back; report per flow
send HOST PORT FLOWS COUNT SIZE MBIT [GSO]
                             COUNT datagrams of SIZE bytes from FLOWS sockets at about MBIT
                             Mbit/s, the flows interleaved unevenly; count what echoes back;
                             with GSO (a number) that many datagrams per UDP_SEGMENT send

Every datagram says what it is: flow number (1 byte), sequence number (4 bytes), then bytes
derived from both (a SHA-256 chain), so the receiver can tell a lost datagram from a corrupted,
duplicated or reordered one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import select
import socket
import struct
import sys
import time

SO_RCVBUFFORCE = 33  # Linux; not in Python 3.11's socket module
SOL_UDP, UDP_SEGMENT = 17, 103

def datagram(flow: int, seq: int, size: int) -> bytes:
    head = bytes([flow]) + seq.to_bytes(4, "big")
    seed = hashlib.sha256(head).digest()
    body = (seed * (size // 32 + 1))[: size - len(head)]
    return head + body


class Tally:
    """Per flow: how many came, how many were corrupt, duplicated, or came after a later one."""

    def __init__(self) -> None:
        self.flows: dict[int, dict[str, int]] = {}
        self.seen: set[tuple[int, int]] = set()

    def add(self, data: bytes, size: int) -> None:
        if len(data) < 5:
            self._flow(-1)["corrupt"] += 1
            return
        flow, seq = data[0], int.from_bytes(data[1:5], "big")
        f = self._flow(flow)
        if len(data) != size or data != datagram(flow, seq, size):
            f["corrupt"] += 1
            return
        if (flow, seq) in self.seen:
            f["duplicate"] += 1
            return
        self.seen.add((flow, seq))
        f["received"] += 1
        if seq < f["last"]:
            f["reordered"] += 1
        f["last"] = max(f["last"], seq)

    def _flow(self, flow: int) -> dict[str, int]:
        return self.flows.setdefault(
            flow, {"received": 0, "corrupt": 0, "duplicate": 0, "reordered": 0, "last": -1}
        )

    def report(self) -> dict[str, object]:
        total = {k: sum(f[k] for f in self.flows.values())
                 for k in ("received", "corrupt", "duplicate", "reordered")}  # fmt: skip
        return {**total, "flows": len(self.flows)}


def sink(hosts: list[str], port: int, idle: float, size: int) -> dict[str, object]:
    socks = []
    for host in hosts:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        s.bind((host, port))
        s.setblocking(False)
        socks.append(s)
    print("ready", flush=True)
    tally = Tally()
    last = None
    deadline = time.monotonic() + 120  # bounded whatever happens
    while time.monotonic() < deadline:
        ready, _, _ = select.select(socks, [], [], 0.1)
        if not ready:
            if last is not None and time.monotonic() - last > idle:
                break
            continue
        for s in ready:
            for _ in range(256):
                try:
                    data, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                tally.add(data, size)
                last = time.monotonic()
                with contextlib.suppress(OSError):  # an echo lost is counted by the sender
                    s.sendto(data, addr)
    return tally.report()


def send(
    host: str, port: int, flows: int, count: int, size: int, mbit: float, gso: int = 1
) -> dict[str, object]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for _ in range(flows):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        s.connect((host, port))
        s.setblocking(False)
        socks.append(s)
    echoes = Tally()

    def drain() -> None:
        for s in socks:
            while True:
                try:
                    echoes.add(s.recv(65535), size)
                except BlockingIOError:
                    break
                except OSError:
                    break

    # Uneven interleaving, as several applications' datagrams meet in one TUN read batch:
    # flow 0 sends runs of 5, the others one at a time between them.
    pattern = [0] * 5 + list(range(1, flows)) if flows > 1 else [0]
    seqs = [0] * flows
    per_second = mbit * 1e6 / 8 / size
    sent = errors = 0
    t0 = time.monotonic()
    while sent < count:
        for flow in pattern:
            if sent >= count:
                break
            try:
                if gso > 1:
                    k = min(gso, count - sent)
                    burst = b"".join(datagram(flow, seqs[flow] + i, size) for i in range(k))
                    socks[flow].sendmsg([burst], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))])
                else:
                    k = 1
                    socks[flow].send(datagram(flow, seqs[flow], size))
                seqs[flow] += k
                sent += k
            except BlockingIOError:
                errors += 1
                select.select([], [socks[flow]], [], 0.01)
        ahead = sent / per_second - (time.monotonic() - t0)
        if ahead > 0.001:
            drain()
            time.sleep(max(0.0, sent / per_second - (time.monotonic() - t0)))
    took = time.monotonic() - t0
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        select.select(socks, [], [], 0.1)
        drain()
    return {"sent": sent, "send_errors": errors, "seconds": round(took, 3),
            "mbit": round(sent * size * 8 / took / 1e6, 1), "echoes": echoes.report()}  # fmt: skip


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "sink":
        *hosts, port, idle, size = args
        out = sink(hosts, int(port), float(idle), int(size))
    elif cmd == "send":
        host, port, flows, count, size, mbit, *gso = args
        out = send(host, int(port), int(flows), int(count), int(size), float(mbit),
                   int(gso[0]) if gso else 1)  # fmt: skip
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
