"""The `ztun` entry point: `ztun run` without typer, everything else through `ztun.cli`.

typer 0.29 imports pydantic (and rich) to coerce any command-line argument: about 10 MiB
of RSS that the one long-lived command would carry for weeks (`ztun run` on the mixed
example: 47.8 MiB idle through typer, 38.2 MiB without; sing-box idles at about 35). So
the plain forms of `ztun run` (a config and at most `--log-level`) are recognised here and
start the box directly; any other argv (help, a typo, another command) goes to the typer
app, which owns the command line's help, usage errors and exit codes.
"""

from __future__ import annotations

import sys
from pathlib import Path


def plain_run(args: list[str]) -> tuple[str, str | None] | None:
    """`(config, log_level)` when `args` is `run CONFIG` with at most a `--log-level`
    (either order, `--log-level=L` too); None for anything else."""
    if not args or args[0] != "run":
        return None
    config: str | None = None
    level: str | None = None
    rest = args[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--log-level" and level is None and i + 1 < len(rest):
            level = rest[i + 1]
            i += 2
            continue
        if arg.startswith("--log-level=") and level is None:
            level = arg.partition("=")[2]
        elif arg and not arg.startswith("-") and config is None:
            config = arg
        else:
            return None  # an option typer knows (--help) or a usage error it explains
        i += 1
    if config is None or level == "":
        return None
    return config, level


def main() -> None:
    parsed = plain_run(sys.argv[1:])
    if parsed is None:
        from ztun.cli import main as cli_main

        cli_main()
        return
    from ztun.errors import ZtunError

    config, level = parsed
    try:
        from ztun.box import run

        code = run(Path(config), level)
    except ZtunError as exc:  # as ztun.cli.main says it
        print(f"ztun: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)
