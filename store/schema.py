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
"""

from __future__ import annotations

import re

MIGRATIONS: list[list[str]] = [
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


def migration(version: int, dialect: str) -> list[str]:
    """The statements of migration version (1-based), rendered for dialect."""
    return [render(s, dialect) for s in MIGRATIONS[version - 1]]
