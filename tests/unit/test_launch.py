"""`ztun.launch`: the plain forms of `ztun run` skip typer; every other argv goes to it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ztun import launch
from ztun.launch import plain_run


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "c.yaml"], ("c.yaml", None)),
        (["run", "c.yaml", "--log-level", "debug"], ("c.yaml", "debug")),
        (["run", "--log-level", "warn", "c.yaml"], ("c.yaml", "warn")),
        (["run", "--log-level=info", "c.yaml"], ("c.yaml", "info")),
    ],
)
def test_plain_run_forms(args: list[str], expected: tuple[str, str | None]) -> None:
    assert plain_run(args) == expected


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["check", "c.yaml"],
        ["run"],
        ["run", "--help"],
        ["run", "c.yaml", "--help"],
        ["run", "a.yaml", "b.yaml"],
        ["run", "c.yaml", "--log-level"],
        ["run", "c.yaml", "--log-level="],
        ["run", "c.yaml", "--log-level", "a", "--log-level", "b"],
        ["run", "c.yaml", "--verbose"],
        ["run", "-"],
    ],
)
def test_everything_else_goes_to_typer(args: list[str]) -> None:
    assert plain_run(args) is None


def test_a_missing_config_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    argv = sys.argv
    sys.argv = ["ztun", "run", str(tmp_path / "absent.yaml")]
    try:
        with pytest.raises(SystemExit) as exit_info:
            launch.main()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ztun: ") and "absent.yaml" in err and "Traceback" not in err
