"""Fixtures the store suites share: a small PKI per module and a store per engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from store import open_store
from tests.importer.test_importer_helpers import MiniPki


@pytest.fixture(scope="module")
def mini_pki(tmp_path_factory: pytest.TempPathFactory) -> MiniPki:
    """CAs and certificates made once per test module (they are only read)."""
    return MiniPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def store(store_location: str) -> Iterator[Any]:
    """An empty store, once per engine (SQLite, PostgreSQL)."""
    s = open_store(store_location)
    yield s
    s.close()
