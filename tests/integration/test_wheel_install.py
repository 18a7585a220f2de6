"""ztun built as a wheel and installed into a fresh venv works away from the checkout.

One wheel and one venv per session (module-scoped): the build takes seconds, installing the
dependencies from PyPI (or pip's cache) a little longer. Every command then runs the venv's
`ztun` script from an empty temporary directory with PYTHONPATH unset, so nothing can come from
the checkout: the schema, the profiles and the examples must come from the installed package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ztun.address import Address
from ztun.config.format import format_config
from ztun.config.loader import PROFILE_DIR, load_config
from ztun.resources import EXAMPLE_DIR, SCHEMA_PATH

from .peers import REPO, free_port, socks5_connect, wait_port

PROFILES = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
EXAMPLES = sorted(p.stem for p in EXAMPLE_DIR.glob("*.yaml"))
#: What goes into the wheel; copied first so the build leaves nothing (build/, egg-info) behind.
SOURCES = ("pyproject.toml", "README.md", "ztun")


@dataclass
class Installed:
    venv: Path
    cwd: Path  # empty, outside the checkout
    env: dict[str, str]

    def ztun(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.venv / "bin" / "ztun"), *args],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc


def _run(args: list[str], timeout: float, env: dict[str, str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    # pip's variables (index, cache, find-links) stay; nothing may point into the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"),
          str(src)], 300, env=env)  # fmt: skip
    wheel = next((root / "dist").glob("ztun-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 120, env=env)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], 600, env=env)
    cwd = root / "elsewhere"
    cwd.mkdir()
    run_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8"}
    yield Installed(venv, cwd, run_env)


def test_ztun_comes_from_the_venv(installed: Installed) -> None:
    where = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", "import ztun, uvloop; print(ztun.__file__)"],
        cwd=installed.cwd, env=installed.env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv)
    assert installed.ztun("version").stdout.startswith("ztun ")


def test_profiles_lists_every_shipped_profile(installed: Installed) -> None:
    proc = installed.ztun("profiles")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == PROFILES
    listed = json.loads(installed.ztun("profiles", "--json").stdout)
    assert [p["name"] for p in listed] == PROFILES
    assert all(Path(p["path"]).is_relative_to(installed.venv) for p in listed)


def _example_paths(installed: Installed) -> dict[str, Path]:
    proc = installed.ztun("examples", "--json")
    assert proc.returncode == 0, proc.stderr
    return {e["name"]: Path(e["path"]) for e in json.loads(proc.stdout)}


def test_examples_lists_every_shipped_example(installed: Installed) -> None:
    paths = _example_paths(installed)
    assert sorted(paths) == EXAMPLES
    assert all(p.is_relative_to(installed.venv) and p.is_file() for p in paths.values())
    one = installed.ztun("examples", "local-proxy").stdout.strip()
    assert Path(one) == paths["local-proxy"]


def test_check_passes_on_every_shipped_example_and_profile(installed: Installed) -> None:
    files = [*_example_paths(installed).values()]
    files += [Path(p["path"]) for p in json.loads(installed.ztun("profiles", "--json").stdout)]
    for path in files:
        proc = installed.ztun("check", str(path))
        assert proc.returncode == 0, (path, proc.stderr)
        # The only warnings a shipped file may get: fields accepted but not executed yet.
        assert all("not yet executed" in line for line in proc.stderr.splitlines()), proc.stderr
    together = json.loads(installed.ztun("check", "--json", *map(str, files)).stdout)
    assert together["valid"] is True and len(together["files"]) == len(files)


def test_schema_is_the_packaged_one(installed: Installed) -> None:
    proc = installed.ztun("schema")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def test_format_gives_what_the_checkout_gives(installed: Installed) -> None:
    for name, path in _example_paths(installed).items():
        proc = installed.ztun("format", str(path))
        assert proc.returncode == 0, proc.stderr
        expected = format_config(load_config(EXAMPLE_DIR / f"{name}.yaml", env={}))
        assert proc.stdout == expected, name
        assert isinstance(yaml.safe_load(proc.stdout), dict)


def test_route_answers(installed: Installed) -> None:
    example = str(_example_paths(installed)["local-proxy"])
    blocked = json.loads(
        installed.ztun("route", example, "ads.doubleclick.net", "--port", "443", "--json").stdout
    )
    assert blocked["outbound"] == "block" and blocked["rule"] == 0
    direct = installed.ztun("route", example, "example.org", "--port", "443")
    assert direct.returncode == 0 and "outbound: direct" in direct.stdout


def test_rule_set_convert_match_decompile(installed: Installed) -> None:
    (installed.cwd / "ads.txt").write_text("ads.example\n+.track.example\n")
    made = installed.ztun("rule-set", "convert", "ads.txt", "-t", "domains", "--binary")
    assert made.returncode == 0, made.stderr
    hit = installed.ztun("rule-set", "match", "ads.srs", "x.track.example")
    assert hit.returncode == 0 and hit.stdout.startswith("match rules[0]:"), hit.stderr
    assert installed.ztun("rule-set", "decompile", "ads.srs").returncode == 0
    assert json.loads((installed.cwd / "ads.json").read_text())["rules"] == [
        {"domain": "ads.example", "domain_suffix": "track.example"}
    ]


def test_run_proxies_one_connection_and_stops_on_sigterm(installed: Installed) -> None:
    example = _example_paths(installed)["local-proxy"]
    port = free_port()
    config = installed.cwd / "local-proxy.yaml"
    config.write_text(re.sub(r"listen_port:\s*\d+", f"listen_port: {port}", example.read_text()))
    target = socket.create_server(("127.0.0.1", 0))
    log = installed.cwd / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(installed.venv / "bin" / "ztun"), "run", str(config)],
                                cwd=installed.cwd, env=installed.env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_port(port, proc)  # type: ignore[arg-type]
        client, code = socks5_connect(port, Address("127.0.0.1", target.getsockname()[1]))
        with client, target:
            assert code == 0
            target.settimeout(10)
            peer, _ = target.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(16) == b"ping"
                peer.sendall(b"pong")
                assert client.recv(16) == b"pong"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise
    text = log.read_text(errors="replace")
    assert exit_code == 0, text
    assert "Traceback" not in text
