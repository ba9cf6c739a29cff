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

from store.errors import (  # noqa: F401 - re-exported: their home before store.errors
    StoreError,
    StoreSchemaError,
    refuse_newer_schema,
    require_current_schema,
)
from store.model import (
    CaId,
    CaRecord,
    CaStats,
    CertRecord,
    CertStatus,
    Change,
    CrlScope,
    DirectoryEntry,
    Generation,
    IssuerHashes,
    LearntUrl,
    PublishedCert,
    RevocationReason,
    UrlTarget,
    utc,
)
from store.sqltext import (  # noqa: F401 - re-exported: their home before store.sqltext
    IN_LIMIT,
    TOP,
    like_pattern,
    reversed_key,
    serial_int,
    serial_text,
    ts,
)


# A CA row with the latest CRL of its full scope (no IDP, not a delta; migration 4).
CA_COLUMNS = (
    "cas.id, cas.name, cas.subject_dn, cas.subject_key, cas.directory_key, cas.cert_der, f.der,"
    " f.number, f.this_update, f.next_update, cas.synced_at, cas.updated_at"
)
CA_FROM = "cas LEFT JOIN crl_scopes f ON f.ca_id = cas.id AND f.idp_key = '' AND f.delta = 0"
SCOPE_COLUMNS = (
    "id, ca_id, idp, delta, urls, only_kind, der, number, base_number, this_update,"
    " next_update, updated_at, generation"
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
        return [self._ca(r) for r in
                self._query(f"SELECT {CA_COLUMNS} FROM {CA_FROM} ORDER BY cas.id")]

    def ca_by_name(self, name: str) -> CaRecord | None:
        rows = self._query(f"SELECT {CA_COLUMNS} FROM {CA_FROM} WHERE cas.name = ?", (name,))
        return self._ca(rows[0]) if rows else None

    def ca_by_id(self, ca_id: int) -> CaRecord | None:
        rows = self._query(f"SELECT {CA_COLUMNS} FROM {CA_FROM} WHERE cas.id = ?", (ca_id,))
        return self._ca(rows[0]) if rows else None

    def ca_by_issuer_hash(self, algorithm: str, name_hash: bytes, key_hash: bytes) -> CaRecord | None:
        """The CA a CertID names (RFC 6960 §4.1.1), by its hash algorithm."""
        rows = self._query(
            f"SELECT {CA_COLUMNS} FROM {CA_FROM} WHERE cas.id = (SELECT ca_id FROM ca_hashes"
            " WHERE algorithm = ? AND name_hash = ? AND key_hash = ? LIMIT 1)",
            (algorithm, name_hash, key_hash),
        )
        return self._ca(rows[0]) if rows else None

    def cas_by_directory_key(self, key: str) -> list[CaRecord]:
        rows = self._query(f"SELECT {CA_COLUMNS} FROM {CA_FROM} WHERE cas.directory_key = ?",
                           (key,))
        return [self._ca(r) for r in rows]

    # --- CRL scopes and the URLs learnt from certificates (migration 4) --------------------

    def _scope(self, row: Sequence[Any]) -> CrlScope:
        (id_, ca_id, idp, delta, urls, only, der, number, base, tu, nu, updated, gen) = row
        return CrlScope(
            id=int(id_), ca_id=CaId(ca_id), idp_der=None if idp is None else bytes(idp),
            delta=bool(delta), urls=tuple(u for u in urls.split("\n") if u), only=only,
            der=bytes(der), number=None if number is None else int(number),
            base_number=None if base is None else int(base),
            this_update=utc(tu) or datetime.fromtimestamp(0), next_update=utc(nu),
            updated_at=utc(updated) or datetime.fromtimestamp(0), generation=Generation(gen),
        )

    def crl_scopes(self, ca_id: int | None = None) -> list[CrlScope]:
        """The applied scopes (not pending deltas) of one CA or all: full scope first, then
        by IDP, each base before its delta."""
        where, params = ("WHERE ca_id = ?", (ca_id,)) if ca_id is not None else ("", ())
        rows = self._query(f"SELECT {SCOPE_COLUMNS} FROM crl_scopes {where}"
                           " ORDER BY ca_id, idp_key, delta", params)
        return [self._scope(r) for r in rows]

    def crl_scope(self, scope_id: int) -> CrlScope | None:
        rows = self._query(f"SELECT {SCOPE_COLUMNS} FROM crl_scopes WHERE id = ?", (scope_id,))
        return self._scope(rows[0]) if rows else None

    def pending_deltas(self, ca_id: int | None = None) -> list[tuple[int, int | None, int]]:
        """Delta CRLs kept until their base arrives: (CA id, number, BaseCRLNumber)."""
        where, params = ("WHERE ca_id = ?", (ca_id,)) if ca_id is not None else ("", ())
        rows = self._query(f"SELECT ca_id, number, base_number FROM crl_pending {where}"
                           " ORDER BY ca_id, id", params)
        return [(int(c), None if n is None else int(n), int(b)) for c, n, b in rows]

    def learnt_urls(self, ca_id: int | None = None) -> list[LearntUrl]:
        where, params = ("WHERE ca_id = ?", (ca_id,)) if ca_id is not None else ("", ())
        rows = self._query("SELECT url, scheme, host, path, kind, ca_id, conflict FROM crl_urls"
                           f" {where} ORDER BY url", params)
        return [LearntUrl(u, s, h, p, k, CaId(c), bool(x)) for u, s, h, p, k, c, x in rows]

    def resolve_url(self, url: str) -> UrlTarget | None:
        """What a URL printed in certificates names (CDP, freshest CRL, AIA caIssuers), or
        None: never learnt, a conflict, or not imported yet. Never another scope's CRL."""
        from store.urls import normalise

        key = normalise(url)
        if key is None:
            return None
        rows = self._query("SELECT kind, ca_id, conflict, pair_url FROM crl_urls WHERE url = ?",
                           (key,))
        if not rows or rows[0][2]:
            return None
        kind, ca_id, _, pair = rows[0]
        return self._target(key, kind, int(ca_id), pair)

    def _target(self, url: str, kind: str, ca_id: int, pair: str | None) -> UrlTarget | None:
        if kind == "ca":
            rows = self._query("SELECT cert_der, generation FROM cas WHERE id = ?", (ca_id,))
            if not rows:
                return None
            return UrlTarget(url, kind, CaId(ca_id), None, bytes(rows[0][0]), None, None,
                             Generation(rows[0][1]))
        scopes = self._query("SELECT id, idp_key, delta, urls FROM crl_scopes WHERE ca_id = ?",
                             (ca_id,))
        chosen = _pick_scope(scopes, url, kind == "delta")
        if chosen is None and kind == "delta" and pair:
            base = _pick_scope(scopes, pair, False)
            if base is not None:
                idp = next(k for i, k, _, _ in scopes if i == base)
                chosen = next((i for i, k, d, _ in scopes if k == idp and d), None)
        if chosen is None:
            return None
        rows = self._query("SELECT der, this_update, next_update, generation FROM crl_scopes"
                           " WHERE id = ?", (chosen,))
        if not rows:
            return None
        der, tu, nu, gen = rows[0]
        return UrlTarget(url, kind, CaId(ca_id), int(chosen), bytes(der), utc(tu), utc(nu),
                         Generation(gen))

    def ldap_url_dns(self) -> list[tuple[str, str, str]]:
        """(DN key, display DN, attribute) of every learnt ldap:// URL (not in conflict)."""
        rows = self._query("SELECT DISTINCT dn_key, dn, attr FROM crl_urls WHERE scheme = 'ldap'"
                           " AND conflict = 0 AND dn_key IS NOT NULL ORDER BY dn_key, attr")
        seen: set[tuple[str, str]] = set()
        out = []
        for key, dn, attr in rows:
            if (key, attr) not in seen:
                seen.add((key, attr))
                out.append((key, dn, attr))
        return out

    def ldap_dn_values(self, dn_key: str) -> list[tuple[str, bytes]]:
        """(attribute, DER) that the ldap:// URLs naming this DN resolve to, as
        ``resolve_url`` resolves them; an attribute that URLs of two CAs ask for at one DN
        resolves to nothing (as a URL claimed by two CAs)."""
        rows = self._query("SELECT url, kind, ca_id, pair_url, attr FROM crl_urls"
                           " WHERE dn_key = ? AND conflict = 0 ORDER BY url", (dn_key,))
        owners: dict[str, set[int]] = {}
        for _, _, ca_id, _, attr in rows:
            owners.setdefault(attr, set()).add(int(ca_id))
        out: list[tuple[str, bytes]] = []
        for url, kind, ca_id, pair, attr in rows:
            if len(owners[attr]) > 1:
                continue
            target = self._target(url, kind, int(ca_id), pair)
            if target is not None and (attr, target.der) not in out:
                out.append((attr, target.der))
        return out

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


def _pick_scope(scopes: Sequence[Any], url: str, delta: bool) -> int | None:
    """The id of the scope (rows: id, idp_key, delta, urls) a CDP (delta False) or freshest
    CRL (delta True) URL names: the one whose IDP names it; for a CA without IDP-scoped CRLs,
    its full scope (or the full scope's delta)."""
    for id_, _, d, urls in scopes:
        if bool(d) == delta and url in urls.split("\n"):
            return int(id_)
    if any(k and not d for _, k, d, _ in scopes):
        return None  # partitioned: a URL no IDP names resolves to nothing
    return next((int(i) for i, k, d, _ in scopes if not k and bool(d) == delta), None)
