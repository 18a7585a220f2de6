"""Clients for the TUN tests, run inside the client namespace; each prints one JSON line.

udp HOST PORT SIZE...       one connected UDP socket: echo each size, or the error
echoes HOST PORT N          N 64-byte UDP echoes one after the other: how many came back exact
conns HOST PORT N           N connections open at once, each echoes its own message
refused HOST PORT           how a TCP connect ends and how long it took
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time


def udp(host: str, port: int, sizes: list[int]) -> dict[str, object]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.connect((host, port))
    out: dict[str, object] = {}
    for size in sizes:
        msg = bytes((i * 7) & 0xFF for i in range(size))
        result = "timeout"
        for _ in range(3):
            s.settimeout(1.0)
            try:
                s.send(msg)
                data = s.recv(70000)
            except TimeoutError:
                continue
            except OSError as e:
                result = f"errno {e.errno}"
                break
            result = "ok" if data == b"echo:" + msg else f"bad {len(data)}"
            break
        out[str(size)] = result
    return out


def echoes(host: str, port: int, n: int) -> dict[str, object]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(1.0)
    exact = 0
    for i in range(n):
        msg = i.to_bytes(4, "big") * 16
        try:
            s.send(msg)
            exact += s.recv(2048) == b"echo:" + msg
        except (TimeoutError, OSError):
            pass
    return {"exact": exact}


async def conns(host: str, port: int, n: int) -> dict[str, object]:
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []
    t0 = time.monotonic()

    async def one(i: int) -> None:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        except (OSError, TimeoutError) as e:
            errors.append(repr(e))
            return
        opened.append((r, w))

    await asyncio.gather(*(one(i) for i in range(n)))
    established = time.monotonic() - t0
    served = 0

    async def talk(i: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal served
        msg = f"hello {i}\n".encode()
        try:
            w.write(msg)
            await w.drain()
            got = await asyncio.wait_for(r.readexactly(len(msg)), 30)
            if got == msg:
                served += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            errors.append(repr(e))

    # every connection is open at this point: all n are served concurrently
    await asyncio.gather(*(talk(i, r, w) for i, (r, w) in enumerate(opened)))
    for _, w in opened:
        w.close()
    return {"opened": len(opened), "served": served, "errors": errors[:5],
            "established_s": round(established, 3)}  # fmt: skip


def refused(host: str, port: int) -> dict[str, object]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    t0 = time.monotonic()
    try:
        s.connect((host, port))
        # system stack: the handshake completes in the kernel; a failed outbound then resets
        s.settimeout(10)
        data = s.recv(10)
        how = "eof" if not data else "data"
    except OSError as e:
        how = f"errno {e.errno}"
    return {"how": how, "seconds": round(time.monotonic() - t0, 3)}


def main() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cmd, host, port, *rest = sys.argv[1:]
    if cmd == "udp":
        res = udp(host, int(port), [int(x) for x in rest])
    elif cmd == "echoes":
        res = echoes(host, int(port), int(rest[0]))
    elif cmd == "conns":
        res = asyncio.run(conns(host, int(port), int(rest[0])))
    elif cmd == "refused":
        res = refused(host, int(port))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
