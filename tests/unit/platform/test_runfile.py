"""The run file `ztun reload` finds a running ztun by: keyed by the config's absolute path,
private, naming the exact process (pid and start time); a dead writer's file is not used, and
a ztun removes only its own."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ztun.platform.linux import state
from ztun.platform.linux.runfile import read_run_file, remove_run_file, run_file, write_run_file


@pytest.fixture(autouse=True)
def sdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("ZTUN_STATE_DIR", str(d))
    return d


def test_written_read_back_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    write_run_file(config, "127.0.0.1:9090", 2, {"applied": True, "problems": []})
    path = run_file(config)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    monkeypatch.chdir(tmp_path)
    found = read_run_file("c.yaml")  # a relative path names the same file
    assert found is not None and found["pid"] == os.getpid() and found["reloads"] == 2
    assert found["api"] == "127.0.0.1:9090" and found["config"] == str(config)
    assert run_file(tmp_path / "other.yaml") != path
    remove_run_file(config)
    assert read_run_file(config) is None and not path.exists()


def test_a_dead_writers_file_is_not_used(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(child.stdout)
    state.write_state(run_file(config), {"pid": dead, "start_time": 1, "config": str(config),
                                         "api": None, "reloads": 0})  # fmt: skip
    assert read_run_file(config) is None


def test_another_ztuns_file_is_left_alone(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    state.write_state(run_file(config), {"pid": 1, "start_time": state.start_time(1) or 0,
                                         "config": str(config), "api": None})  # fmt: skip
    remove_run_file(config)
    assert json.loads(run_file(config).read_text())["pid"] == 1


def test_ztun_reload_without_a_running_ztun_says_so(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ztun import cli

    config = tmp_path / "c.yaml"
    config.write_text("inbounds: []\n")
    result = CliRunner().invoke(cli.app, ["reload", str(config)])
    assert result.exit_code == 1
    assert "no running ztun found for" in result.output


def test_a_killed_runs_file_is_removed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ztun.platform.linux import runfile

    monkeypatch.setenv("ZTUN_STATE_DIR", str(tmp_path / "state"))
    runfile.write_run_file(tmp_path / "live.yaml", None)
    dead = runfile.run_file(tmp_path / "dead.yaml")
    state.write_state(dead, {"pid": 2**22 + 7, "start_time": 1, "config": "dead.yaml"})
    assert dead.exists()
    assert runfile.remove_stale_run_files() == 1
    assert not dead.exists() and runfile.run_file(tmp_path / "live.yaml").exists()
