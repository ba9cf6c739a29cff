"""The directory's store read methods (``published_matches``, ``entry_with_certs``,
``published_certs``) agree with the general API, on both store engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


def test_directory_reads_match_the_general_api(filled: tuple[Any, Any]) -> None:
    store, _ = filled
    (cert_id, key), = store.published_matches("mail", "s2@example.test", 10)
    general = store.certs_by_attribute("mail", "s2@example.test")
    assert [(c.id, c.directory_key) for c in general] == [(cert_id, key)]
    found = store.entry_with_certs(key)
    assert found is not None
    entry, certs = found
    assert entry == store.entry(key)
    full = store.certs_by_directory_key(key)
    assert [c.der for c in certs] == [c.der for c in full]
    assert [c.emails for c in certs] == [c.emails for c in full]
    assert [c.not_after for c in certs] == [c.not_after for c in full]
    assert isinstance(certs[0].der, bytes) and not certs[0].revoked
    assert [c.der for c in store.published_certs(key)] == [c.der for c in certs]
    assert store.published_matches("mail", "nobody@example.test", 10) == []
    assert store.entry_with_certs("cn=nobody") is None
    assert store.published_certs("cn=nobody") == []


def test_published_matches_honours_its_limit(filled: tuple[Any, Any]) -> None:
    store, _ = filled
    everyone = store.certs_with_attribute("mail")
    assert len(everyone) >= 2
    attr_values = [(c.id, c.emails[0]) for c in everyone if c.emails]
    assert len(store.published_matches("mail", attr_values[0][1], 1)) == 1
