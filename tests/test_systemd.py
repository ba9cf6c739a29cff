"""The systemd units verify and stay at a low exposure (systemd-analyze security)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

UNITS = sorted((Path(__file__).parent.parent / "systemd").glob("*.service"))
MAX_EXPOSURE = 2.0


def _unit_with_real_binary(unit: Path, tmp_path: Path) -> Path:
    # The units name /opt/certpub/bin/certpub (the install guide's path); point them at the
    # certpub of this environment so that verify checks everything else.
    certpub = shutil.which("certpub") or str(Path(sys.executable).parent / "certpub")
    text = unit.read_text().replace("/opt/certpub/bin/certpub", certpub)
    out = tmp_path / unit.name
    out.write_text(text)
    return out


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    copy = _unit_with_real_binary(unit, tmp_path)
    result = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if copy.name in line or "error" in line.lower()]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_exposure_is_low(unit: Path) -> None:
    tool = require_tool("systemd-analyze")
    result = subprocess.run([tool, "security", "--offline=true", str(unit)],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
