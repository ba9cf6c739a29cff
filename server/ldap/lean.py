"""Lean store reads for the directory's hot path: fewer SQL queries, no full ``CertRecord``.

Strategy: an equality search on an indexed attribute and the materialisation of an entry are
what nearly every client asks for (``(mail=x)`` → ``userCertificate``, a base search at a
subject DN). Through the store's general API each costs three queries and a full
``CertRecord`` per certificate (seventeen columns, four datetimes, two enums), which is most
of a search's CPU time. Here the same rows are read with only the columns an entry shows:
the matching certificate ids and keys in one query, an entry with all its published
certificates in one more (the entries row joined with its certificates). ``LeanCert`` carries
exactly what ``entries.subject_entry``/``ca_entry`` and ``entries.usable`` read (der, emails,
notAfter, revoked), so the entries built are those the general path builds.

The SQL reads the store's tables (``entries``, ``certs``, ``cert_attrs``) through the store's
own query wrapper (so errors are ``StoreError``s as elsewhere). ``LeanReader.of`` checks the
columns once and returns None when the store is not that SQLite store or its schema differs:
the directory then uses the general API.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from store.model import DirectoryEntry
from store.sqlite import StoreError

_PROBE = ("SELECT e.key, e.dn, e.parent_key, e.kind, c.id, c.der, c.emails, c.not_after,"
          " c.status, c.directory_key, a.cert_id, a.attr, a.value FROM entries e, certs c,"
          " cert_attrs a LIMIT 0")
_MATCH_EQ = ("SELECT m.id, m.directory_key FROM certs m WHERE m.der IS NOT NULL AND m.id IN"
             " (SELECT a.cert_id FROM cert_attrs a WHERE a.attr = ? AND a.value = ? LIMIT ?)")
_ENTRY = ("SELECT e.dn, e.parent_key, e.kind, c.der, c.emails, c.not_after, c.status"
          " FROM entries e LEFT JOIN certs c ON c.directory_key = e.key AND c.der IS NOT NULL"
          " WHERE e.key = ? ORDER BY c.id LIMIT ?")
_CERTS = ("SELECT c.der, c.emails, c.not_after, c.status FROM certs c"
          " WHERE c.directory_key = ? AND c.der IS NOT NULL ORDER BY c.id LIMIT ?")
CERTS_PER_ENTRY = 1000  # as Store.certs_by_directory_key
# Stores whose _query takes this SQL (``?`` placeholders, both engines' common subset).
LEAN_ENGINES = ("store.sqlite", "store.postgres")


class LeanCert:
    """The fields of a CertRecord that an entry shows (duck-typed for entries.py)."""

    __slots__ = ("der", "emails", "not_after_ts", "revoked")

    def __init__(self, der: bytes, emails: str, not_after: int | None, status: str) -> None:
        self.der = der
        self.emails = tuple(e for e in emails.split("\n") if e) if emails else ()
        self.not_after_ts = not_after
        self.revoked = status == "revoked"

    @property
    def not_after(self) -> datetime | None:
        return None if self.not_after_ts is None else datetime.fromtimestamp(self.not_after_ts, UTC)

    def is_revoked(self) -> bool:
        return self.revoked

    def is_expired(self, now: datetime) -> bool:
        return self.not_after_ts is not None and self.not_after_ts < now.timestamp()


class LeanReader:
    def __init__(self, query: Any) -> None:
        self._query = query

    @classmethod
    def of(cls, store: Any) -> LeanReader | None:
        # A threaded store (server.storeaccess.ThreadStore) says what it stands for, and is
        # probed through the store opened at start: it may not be read on this thread.
        kind = getattr(store, "store_type", None) or type(store)
        probe = getattr(store, "sample", store) if kind is not type(store) else store
        query = getattr(store, "_query", None)
        if query is None or probe is None or kind.__module__ not in LEAN_ENGINES:
            return None
        try:
            probe._query(_PROBE)
        except StoreError:  # another schema: the general API still works
            return None
        return cls(query)

    def matching(self, attr: str, value: str, limit: int) -> list[tuple[int, str]]:
        """(certificate id, directory key) of published certificates with attr = value."""
        return self._query(_MATCH_EQ, (attr, value, limit))  # type: ignore[no-any-return]

    def entry(self, key: str) -> tuple[DirectoryEntry, list[LeanCert]] | None:
        """The entry at key and its published certificates (by id), in one query."""
        rows = self._query(_ENTRY, (key, CERTS_PER_ENTRY))
        if not rows:
            return None
        dn, parent, kind = rows[0][0], rows[0][1], rows[0][2]
        certs = [LeanCert(r[3], r[4], r[5], r[6]) for r in rows if r[3] is not None]
        return DirectoryEntry(key, dn, parent, kind), certs

    def certs(self, key: str) -> list[LeanCert]:
        return [LeanCert(*r) for r in self._query(_CERTS, (key, CERTS_PER_ENTRY))]


def expiry_bound(certs: list[Any], now: datetime) -> float:
    """The first notAfter after now among certs (POSIX seconds); inf when none."""
    t = now.timestamp()
    until = float("inf")
    for c in certs:
        na = c.not_after_ts if isinstance(c, LeanCert) else (
            None if c.not_after is None else c.not_after.timestamp())
        if na is not None and t < na < until:
            until = na
    return until
