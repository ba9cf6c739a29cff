"""Stores for the search page tests: the demo PKI imported, and a PKI of hostile names."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from server.config import load_config
from server.web.pages import WebPages
from store import open_store
from tests.conftest import import_demo_store

HOSTILE_NAMES = (
    "<script>alert(1)</script>",
    '"onload=alert(2) x="',
    "'><img src=x onerror=alert(3)>",
    "{{ 7*7 }} {% raw %}",
)


@pytest.fixture(scope="session")
def demo_store(demo_pki: Any, demo_now: datetime, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The demo PKI imported into a store of its own (read-only for the tests)."""
    location = tmp_path_factory.mktemp("web") / "store.sqlite3"
    import_demo_store(demo_pki, location, demo_now)
    store = open_store(location, create=False)
    yield store
    store.close()


@pytest.fixture(scope="session")
def demo_config(demo_pki: Any) -> Any:
    return load_config(demo_pki.config_path)


def pages_for(config: Any, now: datetime, published: dict[str, Any] | None = None) -> WebPages:
    """The pages as the server builds them (published CAs from the OCSP service's view)."""
    from server.ocsp.service import PublishedCa
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    import hashlib

    if published is None:
        published = {}
        for ca in config.cas:
            cert = x509.load_pem_x509_certificate(Path(ca.certificate).read_bytes())
            der = cert.public_bytes(Encoding.DER)
            published[ca.name] = PublishedCa(ca.name, der, cert.subject.rfc4514_string(),
                                             hashlib.sha256(der).hexdigest(),
                                             cert.not_valid_after_utc)
    return WebPages(lambda: published, config.ldap.attributes, config.http.ocsp_paths,
                    lambda: now)


@pytest.fixture(scope="session")
def demo_pages(demo_config: Any, demo_now: datetime) -> WebPages:
    return pages_for(demo_config, demo_now)


@pytest.fixture(scope="session")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store holding certificates whose names and e-mails are HTML and template syntax."""
    from importer.run import import_paths
    from tests.importer.test_importer_helpers import NOW, MiniPki, pem, write

    folder = tmp_path_factory.mktemp("hostile")
    pki = MiniPki(folder)
    files = []
    for i, cn in enumerate(HOSTILE_NAMES):
        cert = pki.cert("ca-a", 0x100 + i, cn, email=f"x{i}@evil.example")
        files.append(write(folder / "in" / f"{i}.pem", pem(cert)))
    config = pki.config()
    import_paths(config, files, now=lambda: NOW, progress=None)
    store = open_store(pki.store_location, create=False)
    return {"store": store, "config": config, "now": NOW.astimezone(UTC), "pki": pki}
