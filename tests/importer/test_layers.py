"""The package layers: store/ is the bottom (imports nothing above it), importer/ sits on it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imported(path: Path) -> set[str]:
    """Every module an import statement in path names (at any depth, lazy ones included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules found in {package}/"
    for path in files:
        for name in sorted(_imported(path)):
            if name.split(".")[0] in forbidden:
                out.append(f"{path.relative_to(REPO)} imports {name}")
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("store", ("server", "importer")),
    ("importer", ("server",)),
])
def test_package_imports_nothing_above_it(package: str, forbidden: tuple[str, ...]) -> None:
    assert _offenders(package, forbidden) == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from server.config import Config\n    import importer.run\n")
    assert _imported(probe) >= {"server.config", "importer.run"}
