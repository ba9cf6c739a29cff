"""The command line: every subcommand has --help; errors are one line, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["serve", "importd", "import", "status", "check-config", "demo"]


def certpub(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    result = certpub(command, "--help")
    assert result.returncode == 0
    assert "usage: certpub " + command in result.stdout


def test_no_command_prints_usage() -> None:
    result = certpub()
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.parametrize("command", ["serve", "importd", "import", "status", "check-config"])
def test_missing_config_is_one_line(command: str, tmp_path: Path) -> None:
    result = certpub(command, "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 78
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot read configuration" in result.stderr and "none.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_key_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[store]\npath = "x"\nbogus = 1\n')
    result = certpub("check-config", "--config", str(conf))
    assert result.returncode == 78
    assert "store.bogus: unknown key" in result.stderr
