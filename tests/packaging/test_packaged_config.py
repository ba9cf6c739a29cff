"""The configuration the Debian package installs: the documented example, every setting
commented out, so nothing is served until it is edited (and saying so when run)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server.cli import main
from server.config import load_config
from server.configtools import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "certpub.example.toml"


def packaged() -> str:
    return subprocess.run([sys.executable, str(ROOT / "deb" / "packaged-config.py"), str(EXAMPLE)],
                          check=True, capture_output=True, text=True).stdout


def test_packaged_config_sets_nothing_and_uncomments_to_the_example() -> None:
    text = packaged()
    assert tomllib.loads(text) == {}
    # Line for line the example (after its first comment lines, replaced by the header), each
    # setting with one "#" in front: removing it gives back the example's line.
    example = EXAMPLE.read_text().splitlines()
    while example[0].startswith("#"):
        example.pop(0)
    body = text.splitlines()[-len(example):]
    for shipped, line in zip(body, example, strict=True):
        setting = bool(line.strip()) and not line.lstrip().startswith("#")
        assert shipped == ("#" + line if setting else line)


def test_serve_on_the_packaged_config_says_what_to_configure(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "certpub.toml"
    config.write_text(packaged())
    with pytest.raises(ConfigError, match=r"has no settings .* at least one \[\[ca\]\]"):
        load_config(config)
    for command in ("serve", "check-config", "importd"):
        assert main([command, "--config", str(config)]) == 78
        err = capsys.readouterr().err
        assert f"certpub: configuration error: {config} has no settings" in err
        assert "Traceback" not in err
