"""Opt-in fuzz run over every parser of ztun (not part of the default test suite).

    python3 bench/fuzz/run.py [--inputs N] [--target NAME ...] [--corpus DIR] [--crashes DIR]
                              [--engine atheris|mutate] [--timeout-ms MS] [--jobs J]

`--inputs` (default 1,000,000) is split evenly across the chosen targets
(bench/fuzz/fuzz_targets.py).
Each target runs in its own process; its corpus lives in `--corpus`/<target> (default
bench/fuzz/corpus, gitignored) and starts from the committed seeds in bench/fuzz/seeds/<target>.
Per target it prints inputs, inputs/s, corpus size and crashes; every crashing input is saved
in `--crashes`/<target>/ (default bench/fuzz/crashes) and the run exits 1.

A crash is: an exception other than the target's documented error types, a broken invariant the
target asserts, an input whose parse takes more than `--timeout-ms` of CPU (default 100; measured
twice, so a GC pause alone is not one; atheris workers screen at `--slowdown` times that, since
instrumented code is slower, and each slow input is replayed uninstrumented before it counts), a
hang past `--hang-s` (default 10 s), or memory past `--rss-mb` (default 2048; atheris only).

Engines: atheris (libFuzzer, coverage-guided over ztun, dnspython and PyYAML; the default when it
is installed: `pip install atheris`, a wheel exists for CPython 3.11-3.13 on Linux x86_64) or, when
it is not, `mutate`: a small random mutator of the seeds in this process. It is not
coverage-guided, so it finds less, but it needs nothing and is what the default suite's smoke test
uses (tests/unit/test_fuzz_harness.py).

`--write-seeds` (re)writes bench/fuzz/seeds/ from the targets' seed builders and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEEDS = HERE / "seeds"
DEFAULT_CORPUS = HERE / "corpus"
DEFAULT_CRASHES = HERE / "crashes"


class SlowInput(Exception):
    """One input took longer than the per-input bound, twice in a row."""


def fuzz_targets_module() -> ModuleType:
    """bench/fuzz/fuzz_targets.py (importable from here, with ztun from this tree)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import fuzz_targets

    return fuzz_targets


def _targets() -> dict[str, Any]:
    return fuzz_targets_module().TARGETS


def write_seeds(names: Iterable[str] | None = None) -> dict[str, int]:
    """Write each target's seeds to bench/fuzz/seeds/<target>/<sha1>; how many per target."""
    table = _targets()
    counts = {}
    for name in names or table:
        folder = SEEDS / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        n = 0
        for seed in table[name].seeds():
            (folder / hashlib.sha1(seed).hexdigest()[:16]).write_bytes(seed)
            n += 1
        counts[name] = n
    return counts


def seed_inputs(name: str) -> list[bytes]:
    """The committed seeds of `name` (built afresh when the folder is missing)."""
    folder = SEEDS / name
    if not folder.is_dir():
        return list(_targets()[name].seeds())
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]


def guarded(run: Callable[[bytes], None], allowed: tuple[type[BaseException], ...],
            bound: float) -> Callable[[bytes], None]:  # fmt: skip
    """`run` as a fuzz entry: documented errors pass, anything else propagates (a crash), and
    an input over `bound` seconds of this thread's CPU, twice, raises SlowInput."""

    def one(data: bytes) -> None:
        for attempt in (1, 2):  # noqa: B007 (the message names the last)
            start = time.thread_time()
            with contextlib.suppress(allowed):
                run(data)
            spent = time.thread_time() - start
            if spent <= bound:
                return
        raise SlowInput(f"{len(data)}-byte input took {spent * 1000:.0f} ms (bound "
                        f"{bound * 1000:.0f} ms) on attempt {attempt}")  # fmt: skip

    return one


# -- the built-in engine ------------------------------------------------------------------------

_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x2E, 0x3A, 0x0A, 0x0D, 0x00, 0x3F, 0x40, 0xC0)


def mutate(rng: random.Random, data: bytes, pool: list[bytes], max_len: int) -> bytes:
    """One to four random edits of `data` (bit flips, bytes, inserts, deletes, copies, splices
    with another input of `pool`, a chunk repeated many times)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        n = len(buf)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice(_INTERESTING)
        elif op == 2 and n:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 3:
            i = rng.randint(0, n)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 4 and n:
            i = rng.randrange(n)
            del buf[i : i + rng.randint(1, 16)]
        elif op == 5 and n:
            i, j = rng.randrange(n), rng.randrange(n)
            size = rng.randint(1, 32)
            buf[j:j] = buf[i : i + size]
        elif op == 6 and pool:
            other = rng.choice(pool)
            if other:
                i = rng.randint(0, n)
                j = rng.randrange(len(other))
                buf[i:] = other[j:]
        elif op == 7 and n:
            del buf[rng.randrange(n) :]
        elif op == 8 and n:
            buf = bytearray(repeat_chunk(rng, bytes(buf), max_len))
    return bytes(buf[:max_len])


@dataclass
class Outcome:
    name: str
    inputs: int = 0
    seconds: float = 0.0
    corpus: int = 0
    crashes: list[str] = field(default_factory=list)
    engine: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def fuzz_in_process(name: str, runs: int, *, crashes: Path | None, bound: float,
                    seed: int = 0, max_crashes: int = 5) -> Outcome:  # fmt: skip
    """The built-in engine: `runs` inputs, the seeds first, then mutations of them. Crashing
    inputs are saved under `crashes`/<name>/ (when given) and reported, at most `max_crashes`
    distinct ones (by exception type and place)."""
    target = _targets()[name]
    one = guarded(target.run, target.allowed, bound)
    pool = seed_inputs(name)
    for p in pool:  # warm-up: first calls build caches and compile patterns
        with contextlib.suppress(Exception):
            target.run(p)
    rng = random.Random(seed)
    out = Outcome(name, engine="mutate", corpus=len(pool))
    seen: set[tuple[str, str]] = set()
    start = time.perf_counter()
    for i in range(runs):
        data = pool[i] if i < len(pool) else mutate(rng, rng.choice(pool), pool, target.max_len)
        try:
            one(data)
        except Exception as exc:  # a crash: anything the target does not allow
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            place = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
            key = (type(exc).__name__, place)
            if key in seen:
                continue
            seen.add(key)
            where = "-"
            if crashes is not None:
                folder = crashes / name
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"crash-{hashlib.sha1(data).hexdigest()}"
                path.write_bytes(data)
                where = str(path)
            out.crashes.append(f"{type(exc).__name__}: {exc} at {place} -> {where}")
            if len(seen) >= max_crashes:
                out.inputs = i + 1
                break
        out.inputs = i + 1
    out.seconds = time.perf_counter() - start
    return out


# -- the atheris engine (one worker process per target) -----------------------------------------


def _repeating_mutator(
    base: Callable[[bytes, int], bytes],
) -> Callable[[bytes, int, int], bytes]:
    """libFuzzer's mutations, and one time in ten a chunk of the input repeated many times:
    coverage does not reward slowness, and a parse that is quadratic in some repeated token
    (escaped quotes, labels, headers) only shows on inputs made of many of them."""

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if data and rng.random() < 0.1:
            return repeat_chunk(rng, data, max_size)
        return base(data, max_size)

    return mutator


def repeat_chunk(rng: random.Random, data: bytes, max_size: int) -> bytes:
    """`data` with one of its chunks (1 to 8 bytes) repeated 16 to 4096 times in place."""
    i = rng.randrange(len(data))
    chunk = data[i : i + rng.randint(1, 8)]
    return (data[:i] + chunk * rng.choice((16, 64, 256, 1024, 4096)) + data[i:])[:max_size]


def _atheris_worker(args: argparse.Namespace) -> None:
    import atheris

    with atheris.instrument_imports(include=args.instrument.split(",")):
        table = _targets()
    target = table[args.worker]
    for seed in seed_inputs(target.name):  # warm-up, untimed
        with contextlib.suppress(Exception):
            target.run(seed)
    one = guarded(target.run, target.allowed, args.timeout_ms / 1000)
    corpus = Path(args.corpus) / target.name
    corpus.mkdir(parents=True, exist_ok=True)
    crash_dir = Path(args.crashes) / target.name
    crash_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        str(corpus),
        str(SEEDS / target.name),
        f"-runs={args.runs}",
        f"-max_len={target.max_len}",
        # full-length inputs from the start: slow (quadratic) parses show only on long ones
        "-len_control=0",
        f"-timeout={args.hang_s}",
        f"-rss_limit_mb={args.rss_mb}",
        f"-artifact_prefix={crash_dir}/",
        f"-seed={args.seed or 0}",
        "-print_final_stats=1",
    ]
    # atheris.Mutate is looked up per call: Fuzz() swaps it for the custom-mutator build's
    mutate_base = lambda data, size: atheris.Mutate(data, size)  # noqa: E731
    atheris.Setup(argv, one, custom_mutator=_repeating_mutator(mutate_base))
    # the parent's inputs/s leaves out start-up (imports, instrumentation, warm-up)
    print(f"fuzz-start {time.time()!r}", file=sys.stderr, flush=True)
    atheris.Fuzz()


_START = re.compile(rb"fuzz-start ([0-9.]+)")
_DONE = re.compile(rb"stat::number_of_executed_units:\s*(\d+)")
#: crash-, timeout-, oom-, leak- files; not slow-unit- (libFuzzer's wall-clock report, which a
#: busy machine triggers: the CPU bound is checked by the target itself)
_ARTIFACT = re.compile(rb"Test unit written to (\S*/(?:crash|timeout|oom|leak)-\S+)")
_CRASH_LINE = re.compile(
    rb"^(=== Uncaught Python exception: ===|==\d+== ERROR: libFuzzer: .*)$", re.M
)


def fuzz_atheris(name: str, runs: int, args: argparse.Namespace) -> Outcome:
    """`runs` inputs of target `name` in atheris worker processes. Instrumentation makes code
    several times slower, so a worker only screens for slow inputs (at `--slowdown` times the
    bound); each one it reports is replayed here, uninstrumented, against the real bound. One
    that is fast here is logged as a false alarm and the worker is restarted for the inputs
    left (the corpus carries over); any other crash ends the target."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}  # fmt: skip
    log = Path(args.crashes) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    out = Outcome(name, engine="atheris")
    left = runs
    slowdown = args.slowdown or _targets()[name].slowdown
    for _restart in range(20):
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--worker", name, "--runs", str(left),
            "--corpus", str(args.corpus), "--crashes", str(args.crashes),
            "--timeout-ms", str(args.timeout_ms * slowdown), "--hang-s", str(args.hang_s),
            "--rss-mb", str(args.rss_mb), "--seed", str((args.seed or 0) + _restart),
            "--instrument", args.instrument,
        ]  # fmt: skip
        start = time.time()
        with log.open("ab") as sink:  # written as it runs: `tail -f` shows libFuzzer's progress
            at = sink.tell()
            proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                  check=False)  # fmt: skip
        end = time.time()
        with log.open("rb") as f:
            f.seek(at)
            output = f.read()
        began = _START.search(output)
        out.seconds += end - (float(began.group(1)) if began else start)
        m = _DONE.search(output)
        done = int(m.group(1)) if m else 0
        out.inputs += done
        left -= done
        if proc.returncode == 0 or left <= 0:
            break
        summary = _exception_summary(output)
        paths = [p.decode() for p in _ARTIFACT.findall(output)]
        if summary.startswith("SlowInput") and paths and done:
            ms = _replay_in_child(name, Path(paths[0]), args.timeout_ms, env)
            if ms is None:
                alarm = Path(paths[0]).with_name("instrumented-slow-" + Path(paths[0]).name)
                Path(paths[0]).rename(alarm)
                out.notes.append(f"slow only under instrumentation: {alarm}")
                continue
            summary += f" (uninstrumented: {ms:.0f} ms)"
        kind = _CRASH_LINE.search(output)
        summary = summary or (kind.group(1).decode() if kind else "")
        summary += f" (exit {proc.returncode})"
        out.crashes.append(f"{summary} -> {', '.join(paths) or '-'} (log {log})")
        break
    corpus = Path(args.corpus) / name
    out.corpus = sum(1 for _ in corpus.iterdir()) if corpus.is_dir() else 0
    return out


def _replay_in_child(name: str, path: Path, timeout_ms: float, env: dict[str, str]) -> float | None:
    """`replay_ms` in a fresh uninstrumented process: a slow input may also be a large one
    (one took 800 MB), and this process's memory peak would show in every later worker."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--replay", f"{name}:{path}",
         "--timeout-ms", str(timeout_ms)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    text = proc.stdout.strip()
    return float(text) if proc.returncode == 0 and text and text != "fast" else None


def replay_ms(name: str, path: Path, bound: float) -> float | None:
    """Replay a slow input in this (uninstrumented) process: its CPU ms when it is slow here
    too (over `bound`, twice), else None."""
    target = _targets()[name]
    one = guarded(target.run, target.allowed, bound)
    data = path.read_bytes()
    start = time.thread_time()
    try:
        one(data)
    except SlowInput:
        return (time.thread_time() - start) * 1000 / 2
    except Exception:
        return None  # not slow: an exception here is a different crash, reported as such
    return None


def _exception_summary(output: bytes) -> str:
    """The last line of the Python traceback atheris printed, if any."""
    text = output.decode("utf-8", "replace")
    at = text.find("=== Uncaught Python exception: ===")
    if at < 0:
        return ""
    lines = [ln for ln in text[at:].splitlines()[1:] if ln.strip()]
    for ln in lines:
        if not ln.startswith((" ", "Traceback")):
            return ln.strip()
    return ""


# -- the driver ---------------------------------------------------------------------------------


def _have_atheris() -> bool:
    return importlib.util.find_spec("atheris") is not None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=1_000_000, help="total over all targets")
    p.add_argument("--target", action="append", help="a target name (repeatable); default all")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--crashes", default=str(DEFAULT_CRASHES))
    p.add_argument("--engine", choices=("atheris", "mutate"))
    p.add_argument("--timeout-ms", type=float, default=100.0, help="CPU bound per input")
    p.add_argument("--slowdown", type=float,
                   help="atheris: screen at this many times the bound (instrumented code is "
                        "slower; default per target, 3 or 10); what it finds is replayed "
                        "uninstrumented")  # fmt: skip
    p.add_argument("--hang-s", type=int, default=10, help="wall-clock bound per input (atheris)")
    p.add_argument("--rss-mb", type=int, default=2048, help="memory bound (atheris)")
    p.add_argument("--jobs", type=int, default=1, help="targets run at once (atheris)")
    p.add_argument("--instrument", default="ztun,dns,yaml",
                   help="packages whose coverage guides atheris (comma-separated)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    p.add_argument("--write-seeds", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--replay", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the per-target figures to this file")
    args = p.parse_args(argv)

    if args.worker:
        _atheris_worker(args)
        return 0
    if args.replay:
        name, _, path = args.replay.partition(":")
        ms = replay_ms(name, Path(path), args.timeout_ms / 1000)
        print("fast" if ms is None else f"{ms:.1f}")
        return 0
    table = _targets()
    if args.list:
        for t in table.values():
            print(f"{t.name:16} {t.what}")
        return 0
    if args.write_seeds:
        for name, n in write_seeds(args.target).items():
            print(f"{name}: {n} seeds")
        return 0
    names = args.target or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; --list shows them")
    engine = args.engine or ("atheris" if _have_atheris() else "mutate")
    if engine == "atheris" and not _have_atheris():
        p.error("atheris is not installed (pip install atheris), use --engine mutate")
    per_target = max(1, -(-args.inputs // len(names)))  # rounded up: at least --inputs in all
    print(f"fuzz: {engine}, {per_target} inputs for each of {len(names)} targets, "
          f"{args.timeout_ms:g} ms per input", flush=True)  # fmt: skip
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    if engine == "atheris":
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = [pool.submit(fuzz_atheris, n, per_target, args) for n in names]
            for f in futures:
                outcomes.append(f.result())
                _print(outcomes[-1])
    else:
        for n in names:
            bound = args.timeout_ms / 1000
            outcomes.append(
                fuzz_in_process(n, per_target, crashes=Path(args.crashes), bound=bound,
                                seed=args.seed)
            )  # fmt: skip
            _print(outcomes[-1])
    total = sum(o.inputs for o in outcomes)
    crashed = [o for o in outcomes if o.crashes]
    wall = time.perf_counter() - started
    print(f"total: {total} inputs in {wall:.0f} s, {len(crashed)} target(s) with crashes")
    for o in outcomes:
        for note in o.notes:
            print(f"note {o.name}: {note}")
    for o in crashed:
        for c in o.crashes:
            print(f"CRASH {o.name}: {c}")
    if args.json:
        Path(args.json).write_text(json.dumps([
            {"target": o.name, "engine": o.engine, "inputs": o.inputs, "seconds": o.seconds,
             "inputs_per_s": o.rate, "corpus": o.corpus, "crashes": o.crashes,
             "notes": o.notes}
            for o in outcomes
        ], indent=1))  # fmt: skip
    return 1 if crashed else 0


def _print(o: Outcome) -> None:
    print(f"{o.name:16} {o.inputs:>9} inputs {o.seconds:8.1f} s {o.rate:9.0f}/s "
          f"corpus {o.corpus:>5}  crashes {len(o.crashes)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
