"""Fixtures for the directory tests: the demo PKI imported into a store of its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from server.ldap.config import DEFAULT_ATTRIBUTES, LdapConfig
from server.ldap.directory import Directory
from server.ldap.schema import Allowlist
from store import open_store
from store.sqlite import Store
from tests.conftest import import_demo_store


@pytest.fixture(scope="session")
def ldap_store_path(demo_pki: Any, demo_now: datetime,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo PKI (index files, certificates, CRLs) imported once into a private store."""
    return import_demo_store(demo_pki, tmp_path_factory.mktemp("ldapstore") / "store.sqlite3",
                             demo_now)


@pytest.fixture(scope="session")
def ldap_pg_url(demo_pki: Any, demo_now: datetime, pg_cluster: Any) -> Iterator[str]:
    """The same import into a PostgreSQL database of its own (once per session)."""
    url = str(import_demo_store(demo_pki, pg_cluster.create_database(), demo_now))
    yield url
    pg_cluster.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, ldap_store_path: Path) -> Iterator[Any]:
    """The demo store, once per engine: directory tests run on SQLite and on PostgreSQL."""
    location = (str(ldap_store_path) if request.param == "sqlite"
                else request.getfixturevalue("ldap_pg_url"))
    s = open_store(location)
    yield s
    s.close()


def ldap_config(**overrides: Any) -> LdapConfig:
    base = LdapConfig(listen=(), naming_contexts=(), attributes=DEFAULT_ATTRIBUTES,
                      size_limit=500, time_limit=10.0, max_request_bytes=262_143)
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def directory(store: Store) -> Directory:
    return Directory(store, Allowlist.of(DEFAULT_ATTRIBUTES))
