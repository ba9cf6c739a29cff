"""scripts/bootstrap says what it installs before the long, otherwise silent, pip run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/bin/sh
# Stands in for python3: the version check passes, "-m venv DIR" makes DIR/bin/python,
# which records its arguments (the pip install) instead of installing anything.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/bin/sh\\necho "$@" >> "%s/pip.log"\\necho pip-ran >&2\\n' "$(pwd)" > "$3/bin/python"
    chmod +x "$3/bin/python"
fi
exit 0
"""


def test_bootstrap_announces_the_install(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap", tmp_path / "scripts" / "bootstrap")
    (tmp_path / "pyproject.toml").write_text("")
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake))

    def bootstrap() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(tmp_path / "scripts" / "bootstrap")], env=env,
                              capture_output=True, text=True, timeout=60, check=True)

    first = bootstrap()
    assert "first run, installing certpub and its dependencies" in first.stderr
    assert "about a minute" in first.stderr
    assert "install" in (tmp_path / "pip.log").read_text()
    assert first.stderr.index("first run") < first.stderr.index("pip-ran")  # said before
    assert bootstrap().stderr == ""  # nothing to install: silent
    stamp = tmp_path / ".venv" / ".certpub-installed"
    old = stamp.stat().st_mtime - 10
    os.utime(stamp, (old, old))  # pyproject.toml is now newer than the last install
    again = bootstrap()
    assert "pyproject.toml changed, updating the packages" in again.stderr
