"""The SQLite store: WAL mode, one writer (the importer), many readers (server processes).

Strategy: every read is one indexed query returning typed records (``store.model``); every
write happens inside a ``Batch``, one ``BEGIN IMMEDIATE`` transaction that takes the single
writer lock, so a batch is all-or-nothing whatever moment the process dies at. A batch that
changed something takes the next generation number and writes one change-log row per touched
certificate, CRL or CA; servers poll ``generation()`` (one row) and then ``changes_since``.
Readers never see "database is locked": WAL lets them read while the writer writes, and the
busy timeout covers checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from store.model import (
    CaId,
    CaRecord,
    CaStats,
    CertRecord,
    CertStatus,
    Change,
    DirectoryEntry,
    Generation,
    IssuerHashes,
    RevocationReason,
    Serial,
    utc,
)
from store.schema import MIGRATIONS, SCHEMA_VERSION

BUSY_TIMEOUT_MS = 10_000


class StoreError(Exception):
    """The store cannot be read or written (OCSP answers tryLater, LDAP unavailable)."""


class StoreSchemaError(StoreError):
    """The store file was written by a newer certpub, or is not a certpub store."""


def serial_text(serial: int) -> str:
    """Exact, canonical text of a serial: lower-case hex without leading zeros."""
    return format(serial, "x") if serial >= 0 else "-" + format(-serial, "x")


def serial_int(text: str) -> Serial:
    return Serial(int(text, 16))


def ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def reversed_key(key: str) -> str:
    """Root-first form of a DN key, so that a subtree is a range of one index."""
    if not key:
        return ""
    # RDN separators in keys are unescaped commas; escaped ones are preceded by a backslash.
    parts: list[str] = []
    cur: list[str] = []
    esc = False
    for ch in key:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            cur.append(ch)
            esc = True
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    # "\x01" sorts below every printable character, so "a\x01" < "a\x01b" < "a\x02".
    return "".join(p + "\x01" for p in reversed(parts))


_CA_COLUMNS = (
    "id, name, subject_dn, subject_key, directory_key, cert_der, crl_der, crl_number,"
    " crl_this_update, crl_next_update, synced_at, updated_at"
)
_CERT_COLUMNS = (
    "c.id, c.ca_id, c.serial, c.der, c.subject_dn, c.directory_dn, c.directory_key, c.emails,"
    " c.cn, c.not_before, c.not_after, c.status, c.revoked_at, c.reason, c.imported_at,"
    " c.source, c.generation"
)


class Store:
    """A certpub store in one SQLite file. Not shared across threads: open one per thread."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._hash_cache: dict[int, tuple[IssuerHashes, ...]] = {}
        self._owner = threading.get_ident()
        self._durable = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True,
             migrate: bool = True) -> Store:
        """Open (and create or migrate) the store at path.

        migrate=False refuses a store whose schema is behind (``certpub migrate`` upgrades it).
        """
        p = Path(path)
        if not create and not p.exists():
            raise StoreError(f"store {p} does not exist")
        try:
            if create:
                p.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(p), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"store {p}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {p}: {exc}") from exc
        store = cls(conn, p)
        if migrate:
            store._migrate()
        else:
            store._check_current()
        return store

    def close(self) -> None:
        self._conn.close()

    # --- schema -------------------------------------------------------------------------

    def schema_version(self) -> int:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            return 0
        return int(row[0]) if row else (1 if self._has_table("cas") else 0)

    def _has_table(self, name: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def _check_current(self) -> None:
        try:
            current = self.schema_version()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.path}: {exc}") from exc
        if current != SCHEMA_VERSION:
            raise StoreSchemaError(
                f"store {self.path} has schema version {current}, this certpub needs "
                f"{SCHEMA_VERSION}: run `certpub migrate` (or set [store] migrate = \"auto\")"
            )

    def _migrate(self, target: int = SCHEMA_VERSION) -> None:
        try:
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise StoreSchemaError(
                    f"store {self.path} has schema version {current}; this certpub knows up to "
                    f"{SCHEMA_VERSION}: upgrade certpub"
                )
            if current >= target:
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                current = self.schema_version()  # another process may have migrated meanwhile
                for version in range(current + 1, target + 1):
                    for stmt in MIGRATIONS[version - 1]:
                        self._conn.execute(stmt)
                    self._conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (str(version),),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot migrate store {self.path}: {exc}") from exc

    # --- reads --------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorname", "") not in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                self._reopen()
            raise StoreError(f"store read failed: {exc}") from exc

    def _reopen(self) -> None:
        """A new connection after a failed read, if one opens: a connection that read a
        corrupted file keeps failing after the file is restored in place."""
        if self._conn.in_transaction:
            return
        try:
            fresh = Store.open(self.path, create=False)
        except StoreError:
            return
        self._conn.close()
        self._conn, self._durable = fresh._conn, False
        self._hash_cache.clear()

    def generation(self) -> Generation:
        rows = self._query("SELECT value FROM meta WHERE key = 'generation'")
        return Generation(int(rows[0][0]) if rows else 0)

    def changes_since(self, generation: int, limit: int = 10_000) -> list[Change]:
        rows = self._query(
            "SELECT generation, kind, ca_id, serial, directory_key FROM changes"
            " WHERE generation > ? ORDER BY generation LIMIT ?",
            (generation, limit),
        )
        return [
            Change(Generation(g), k, CaId(c), None if s is None else serial_int(s), d)
            for g, k, c, s, d in rows
        ]

    def _hashes(self, ca_id: int) -> tuple[IssuerHashes, ...]:
        cached = self._hash_cache.get(ca_id)
        if cached is None:
            rows = self._query(
                "SELECT algorithm, name_hash, key_hash FROM ca_hashes WHERE ca_id = ?"
                " ORDER BY algorithm",
                (ca_id,),
            )
            cached = tuple(IssuerHashes(a, bytes(n), bytes(k)) for a, n, k in rows)
            self._hash_cache[ca_id] = cached
        return cached

    def _ca(self, row: Sequence[Any]) -> CaRecord:
        (id_, name, sdn, skey, dkey, der, crl, crlnum, tu, nu, synced, updated) = row
        return CaRecord(
            id=CaId(id_), name=name, subject_dn=sdn, subject_key=skey, directory_key=dkey,
            cert_der=bytes(der), hashes=self._hashes(id_),
            crl_der=None if crl is None else bytes(crl),
            crl_number=None if crlnum is None else int(crlnum),
            crl_this_update=utc(tu), crl_next_update=utc(nu), synced_at=utc(synced),
            updated_at=utc(updated) or datetime.fromtimestamp(0),
        )

    def cas(self) -> list[CaRecord]:
        return [self._ca(r) for r in self._query(f"SELECT {_CA_COLUMNS} FROM cas ORDER BY id")]

    def ca_by_name(self, name: str) -> CaRecord | None:
        rows = self._query(f"SELECT {_CA_COLUMNS} FROM cas WHERE name = ?", (name,))
        return self._ca(rows[0]) if rows else None

    def ca_by_id(self, ca_id: int) -> CaRecord | None:
        rows = self._query(f"SELECT {_CA_COLUMNS} FROM cas WHERE id = ?", (ca_id,))
        return self._ca(rows[0]) if rows else None

    def ca_by_issuer_hash(self, algorithm: str, name_hash: bytes, key_hash: bytes) -> CaRecord | None:
        """The CA a CertID names (RFC 6960 §4.1.1), by its hash algorithm."""
        rows = self._query(
            f"SELECT {_CA_COLUMNS} FROM cas WHERE id = (SELECT ca_id FROM ca_hashes"
            " WHERE algorithm = ? AND name_hash = ? AND key_hash = ? LIMIT 1)",
            (algorithm, name_hash, key_hash),
        )
        return self._ca(rows[0]) if rows else None

    def cas_by_directory_key(self, key: str) -> list[CaRecord]:
        rows = self._query(f"SELECT {_CA_COLUMNS} FROM cas WHERE directory_key = ?", (key,))
        return [self._ca(r) for r in rows]

    def _cert(self, row: Sequence[Any]) -> CertRecord:
        (id_, ca_id, serial, der, sdn, ddn, dkey, emails, cn, nb, na, status, rat, reason,
         imp, source, gen) = row
        return CertRecord(
            id=id_, ca_id=CaId(ca_id), serial=serial_int(serial),
            der=None if der is None else bytes(der), subject_dn=sdn, directory_dn=ddn,
            directory_key=dkey, emails=tuple(e for e in emails.split("\n") if e), cn=cn,
            not_before=utc(nb), not_after=utc(na), status=CertStatus(status),
            revoked_at=utc(rat), reason=None if reason is None else RevocationReason(reason),
            imported_at=utc(imp) or datetime.fromtimestamp(0), source=source,
            generation=Generation(gen),
        )

    def cert(self, ca_id: int, serial: int) -> CertRecord | None:
        """Status of one serial of one CA: the OCSP lookup."""
        rows = self._query(
            f"SELECT {_CERT_COLUMNS} FROM certs c WHERE c.ca_id = ? AND c.serial = ?",
            (ca_id, serial_text(serial)),
        )
        return self._cert(rows[0]) if rows else None

    def certs_by_directory_key(self, key: str, limit: int = 1000) -> list[CertRecord]:
        rows = self._query(
            f"SELECT {_CERT_COLUMNS} FROM certs c WHERE c.directory_key = ? AND c.der IS NOT NULL"
            " ORDER BY c.id LIMIT ?",
            (key, limit),
        )
        return [self._cert(r) for r in rows]

    def certs_by_attribute(self, attr: str, value: str, limit: int = 1000) -> list[CertRecord]:
        """Certificates whose normalised attribute equals value (LDAP equality filter)."""
        return self._certs_where_attr("a.value = ?", (attr, value), limit)

    def certs_by_attribute_prefix(self, attr: str, prefix: str, limit: int = 1000) -> list[CertRecord]:
        """Certificates whose normalised attribute starts with prefix (an index range)."""
        if not prefix:
            return self._certs_where_attr("1 = 1", (attr,), limit)
        return self._certs_where_attr(
            "a.value >= ? AND a.value < ?", (attr, prefix, prefix + "\U0010ffff"), limit
        )

    def certs_by_attribute_substring(
        self, attr: str, initial: str, any_: Sequence[str], final: str, limit: int = 1000
    ) -> list[CertRecord]:
        """Substring filter: an index range on the initial part, then a check of the rest.

        Without an initial part this walks the attribute's index (not the certificates),
        stopping at ``limit`` matches; see README "Known limits".
        """
        where = ["1 = 1"]
        params: list[Any] = [attr]
        if initial:
            where.append("a.value >= ? AND a.value < ?")
            params += [initial, initial + "\U0010ffff"]
        pattern = _like_pattern(initial, any_, final)
        where.append("a.value LIKE ? ESCAPE '\\'")
        params.append(pattern)
        return self._certs_where_attr(" AND ".join(where), params, limit)

    def certs_with_attribute(self, attr: str, limit: int = 1000) -> list[CertRecord]:
        """Certificates having attr at all (LDAP presence filter)."""
        return self._certs_where_attr("1 = 1", (attr,), limit)

    def _certs_where_attr(self, cond: str, params: Sequence[Any], limit: int) -> list[CertRecord]:
        rows = self._query(
            f"SELECT {_CERT_COLUMNS} FROM certs c WHERE c.der IS NOT NULL AND c.id IN"
            f" (SELECT a.cert_id FROM cert_attrs a WHERE a.attr = ? AND {cond} LIMIT ?)"
            " ORDER BY c.id",
            (*params, limit),
        )
        return [self._cert(r) for r in rows]

    def entry(self, key: str) -> DirectoryEntry | None:
        rows = self._query("SELECT key, dn, parent_key, kind FROM entries WHERE key = ?", (key,))
        return DirectoryEntry(*rows[0]) if rows else None

    def children(self, parent_key: str, limit: int = 1000, after: str = "") -> list[DirectoryEntry]:
        rows = self._query(
            "SELECT key, dn, parent_key, kind FROM entries WHERE parent_key = ? AND key > ?"
            " ORDER BY key LIMIT ?",
            (parent_key, after, limit),
        )
        return [DirectoryEntry(*r) for r in rows]

    def subtree(self, base_key: str, limit: int = 1000, after: str = "") -> list[DirectoryEntry]:
        """Entries at or below base_key, in root-first key order (an index range)."""
        lo = reversed_key(base_key)
        start = max(lo, reversed_key(after) + "\x00") if after else lo
        rows = self._query(
            "SELECT key, dn, parent_key, kind FROM entries WHERE rkey >= ? AND rkey < ?"
            " ORDER BY rkey LIMIT ?",
            (start, lo + "\U0010ffff", limit),
        )
        return [DirectoryEntry(*r) for r in rows]

    def roots(self) -> list[DirectoryEntry]:
        """Top-level entries of the published tree (candidate naming contexts)."""
        rows = self._query(
            "SELECT key, dn, parent_key, kind FROM entries WHERE parent_key IS NULL ORDER BY key"
        )
        return [DirectoryEntry(*r) for r in rows]

    def stats(self, now: datetime) -> list[CaStats]:
        """Counts per CA and status for operators (not a request path)."""
        out = []
        n = ts(now)
        for ca in self.cas():
            (good, revoked, hold, expired, last) = self._query(
                "SELECT"
                " SUM(CASE WHEN status = 'good' AND (not_after IS NULL OR not_after >= ?)"
                "     THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status = 'revoked' THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status = 'revoked' AND reason = 'certificate_hold'"
                "     THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status = 'good' AND not_after < ? THEN 1 ELSE 0 END),"
                " MAX(imported_at)"
                " FROM certs WHERE ca_id = ?",
                (n, n, ca.id),
            )[0]
            out.append(CaStats(ca, good or 0, revoked or 0, expired or 0, hold or 0, utc(last)))
        return out

    def file_seen(self, sha256: bytes) -> bool:
        return bool(self._query("SELECT 1 FROM imported_files WHERE sha256 = ?", (sha256,)))

    # --- writes -------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self, now: datetime) -> Iterator[Any]:
        """One atomic write: commits on success, rolls back on any exception."""
        from store.writer import Batch  # the write half lives beside, to keep files short

        try:
            if not self._durable:
                # The importer moves or deletes its input once a batch committed, so a commit
                # must survive power loss too; WAL with synchronous=NORMAL does not promise it.
                self._conn.execute("PRAGMA synchronous = FULL")
                self._durable = True
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot start a write on {self.path}: {exc}") from exc
        batch = Batch(self, self._conn, now)
        try:
            yield batch
            batch.finish()
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:  # disk full, I/O error: the batch is rolled back
                raise StoreError(f"store write failed: {exc}") from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise
        finally:
            self._hash_cache.clear()


def _like_pattern(initial: str, any_: Sequence[str], final: str) -> str:
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    return esc(initial) + "%" + "".join(esc(a) + "%" for a in any_ if a) + esc(final)
