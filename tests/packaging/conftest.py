"""Fixtures shared by the package and container tests: the .deb built once per session, a
demo PKI to configure it with."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.packaging.debroot import WORK, build_deb, require_root_tools


@pytest.fixture(scope="session")
def deb() -> Path:
    """The package built from this checkout (the first step CI runs)."""
    require_root_tools("debootstrap", "chroot", "dpkg-deb", "git")
    out = WORK / "dist"
    shutil.rmtree(out, ignore_errors=True)
    return build_deb(out)


@pytest.fixture(scope="session")
def deb_pki(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from server.demo.pki import build_demo_pki

    return build_demo_pki(tmp_path_factory.mktemp("debpki"), now=datetime.now(UTC))
