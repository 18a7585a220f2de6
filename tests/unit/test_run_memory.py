"""`ztun run` loads only what its config uses (issue 17: idle RSS, small routers): a config
with a mixed inbound alone, no DNS, no API, no TUN, starts without aiohttp, pyroute2,
cryptography, RE2 or dnspython, and its idle RSS stays under a generous bound."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: `ztun run` through the CLI, as a user starts it; once every inbound has started (Box._run),
#: the modules and VmRSS are printed and the box stops at once.
RUN = """
import gc, json, sys
import ztun.box as box
original = box.Box._run
async def _run(self):
    gc.collect()
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
    print(json.dumps({"modules": sorted(sys.modules), "rss_kib": rss}), flush=True)
    self._stop.set()
    return await original(self)
box.Box._run = _run
sys.argv = ["ztun", "run", sys.argv[1]]
from ztun.launch import main
main()
"""

#: Modules only some features need: the Clash API, the TUN and the network monitor, the QUIC
#: sniffer, domain_regex, DNS.
FEATURE_MODULES = (
    "aiohttp",
    "pyroute2",
    "cryptography",
    "re2",
    "dns",
    "maxminddb",
    "ztun.api",
    "ztun.inbound.tun",
    "ztun.dns.module",
    "ztun.platform.linux.tun",
    # the command line's library and what it brings (ztun.launch starts `run` without them)
    "typer",
    "pydantic",
    "rich",
    # remote rule-set downloads (urllib.request, http.client and the email package) and the
    # socks outbound's library
    "urllib.request",
    "http.client",
    "python_socks",
)
#: Measured 37.4 MiB on the 2-core development machine (57.9 MiB before the lazy imports,
#: 47.8 MiB with them but still through typer).
IDLE_RSS_MIB = 47
#: The same config started again, its schema check trusted (ztun.provider.validated):
#: measured 32.6 MiB (sing-box idles at about 35).
AGAIN_RSS_MIB = 42


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_mixed_only_config_starts_without_the_other_features(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "mixed.yaml"
    config.write_text(
        "log: {level: warn}\n"
        f"inbounds: [{{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: {port}}}]\n"
        "outbounds: [{type: direct, tag: direct}, {type: block, tag: block}]\n"
        "route:\n"
        "  rules:\n"
        "    - {domain_suffix: [example.org], outbound: block}\n"
        "    - {ip_cidr: [203.0.113.0/24], action: reject}\n"
        "  final: direct\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    reports = []
    for _ in range(2):  # the first start checks the schema, the second trusts its marker
        done = subprocess.run([sys.executable, "-c", RUN, str(config)], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        reports.append(json.loads(done.stdout.splitlines()[0]))
    for report in reports:
        loaded = [m for m in report["modules"]
                  if any(m == f or m.startswith(f + ".") for f in FEATURE_MODULES)]  # fmt: skip
        assert not loaded, f"a mixed-only config imported {loaded}"
        assert "ztun.inbound.mixed" in report["modules"]  # the probe saw a real start
    first, again = reports
    # the first start checks the schema in a child process (ztun.check), the second not at all
    assert "jsonschema" not in first["modules"] and "jsonschema" not in again["modules"]
    assert first["rss_kib"] < IDLE_RSS_MIB * 1024, first["rss_kib"]
    assert again["rss_kib"] < AGAIN_RSS_MIB * 1024, again["rss_kib"]
