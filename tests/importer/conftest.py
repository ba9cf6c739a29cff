"""The importer suites share the store suites' fixtures (a small PKI, a store per engine)."""

from __future__ import annotations

from tests.store.conftest import mini_pki, store

__all__ = ["mini_pki", "store"]
