"""The LDAP hot path's one-query reads (server/ldap/lean.py) on both store engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.ldap.lean import LeanReader
from store import open_store
from tests.ocsp.helpers import T0, fill_store, make_ca


@pytest.fixture
def filled(store_location: str, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    ca = make_ca(tmp_path / "ca", "lean")
    for serial in (1, 2):
        ca.subscriber(serial)
    store = open_store(store_location)
    fill_store(store, ca, T0)
    yield store, ca
    store.close()


def test_lean_reader_matches_the_general_api(filled: tuple[Any, Any]) -> None:
    store, _ = filled
    lean = LeanReader.of(store)
    assert lean is not None, f"no lean path on {type(store).__module__}"
    (cert_id, key), = lean.matching("mail", "s2@example.test", 10)
    general = store.certs_by_attribute("mail", "s2@example.test")
    assert [(c.id, c.directory_key) for c in general] == [(cert_id, key)]
    found = lean.entry(key)
    assert found is not None
    entry, certs = found
    assert entry == store.entry(key)
    assert [c.der for c in certs] == [c.der for c in store.certs_by_directory_key(key)]
    assert isinstance(certs[0].der, bytes) and not certs[0].revoked
    assert [c.der for c in lean.certs(key)] == [c.der for c in certs]
    assert lean.matching("mail", "nobody@example.test", 10) == []
    assert lean.entry("cn=nobody") is None
