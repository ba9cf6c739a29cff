"""The write half of the store: one ``Batch`` per transaction, used by the importer alone.

Strategy: every method is idempotent (applying the same certificate, CRL or index line twice
changes nothing) and monotone (revocation never goes backwards: only a certificateHold is ever
released, and only by a newer full CRL, a removeFromCRL entry, or an index that lists the
certificate as valid again). Rows written by a batch carry its tentative generation; the
generation counter moves only if the batch changed something.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from store.model import (
    HASH_ALGORITHMS,
    BatchResult,
    CaId,
    CertInput,
    CertStatus,
    CrlInput,
    Generation,
    IndexLine,
    RevocationReason,
    Serial,
    idp_key,
)
from store.errors import StoreError
from store.sqltext import IN_LIMIT, reversed_key, serial_text, ts
from store.urls import ParsedUrl, UrlRefused, parse_url


class SqlEngine(Protocol):
    """What a batch needs of its store (``store.sqlbase.SqlStore``; not imported here, so
    the read half and the write half do not import each other)."""

    engine: str

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

HOLD = RevocationReason.CERTIFICATE_HOLD.value
REVOKED = CertStatus.REVOKED.value
MAX_PENDING = 16  # delta CRLs kept per scope while their base has not come
_KIND_RANK = {"glue": 0, "crldp": 1, "subject": 2, "ca": 3}


class CertRow(NamedTuple):
    """A verified certificate as ``add_cert_rows`` writes it: ``CertInput`` with the values
    computed that the rows need (the importer's workers build these, so the one writer
    process does little more than hand them to the database)."""

    ca_id: int
    serial: int
    der: bytes
    sha256: bytes
    subject_dn: str
    directory_dn: str
    directory_key: str
    emails: str  # newline-separated, as stored
    cn: str | None
    not_before: int | None  # Unix seconds
    not_after: int | None
    attributes: tuple[tuple[str, str], ...]  # (attr, normalised value), sorted, no repeats
    directory_ancestors: tuple[tuple[str, str], ...]
    urls: tuple[tuple[str, str], ...] = ()  # (kind, URI): CertInput.urls


def cert_row(cert: CertInput) -> CertRow:
    """The row of a parsed certificate."""
    return CertRow(cert.ca_id, cert.serial, cert.der, hashlib.sha256(cert.der).digest(),
                   cert.subject_dn, cert.directory_dn, cert.directory_key,
                   "\n".join(cert.emails), cert.cn, ts(cert.not_before), ts(cert.not_after),
                   tuple(sorted(set(cert.attributes))), cert.directory_ancestors, cert.urls)


class Batch:
    """One atomic, idempotent write to the store."""

    def __init__(self, store: SqlEngine, now: datetime) -> None:
        """Called by ``store.batch`` once the write transaction (and its lock) is held."""
        self._store = store
        self.now = now
        self._now_ts = int(now.timestamp())
        self.result = BatchResult()
        self.generation = Generation(int(self._one("SELECT value FROM meta WHERE key = 'generation'")[0]) + 1)
        self._changes: list[tuple[str, int, str | None, str | None]] = []
        # Directory entries, written once per key at the end of the batch (see _add_entries).
        self._entries: dict[str, list[Any]] = {}
        self._known: dict[int, dict[int, list[Any] | None]] = {}  # see known_certs
        # URLs printed in this batch's certificates and CRLs (see learn_urls, _flush_urls)
        self._url_sets: set[tuple[int, tuple[tuple[str, str], ...]]] = set()
        self._url_claims: dict[str, list[tuple[ParsedUrl, str, int, str | None, bool]]] = {}
        self._noted: set[str] = set()

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self._exec(sql, params).fetchone()

    def _exec(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        return self._store._execute(sql, params)

    def _insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Rows that are certainly new (no conflict clause): COPY on PostgreSQL."""
        if not rows:
            return
        if self._store.engine == "postgresql":
            self._store._copy(table, columns, rows)  # type: ignore[attr-defined]
        else:
            self._store._executemany(
                f"INSERT INTO {table} ({', '.join(columns)})"
                f" VALUES ({', '.join('?' * len(columns))})", rows)

    def _change(self, kind: str, ca_id: int, serial: int | None = None, key: str | None = None) -> None:
        self._changes.append((kind, ca_id, None if serial is None else serial_text(serial), key))

    def finish(self) -> None:
        """Called by the store's batch before COMMIT: bump the generation if anything changed."""
        self._flush_urls()
        if self._entries:
            self._store._executemany(
                "INSERT INTO entries (key, rkey, dn, parent_key, kind) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET kind = excluded.kind"
                " WHERE entries.kind = 'glue' AND excluded.kind <> 'glue'"
                " OR entries.kind = 'crldp' AND excluded.kind IN ('subject', 'ca')"
                " OR entries.kind = 'subject' AND excluded.kind = 'ca'",
                [(k, reversed_key(k), d, parent, kind)
                 for k, (d, parent, kind) in self._entries.items()],
            )
            self._entries = {}
        if not self.result.changed:
            return
        self._insert("changes", ("generation", "kind", "ca_id", "serial", "directory_key"),
                     [(self.generation, kind, ca_id, serial, key)
                      for kind, ca_id, serial, key in self._changes])
        self._exec("UPDATE meta SET value = ? WHERE key = 'generation'", (str(self.generation),))
        self.result.generation = self.generation

    # --- CAs ----------------------------------------------------------------------------

    def ensure_ca(self, name: str, cert_der: bytes) -> tuple[CaId, str]:
        """Create or update the CA called name; returns (id, "new"|"updated"|"unchanged")."""
        from store.certparse import ca_info

        info = ca_info(cert_der)
        row = self._one("SELECT id, cert_der FROM cas WHERE name = ?", (name,))
        if row is not None and bytes(row[1]) == cert_der:
            return CaId(row[0]), "unchanged"
        if row is None:
            cur = self._exec(
                "INSERT INTO cas (name, subject_dn, subject_key, directory_key, cert_der,"
                " updated_at, generation) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (name, info.subject_dn, info.subject_key, info.directory_key, cert_der,
                 self._now_ts, self.generation),
            )
            ca_id = CaId(int(cur.fetchall()[0][0]))
            outcome = "new"
        else:
            ca_id = CaId(row[0])
            self._exec(
                "UPDATE cas SET subject_dn = ?, subject_key = ?, directory_key = ?, cert_der = ?,"
                " updated_at = ?, generation = ? WHERE id = ?",
                (info.subject_dn, info.subject_key, info.directory_key, cert_der, self._now_ts,
                 self.generation, ca_id),
            )
            self._exec("DELETE FROM ca_hashes WHERE ca_id = ?", (ca_id,))
            outcome = "updated"
        for alg in HASH_ALGORITHMS:
            self._exec(
                "INSERT INTO ca_hashes (ca_id, algorithm, name_hash, key_hash) VALUES (?, ?, ?, ?)",
                (ca_id, alg, hashlib.new(alg, info.name_der).digest(),
                 hashlib.new(alg, info.key_bits).digest()),
            )
        self._add_entries(info.directory_key, info.directory_dn, info.directory_ancestors, "ca")
        self._change("ca", ca_id, None, info.directory_key)
        self.result.cas += 1
        return ca_id, outcome

    def mark_synced(self, ca_id: int) -> None:
        """Record that the importer has just confirmed every status of this CA."""
        self._exec("UPDATE cas SET synced_at = ? WHERE id = ?", (self._now_ts, ca_id))

    # --- directory tree -----------------------------------------------------------------

    def _add_entries(
        self, key: str, dn: str, ancestors: tuple[tuple[str, str], ...], kind: str
    ) -> None:
        """Note an entry and its glue ancestors; ``finish`` upserts each key once.

        The upsert only ever raises an entry's kind (glue < subject < ca) and keeps the first
        DN written, so one write per key with its highest kind equals one write per use.
        """
        if not key:
            return
        chain = [(key, dn, kind)] + [(k, d, "glue") for k, d in ancestors]
        for i, (k, d, kd) in enumerate(chain):
            known = self._entries.get(k)
            if known is None:
                parent = chain[i + 1][0] if i + 1 < len(chain) else None
                self._entries[k] = [d, parent, kd]
            elif _KIND_RANK[kd] > _KIND_RANK[known[2]]:
                known[2] = kd
            elif i > 0:
                break  # its ancestors are noted already

    # --- certificates -------------------------------------------------------------------

    def add_cert(self, cert: CertInput, source: str) -> str:
        """Store a verified certificate: "new", "updated" (was known by serial only),
        "unchanged", or "conflict" (the CA already has a different certificate with this
        serial; nothing is written)."""
        sha = hashlib.sha256(cert.der).digest()
        self.learn_urls(cert.ca_id, cert.urls)
        self._known.clear()  # see known_certs
        row = self._one(
            "SELECT id, sha256 FROM certs WHERE ca_id = ? AND serial = ?",
            (cert.ca_id, serial_text(cert.serial)),
        )
        cols = (cert.der, sha, cert.subject_dn, cert.directory_dn, cert.directory_key,
                "\n".join(cert.emails), cert.cn, ts(cert.not_before), ts(cert.not_after))
        if row is not None and row[1] is not None:
            if bytes(row[1]) == sha:
                self.result.certs_unchanged += 1
                return "unchanged"
            return "conflict"
        if row is None:
            cur = self._exec(
                "INSERT INTO certs (ca_id, serial, der, sha256, subject_dn, directory_dn,"
                " directory_key, emails, cn, not_before, not_after, status, imported_at, source,"
                " generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'good', ?, ?, ?) RETURNING id",
                (cert.ca_id, serial_text(cert.serial), *cols, self._now_ts, source,
                 self.generation),
            )
            cert_id = int(cur.fetchall()[0][0])  # fetchall: the statement is done
            outcome = "new"
            self.result.certs_new += 1
        else:
            cert_id = row[0]
            self._exec(
                "UPDATE certs SET der = ?, sha256 = ?, subject_dn = ?, directory_dn = ?,"
                " directory_key = ?, emails = ?, cn = ?, not_before = ?, not_after = ?,"
                " imported_at = ?, source = ?, generation = ? WHERE id = ?",
                (*cols, self._now_ts, source, self.generation, cert_id),
            )
            outcome = "updated"
            self.result.certs_updated += 1
        for attr, value in sorted(set(cert.attributes)):
            self._exec(
                "INSERT INTO cert_attrs (cert_id, attr, value) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (cert_id, attr, value),
            )
        self._add_entries(cert.directory_key, cert.directory_dn, cert.directory_ancestors, "subject")
        self._change("cert", cert.ca_id, cert.serial, cert.directory_key)
        return outcome

    def known_certs(self, ca_id: int, serials: Sequence[int]) -> dict[int, list[Any] | None]:
        """Rows of serials of one CA: serial -> [id, sha256 or None, status, reason, directory
        key], or None for a serial not stored. One ``IN`` query per 500 serials not looked up
        yet in this batch; the bulk methods keep the rows current as they write (the
        single-row methods drop them, see ``_status_row``)."""
        rows = self._known.setdefault(ca_id, {})
        texts = sorted({serial_text(s) for s in serials if s not in rows})
        for i in range(0, len(texts), IN_LIMIT):
            part = texts[i:i + IN_LIMIT]
            for t in part:
                rows[int(t, 16)] = None
            found = self._exec(
                "SELECT serial, id, sha256, status, reason, directory_key FROM certs"
                f" WHERE ca_id = ? AND serial IN ({','.join('?' * len(part))})",
                (ca_id, *part),
            ).fetchall()
            for serial, id_, sha, status, reason, key in found:
                rows[int(serial, 16)] = [id_, None if sha is None else bytes(sha), status, reason,
                                         key]
        return rows

    def add_certs(self, items: Sequence[tuple[CertInput, str]]) -> list[str]:
        """``add_cert`` for many (certificate, source) pairs, in order, with a few statements
        for all of them: the same outcomes, rows and changes as one call per pair."""
        return self.add_cert_rows([(cert_row(c), s) for c, s in items])

    def _reserve_cert_ids(self, n: int) -> list[int]:
        """n ids for new ``certs`` rows, unused by any other writer (this batch holds the
        store's write lock: SQLite's BEGIN IMMEDIATE, PostgreSQL's sequence)."""
        if self._store.engine == "postgresql":
            rows = self._exec("SELECT nextval(pg_get_serial_sequence('certs', 'id'))"
                              " FROM generate_series(1, ?)", (n,)).fetchall()
            return [int(r[0]) for r in rows]
        top = int(self._one("SELECT coalesce(max(id), 0) FROM certs")[0])
        return list(range(top + 1, top + 1 + n))

    def add_cert_rows(self, items: Sequence[tuple[CertRow, str]]) -> list[str]:
        """``add_certs`` for certificates already turned into rows (by the importer's
        workers): outcomes "new", "updated", "unchanged" or "conflict", in order."""
        known: dict[int, dict[int, list[Any] | None]] = {}
        for ca_id in {c.ca_id for c, _ in items}:
            known[ca_id] = self.known_certs(ca_id, [c.serial for c, _ in items if c.ca_id == ca_id])
        inserts: list[list[Any]] = []
        updates: list[tuple[Any, ...]] = []
        attrs: list[tuple[list[Any] | int, tuple[tuple[str, str], ...]]] = []
        outcomes: list[str] = []
        now, generation = self._now_ts, self.generation
        changes = self._changes
        entries = self._entries
        url_sets = self._url_sets
        for cert, source in items:
            if cert.urls and (cert.ca_id, cert.urls) not in url_sets:
                self.learn_urls(cert.ca_id, cert.urls)
            rows = known[cert.ca_id]
            row = rows.get(cert.serial)
            if row is not None and row[1] is not None:
                if row[1] == cert.sha256:
                    self.result.certs_unchanged += 1
                    outcomes.append("unchanged")
                else:
                    outcomes.append("conflict")
                continue
            st = serial_text(cert.serial)
            key = cert.directory_key
            if row is None:
                new = [None, cert.ca_id, st, cert.der, cert.sha256, cert.subject_dn,
                       cert.directory_dn, key, cert.emails, cert.cn, cert.not_before,
                       cert.not_after, "good", now, source, generation]
                inserts.append(new)
                rows[cert.serial] = known_row = [None, cert.sha256, "good", None, key]
                attrs.append((new, cert.attributes))
                new.append(known_row)  # gets its id below; dropped before the insert
                outcomes.append("new")
                self.result.certs_new += 1
            else:
                updates.append((cert.der, cert.sha256, cert.subject_dn, cert.directory_dn, key,
                                cert.emails, cert.cn, cert.not_before, cert.not_after, now,
                                source, generation, row[0]))
                row[1] = cert.sha256
                attrs.append((row[0], cert.attributes))
                outcomes.append("updated")
                self.result.certs_updated += 1
            if key and key not in entries:
                self._add_entries(key, cert.directory_dn, cert.directory_ancestors, "subject")
            elif key:
                known_entry = entries[key]
                if known_entry[2] == "glue":
                    known_entry[2] = "subject"
            changes.append(("cert", cert.ca_id, st, key))
        if inserts:
            for new, id_ in zip(inserts, self._reserve_cert_ids(len(inserts)), strict=True):
                new[0] = id_
                new.pop()[0] = id_  # the known row
            self._insert("certs", ("id", "ca_id", "serial", "der", "sha256", "subject_dn",
                                   "directory_dn", "directory_key", "emails", "cn",
                                   "not_before", "not_after", "status", "imported_at",
                                   "source", "generation"), inserts)
        if updates:
            self._store._executemany(
                "UPDATE certs SET der = ?, sha256 = ?, subject_dn = ?, directory_dn = ?,"
                " directory_key = ?, emails = ?, cn = ?, not_before = ?, not_after = ?,"
                " imported_at = ?, source = ?, generation = ? WHERE id = ?",
                updates,
            )
        # A new certificate's id is new: its rows cannot clash (its pairs are unique).
        self._insert("cert_attrs", ("cert_id", "attr", "value"),
                     [(ref[0], a, v) for ref, pairs in attrs if not isinstance(ref, int)
                      for a, v in pairs])
        attr_rows = [(ref, a, v) for ref, pairs in attrs if isinstance(ref, int)
                     for a, v in pairs]
        if attr_rows:
            self._store._executemany(
                "INSERT INTO cert_attrs (cert_id, attr, value) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                attr_rows,
            )
        return outcomes

    def _status_row(self, ca_id: int, serial: int) -> Any:
        self._known.clear()  # a single-row write follows: rows looked up in bulk may change
        return self._one(
            "SELECT id, status, reason, directory_key FROM certs WHERE ca_id = ? AND serial = ?",
            (ca_id, serial_text(serial)),
        )

    def revoke(
        self, ca_id: CaId, serial: Serial, revoked_at: datetime,
        reason: RevocationReason | None, by: str, source: str,
    ) -> str:
        """Mark a serial revoked: "revoked", "released", "unchanged" (never backwards)."""
        if reason is RevocationReason.REMOVE_FROM_CRL:
            return self.release(ca_id, serial, by)
        reason_v = None if reason is None else reason.value
        row = self._status_row(ca_id, serial)
        if row is None:
            self._exec(
                "INSERT INTO certs (ca_id, serial, status, revoked_at, reason, revoked_by,"
                " imported_at, source, generation) VALUES (?, ?, 'revoked', ?, ?, ?, ?, ?, ?)",
                (ca_id, serial_text(serial), ts(revoked_at), reason_v, by, self._now_ts, source,
                 self.generation),
            )
            key = None
        else:
            cert_id, status, old_reason, key = row
            if status == CertStatus.REVOKED.value and (old_reason != HOLD or reason_v == HOLD):
                return "unchanged"
            self._exec(
                "UPDATE certs SET status = 'revoked', revoked_at = ?, reason = ?, revoked_by = ?,"
                " generation = ? WHERE id = ?",
                (ts(revoked_at), reason_v, by, self.generation, cert_id),
            )
        self._change("cert", ca_id, serial, key)
        self.result.revoked += 1
        return "revoked"

    def release(self, ca_id: int, serial: int, by: str) -> str:
        """Lift a certificateHold: the only way back from revoked (RFC 5280 §5.3.1)."""
        row = self._status_row(ca_id, serial)
        if row is None or row[1] != CertStatus.REVOKED.value or row[2] != HOLD:
            return "unchanged"
        self._exec(
            "UPDATE certs SET status = 'good', revoked_at = NULL, reason = NULL, revoked_by = ?,"
            " generation = ? WHERE id = ?",
            (by, self.generation, row[0]),
        )
        self._change("cert", ca_id, serial, row[3])
        self.result.released += 1
        return "released"

    # --- CRLs ---------------------------------------------------------------------------

    def apply_crl(self, crl: CrlInput, source: str) -> str:
        """Apply a verified CRL to its scope (CA, IDP, delta?; RFC 5280 §5.2.4, §5.2.5):
        "applied"; "unchanged" (this CRL, or one with its number, is the scope's latest);
        "older" (an older CRL of the scope, or a delta its stored base already covers:
        it changes nothing); "pending" (a delta whose base is not stored yet: kept, and
        applied once that base arrives); "refused" (an indirect CRL, §5.3.3 not read)."""
        if crl.indirect:
            return "refused"
        if self._one("SELECT 1 FROM cas WHERE id = ?", (crl.ca_id,)) is None:
            raise StoreError(f"CRL for unknown CA id {crl.ca_id}")
        key = idp_key(crl.idp_der)
        row = self._scope_row(crl.ca_id, key, crl.is_delta)
        if row is not None:
            if bytes(row[1]) == crl.der:
                return "unchanged"
            verdict = _against_latest(crl, row[2], row[3])
            if verdict is not None:
                return verdict
        if crl.is_delta:
            base = self._scope_row(crl.ca_id, key, False)
            base_number = None if base is None or base[2] is None else int(base[2])
            if crl.base_number is not None and (base_number is None
                                                or base_number < crl.base_number):
                self._keep_pending(crl, key, source)
                return "pending"
            if crl.number is not None and base_number is not None and crl.number <= base_number:
                return "older"  # the stored base is as new: this delta adds nothing
        scope_id = self._store_scope(crl, key, None if row is None else int(row[0]))
        by = f"crl:{crl.number}" if crl.number is not None else f"crl@{ts(crl.this_update)}"
        settled = _settled_entries(crl, None if row is None else bytes(row[1]))
        for i, entry in enumerate(crl.entries):
            if i not in settled:
                self.revoke(crl.ca_id, entry.serial, entry.revoked_at, entry.reason, by, source)
        self._update_holds(crl, scope_id, by)
        self._change("crl", crl.ca_id)
        self.result.crls += 1
        if not crl.is_delta and crl.number is not None:
            self._apply_pending(crl.ca_id, key, crl.number)
        return "applied"

    def _scope_row(self, ca_id: int, key: str, delta: bool) -> Any:
        """(id, der, number, this_update) of a scope's latest CRL, or None."""
        return self._one("SELECT id, der, number, this_update FROM crl_scopes"
                         " WHERE ca_id = ? AND idp_key = ? AND delta = ?",
                         (ca_id, key, 1 if delta else 0))

    def _store_scope(self, crl: CrlInput, key: str, scope_id: int | None) -> int:
        """Make crl the latest of its scope; learn its IDP's URLs. Returns the scope's id."""
        urls = []
        for text in crl.idp_urls:
            try:
                parsed = parse_url(text, "delta" if crl.is_delta else "crl")
            except UrlRefused as exc:
                self._note(f"CRL distribution point URL skipped: {exc}")
                continue
            urls.append(parsed.url)
            self._claim(parsed, "delta" if crl.is_delta else "crl", crl.ca_id, None, idp=True)
        values = (crl.idp_der, 1 if crl.is_delta else 0, "\n".join(urls), crl.only, crl.der,
                  None if crl.number is None else str(crl.number),
                  None if crl.base_number is None else str(crl.base_number),
                  ts(crl.this_update), ts(crl.next_update), self._now_ts, self.generation)
        if scope_id is None:
            cur = self._exec(
                "INSERT INTO crl_scopes (idp, delta, urls, only_kind, der, number, base_number,"
                " this_update, next_update, updated_at, generation, ca_id, idp_key)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (*values, crl.ca_id, key))
            return int(cur.fetchall()[0][0])
        self._exec(
            "UPDATE crl_scopes SET idp = ?, delta = ?, urls = ?, only_kind = ?, der = ?,"
            " number = ?, base_number = ?, this_update = ?, next_update = ?, updated_at = ?,"
            " generation = ? WHERE id = ?", (*values, scope_id))
        return scope_id

    def _update_holds(self, crl: CrlInput, scope_id: int, by: str) -> None:
        """The scope now lists crl's holds. A hold it listed before and no longer lists is
        released unless another scope's latest CRL still lists it. A full CRL (no IDP, not a
        delta) speaks for every certificate of its CA: any hold it does not list (set by an
        index, say) is released on the same condition. A removeFromCRL entry (in a delta,
        RFC 5280 §5.3.1) was released by ``revoke`` and leaves every scope."""
        holds = {serial_text(e.serial) for e in crl.entries
                 if e.reason is RevocationReason.CERTIFICATE_HOLD}
        before = {r[0] for r in self._exec("SELECT serial FROM crl_holds WHERE scope_id = ?",
                                           (scope_id,)).fetchall()}
        gone = before - holds
        candidates = set(gone)
        if crl.idp_der is None and not crl.is_delta:
            candidates.update(r[0] for r in self._exec(
                "SELECT serial FROM certs WHERE ca_id = ? AND status = 'revoked' AND reason = ?",
                (crl.ca_id, HOLD)).fetchall())
            candidates -= holds
        if gone:
            self._store._executemany("DELETE FROM crl_holds WHERE scope_id = ? AND serial = ?",
                                     [(scope_id, st) for st in sorted(gone)])
        if candidates:
            listed = {serial_text(e.serial) for e in crl.entries}
            for st in sorted(candidates - listed):
                if self._one("SELECT 1 FROM crl_holds WHERE ca_id = ? AND serial = ?",
                             (crl.ca_id, st)) is None:
                    self.release(crl.ca_id, int(st, 16), by)
        if holds - before:
            self._store._executemany(
                "INSERT INTO crl_holds (scope_id, ca_id, serial) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                [(scope_id, crl.ca_id, st) for st in sorted(holds - before)])
        removed = sorted({serial_text(e.serial) for e in crl.entries
                          if e.reason is RevocationReason.REMOVE_FROM_CRL})
        if removed:
            self._store._executemany("DELETE FROM crl_holds WHERE ca_id = ? AND serial = ?",
                                     [(crl.ca_id, st) for st in removed])

    def _keep_pending(self, crl: CrlInput, key: str, source: str) -> None:
        """Keep a delta CRL whose base is not stored yet (until ``_apply_pending``)."""
        self._exec(
            "INSERT INTO crl_pending (ca_id, idp_key, der, sha256, number, base_number,"
            " received_at, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (ca_id, sha256) DO NOTHING",
            (crl.ca_id, key, crl.der, hashlib.sha256(crl.der).digest(),
             None if crl.number is None else str(crl.number), str(crl.base_number),
             self._now_ts, source))
        kept = self._exec("SELECT id, number FROM crl_pending WHERE ca_id = ? AND idp_key = ?",
                          (crl.ca_id, key)).fetchall()
        if len(kept) > MAX_PENDING:  # a base that never comes: keep the newest few
            kept.sort(key=lambda r: -1 if r[1] is None else int(r[1]))
            drop = kept[:len(kept) - MAX_PENDING]
            self._store._executemany("DELETE FROM crl_pending WHERE id = ?",
                                     [(r[0],) for r in drop])
            self._note(f"CA {crl.ca_id}: {len(drop)} delta CRL(s) waiting for a base CRL"
                       f" dropped (more than {MAX_PENDING} wait for one that has not come)")

    def _apply_pending(self, ca_id: int, key: str, base_number: int) -> None:
        """A base CRL numbered base_number was applied: apply the kept deltas over it (in
        number order), drop those it makes obsolete, keep those that need a newer base."""
        from store.certparse import crl_input

        rows = self._exec("SELECT id, der, number, base_number, source FROM crl_pending"
                          " WHERE ca_id = ? AND idp_key = ?", (ca_id, key)).fetchall()
        done, ready = [], []
        for id_, der, number, base, source in rows:
            if number is not None and int(number) <= base_number:
                done.append(id_)  # the base already covers it
            elif int(base) <= base_number:
                ready.append((-1 if number is None else int(number), id_, bytes(der), source))
        for _, id_, der, source in sorted(ready):
            delta = crl_input(der, CaId(ca_id))
            outcome = self.apply_crl(delta, source)
            self.result.notes.append(f"pending delta CRL {delta.number} of CA {ca_id}"
                                     f" ({source}): {outcome} over base {base_number}")
            done.append(id_)
        if done:
            self._store._executemany("DELETE FROM crl_pending WHERE id = ?",
                                     [(i,) for i in done])

    # --- URLs printed in certificates and CRLs -------------------------------------------

    def _note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.result.notes.append(text)

    def learn_urls(self, ca_id: int, urls: tuple[tuple[str, str], ...]) -> None:
        """Remember the (kind, URI) pairs one certificate issued by ca_id prints; the same
        pairs again in this batch cost one set look-up. Written by ``finish``."""
        if not urls or (ca_id, urls) in self._url_sets:
            return
        self._url_sets.add((ca_id, urls))
        parsed: list[tuple[str, ParsedUrl]] = []
        first_cdp: dict[str, str] = {}
        for kind, text in urls:
            try:
                p = parse_url(text, kind)
            except UrlRefused as exc:
                self._note(f"URL skipped: {exc}")
                continue
            parsed.append((kind, p))
            if kind == "crl":
                first_cdp.setdefault(p.scheme, p.url)
                first_cdp.setdefault("", p.url)
        for kind, p in parsed:
            pair = first_cdp.get(p.scheme) or first_cdp.get("") if kind == "delta" else None
            self._claim(p, kind, ca_id, pair)

    def _claim(self, p: ParsedUrl, kind: str, ca_id: int, pair: str | None,
               idp: bool = False) -> None:
        claims = self._url_claims.setdefault(p.url, [])
        if not any(c[2] == ca_id for c in claims):
            claims.append((p, kind, ca_id, pair, idp))

    def _flush_urls(self) -> None:
        """Write the URLs claimed in this batch: new ones inserted, a URL claimed by a second
        CA marked conflict (never served), an ldap:// URL's DN added to the DN tree."""
        claims, self._url_claims = self._url_claims, {}
        if not claims:
            return
        known: dict[str, tuple[int, int]] = {}
        texts = sorted(claims)
        for i in range(0, len(texts), IN_LIMIT):
            part = texts[i:i + IN_LIMIT]
            for url, ca_id, conflict in self._exec(
                    f"SELECT url, ca_id, conflict FROM crl_urls WHERE url IN"
                    f" ({','.join('?' * len(part))})", part).fetchall():
                known[url] = (int(ca_id), int(conflict))
        for url in texts:
            got = claims[url]
            owners = {c[2] for c in got}
            row = known.get(url)
            if row is not None:
                owners.add(row[0])
            conflict = len(owners) > 1
            if row is None:
                p, kind, ca_id, pair, _ = got[0]
                self._exec(
                    "INSERT INTO crl_urls (url, scheme, host, path, kind, ca_id, conflict,"
                    " pair_url, dn_key, dn, attr, learnt_at, generation)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (url, p.scheme, p.host, p.path, kind, ca_id, 1 if conflict else 0, pair,
                     p.dn_key, p.dn, p.attr, self._now_ts, self.generation))
                if p.dn_key is not None and not conflict:
                    self._add_crldp(p)
            elif conflict and not row[1]:
                self._exec("UPDATE crl_urls SET conflict = 1, generation = ? WHERE url = ?",
                           (self.generation, url))
            else:
                continue
            if conflict:
                self._note(f"URL {url} is printed by certificates of two CAs (ids"
                           f" {', '.join(map(str, sorted(owners)))}): never served")
            self.result.urls += 1
            for owner in sorted(owners):
                self._change("crl", owner)

    def _add_crldp(self, p: ParsedUrl) -> None:
        """The DN an ldap:// URL names, as an entry of the DN tree (unless it is a CA's)."""
        from store import names

        assert p.dn_key is not None
        if self._one("SELECT 1 FROM cas WHERE directory_key = ? OR subject_key = ?",
                     (p.dn_key, p.dn_key)) is not None:
            return
        dn = names.parse(p.dn or "")
        self._add_entries(p.dn_key, str(dn), tuple((a.key, str(a)) for a in dn.ancestors()),
                          "crldp")

    # --- OpenSSL index.txt --------------------------------------------------------------

    def apply_index_line(self, ca_id: CaId, line: IndexLine, source: str) -> str:
        """Apply one index.txt line's status: R revokes, V releases a hold, E changes nothing."""
        if line.status == "R":
            return self.revoke(
                ca_id, line.serial, line.revoked_at or self.now, line.reason, "index", source
            )
        if line.status == "V":
            row = self._status_row(ca_id, line.serial)
            if row is None:
                # Issued according to the CA's own database; its certificate file is missing.
                self._exec(
                    "INSERT INTO certs (ca_id, serial, status, not_after, imported_at, source,"
                    " generation) VALUES (?, ?, 'good', ?, ?, ?, ?)",
                    (ca_id, serial_text(line.serial), ts(line.expires), self._now_ts, source,
                     self.generation),
                )
                self._change("cert", ca_id, line.serial)
                self.result.certs_new += 1
                return "new"
            return self.release(ca_id, line.serial, "index")
        return "unchanged"

    def apply_index_lines(self, ca_id: CaId, lines: Sequence[IndexLine], source: str) -> None:
        """``apply_index_line`` for many lines of one CA, in order, with a few statements."""
        rows = self.known_certs(ca_id, [line.serial for line in lines])
        touched: set[int] = set()
        inserts: list[tuple[Any, ...]] = []
        revokes: list[tuple[Any, ...]] = []
        releases: list[tuple[Any, ...]] = []

        def flush() -> None:
            if inserts:
                self._store._executemany(
                    "INSERT INTO certs (ca_id, serial, status, not_after, revoked_at, reason,"
                    " revoked_by, imported_at, source, generation)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", inserts)
            if revokes:
                self._store._executemany(
                    "UPDATE certs SET status = 'revoked', revoked_at = ?, reason = ?,"
                    " revoked_by = ?, generation = ? WHERE ca_id = ? AND serial = ?", revokes)
            if releases:
                self._store._executemany(
                    "UPDATE certs SET status = 'good', revoked_at = NULL, reason = NULL,"
                    " revoked_by = ?, generation = ? WHERE ca_id = ? AND serial = ?", releases)
            inserts.clear()
            revokes.clear()
            releases.clear()
            touched.clear()

        for line in lines:
            if line.status not in ("R", "V"):
                continue
            serial = line.serial
            if serial in touched:
                flush()  # a serial twice in these lines: its first change goes in first
            st = serial_text(serial)
            row = rows.get(serial)
            if line.status == "R" and line.reason is RevocationReason.REMOVE_FROM_CRL \
                    or line.status == "V" and row is not None:
                # release(): only a certificateHold is ever lifted
                if row is None or row[2] != REVOKED or row[3] != HOLD:
                    continue
                releases.append(("index", self.generation, ca_id, st))
                row[2], row[3] = "good", None
                self._change("cert", ca_id, serial, row[4])
                self.result.released += 1
            elif line.status == "R":
                reason_v = None if line.reason is None else line.reason.value
                revoked_at = ts(line.revoked_at or self.now)
                if row is None:
                    inserts.append((ca_id, st, "revoked", None, revoked_at, reason_v, "index",
                                    self._now_ts, source, self.generation))
                    rows[serial] = [None, None, REVOKED, reason_v, None]
                    self._change("cert", ca_id, serial, None)
                else:
                    if row[2] == REVOKED and (row[3] != HOLD or reason_v == HOLD):
                        continue
                    revokes.append((revoked_at, reason_v, "index", self.generation, ca_id, st))
                    row[2], row[3] = REVOKED, reason_v
                    self._change("cert", ca_id, serial, row[4])
                self.result.revoked += 1
            else:  # "V", not stored: issued per the CA's database, its file is missing
                inserts.append((ca_id, st, "good", ts(line.expires), None, None, None,
                                self._now_ts, source, self.generation))
                rows[serial] = [None, None, "good", None, None]
                self._change("cert", ca_id, serial)
                self.result.certs_new += 1
            touched.add(serial)
        flush()

    def record_files(self, files: Sequence[tuple[bytes, str, str]]) -> None:
        """``record_file`` for many (sha256, name, outcome) triples."""
        self._store._executemany(
            "INSERT INTO imported_files (sha256, name, imported_at, generation, outcome)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
            [(sha, name, self._now_ts, self.generation, outcome) for sha, name, outcome in files],
        )

    # --- files --------------------------------------------------------------------------

    def record_file(self, sha256: bytes, name: str, outcome: str) -> None:
        """Remember a processed input file, so a re-delivery is recognised."""
        self._exec(
            "INSERT INTO imported_files (sha256, name, imported_at, generation, outcome)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
            (sha256, name, self._now_ts, self.generation, outcome),
        )


_NEVER_SETTLED = (RevocationReason.CERTIFICATE_HOLD, RevocationReason.REMOVE_FROM_CRL)


def _against_latest(crl: CrlInput, number: str | None, this_update: int | None) -> str | None:
    """"older" or "unchanged" when crl is not newer than its scope's latest CRL (by CRL
    number, by thisUpdate when either has none); None when it is newer."""
    if number is not None and crl.number is not None:
        if crl.number < int(number):
            return "older"
        return "unchanged" if crl.number == int(number) else None
    if this_update is not None and ts(crl.this_update) <= this_update:  # type: ignore[operator]
        return "older"
    return None


def _settled_entries(crl: CrlInput, previous_der: bytes | None) -> set[int]:
    """Indexes of crl's entries that ``revoke`` would certainly leave unchanged.

    An entry byte-identical to one of its scope's previously applied full CRL, whose reason is
    neither certificateHold nor removeFromCRL: applying that CRL left the serial revoked with a
    reason other than certificateHold, and nothing moves such a row any more (``revoke`` keeps
    it, ``release`` lifts holds only). Holds and removeFromCRL entries are always applied again,
    since an index or a delta CRL may have changed them since. An empty set means "apply all".
    """
    if crl.is_delta or previous_der is None or not crl.entries:
        return set()
    from store.certparse import crl_entry_ders, entry_serial

    previous = crl_entry_ders(previous_der)
    current = crl_entry_ders(crl.der)
    if not previous or current is None or len(current) != len(crl.entries):
        return set()
    seen = set(previous)
    settled = set()
    try:
        for i, (raw, entry) in enumerate(zip(current, crl.entries, strict=True)):
            if (raw in seen and entry.reason not in _NEVER_SETTLED
                    and entry_serial(raw) == entry.serial):
                settled.add(i)
    except (IndexError, ValueError):
        return set()
    return settled
