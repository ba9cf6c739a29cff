"""The certificate store: one interface, two engines (SQLite file, PostgreSQL database).

``open_store`` picks the engine from the location: a ``postgresql://`` (or ``postgres://``)
URL opens ``store.postgres.PostgresStore``; anything else is the path of an SQLite file
(``store.sqlite.Store``). Both expose the same read API and the same write ``Batch``.
"""

from __future__ import annotations

import os
import re
from typing import Any

_PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: str | os.PathLike[str]) -> bool:
    return str(location).startswith(_PG_SCHEMES)


def redact_location(location: str | os.PathLike[str]) -> str:
    """The location with any password replaced by ``***`` (for logs and error messages)."""
    text = str(location)
    if not is_postgres_url(text):
        return text
    text = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", text)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", text)


def open_store(location: str | os.PathLike[str], *, create: bool = True,
               migrate: bool = True) -> Any:
    """Open the store at location (an SQLite path or a PostgreSQL URL).

    create: make the SQLite file (and its folder) if missing; PostgreSQL databases are never
    created, only their tables. migrate: apply pending schema migrations; when False, a store
    whose schema is behind raises ``StoreSchemaError`` (run ``certpub migrate``).
    """
    if is_postgres_url(location):
        from store.postgres import PostgresStore

        return PostgresStore.open(str(location), create=create, migrate=migrate)
    from store.sqlite import Store

    return Store.open(location, create=create, migrate=migrate)


def migrate_store(location: str | os.PathLike[str]) -> tuple[int, int]:
    """Apply pending schema migrations at location (``certpub migrate``): (from, to) versions."""
    store: Any
    if is_postgres_url(location):
        from store.postgres import PostgresStore

        store = PostgresStore.connect(str(location))
    else:
        from store.sqlite import Store

        store = Store.connect(location)
    try:
        return store.migrate()  # type: ignore[no-any-return]
    finally:
        store.close()
