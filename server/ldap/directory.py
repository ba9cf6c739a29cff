"""The virtual directory: entries looked up and searched in the store, never copied into memory.

Strategy: a base lookup is one indexed read (``Store.entry_with_certs``: the entry row and the
columns its published certificates show); a search with an indexable filter
(``server.ldap.plan``) reads candidate certificates from ``cert_attrs`` (an equality filter
only their ids and keys, ``Store.published_matches``) and evaluates the whole filter on the
entry each belongs to, so results are exact; a search without one evaluates the base entry
(scope base), or walks the base's children (one level) or subtree page by page in key order
(one loop for both), examining at most ``scan_limit`` entries (then adminLimitExceeded).
Searches are generators: the caller pulls one result at a time, so it can stop at the size
limit, check the time limit, interleave other clients and resume a paged search from a
position. Every hit carries the moment until which it is right (``Hit.until``: what an entry
shows depends on the time only through the expiry of its certificates), which the answer
cache (``server.ldap.answers``) keeps with an answer. The CA rows (a handful, with their CRLs)
are cached, and dropped when the change feed reports a CA or CRL change; with a change feed,
materialised entries are also kept in a bounded LRU cache (``entry_cache`` entries, so memory
does not grow with the store), each dropped when the feed reports a change at its key (all of
them on a CA, CRL or unkeyed change).

Threads: with ``[store] threads > 0`` searches run in pool threads (``server.storeaccess``)
while the change feed invalidates on the reactor thread. The caches are guarded by one lock,
and every store read is tagged with the invalidation epoch it started in: a result read
before an invalidation is not cached after it (it could hold what the change just voided).

Known limits: indexed searches return subscriber, certificate and CA entries, not glue entries
(a glue entry matches a name filter only through its own RDN, and is reached by one-level or
subtree searches whose filter has no indexable part); candidates are capped at ``scan_limit``
certificates (then adminLimitExceeded after the matching entries found).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from server.ldap.entries import (
    CA_OID,
    SERIAL_OID,
    SUBSCHEMA_KEY,
    Entry,
    ca_entry,
    cert_entry,
    crldp_entry,
    dse_entry,
    glue_entry,
    parse_dn,
    subject_entry,
    subschema_entry,
)
from server.ldap.errors import AdminLimitExceeded, NoSuchObject
from server.ldap.filters import Filter, evaluate
from server.ldap.plan import IndexQuery, plan
from server.ldap.schema import Allowlist
from store import names
from store.model import CaRecord, CertRecord, Change, DirectoryEntry, PublishedCert

BASE, ONE, SUB = 0, 1, 2
PAGE = 200
NEVER = float("inf")
CERTS_PER_ENTRY = 1000  # published certificates an entry shows at most

# (phase, first certificate id, entry key, certificate id): where a paged search resumes.
Position = tuple[int, int, str, int]


class DirectoryStore(Protocol):
    """The store's read methods the directory uses (``store.sqlbase.SqlStore``)."""

    def entry(self, key: str) -> DirectoryEntry | None: ...
    def entry_with_certs(self, key: str, limit: int = ...
                         ) -> tuple[DirectoryEntry, list[PublishedCert]] | None: ...
    def published_certs(self, key: str, limit: int = ...) -> list[PublishedCert]: ...
    def published_matches(self, attr: str, value: str, limit: int = ...
                          ) -> list[tuple[int, str]]: ...
    def children(self, parent_key: str, limit: int = ..., after: str = ...) -> list[DirectoryEntry]: ...
    def subtree(self, base_key: str, limit: int = ..., after: str = ...) -> list[DirectoryEntry]: ...
    def roots(self) -> list[DirectoryEntry]: ...
    def cas(self) -> list[CaRecord]: ...
    # and, when the store has CRL scopes (issue 23): ldap_dn_values(key), crl_scopes(ca_id)
    def cert(self, ca_id: int, serial: int) -> CertRecord | None: ...
    def certs_by_directory_key(self, key: str, limit: int = ...) -> list[CertRecord]: ...
    def certs_by_attribute(self, attr: str, value: str, limit: int = ...) -> list[CertRecord]: ...
    def certs_by_attribute_substring(self, attr: str, initial: str, any_: Sequence[str],
                                     final: str, limit: int = ...) -> list[CertRecord]: ...
    def certs_with_attribute(self, attr: str, limit: int = ...) -> list[CertRecord]: ...


@dataclass(frozen=True)
class Hit:
    entry: Entry
    position: Position
    until: float = NEVER  # POSIX time until which the entry shows what it shows now


def expiry_bound(certs: Sequence[Any], now: datetime) -> float:
    """The first notAfter after now among certs (POSIX seconds); inf when none."""
    t = now.timestamp()
    until = NEVER
    for c in certs:
        na = getattr(c, "not_after_ts", _MISSING)
        if na is _MISSING:
            na = None if c.not_after is None else c.not_after.timestamp()
        if na is not None and t < na < until:
            until = na
    return until


_MISSING: Any = object()


class Directory:
    """Lookups and searches over the store's published DN tree."""

    def __init__(self, store: DirectoryStore, allow: Allowlist, *,
                 naming_contexts: Sequence[str] = (), scan_limit: int = 20_000,
                 controls: Sequence[str] = (), extensions: Sequence[str] = (),
                 version: str = "0.1.0", entry_cache: int = 0) -> None:
        self.store = store
        self.allow = allow
        self.scan_limit = scan_limit
        self._configured_contexts = tuple(naming_contexts)
        self._controls = tuple(controls)
        self._extensions = tuple(extensions)
        self._version = version
        self._cas: dict[str, list[CaRecord]] | None = None
        self._ca_names: dict[int, str] = {}
        self._contexts: tuple[str, ...] | None = None
        self._subschema = subschema_entry()
        # key -> (entry, POSIX time until which it is right); only used with a change feed
        self.entry_cache = entry_cache
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        # search base text -> key of the entry it named (plain DNs only; bounded)
        self._base_keys: dict[str, str] = {}
        self._lock = threading.Lock()
        self._epoch = 0  # bumped by every invalidation (see the module docstring)

    # --- caches -----------------------------------------------------------------------------

    def invalidate(self, changes: list[Change]) -> None:
        """Change-feed subscriber: forget what the committed batches made stale."""
        with self._lock:
            self._epoch += 1
            self._contexts = None
            if any(c.kind in ("ca", "crl", "all") for c in changes):
                self._cas = None
                self._entries.clear()
                return
            entries = self._entries
            for c in changes:
                if not entries:
                    return
                if c.directory_key is None:
                    entries.clear()
                    return
                entries.pop(c.directory_key, None)

    def _ca_map(self) -> dict[str, list[CaRecord]]:
        cas = self._cas
        if cas is None:
            epoch = self._epoch
            by_key: dict[str, list[CaRecord]] = {}
            names_by_id: dict[int, str] = {}
            for ca in self.store.cas():
                by_key.setdefault(ca.directory_key, []).append(ca)
                names_by_id[ca.id] = ca.name
            with self._lock:
                self._ca_names.update(names_by_id)
                if epoch == self._epoch:
                    self._cas = by_key
            cas = by_key
        return cas

    def ca_name(self, ca_id: int) -> str:
        self._ca_map()
        return self._ca_names.get(ca_id, str(ca_id))

    def naming_contexts(self) -> tuple[str, ...]:
        if self._configured_contexts:
            return self._configured_contexts
        contexts = self._contexts
        if contexts is None:
            epoch = self._epoch
            contexts = tuple(e.dn for e in self.store.roots())
            with self._lock:
                if epoch == self._epoch:
                    self._contexts = contexts
        return contexts

    # --- entries ----------------------------------------------------------------------------

    def root_dse(self) -> Entry:
        return dse_entry(self.naming_contexts(), self._controls, self._extensions, self._version)

    def materialise(self, e: DirectoryEntry, now: datetime, epoch: int | None = None) -> Entry:
        """The entry of a row read in ``epoch`` (default: now; pass the epoch before the read)."""
        return self._materialise(e, now, self._epoch if epoch is None else epoch)[0]

    def _materialise(self, e: DirectoryEntry, now: datetime,
                     epoch: int) -> tuple[Entry, float]:
        if self.entry_cache:
            cached = self._cached(e.key, now)
            if cached is not None:
                return cached
        if e.kind == "glue" or e.kind == "crldp":
            return self._build(e, (), now, epoch)
        return self._build(e, self.store.published_certs(e.key, CERTS_PER_ENTRY), now, epoch)

    def _build(self, e: DirectoryEntry, certs: Sequence[Any], now: datetime,
               epoch: int) -> tuple[Entry, float]:
        if e.kind == "glue":
            entry, until = glue_entry(e), NEVER
        elif e.kind == "crldp":
            entry, until = crldp_entry(e, self._dn_values(e.key)), NEVER
        else:
            if e.kind == "ca":
                cas = self._ca_map().get(e.key, [])
                entry = ca_entry(e, cas, certs, now, self._ca_extras(e.key, cas))
            else:
                entry = subject_entry(e, certs, now)
            until = expiry_bound(certs, now)  # an entry shows a certificate until it expires
        if self.entry_cache:
            with self._lock:
                if epoch == self._epoch:  # else read before an invalidation: maybe stale
                    self._entries[entry.key] = (entry, until)
                    if len(self._entries) > self.entry_cache:
                        self._entries.popitem(last=False)
        return entry, until

    def _cached(self, key: str, now: datetime) -> tuple[Entry, float] | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None or hit[1] <= now.timestamp():
                return None
            self._entries.move_to_end(key)
        return hit

    def _dn_values(self, key: str) -> list[tuple[str, bytes]]:
        """(attribute, DER) that the certificates' ldap:// URLs at this DN name."""
        read = getattr(self.store, "ldap_dn_values", None)
        return list(read(key)) if read is not None else []

    def _ca_extras(self, key: str, cas: Sequence[CaRecord]) -> list[tuple[str, bytes]]:
        """A CA entry's values beyond its full CRL: what ldap:// URLs at its DN name, and
        the delta CRL of its full scope (RFC 5280 §5.2.4) as deltaRevocationList."""
        extra = self._dn_values(key)
        scopes = getattr(self.store, "crl_scopes", None)
        if scopes is not None:
            for ca in cas:
                extra += [("deltaRevocationList", s.der) for s in scopes(ca.id)
                          if s.delta and s.idp_der is None]
        return extra

    def entry_at(self, key: str, now: datetime) -> Entry | None:
        """The materialised entry with this key: from the cache, else one indexed read."""
        found = self._entry_until(key, now)
        return None if found is None else found[0]

    def _entry_until(self, key: str, now: datetime) -> tuple[Entry, float] | None:
        if self.entry_cache:
            cached = self._cached(key, now)
            if cached is not None:
                return cached
        epoch = self._epoch
        found = self.store.entry_with_certs(key, CERTS_PER_ENTRY)
        return None if found is None else self._build(found[0], found[1], now, epoch)

    def cert_children(self, parent: Entry, now: datetime,
                      certs: Sequence[CertRecord] | None = None) -> list[Entry]:
        if parent.kind not in ("subject", "ca"):
            return []
        if certs is None:
            certs = self.store.certs_by_directory_key(parent.key)
        return [cert_entry(parent.dn, c, self.ca_name(c.ca_id), now) for c in certs]

    def lookup(self, dn: names.DN, now: datetime) -> Entry | None:
        """The entry at dn (any RFC 4514 spelling; a full subject DN finds its public entry)."""
        found = self._lookup(dn, now)
        return None if found is None else found[0]

    def _lookup(self, dn: names.DN, now: datetime) -> tuple[Entry, float] | None:
        if dn.is_root():
            return self.root_dse(), NEVER
        if dn.key == SUBSCHEMA_KEY:
            return self._subschema, NEVER
        leaf = dn.rdns[0]
        if any(a.oid == SERIAL_OID for a in leaf):
            return self._lookup_cert(dn, now)
        key = dn.key
        found = self._entry_until(key, now)
        if found is None:
            public = dn.public()
            if public.rdns and public.key != key:
                found = self._entry_until(public.key, now)
        return found

    def _lookup_cert(self, dn: names.DN, now: datetime) -> tuple[Entry, float] | None:
        leaf = dn.rdns[0]
        serial_text = next((a.display for a in leaf if a.oid == SERIAL_OID), "")
        ca_text = next((a.norm for a in leaf if a.oid == CA_OID), None)
        try:
            serial = int(serial_text.strip(), 16)
        except ValueError:
            return None
        parent = self.lookup(dn.parent, now)
        if parent is None or ca_text is None:
            return None
        for records in self._ca_map().values():
            for ca in records:
                if names.prep_value(ca.name) != ca_text:
                    continue
                cert = self.store.cert(ca.id, serial)
                if cert is not None and cert.directory_key == parent.key:
                    return (cert_entry(parent.dn, cert, ca.name, now),
                            expiry_bound((cert,), now))
        return None

    def matched(self, dn: names.DN) -> str:
        """The nearest existing ancestor's DN, for noSuchObject (RFC 4511 §4.1.9)."""
        for ancestor in dn.ancestors():
            e = self.store.entry(ancestor.key)
            if e is not None:
                return e.dn
        return ""

    def base(self, dn: names.DN, now: datetime) -> Entry:
        return self._base(dn, now)[0]

    def _base(self, dn: names.DN, now: datetime) -> tuple[Entry, float]:
        found = self._lookup(dn, now)
        if found is None:
            raise NoSuchObject("no such entry", self.matched(dn))
        return found

    def base_text(self, text: str, now: datetime) -> Entry:
        """base(parse_dn(text)), remembering which key a plain DN text names."""
        return self.base_hit(text, now).entry

    def base_hit(self, text: str, now: datetime) -> Hit:
        """The base entry a search names, as a hit (with its ``until``)."""
        key = self._base_keys.get(text)
        if key is not None:
            found = self._entry_until(key, now)
            if found is not None:
                return Hit(found[0], (0, 0, "", 0), found[1])
        dn = parse_dn(text)
        entry, until = self._base(dn, now)
        if (entry.kind in ("glue", "subject", "ca", "crldp") and entry.key == dn.key
                and self.entry_cache):
            with self._lock:
                if len(self._base_keys) >= 1024:
                    self._base_keys.clear()
                self._base_keys[text] = entry.key
        return Hit(entry, (0, 0, "", 0), until)

    # --- search -----------------------------------------------------------------------------

    def search(self, base: Entry | Hit, scope: int, f: Filter, now: datetime,
               after: Position | None = None, candidates: int | None = None
               ) -> Iterator[Hit | None]:
        """Matching entries, each with the position a paged search resumes after; None now
        and then while scanning, so the caller can check its limits. ``candidates``: read
        at most this many index candidates (fewer than ``scan_limit``: a capped search)."""
        hit = base if isinstance(base, Hit) else Hit(base, (0, 0, "", 0))
        entry = hit.entry
        if scope == BASE or entry.kind in ("subschema", "cert"):
            if (scope != ONE and (after is None or after < (0, 0, "", 0))
                    and evaluate(f, entry, self.allow) is True):
                yield hit
            return
        p = plan(f, self.allow)
        if p is not None:
            yield from self._indexed(p.queries, entry, scope, f, now, after, candidates)
        else:
            yield from self._walk(entry, scope, f, now, after)

    def _in_scope(self, entry: Entry, base: Entry, scope: int) -> bool:
        if base.kind == "dse":
            return scope == SUB or (entry.parsed is not None and len(entry.parsed.rdns) == 1)
        parsed = entry.parsed or names.DN(())
        if scope == ONE:
            return parsed.parent.key == base.key
        # subtree: compare the normalised keys (a DN.key is rebuilt on every access)
        key, bkey = entry.key, base.key
        if not bkey or key == bkey:
            return True
        cut = len(key) - len(bkey) - 1
        if cut > 0 and key.endswith(bkey) and key[cut] == ",":
            slashes = 0
            while cut - slashes - 1 >= 0 and key[cut - slashes - 1] == "\\":
                slashes += 1
            if slashes % 2 == 0:
                return True
        return parsed.is_within(base.parsed or names.DN(()))

    def _candidates(self, q: IndexQuery, records: bool, limit: int
                    ) -> list[tuple[int, str, CertRecord | None]]:
        """(certificate id, entry key, the record when ``records``) of q's candidates."""
        s = self.store
        if q.kind == "eq" and not records:
            return [(i, k, None) for i, k in s.published_matches(q.attr, q.value, limit)]
        if q.kind == "eq":
            rows = s.certs_by_attribute(q.attr, q.value, limit)
        elif q.kind == "substr":
            rows = s.certs_by_attribute_substring(q.attr, q.initial, q.any, q.final, limit)
        elif q.kind == "present":
            rows = s.certs_with_attribute(q.attr, limit)
        else:
            rows = []
            for cas in self._ca_map().values():
                for ca in cas:
                    if q.kind == "cert" and q.cert is not None and ca.subject_key != q.cert[1]:
                        continue
                    serial = q.cert[0] if q.cert is not None else q.serial
                    cert = None if serial is None else s.cert(ca.id, serial)
                    if cert is not None and cert.der is not None:
                        rows.append(cert)
        return [(c.id, c.directory_key, c) for c in rows]

    def _indexed(self, queries: Sequence[IndexQuery], base: Entry, scope: int, f: Filter,
                 now: datetime, after: Position | None,
                 limit: int | None = None) -> Iterator[Hit | None]:
        """The one scan loop over index candidates: CA entries, then each candidate entry
        (in order of its first certificate), then, for certificate queries, the certificate
        entries below it."""
        for key in sorted(self._ca_map()):
            pos: Position = (0, 0, key, 0)
            if after is not None and pos <= after:
                continue
            found = self._entry_until(key, now)
            if found is None:
                continue
            if self._in_scope(found[0], base, scope) and evaluate(f, found[0], self.allow) is True:
                yield Hit(found[0], pos, found[1])
        per_cert = any(q.kind in ("cert", "serial") for q in queries)
        truncated = False
        candidates: dict[int, tuple[str, CertRecord | None]] = {}
        limit = self.scan_limit if limit is None else min(limit, self.scan_limit)
        for q in queries:
            rows = self._candidates(q, per_cert, limit)
            truncated = truncated or len(rows) >= limit
            for cid, key, record in rows:
                candidates[cid] = (key, record)
        yield None
        groups: dict[str, list[tuple[int, CertRecord | None]]] = {}
        for cid in sorted(candidates):
            key, record = candidates[cid]
            groups.setdefault(key, []).append((cid, record))
        for key, hits in groups.items():
            first = hits[0][0]
            if after is not None and (1, first, "", 1 << 62) <= after:
                continue
            found = self._entry_until(key, now)
            if found is None or found[0].kind == "ca" and not per_cert:
                continue
            entry, until = found
            pos = (1, first, "", 0)
            if (entry.kind != "ca" and (after is None or pos > after)
                    and self._in_scope(entry, base, scope)
                    and evaluate(f, entry, self.allow) is True):
                yield Hit(entry, pos, until)
            if per_cert:
                records = [r for _, r in hits if r is not None]
                for child, c in zip(self.cert_children(entry, now, records), records, strict=True):
                    cpos = (1, first, "", c.id)
                    if ((after is None or cpos > after) and self._in_scope(child, base, scope)
                            and evaluate(f, child, self.allow) is True):
                        yield Hit(child, cpos, expiry_bound((c,), now))
        if truncated:
            raise AdminLimitExceeded("too many candidate entries; refine the filter")

    def _cert_hits(self, entry: Entry, f: Filter, now: datetime, phase: int,
                   after: Position | None) -> Iterator[Hit]:
        if entry.kind not in ("subject", "ca"):
            return
        certs = self.store.certs_by_directory_key(entry.key)
        # in the order of their positions (by serial), so that a paged search resuming
        # after one child of an entry neither skips nor repeats its other children
        children = sorted(zip(self.cert_children(entry, now, certs), certs, strict=True),
                          key=lambda pair: _child_order(pair[0]))
        for child, c in children:
            pos = (phase, 0, entry.key, _child_order(child))
            if (after is None or pos > after) and evaluate(f, child, self.allow) is True:
                yield Hit(child, pos, expiry_bound((c,), now))

    def _walk(self, base: Entry, scope: int, f: Filter, now: datetime,
              after: Position | None) -> Iterator[Hit | None]:
        """The one scan loop without an index: the base's children (one level, phase 3) or
        its subtree (phase 2) page by page in key order, at most ``scan_limit`` entries."""
        if scope == ONE and base.kind == "dse":
            epoch = self._epoch
            rows = [e for e in self.store.roots() if after is None or (3, 0, e.key, 0) > after]
            for e in rows:
                entry, until = self._materialise(e, now, epoch)
                if evaluate(f, entry, self.allow) is True:
                    yield Hit(entry, (3, 0, e.key, 0), until)
            return
        start = ""
        if scope == ONE:
            yield from self._cert_hits(base, f, now, 2, after)
            read: Callable[[str], list[DirectoryEntry]] = (
                lambda start: self.store.children(base.key, PAGE, start))
            phase = 3
            if after is not None and after[0] == 3:
                start = after[2]
        else:
            read = lambda start: self.store.subtree(base.key, PAGE, start)  # noqa: E731
            phase = 2
            if after is not None and after[0] == 2:
                start = after[2]
                # finish the certificate children of the entry the last page ended in
                epoch = self._epoch
                e = self.store.entry(start)
                if e is not None:
                    parent = self._materialise(e, now, epoch)[0]
                    yield from self._cert_hits(parent, f, now, 2, after)
        examined = 0
        while True:
            epoch = self._epoch
            rows = read(start)
            for e in rows:
                examined += 1
                if examined > self.scan_limit:
                    raise AdminLimitExceeded("too many entries to examine; refine the filter")
                entry, until = self._materialise(e, now, epoch)
                if evaluate(f, entry, self.allow) is True:
                    yield Hit(entry, (phase, 0, e.key, 0), until)
                if scope == SUB:
                    yield from self._cert_hits(entry, f, now, 2, None)
            if len(rows) < PAGE:
                return
            start = rows[-1].key
            yield None


def _child_order(child: Entry) -> int:
    """Order of certificate entries below one subscriber: by serial number."""
    return int(str(child.values("certpubSerialNumber")[0]), 16) + 1
