"""Schema and forward migrations, written in SQL that SQLite and PostgreSQL both accept.

Strategy: each migration is a list of statements applied in one transaction and recorded in
``meta.schema_version``; the store runs every migration above the recorded version when it
opens. The statements are written once, for SQLite, in types both engines know (INTEGER,
BIGINT, TEXT, BLOB); ``migration(version, "postgresql")`` renders them for PostgreSQL:
``INTEGER PRIMARY KEY`` becomes an identity column, every other INTEGER (all are row ids)
BIGINT, BLOB BYTEA, and TEXT ``TEXT COLLATE "C"`` so that comparisons and ORDER BY are
byte-wise as in SQLite — the key and prefix range scans below rely on it.

Indexes, one per lookup a server makes (no request path scans ``certs``):

- ``certs (ca_id, serial)`` unique — OCSP status by CertID; serials are exact hex text.
- ``ca_hashes (algorithm, name_hash, key_hash)`` — OCSP issuer lookup for SHA-1/256/384/512.
- ``cert_attrs (attr, value, cert_id)`` — LDAP equality and prefix filters on mail, cn, sn,
  givenName, o, ou, c, l, st (values normalised: NFKC, case-folded).
- ``certs (directory_key)`` — LDAP base search at a subject DN.
- ``entries (rkey)`` and ``entries (parent_key)`` — the published DN tree: one-level search
  by parent, subtree search as a range on the root-first key.
- ``certs (ca_id, status, reason)`` — on-hold certificates a newer CRL may release.
- ``changes (generation)`` — the change feed servers poll.
- ``certs (not_after)`` — expired counts for ``certpub status`` (migration 2).
- ``certs (sha256)`` — the search page's fingerprint lookup (migration 3).
- ``crl_scopes (ca_id, idp_key, delta)`` unique — the scope a CRL belongs to (migration 4);
  ``crl_holds (ca_id, serial)`` — does another scope still list this hold;
  ``crl_urls (url)``, ``(ca_id)``, ``(dn_key)`` — a URL printed in certificates, a CA's
  URLs, the URLs naming one LDAP DN.

A migration may also hold Python steps (migration 4 parses each CA's stored CRL once): a
callable in the list, run by the engine inside the same transaction with ``run(sql,
params)``; ``migration`` hands it over unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

# A migration step that SQL alone cannot express: called inside the migration's transaction
# with ``run(sql, params) -> rows`` (``?`` placeholders, any engine).
Run = Callable[[str, Sequence[Any]], list[Any]]
PythonStep = Callable[[Run], None]
Step = str | PythonStep


def _scopes_from_cas(run: Run) -> None:
    """Migration 4: each CA's one CRL becomes the scope its IDP names (the full scope when it
    has none, as nearly every such CRL) and the CA's holds become that scope's listed holds;
    the ``cas`` CRL columns are emptied (``CaRecord.crl_*`` now reads the full scope)."""
    from store.certparse import ParseError, scope_of
    from store.sqltext import serial_text

    rows = run("SELECT id, crl_der, crl_number, crl_this_update, crl_next_update, updated_at,"
               " generation FROM cas WHERE crl_der IS NOT NULL ORDER BY id", ())
    for ca_id, der, number, this_update, next_update, updated_at, generation in rows:
        der = bytes(der)
        try:
            scope = scope_of(der)
        except ParseError:
            scope = None
        if scope is None:  # unreadable now: kept as the full scope, as the old code saw it
            key, idp, delta, urls, only, base = "", None, 0, "", "", None
        else:
            key, idp, urls, only = scope.key, scope.idp_der, "\n".join(scope.urls), scope.only
            delta = 1 if scope.is_delta else 0
            base = None if scope.base_number is None else str(scope.base_number)
        if this_update is None:
            this_update = updated_at
        scope_id = run(
            "INSERT INTO crl_scopes (ca_id, idp_key, idp, delta, urls, only_kind, der, number,"
            " base_number, this_update, next_update, updated_at, generation)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (ca_id, key, idp, delta, urls, only, der, number, base, this_update, next_update,
             updated_at, generation))[0][0]
        held = run("SELECT serial FROM certs WHERE ca_id = ? AND status = 'revoked'"
                   " AND reason = 'certificate_hold'", (ca_id,))
        for (serial,) in held:
            run("INSERT INTO crl_holds (scope_id, ca_id, serial) VALUES (?, ?, ?)",
                (scope_id, ca_id, serial_text(int(serial, 16))))
    run("UPDATE cas SET crl_der = NULL, crl_number = NULL, crl_this_update = NULL,"
        " crl_next_update = NULL", ())


class _RunEngine:
    """What ``store.writer.Batch`` needs of a store, over a migration step's ``run``."""

    engine = "sqlite"  # the generic SQL paths (no COPY): ``run`` renders for either engine

    def __init__(self, run: Run) -> None:
        self._run = run

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return _Rows(self._run(sql, tuple(params)))

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            self._run(sql, tuple(row))


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


def _urls_from_certs(run: Run) -> None:
    """Migration 4: learn the URLs the stored certificates print (CRL distribution points,
    freshest CRL, caIssuers), as the importer learns them from new ones: one walk over each
    certificate's DER, each distinct set of URLs learnt once."""
    from datetime import UTC, datetime

    from store.certparse import url_extension_values
    from store.urls import urls_of_extensions
    from store.writer import Batch

    sets: set[tuple[int, tuple[tuple[str, str], ...]]] = set()
    last = -1
    while True:
        rows = run("SELECT id, ca_id, der FROM certs WHERE id > ? AND der IS NOT NULL"
                   " ORDER BY id LIMIT 2000", (last,))
        if not rows:
            break
        for id_, ca_id, der in rows:
            last = int(id_)
            raws = url_extension_values(bytes(der))
            if raws is not None:
                urls = urls_of_extensions(*raws)
                if urls:
                    sets.add((int(ca_id), urls))
    if not sets:
        return
    batch = Batch(_RunEngine(run), datetime.now(UTC))
    for ca_id, urls in sorted(sets):
        batch.learn_urls(ca_id, urls)
    batch.finish()


MIGRATIONS: list[list[Step]] = [
    # 1: initial schema
    [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE cas (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            subject_dn TEXT NOT NULL,
            subject_key TEXT NOT NULL,
            directory_key TEXT NOT NULL,
            cert_der BLOB NOT NULL,
            crl_der BLOB,
            crl_number TEXT,
            crl_this_update BIGINT,
            crl_next_update BIGINT,
            synced_at BIGINT,
            updated_at BIGINT NOT NULL,
            generation BIGINT NOT NULL)""",
        "CREATE INDEX cas_directory_key ON cas (directory_key)",
        """CREATE TABLE ca_hashes (
            ca_id INTEGER NOT NULL REFERENCES cas (id),
            algorithm TEXT NOT NULL,
            name_hash BLOB NOT NULL,
            key_hash BLOB NOT NULL,
            PRIMARY KEY (algorithm, name_hash, key_hash, ca_id))""",
        """CREATE TABLE certs (
            id INTEGER PRIMARY KEY,
            ca_id INTEGER NOT NULL REFERENCES cas (id),
            serial TEXT NOT NULL,
            der BLOB,
            sha256 BLOB,
            subject_dn TEXT NOT NULL DEFAULT '',
            directory_dn TEXT NOT NULL DEFAULT '',
            directory_key TEXT NOT NULL DEFAULT '',
            emails TEXT NOT NULL DEFAULT '',
            cn TEXT,
            not_before BIGINT,
            not_after BIGINT,
            status TEXT NOT NULL,
            revoked_at BIGINT,
            reason TEXT,
            revoked_by TEXT,
            imported_at BIGINT NOT NULL,
            source TEXT NOT NULL,
            generation BIGINT NOT NULL,
            UNIQUE (ca_id, serial))""",
        "CREATE INDEX certs_directory_key ON certs (directory_key)",
        "CREATE INDEX certs_status ON certs (ca_id, status, reason)",
        """CREATE TABLE cert_attrs (
            cert_id INTEGER NOT NULL REFERENCES certs (id),
            attr TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (attr, value, cert_id))""",
        "CREATE INDEX cert_attrs_cert ON cert_attrs (cert_id)",
        """CREATE TABLE entries (
            key TEXT PRIMARY KEY,
            rkey TEXT NOT NULL,
            dn TEXT NOT NULL,
            parent_key TEXT,
            kind TEXT NOT NULL)""",
        "CREATE INDEX entries_rkey ON entries (rkey)",
        "CREATE INDEX entries_parent ON entries (parent_key)",
        """CREATE TABLE changes (
            generation BIGINT NOT NULL,
            kind TEXT NOT NULL,
            ca_id INTEGER NOT NULL,
            serial TEXT,
            directory_key TEXT)""",
        "CREATE INDEX changes_generation ON changes (generation)",
        """CREATE TABLE imported_files (
            sha256 BLOB PRIMARY KEY,
            name TEXT NOT NULL,
            imported_at BIGINT NOT NULL,
            generation BIGINT,
            outcome TEXT NOT NULL)""",
        "INSERT INTO meta (key, value) VALUES ('generation', '0')",
    ],
    # 2: expired counts without a scan of every row
    [
        "CREATE INDEX certs_not_after ON certs (ca_id, not_after)",
    ],
    # 3: the search page finds a certificate by its SHA-256 fingerprint
    [
        "CREATE INDEX certs_sha256 ON certs (sha256)",
    ],
    # 4: CRL scopes (RFC 5280 §5.2.4, §5.2.5): each (CA, IDP, delta?) keeps its own latest
    # CRL; the holds each scope lists; deltas waiting for their base; URLs learnt from the
    # certificates (CDP, freshest CRL, AIA caIssuers) and from CRLs' IDPs.
    [
        """CREATE TABLE crl_scopes (
            id INTEGER PRIMARY KEY,
            ca_id INTEGER NOT NULL REFERENCES cas (id),
            idp_key TEXT NOT NULL,
            idp BLOB,
            delta INTEGER NOT NULL,
            urls TEXT NOT NULL DEFAULT '',
            only_kind TEXT NOT NULL DEFAULT '',
            der BLOB NOT NULL,
            number TEXT,
            base_number TEXT,
            this_update BIGINT NOT NULL,
            next_update BIGINT,
            updated_at BIGINT NOT NULL,
            generation BIGINT NOT NULL,
            UNIQUE (ca_id, idp_key, delta))""",
        """CREATE TABLE crl_holds (
            scope_id INTEGER NOT NULL REFERENCES crl_scopes (id),
            ca_id INTEGER NOT NULL,
            serial TEXT NOT NULL,
            PRIMARY KEY (scope_id, serial))""",
        "CREATE INDEX crl_holds_serial ON crl_holds (ca_id, serial)",
        """CREATE TABLE crl_pending (
            id INTEGER PRIMARY KEY,
            ca_id INTEGER NOT NULL REFERENCES cas (id),
            idp_key TEXT NOT NULL,
            der BLOB NOT NULL,
            sha256 BLOB NOT NULL,
            number TEXT,
            base_number TEXT NOT NULL,
            received_at BIGINT NOT NULL,
            source TEXT NOT NULL,
            UNIQUE (ca_id, sha256))""",
        "CREATE INDEX crl_pending_scope ON crl_pending (ca_id, idp_key)",
        """CREATE TABLE crl_urls (
            url TEXT PRIMARY KEY,
            scheme TEXT NOT NULL,
            host TEXT NOT NULL,
            path TEXT NOT NULL,
            kind TEXT NOT NULL,
            ca_id INTEGER NOT NULL REFERENCES cas (id),
            conflict INTEGER NOT NULL DEFAULT 0,
            pair_url TEXT,
            dn_key TEXT,
            dn TEXT,
            attr TEXT,
            learnt_at BIGINT NOT NULL,
            generation BIGINT NOT NULL)""",
        "CREATE INDEX crl_urls_ca ON crl_urls (ca_id)",
        "CREATE INDEX crl_urls_dn ON crl_urls (dn_key)",
        _scopes_from_cas,
        _urls_from_certs,
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)


_PG_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bTEXT\b"), 'TEXT COLLATE "C"'),
)

DIALECTS = ("sqlite", "postgresql")


def render(statement: str, dialect: str) -> str:
    """One schema statement in the SQL of dialect ("sqlite" or "postgresql")."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}")
    if dialect == "postgresql" and not statement.lstrip().upper().startswith("INSERT"):
        for pattern, replacement in _PG_RULES:
            statement = pattern.sub(replacement, statement)
    return statement


def migration(version: int, dialect: str) -> list[Step]:
    """The steps of migration version (1-based): SQL statements rendered for dialect, and
    Python steps (callables taking ``run``, see ``PythonStep``) in their place."""
    return [render(s, dialect) if isinstance(s, str) else s for s in MIGRATIONS[version - 1]]
