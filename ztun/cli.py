"""The `ztun` command line: argument parsing, output formatting and exit codes only.

Exit codes: 0 success, 1 the config (or a query) has errors, 2 bad usage.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from ztun import __version__
from ztun.errors import ZtunError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ztun: a rules router that splits traffic between a direct path and a SOCKS5 proxy.",
)

ConfigArg = Annotated[Path, typer.Argument(help="The config file (YAML).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"ztun: {message}", err=True)
    return typer.Exit(code)


ConfigsArg = Annotated[
    list[Path], typer.Argument(help="The config file(s) (YAML).", show_default=False)
]


@app.command()
def check(configs: ConfigsArg, as_json: JsonOpt = False) -> None:
    """Validate configs; print every mistake as FILE:LINE:COL: message. Exit 1 if any fails."""
    from ztun.check import check_file

    results = [(config, check_file(config)) for config in configs]
    errors = sum(len(r.errors) for _c, r in results)
    warnings = sum(len(r.warnings) for _c, r in results)
    if as_json:
        # The one-file shape (valid, errors, warnings, diagnostics) stays as it was, totalled over
        # all files; `files` adds one summary per file, in argument order.
        out = {
            "valid": not errors,
            "errors": errors,
            "warnings": warnings,
            "diagnostics": [_diagnostic_json(d, c) for c, r in results for d in r.diagnostics],
            "files": [
                {"file": str(c), "valid": not r.errors, "errors": len(r.errors),
                 "warnings": len(r.warnings)}
                for c, r in results
            ],
        }  # fmt: skip
        typer.echo(json.dumps(out, indent=2))
    else:
        for config, result in results:
            # One stream keeps errors and warnings in file order.
            for d in result.diagnostics:
                typer.echo(_diagnostic_text(d, config), err=True)
        failed = sum(1 for _c, r in results if r.errors)
        if errors:
            of_files = f" in {failed} of {len(results)} files" if len(results) > 1 else ""
            typer.echo(f"{errors} error(s), {warnings} warning(s){of_files}", err=True)
    raise typer.Exit(1 if errors else 0)


def _diagnostic_text(d: Any, config: Path) -> str:
    # With several files a diagnostic without a position still has to say which file it is about.
    if d.mark is not None:
        return str(d)
    prefix = "warning: " if d.severity == "warning" else ""
    return f"{config}: {prefix}{d.message}"


def _diagnostic_json(d: Any, config: Path) -> dict[str, object]:
    out: dict[str, object] = d.to_json()
    if out["file"] is None:
        out["file"] = str(config)
    return out


def _load_router(config: Path) -> Any:
    return _load_compiled(config).router


def _load_compiled(config: Path) -> Any:
    from ztun.check import load_and_compile
    from ztun.errors import ConfigError

    try:
        return load_and_compile(config, offline=True)
    except ConfigError as exc:
        for d in exc.diagnostics:
            typer.echo(str(d), err=True)
        raise _fail(f"{config}: the config has errors; `ztun check` lists them") from None


def _group_nows(compiled: Any) -> dict[str, Any]:
    """Each group outbound's member in use: from the running ztun's API when the config has
    one and it answers, else what `ztun run` would start with (a selector's cache-file choice
    or default; a urltest group's first member, before any probe)."""
    from ztun.config.options import SelectorOutboundOptions, URLTestOutboundOptions
    from ztun.errors import ZtunError
    from ztun.query import GroupNow
    from ztun.runtime.cache_file import cache_path, read_state

    options = compiled.options
    groups = [o for o in options.outbounds
              if isinstance(o, SelectorOutboundOptions | URLTestOutboundOptions)]  # fmt: skip
    if not groups:
        return {}
    api = options.experimental.clash_api
    if api.external_controller:
        from ztun.api.client import ApiClient

        try:
            found = ApiClient(api.external_controller, api.secret).get("/proxies")["proxies"]
            return {g.tag: GroupNow(found[g.tag]["now"], "running ztun") for g in groups
                    if isinstance(found.get(g.tag, {}).get("now"), str)}  # fmt: skip
        except (ZtunError, KeyError, TypeError):
            pass  # not running (or another config's ztun): say what a start would use
    path = cache_path(options.experimental.cache_file, compiled.loaded.base_dir)
    kept = ((read_state(path) or {}).get("selected") if path is not None else None) or {}
    out = {}
    for g in groups:
        if isinstance(g, URLTestOutboundOptions):
            out[g.tag] = GroupNow(g.outbounds[0], "first member, before any probe")
        elif isinstance(kept, dict) and kept.get(g.tag) in g.outbounds:
            out[g.tag] = GroupNow(kept[g.tag], "cache file")
        else:
            out[g.tag] = GroupNow(g.default or g.outbounds[0], "default")
    return out


@app.command()
def route(
    config: ConfigArg,
    dest: Annotated[
        str | None, typer.Argument(help="Destination: a domain or an IP.", show_default=False)
    ] = None,
    port: Annotated[int, typer.Option(help="Destination port.", min=0, max=65535)] = 0,
    network: Annotated[str, typer.Option(help="tcp, udp or icmp.")] = "tcp",
    source: Annotated[str | None, typer.Option(help="Source IP[:PORT].")] = None,
    inbound: Annotated[str | None, typer.Option(help="Inbound tag.")] = None,
    protocol: Annotated[str | None, typer.Option(help="Sniffed protocol (tls, http…).")] = None,
    domain: Annotated[str | None, typer.Option(help="Domain known for an IP dest.")] = None,
    ip: Annotated[
        list[str] | None, typer.Option(help="Address(es) a domain dest resolved to.")
    ] = None,
    user: Annotated[str | None, typer.Option(help="Authenticated user (auth_user).")] = None,
    process: Annotated[
        str | None,
        typer.Option(help="The flow's local program: a name (curl) or a path (/usr/bin/curl)."),
    ] = None,
    process_user: Annotated[
        str | None, typer.Option(help="The user owning the flow's socket (rule item user).")
    ] = None,
    uid: Annotated[
        int | None,
        typer.Option(help="That user's id (rule item user_id).", min=0, max=0xFFFFFFFF),
    ] = None,
    batch: Annotated[
        str | None, typer.Option(help="File of queries 'DEST [PORT] [NETWORK]', or '-'.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show which outbound a flow gets, the rule that decided, and why."""
    from ztun.query import QueryError, parse_query, parse_source, render_answer

    if (dest is None) == (batch is None):
        raise _fail("give either DEST or --batch FILE", 2)
    if network not in ("tcp", "udp", "icmp"):
        raise _fail(f"--network: '{network}' is not tcp, udp or icmp", 2)
    try:
        src, src_port = parse_source(source) if source else (None, 0)
    except QueryError as exc:
        raise _fail(f"--source: {exc}", 2) from None
    compiled = _load_compiled(config)
    router, groups = compiled.router, _group_nows(compiled)
    defaults = {
        "port": port, "network": network, "source": src, "source_port": src_port,
        "inbound": inbound, "protocol": protocol, "domain": domain, "ips": ip or [],
        "user": user, "process": process, "process_user": process_user, "uid": uid,
    }  # fmt: skip
    if dest is not None:
        try:
            meta = parse_query(dest, **defaults)  # type: ignore[arg-type]
        except QueryError as exc:
            raise _fail(str(exc), 2) from None
        typer.echo(render_answer(router, meta, as_json=as_json, verbose=True, groups=groups))
        return
    assert batch is not None
    stream: TextIO = sys.stdin if batch == "-" else _open_batch(batch)
    _route_batch(router, stream, defaults, as_json, groups)


def _open_batch(name: str) -> TextIO:
    try:
        return open(name, encoding="utf-8")
    except OSError as exc:
        raise _fail(f"--batch: cannot read {name}: {exc.strerror}", 2) from None


def _route_batch(router: Any, stream: TextIO, defaults: dict[str, Any], as_json: bool,
                 groups: dict[str, Any] | None = None) -> None:  # fmt: skip
    from ztun.query import QueryError, parse_batch_line, render_answer

    out = sys.stdout
    bad = 0
    write = out.write
    for number, line in enumerate(stream, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            meta = parse_batch_line(text, defaults)
        except QueryError as exc:
            bad += 1
            if as_json:
                write(json.dumps({"query": text, "error": str(exc), "line": number}) + "\n")
            else:
                write(f"{text}\terror: {exc}\n")
            continue
        write(render_answer(router, meta, as_json=as_json, verbose=False, query=text,
                            groups=groups) + "\n")  # fmt: skip
    out.flush()
    if bad:
        raise typer.Exit(1)


@app.command("dns")
def dns_(
    config: ConfigArg,
    name: Annotated[str, typer.Argument(help="The name to ask for.", show_default=False)],
    qtype: Annotated[str, typer.Option("--type", help="Record type: A, AAAA, HTTPS, MX…")] = "A",
    inbound: Annotated[str | None, typer.Option(help="Inbound tag the query came in on.")] = None,
    no_query: Annotated[
        bool, typer.Option("--no-query", help="Only show the rule and server; ask nobody.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.", min=0.1)] = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Show which DNS rule and server answer a query, then ask it and print the answer."""
    from ztun.check import load_and_compile
    from ztun.dns.explain import DnsQueryError, query_type, render, run_explain
    from ztun.errors import ConfigError

    try:
        number = query_type(qtype)
    except DnsQueryError as exc:
        raise _fail(str(exc), 2) from None
    try:
        compiled = load_and_compile(config, offline=True)
    except ConfigError as exc:
        for d in exc.diagnostics:
            typer.echo(str(d), err=True)
        raise _fail(f"{config}: the config has errors; `ztun check` lists them") from None
    try:
        explained = run_explain(
            compiled.options, getattr(compiled, "dns_router", None), name, number,
            inbound=inbound, query=not no_query, base_dir=compiled.loaded.base_dir,
            timeout=timeout,
        )  # fmt: skip
    except DnsQueryError as exc:
        raise _fail(str(exc)) from None
    typer.echo(render(explained, as_json=as_json))


@app.command("format")
def format_(config: ConfigArg) -> None:
    """Print the config (includes merged) normalised."""
    from ztun.config.format import format_config
    from ztun.config.loader import load_config
    from ztun.errors import ConfigError

    try:
        loaded = load_config(config, env=os.environ)
    except ConfigError as exc:
        for d in exc.diagnostics:
            typer.echo(str(d), err=True)
        raise typer.Exit(1) from None
    typer.echo(format_config(loaded), nl=False)


@app.command()
def schema() -> None:
    """Print the JSON schema of the config format."""
    from ztun.config.schema import schema_text

    typer.echo(schema_text(), nl=False)


@app.command()
def profiles(as_json: JsonOpt = False) -> None:
    """List the shipped profiles a config can include by name."""
    from ztun.config.loader import PROFILE_DIR, list_profiles

    found = list_profiles()
    if not found:
        # An empty list would look like success; it means a broken or partial install.
        raise _fail(f"no shipped profiles found in {PROFILE_DIR} (is ztun installed completely?)")
    _list_configs(found, as_json)


@app.command()
def examples(
    name: Annotated[
        str | None, typer.Argument(help="Print only this example's path.", show_default=False)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the shipped example configs and where they are installed."""
    from ztun.config.loader import list_profiles
    from ztun.resources import EXAMPLE_DIR

    found = list_profiles(EXAMPLE_DIR)
    if not found:
        raise _fail(f"no shipped examples found in {EXAMPLE_DIR} (is ztun installed completely?)")
    if name is None:
        _list_configs(found, as_json, show_path=True)
        return
    for example, description, path in found:
        if example == name:
            if as_json:
                typer.echo(json.dumps({"name": example, "description": description,
                                       "path": str(path)}, indent=2))  # fmt: skip
            else:
                typer.echo(str(path))
            return
    known = ", ".join(n for n, _d, _p in found)
    raise _fail(f"no shipped example {name!r} (examples: {known})")


def _list_configs(
    found: list[tuple[str, str, Path]], as_json: bool, *, show_path: bool = False
) -> None:
    if as_json:
        typer.echo(json.dumps([{"name": n, "description": d, "path": str(p)}
                               for n, d, p in found], indent=2))  # fmt: skip
        return
    width = max(len(n) for n, _d, _p in found)
    for name, description, path in found:
        typer.echo(f"{name.ljust(width)}  {path if show_path else description}")


@app.command()
def run(
    config: ConfigArg,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="Override log.level (debug, info, warn…).")
    ] = None,
) -> None:
    """Start the inbounds and route every flow until SIGINT/SIGTERM."""
    from ztun.box import run as run_box

    raise typer.Exit(run_box(config, log_level))


ApiOpt = Annotated[
    str | None,
    typer.Option("--api", help="The API's host:port (default: the config's "
                 "external_controller, else 127.0.0.1:9090).", show_default=False),
]
SecretOpt = Annotated[
    str | None,
    typer.Option("--secret", envvar="ZTUN_API_SECRET", show_default=False,
                 help="The API's secret (default: the config's, or $ZTUN_API_SECRET)."),
]
ApiConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", show_default=False,
                 help="Read the API's address and secret from this config."),
]


def _api_client(api: str | None, secret: str | None, config: Path | None) -> Any:
    from ztun.api.client import ApiClient

    controller, config_secret = "127.0.0.1:9090", ""
    if config is not None:
        from ztun.config.loader import load_config

        data = load_config(config).data
        clash = ((data.get("experimental") or {}).get("clash_api") or {}) if isinstance(
            data, dict) else {}  # fmt: skip
        controller = str(clash.get("external_controller") or controller)
        config_secret = str(clash.get("secret") or "")
    if api is not None:
        controller = api
    if controller.startswith(":"):
        controller = "127.0.0.1" + controller
    return ApiClient(controller, secret if secret is not None else config_secret)


@app.command("reload")
def reload_(
    config: ConfigArg,
    api: ApiOpt = None,
    secret: SecretOpt = None,
    use_signal: Annotated[bool, typer.Option(
        "--signal", help="Send SIGHUP even when the API is on.")] = False,
    pid: Annotated[int | None, typer.Option(
        "--pid", help="The ztun to send SIGHUP to (default: the one running CONFIG).",
        show_default=False)] = None,
    timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the outcome.", min=1)] = 90.0,
) -> None:  # fmt: skip
    """Make the ztun running CONFIG read it again: through its API when it has one, else by
    SIGHUP. Prints why a config was refused (the running one then stays) and exits 1."""
    import signal
    import time

    from ztun.platform.linux.runfile import netns, read_run_file

    running = read_run_file(config)
    controller = api
    if controller is None and running is not None and running.get("netns") == netns():
        # Its API's address means the same here only in the same network namespace.
        controller = running.get("api")
    problems: list[str] | None = None
    if controller and not use_signal:
        client = _api_client(controller, secret, _config_or_none(config))
        try:
            problems = client.reload(timeout)
        except ZtunError as e:
            if pid is None and running is None:
                raise
            typer.echo(f"ztun: {e}; sending SIGHUP instead", err=True)
    if problems is None:
        target = pid if pid is not None else (running or {}).get("pid")
        if not isinstance(target, int):
            raise _fail(f"no running ztun found for {config} (`ztun run` records itself in "
                        "$ZTUN_STATE_DIR, default /run/ztun; give --pid, or --api)")  # fmt: skip
        before = (running or {}).get("reloads", 0)
        try:
            os.kill(target, signal.SIGHUP)
        except OSError as e:
            raise _fail(f"cannot signal pid {target}: {e.strerror}") from None
        if running is None or running.get("pid") != target:
            typer.echo(f"sent SIGHUP to pid {target}; its log says how the reload went")
            return
        deadline = time.monotonic() + timeout
        while True:
            now = read_run_file(config)
            if now is None:
                raise _fail("ztun exited before it reloaded")
            if now.get("reloads", 0) > before:
                last = now.get("last_reload") or {}
                problems = [] if last.get("applied") else list(last.get("problems") or ["?"])
                break
            if time.monotonic() > deadline:
                raise _fail(f"no outcome after {timeout:g}s (see ztun's log)")
            time.sleep(0.1)
    if problems:
        for problem in problems:
            typer.echo(problem, err=True)
        raise _fail("the config was refused; the running one stays")
    typer.echo("reloaded")


def _config_or_none(config: Path) -> Path | None:
    """The config to read the API's secret from, when it can be read at all."""
    from ztun.config.loader import load_config
    from ztun.errors import ConfigError

    try:
        load_config(config)
    except (ConfigError, OSError):
        return None
    return config


@app.command()
def status(
    api: ApiOpt = None, secret: SecretOpt = None, config: ApiConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Show a running ztun's flows, totals per outbound and DNS counters (via its API)."""
    from ztun.api.console import status_text

    found = _api_client(api, secret, config).get("/ztun/status")
    typer.echo(json.dumps(found, indent=2) if as_json else status_text(found))


@app.command()
def top(
    api: ApiOpt = None, secret: SecretOpt = None, config: ApiConfigOpt = None,
    interval: Annotated[float, typer.Option(help="Seconds between screens.", min=0.1)] = 1.0,
    count: Annotated[int, typer.Option(help="Stop after this many screens (0: never).",
                                       min=0)] = 0,
) -> None:  # fmt: skip
    """A live view of a running ztun's connections, busiest first (via its API)."""
    import shutil

    from ztun.api.console import Top

    client = _api_client(api, secret, config)
    view = Top()
    tty = sys.stdout.isatty()
    with _keys() as pressed:
        shown = 0
        while True:
            connections = client.get("/connections")
            found = client.get("/ztun/status")
            size = shutil.get_terminal_size((120, 40))
            screen = view.screen(connections, found, interval, size.columns, size.lines)
            # Plain ANSI: home and clear, then the screen (no curses, no dependency).
            typer.echo(("\x1b[H\x1b[2J" if tty else "") + screen)
            shown += 1
            if count and shown >= count:
                return
            if pressed(interval) == "q":
                return


class _keys:
    """While `top` runs on a terminal: keys without Enter (cbreak), restored on exit; the
    context gives `pressed(timeout)`, the key pressed within `timeout`, or None."""

    def __enter__(self) -> Any:
        import select
        import time

        self.saved = None
        if sys.stdin.isatty():
            import termios
            import tty

            self.saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin)

        def pressed(timeout: float) -> str | None:
            if self.saved is None:
                time.sleep(timeout)
                return None
            ready, _, _ = select.select([sys.stdin], [], [], timeout)
            return sys.stdin.read(1) if ready else None

        return pressed

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, self.saved)


rule_set_app = typer.Typer(
    no_args_is_help=True,
    help="Rule-set files: match a name or IP, compile to and decompile from sing-box's binary "
    ".srs, convert Clash rule providers and domain lists.",
)
app.add_typer(rule_set_app, name="rule-set")

SetArg = Annotated[Path, typer.Argument(help="The rule-set file.", show_default=False)]
FormatOpt = Annotated[
    str | None,
    typer.Option("--format", "-f", help="source, binary, clash or domains (default: binary for "
                 ".srs files, else source).", show_default=False),
]  # fmt: skip
BehaviorOpt = Annotated[str, typer.Option(help="For --format clash: domain, ipcidr or classical.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Output file ('-': standard output).", show_default=False),
]


def _load_set(path: Path, fmt: str | None, behavior: str) -> Any:
    from ztun.ruleset_tool import load

    loaded = load(path, fmt, behavior)
    for warning in loaded.warnings:
        typer.echo(f"ztun: warning: {path}: {warning}", err=True)
    return loaded


def _write_output(output: Path, data: bytes, *, what: str) -> None:
    if str(output) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        output.write_bytes(data)
    except OSError as exc:
        raise _fail(f"cannot write {output}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {what} {output}", err=True)


@rule_set_app.command("match")
def rule_set_match(
    path: SetArg,
    query: Annotated[str, typer.Argument(help="A domain or an IP address.", show_default=False)],
    fmt: FormatOpt = None,
    behavior: BehaviorOpt = "classical",
    port: Annotated[int, typer.Option(help="Destination port.", min=0, max=65535)] = 0,
    network: Annotated[str, typer.Option(help="tcp, udp or icmp.")] = "tcp",
    as_json: JsonOpt = False,
) -> None:
    """Print every top-level rule of the set that QUERY matches (each rule on its own)."""
    from ztun.query import QueryError
    from ztun.ruleset_tool import describe, match

    loaded = _load_set(path, fmt, behavior)
    try:
        hits = match(loaded, query, port=port, network=network)
    except QueryError as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        typer.echo(json.dumps({"query": query, "matches": [
            {"index": i, "rule": loaded.rules[i]} for i in hits]}, indent=2))  # fmt: skip
        return
    for index in hits:
        typer.echo(f"match rules[{index}]: {describe(loaded.rules[index])}")
    if not hits:
        typer.echo(f"no rule of {path} matches {query}", err=True)


@rule_set_app.command("compile")
def rule_set_compile(
    path: SetArg,
    output: OutputOpt = None,
    fmt: FormatOpt = None,
    behavior: BehaviorOpt = "classical",
    srs_version: Annotated[
        int,
        typer.Option(
            "--version", help="Binary version: 2, or 1 for sing-box before 1.10.", min=1, max=2
        ),
    ] = 2,
) -> None:
    """Write the set as sing-box's binary .srs (default: the input's name with .srs)."""
    from ztun.ruleset_tool import default_output, to_binary

    loaded = _load_set(path, fmt, behavior)
    data = to_binary(loaded.rules, srs_version)
    _write_output(output or default_output(path, ".srs"), data, what="binary rule set")


@rule_set_app.command("decompile")
def rule_set_decompile(path: SetArg, output: OutputOpt = None) -> None:
    """Write a binary .srs set as sing-box source JSON (default: the input's name with .json)."""
    from ztun.ruleset_tool import decompile, default_output

    text, warnings = decompile(path)
    for warning in warnings:
        typer.echo(f"ztun: warning: {path}: {warning}", err=True)
    _write_output(output or default_output(path, ".json"), text.encode("utf-8"),
                  what="source rule set")  # fmt: skip


@rule_set_app.command("convert")
def rule_set_convert(
    path: SetArg,
    source_type: Annotated[
        str, typer.Option("--type", "-t", help="clash (a rule provider) or domains (a list).")
    ],
    behavior: BehaviorOpt = "classical",
    output: OutputOpt = None,
    binary: Annotated[bool, typer.Option("--binary", help="Write binary .srs, not JSON.")] = False,
) -> None:
    """Convert a Clash rule provider or a plain domain list to a sing-box rule set."""
    from ztun.ruleset_tool import default_output, to_binary, to_source

    if source_type not in ("clash", "domains"):
        raise _fail(f"--type: '{source_type}' is not clash or domains", 2)
    loaded = _load_set(path, source_type, behavior)
    if binary:
        data = to_binary(loaded.rules)
        _write_output(output or default_output(path, ".srs"), data, what="binary rule set")
    else:
        text = to_source(loaded.rules)
        _write_output(output or default_output(path, ".json"), text.encode("utf-8"),
                      what="source rule set")  # fmt: skip


@app.command()
def version() -> None:
    """Print ztun's version."""
    typer.echo(f"ztun {__version__}")


def main() -> None:
    """Entry point: run the app, turning user errors into one clear line."""
    try:
        app()
    except ZtunError as exc:
        typer.echo(f"ztun: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `ztun route --batch … | head` must not print a traceback
        sys.stderr.close()
        sys.exit(0)
