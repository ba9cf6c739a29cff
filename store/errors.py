"""The store's exceptions, in one module every layer may import (``store.sqlbase``,
``store.sqlite``, ``store.postgres`` and ``store.writer`` re-export or use them)."""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot be read or written (OCSP answers tryLater, LDAP unavailable)."""


class StoreSchemaError(StoreError):
    """The store was written by a newer certpub, is behind (migrate), or is not a certpub store."""


def refuse_newer_schema(where: str, current: int) -> None:
    """A store written by a newer certpub is never migrated or read."""
    from store.schema import SCHEMA_VERSION

    if current > SCHEMA_VERSION:
        raise StoreSchemaError(
            f"store {where} has schema version {current}; this certpub knows up to "
            f"{SCHEMA_VERSION}: upgrade certpub"
        )


def require_current_schema(where: str, current: int) -> None:
    """For ``migrate=False`` opens: the schema must be exactly this certpub's."""
    from store.schema import SCHEMA_VERSION

    if current != SCHEMA_VERSION:
        raise StoreSchemaError(
            f"store {where} has schema version {current}, this certpub needs "
            f"{SCHEMA_VERSION}: run `certpub migrate` (or set [store] migrate = \"auto\")"
        )
