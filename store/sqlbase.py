"""The SQL both store engines share: every read query, its row mapping, and the batch frame.

Strategy: the SQL is written once, with ``?`` placeholders, in the subset SQLite and
PostgreSQL both accept; an engine subclass supplies only what differs — how a connection is
opened and re-opened, placeholder style, which driver errors become ``StoreError``, how a
write transaction starts (and takes the single-writer lock), and migration bookkeeping.
Text is compared byte-wise on both engines (SQLite's BINARY collation, PostgreSQL columns
declared ``COLLATE "C"``), which the index range scans below depend on.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from datetime import datetime
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
    PublishedCert,
    RevocationReason,
    Serial,
    utc,
)


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


# Above every character a key or value can hold: an exclusive upper bound of a prefix range.
# Byte-wise comparison of UTF-8 orders by code point, so this holds on both engines.
TOP = "\U0010ffff"
IN_LIMIT = 500  # values in one ``IN (...)`` list (SQLite allows 32,766 parameters)


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
    if "\\" not in key:  # no escapes: every comma separates RDNs
        return "\x01".join(reversed(key.split(","))) + "\x01"
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


CA_COLUMNS = (
    "id, name, subject_dn, subject_key, directory_key, cert_der, crl_der, crl_number,"
    " crl_this_update, crl_next_update, synced_at, updated_at"
)
CERT_COLUMNS = (
    "c.id, c.ca_id, c.serial, c.der, c.subject_dn, c.directory_dn, c.directory_key, c.emails,"
    " c.cn, c.not_before, c.not_after, c.status, c.revoked_at, c.reason, c.imported_at,"
    " c.source, c.generation"
)


class SqlStore(abc.ABC):
    """The read API and the batch frame over one connection; engines subclass it."""

    engine = "sql"

    def __init__(self) -> None:
        self._hash_cache: dict[int, tuple[IssuerHashes, ...]] = {}

    # --- what an engine provides ------------------------------------------------------------

    @abc.abstractmethod
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read (``?`` placeholders); any failure raises StoreError."""

    @abc.abstractmethod
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """One statement inside the open write transaction: a cursor (``fetchone``,
        ``fetchall``); any failure raises StoreError."""

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for many rows inside the open write transaction (engines batch it)."""
        for row in rows:
            self._execute(sql, row)

    @abc.abstractmethod
    def _begin_write(self) -> None:
        """Start the write transaction, holding the single-writer lock."""

    @abc.abstractmethod
    def _commit(self) -> None:
        """Commit the write transaction; a failure raises StoreError (rolled back)."""

    @abc.abstractmethod
    def _rollback(self) -> None:
        """Roll back the write transaction; never raises."""

    def _announce(self, generation: Generation) -> None:
        """Inside the write transaction of a changing batch, before COMMIT: tell listeners."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection(s)."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version recorded in the store (0: an empty database)."""

    # --- reads ------------------------------------------------------------------------------

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
        return [self._ca(r) for r in self._query(f"SELECT {CA_COLUMNS} FROM cas ORDER BY id")]

    def ca_by_name(self, name: str) -> CaRecord | None:
        rows = self._query(f"SELECT {CA_COLUMNS} FROM cas WHERE name = ?", (name,))
        return self._ca(rows[0]) if rows else None

    def ca_by_id(self, ca_id: int) -> CaRecord | None:
        rows = self._query(f"SELECT {CA_COLUMNS} FROM cas WHERE id = ?", (ca_id,))
        return self._ca(rows[0]) if rows else None

    def ca_by_issuer_hash(self, algorithm: str, name_hash: bytes, key_hash: bytes) -> CaRecord | None:
        """The CA a CertID names (RFC 6960 §4.1.1), by its hash algorithm."""
        rows = self._query(
            f"SELECT {CA_COLUMNS} FROM cas WHERE id = (SELECT ca_id FROM ca_hashes"
            " WHERE algorithm = ? AND name_hash = ? AND key_hash = ? LIMIT 1)",
            (algorithm, name_hash, key_hash),
        )
        return self._ca(rows[0]) if rows else None

    def cas_by_directory_key(self, key: str) -> list[CaRecord]:
        rows = self._query(f"SELECT {CA_COLUMNS} FROM cas WHERE directory_key = ?", (key,))
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
            f"SELECT {CERT_COLUMNS} FROM certs c WHERE c.ca_id = ? AND c.serial = ?",
            (ca_id, serial_text(serial)),
        )
        return self._cert(rows[0]) if rows else None

    def certs_by_directory_key(self, key: str, limit: int = 1000) -> list[CertRecord]:
        rows = self._query(
            f"SELECT {CERT_COLUMNS} FROM certs c WHERE c.directory_key = ? AND c.der IS NOT NULL"
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
            "a.value >= ? AND a.value < ?", (attr, prefix, prefix + TOP), limit
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
            params += [initial, initial + TOP]
        pattern = like_pattern(initial, any_, final)
        where.append("a.value LIKE ? ESCAPE '\\'")
        params.append(pattern)
        return self._certs_where_attr(" AND ".join(where), params, limit)

    def certs_with_attribute(self, attr: str, limit: int = 1000) -> list[CertRecord]:
        """Certificates having attr at all (LDAP presence filter)."""
        return self._certs_where_attr("1 = 1", (attr,), limit)

    def _certs_where_attr(self, cond: str, params: Sequence[Any], limit: int) -> list[CertRecord]:
        rows = self._query(
            f"SELECT {CERT_COLUMNS} FROM certs c WHERE c.der IS NOT NULL AND c.id IN"
            f" (SELECT a.cert_id FROM cert_attrs a WHERE a.attr = ? AND {cond} LIMIT ?)"
            " ORDER BY c.id",
            (*params, limit),
        )
        return [self._cert(r) for r in rows]

    # --- the directory's reads: only the columns an entry shows ---------------------------

    def published_matches(self, attr: str, value: str, limit: int = 1000) -> list[tuple[int, str]]:
        """(certificate id, directory key) of published certificates whose normalised attr
        equals value, at most limit (an LDAP equality filter's candidates)."""
        rows = self._query(
            "SELECT m.id, m.directory_key FROM certs m WHERE m.der IS NOT NULL AND m.id IN"
            " (SELECT a.cert_id FROM cert_attrs a WHERE a.attr = ? AND a.value = ? LIMIT ?)",
            (attr, value, limit),
        )
        return [(int(i), k) for i, k in rows]

    def entry_with_certs(self, key: str, limit: int = 1000
                         ) -> tuple[DirectoryEntry, list[PublishedCert]] | None:
        """The entry at key and its published certificates (by id), in one query."""
        rows = self._query(
            "SELECT e.dn, e.parent_key, e.kind, c.der, c.emails, c.not_after, c.status"
            " FROM entries e LEFT JOIN certs c ON c.directory_key = e.key AND c.der IS NOT NULL"
            " WHERE e.key = ? ORDER BY c.id LIMIT ?",
            (key, limit),
        )
        if not rows:
            return None
        dn, parent, kind = rows[0][0], rows[0][1], rows[0][2]
        certs = [PublishedCert(r[3], r[4], r[5], r[6]) for r in rows if r[3] is not None]
        return DirectoryEntry(key, dn, parent, kind), certs

    def published_certs(self, key: str, limit: int = 1000) -> list[PublishedCert]:
        """The published certificates of the entry at key (by id)."""
        rows = self._query(
            "SELECT c.der, c.emails, c.not_after, c.status FROM certs c"
            " WHERE c.directory_key = ? AND c.der IS NOT NULL ORDER BY c.id LIMIT ?",
            (key, limit),
        )
        return [PublishedCert(*r) for r in rows]

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
        resume = reversed_key(after) if after else ""
        # Strictly after the last entry returned, when that lies inside the range: "rkey > x"
        # rather than "rkey >= x + NUL", which PostgreSQL text cannot hold.
        cond, start = ("rkey > ?", resume) if after and resume >= lo else ("rkey >= ?", lo)
        rows = self._query(
            f"SELECT key, dn, parent_key, kind FROM entries WHERE {cond} AND rkey < ?"
            " ORDER BY rkey LIMIT ?",
            (start, lo + TOP, limit),
        )
        return [DirectoryEntry(*r) for r in rows]

    def roots(self) -> list[DirectoryEntry]:
        """Top-level entries of the published tree (candidate naming contexts)."""
        rows = self._query(
            "SELECT key, dn, parent_key, kind FROM entries WHERE parent_key IS NULL ORDER BY key"
        )
        return [DirectoryEntry(*r) for r in rows]

    def stats(self, now: datetime) -> list[CaStats]:
        """Counts per CA and status for operators (not a request path); the counts partition
        the CA's certificates: revoked excludes those on hold, expired only the unrevoked."""
        out = []
        n = ts(now)
        for ca in self.cas():
            (good, revoked, hold, expired, last) = self._query(
                "SELECT"
                " SUM(CASE WHEN status = 'good' AND (not_after IS NULL OR not_after >= ?)"
                "     THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status = 'revoked'"
                "     AND (reason IS NULL OR reason <> 'certificate_hold')"
                "     THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status = 'revoked' AND reason = 'certificate_hold'"
                "     THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status = 'good' AND not_after < ? THEN 1 ELSE 0 END),"
                " MAX(imported_at)"
                " FROM certs WHERE ca_id = ?",
                (n, n, ca.id),
            )[0]
            # PostgreSQL sums to NUMERIC (a Decimal): counts are ints on both engines.
            out.append(CaStats(ca, int(good or 0), int(revoked or 0), int(expired or 0),
                               int(hold or 0), utc(last)))
        return out

    def file_seen(self, sha256: bytes) -> bool:
        return bool(self._query("SELECT 1 FROM imported_files WHERE sha256 = ?", (sha256,)))

    def import_file_counts(self) -> dict[str, int]:
        """Input files the importer recorded, by outcome (``/metrics``)."""
        rows = self._query("SELECT outcome, COUNT(*) FROM imported_files GROUP BY outcome")
        return {str(outcome): int(n) for outcome, n in rows}

    def files_seen(self, sha256s: Sequence[bytes]) -> set[bytes]:
        """Which of these input files (by SHA-256) were imported before (the importer's bulk
        form of ``file_seen``)."""
        seen: set[bytes] = set()
        for i in range(0, len(sha256s), IN_LIMIT):
            part = list(sha256s[i:i + IN_LIMIT])
            rows = self._query("SELECT sha256 FROM imported_files WHERE sha256 IN"
                               f" ({','.join('?' * len(part))})", part)
            seen.update(bytes(r[0]) for r in rows)
        return seen

    def serials_with_certificate(self, ca_id: int, serials: Sequence[int]) -> set[int]:
        """Which of these serials of a CA already have their certificate stored (importer)."""
        found: set[int] = set()
        texts = [serial_text(s) for s in serials]
        for i in range(0, len(texts), IN_LIMIT):
            part = texts[i:i + IN_LIMIT]
            rows = self._query("SELECT serial FROM certs WHERE ca_id = ? AND der IS NOT NULL"
                               f" AND serial IN ({','.join('?' * len(part))})", (ca_id, *part))
            found.update(int(r[0], 16) for r in rows)
        return found

    # --- the search pages' reads (server/web): index lookups, bounded -------------------------

    def attr_match_ids(self, attr: str, value: str, *, prefix: bool, limit: int,
                       ca_id: int | None = None, scan: int = 2000) -> tuple[list[int], bool]:
        """Ids of certificates whose normalised attr equals (or starts with) value, in value
        order, at most limit distinct ids: one range of ``cert_attrs (attr, value, cert_id)``.
        With ca_id, only that CA's, among the first ``scan`` index entries of the range; the
        flag says the scan stopped there (there may be more)."""
        if prefix:
            cond, params = "a.value >= ? AND a.value < ?", (attr, value, value + TOP)
        else:
            cond, params = "a.value = ?", (attr, value)
        # A certificate may hold several matching values (two e-mails, two cns): ask for a
        # few rows more than limit and keep the first limit distinct ids.
        inner = (f"SELECT a.cert_id, a.value FROM cert_attrs a WHERE a.attr = ? AND {cond}"
                 " ORDER BY a.value, a.cert_id LIMIT ?")
        if ca_id is None:
            rows = self._query(inner, (*params, limit * 4))
            more = False
        else:
            scanned = self._query(
                f"SELECT m.cert_id, c.ca_id FROM ({inner}) m JOIN certs c ON c.id = m.cert_id"
                " ORDER BY m.value, m.cert_id",
                (*params, scan),
            )
            rows = [r for r in scanned if int(r[1]) == ca_id]
            more = len(scanned) >= scan
        ids: list[int] = []
        seen: set[int] = set()
        for row in rows:
            cert_id = int(row[0])
            if cert_id not in seen:
                seen.add(cert_id)
                ids.append(cert_id)
                if len(ids) == limit:
                    break
        return ids, more

    def certs_by_ids(self, ids: Sequence[int]) -> list[CertRecord]:
        """The certificates with these ids (primary key lookups), in the order of ids."""
        found: dict[int, CertRecord] = {}
        for i in range(0, len(ids), IN_LIMIT):
            part = list(ids[i:i + IN_LIMIT])
            rows = self._query(f"SELECT {CERT_COLUMNS} FROM certs c WHERE c.id IN"
                               f" ({','.join('?' * len(part))})", part)
            for row in rows:
                found[int(row[0])] = self._cert(row)
        return [found[i] for i in ids if i in found]

    def certs_by_serial(self, ca_ids: Sequence[int], serial: int) -> list[CertRecord]:
        """The certificates with this serial among these CAs: one ``certs (ca_id, serial)``
        lookup per CA (a serial alone is not the index's leading column)."""
        if not ca_ids:
            return []
        part = list(ca_ids[:IN_LIMIT])
        rows = self._query(
            f"SELECT {CERT_COLUMNS} FROM certs c WHERE c.ca_id IN ({','.join('?' * len(part))})"
            " AND c.serial = ? ORDER BY c.ca_id",
            (*part, serial_text(serial)),
        )
        return [self._cert(r) for r in rows]

    def certs_by_sha256(self, digest: bytes, limit: int = 10) -> list[CertRecord]:
        """The certificates whose DER has this SHA-256 (``certs (sha256)``, migration 3)."""
        rows = self._query(
            f"SELECT {CERT_COLUMNS} FROM certs c WHERE c.sha256 = ? ORDER BY c.id LIMIT ?",
            (digest, limit),
        )
        return [self._cert(r) for r in rows]

    # --- writes -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self, now: datetime) -> Iterator[Any]:
        """One atomic write: commits on success, rolls back on any exception."""
        from store.writer import Batch  # the write half lives beside, to keep files short

        self._begin_write()
        try:
            batch = Batch(self, now)
            yield batch
            batch.finish()
            if batch.result.changed:
                self._announce(batch.generation)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        finally:
            self._hash_cache.clear()


def like_pattern(initial: str, any_: Sequence[str], final: str) -> str:
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    return esc(initial) + "%" + "".join(esc(a) + "%" for a in any_ if a) + esc(final)
