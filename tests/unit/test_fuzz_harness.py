"""The fuzz harness (bench/fuzz/) stays runnable: every target takes its seeds and a few hundred
mutations of them without a crash, the committed seeds match what the targets build, and the
atheris engine runs end to end. The real run (a million inputs and more) is opt-in:
`python3 bench/fuzz/run.py` (bench/README.md, "Fuzzing")."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import need

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "bench" / "fuzz"


def _load(name: str, path: Path):  # bench/fuzz is a folder of scripts, not a package
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fuzz_run = _load("ztun_fuzz_run", FUZZ / "run.py")
fuzz_targets = fuzz_run.fuzz_targets_module()

NAMES = sorted(fuzz_targets.TARGETS)


@pytest.mark.parametrize("name", NAMES)
def test_target_survives_its_seeds_and_mutations(name: str, tmp_path: Path) -> None:
    # A generous bound here: the unit-test run shares the machine; the fuzz run uses 100 ms.
    out = fuzz_run.fuzz_in_process(name, 300, crashes=tmp_path, bound=2.0, seed=12)
    assert out.inputs == 300
    assert out.crashes == []


@pytest.mark.parametrize("name", NAMES)
def test_committed_seeds_are_the_built_ones(name: str) -> None:
    """bench/fuzz/seeds/ is what `run.py --write-seeds` writes from the unit tests' fixtures."""
    folder = FUZZ / "seeds" / name
    committed = {p.name for p in folder.iterdir()}
    built = {hashlib.sha1(s).hexdigest()[:16] for s in fuzz_targets.TARGETS[name].seeds()}
    assert committed == built, "run `python3 bench/fuzz/run.py --write-seeds` and commit"


def test_a_crash_is_reported_and_saved(tmp_path: Path) -> None:
    def parser(data: bytes) -> None:
        if data[:1] == b"\x05":
            raise ValueError("a parser bug")
        if data[:1] == b"\x06":
            raise KeyError("documented")

    target = fuzz_targets.Target("demo", parser, (KeyError,), lambda: iter([b"\x05", b"\x06"]))
    fuzz_targets.TARGETS["demo"] = target
    try:
        out = fuzz_run.fuzz_in_process("demo", 10, crashes=tmp_path, bound=2.0)
    finally:
        del fuzz_targets.TARGETS["demo"]
    assert len(out.crashes) == 1 and "ValueError: a parser bug" in out.crashes[0]
    saved = list((tmp_path / "demo").iterdir())
    assert [p.read_bytes() for p in saved] == [b"\x05"]


def test_a_slow_input_is_a_crash() -> None:
    def slow(data: bytes) -> None:
        x = 0
        for i in range(10**6):  # tens of ms of CPU
            x += i

    one = fuzz_run.guarded(slow, (), 0.002)
    with pytest.raises(fuzz_run.SlowInput):
        one(b"")


def test_atheris_engine_end_to_end(tmp_path: Path) -> None:
    need(importlib.util.find_spec("atheris"), "atheris (in .[test] on Linux x86_64)")
    proc = subprocess.run(
        [sys.executable, str(FUZZ / "run.py"), "--inputs", "400", "--target", "socks_server",
         "--corpus", str(tmp_path / "corpus"), "--crashes", str(tmp_path / "crashes"),
         "--instrument", "ztun.proto"],  # instrumenting all of ztun takes seconds
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "socks_server" in proc.stdout and "crashes 0" in proc.stdout
    assert any((tmp_path / "corpus" / "socks_server").iterdir())
