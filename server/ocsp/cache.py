"""The one cache of ready OCSP answers: pre-signed responses for requests without a nonce,
bounded, voided by the change feed, and the views that serve them without a lookup.

Strategy: an LRU (an ``OrderedDict``) of signed responses under two kinds of key: the raw
request DER (the hot path: a POST body, or a GET path once base64-decoded, is looked up
before any ASN.1 parsing, so GET and POST of one request share the entry) and the request's
CertIDs (their DER, so a request spelled differently — signed, with a requestor name or
other extensions — still finds the response for the same CertIDs; the response echoes the
CertID DER, which is why the CertIDs' exact bytes, not their values, make the key).
Side indexes by (CA, serial) and by CA let a change-feed batch void exactly the entries it
touches. An entry is also dropped once it is half-way to its nextUpdate (RFC 5019 §6: the
responder re-signs well before clients would see it expire), so a status is never re-signed
per request and never served stale.

Threads: with a threaded store, misses are answered (and inserted) in store threads while
hits and the change feed stay on the reactor thread, so every operation holds one lock. The
cache also counts invalidations (``epoch``): a response is computed from reads made after
the epoch it started in was read, and ``put(..., epoch=)`` drops it when an invalidation
came in between — it may hold a status the change just voided (``good`` for a certificate
revoked meanwhile), so it must not outlive that change in the cache.

Views: the HTTP adapter's tables of hot requests (POST body or GET path -> answer) and the
listener's memo of whole reads do not copy answers; they hold a ``Ready``, which the cache
hands out for a live entry (``ResponseCache.ready``). ``Ready.serve`` holds the one liveness
check every view makes before it serves: no invalidation since it was handed out (the cache's
``epoch``), before its refresh time, and within the same Date second and ``max-age`` value
that its memo of encoded bytes (``Ready.views``) was made for; a dead ``Ready`` is dropped
and the request goes back to the cache. The epoch check is global on purpose: a view may
hold an entry the LRU evicted, which a later invalidation can no longer find by serial.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from store.model import CaId, Change

DEFAULT_MAX_ENTRIES = 100_000
_NEVER = datetime.min.replace(tzinfo=UTC)
_SECOND = timedelta(seconds=1)
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class CachedResponse:
    """A signed response and what the HTTP adapter and the log need to know of it."""

    der: bytes
    etag: str
    ca_id: CaId
    ca_name: str
    produced_at: datetime
    this_update: datetime
    next_update: datetime
    refresh_at: datetime  # drop (and so re-sign) from this moment on
    serials: frozenset[tuple[CaId, int]]
    summary: tuple[tuple[int, str], ...]  # (serial, status) per CertID, for the log
    # The request that produced it (empty: not re-signable ahead of time), so that the
    # service re-signs it when its certificate changes or before its refresh time.
    request: bytes = field(default=b"", compare=False, repr=False)
    # The pre-encoded parts of its ResponseData that a nonce request for the same CertIDs
    # reuses (``codec.response_data_der``): the responses SEQUENCE (empty: none kept) and
    # whether the extended-revoke extension goes with it. Only producedAt and the nonce
    # change, so such a request costs one signature.
    responses: bytes = field(default=b"", compare=False, repr=False)
    extended_revoke: bool = field(default=False, compare=False, repr=False)


def certids_key(cert_id_ders: Iterable[bytes]) -> bytes:
    """The cache key of a request by its CertIDs' DER (self-delimiting, so just joined)."""
    return b"C" + b"".join(cert_id_ders)


def raw_key(request_der: bytes) -> bytes:
    return b"R" + request_der


class Ready:
    """A live cache entry as a view holds it, with the view's memo of encoded answers.

    ``serve`` is what a view calls per request: the liveness check, then the memo
    (``views``: variant -> the adapter's reply, made by ``build`` the first time in a
    window), which is emptied whenever the Date second or the ``max-age`` value moves."""

    __slots__ = ("cache", "entry", "epoch", "clock", "date", "lo", "hi", "views", "fields",
                 "der", "build")

    def __init__(self, cache: ResponseCache, entry: CachedResponse, epoch: int,
                 clock: Any, der: bytes) -> None:
        self.cache = cache
        self.entry = entry
        self.epoch = epoch
        self.clock = clock  # the service's clock (tests move it)
        self.der = der  # the request it answers (a GET path's decoding, kept)
        self.date = b""
        self.lo = self.hi = _NEVER
        self.views: dict[Any, Any] = {}
        self.fields: Any = None  # the adapter's log fields of a hit
        # the adapter's reply of a variant: build(ready, variant, date), kept in views
        self.build: Any = None

    def serve(self, variant: Any, date: bytes, count: bool = True) -> Any:
        """The adapter's reply of variant at Date date while this answer is live (counted
        as a hit, unless it was counted already), else None: the one liveness check of
        every view (see the module docstring)."""
        if self.epoch != self.cache.epoch:
            return None
        now = self.clock()
        if date != self.date or not self.lo <= now < self.hi:
            entry = self.entry
            if now >= entry.refresh_at:
                return None
            self.views.clear()
            self.date = date
            # max-age = int(next_update - now) stays m on (next - m - 1, next - m]
            self.lo, self.hi = _NEVER, entry.refresh_at
            m = max(0, int((entry.next_update - now).total_seconds()))
            if m:
                self.lo = entry.next_update - (m + 1) * _SECOND + _TICK
                self.hi = min(self.hi, entry.next_update - m * _SECOND + _TICK)
        if count:
            self.cache.hits += 1
        reply = self.views.get(variant)
        if reply is None:
            reply = self.views[variant] = self.build(self, variant, date)
        return reply


class ResponseCache:
    """An LRU of pre-signed responses, indexed for invalidation by CA and serial."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, CachedResponse] = OrderedDict()
        self._by_serial: dict[tuple[CaId, int], set[bytes]] = {}
        self._by_ca: dict[CaId, set[bytes]] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.epoch = 0  # invalidations so far (see the module docstring)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    # The cache's own look-ups drop an entry at its refresh time (the same test as in
    # ``Ready.serve``): they hand entries out in the first place.

    def _take(self, key: bytes, now: datetime) -> CachedResponse | None:
        """The live entry under key, or None counted as a miss (the lock is held)."""
        entry = self._entries.get(key)
        if entry is not None and now >= entry.refresh_at:
            self._drop(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        return entry

    def get(self, key: bytes, now: datetime) -> CachedResponse | None:
        """The live entry under key, counting a hit or a miss."""
        with self._lock:
            entry = self._take(key, now)
            if entry is not None:
                self.hits += 1
            return entry

    def ready(self, key: bytes, now: datetime, clock: Any, der: bytes) -> Ready | None:
        """The live entry under key as a view's ``Ready`` (a miss is counted here, a hit by
        ``Ready.serve`` when it is served)."""
        with self._lock:
            entry = self._take(key, now)
            return None if entry is None else Ready(self, entry, self.epoch, clock, der)

    def peek(self, key: bytes, now: datetime) -> CachedResponse | None:
        """Like get, without counting (for the second key of one request)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or now >= entry.refresh_at:
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, keys: Sequence[bytes], entry: CachedResponse,
            epoch: int | None = None) -> bool:
        """Store entry under every key (evicting the least recently used beyond the bound);
        with ``epoch`` (read before the store reads), only if no invalidation came since."""
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                return False
            self._put(keys, entry)
            return True

    def _put(self, keys: Sequence[bytes], entry: CachedResponse) -> None:
        for key in keys:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = entry
            self._by_ca.setdefault(entry.ca_id, set()).add(key)
            for s in entry.serials:
                self._by_serial.setdefault(s, set()).add(key)
        while len(self._entries) > self.max_entries:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.evictions += 1

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        keys = self._by_ca.get(entry.ca_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_ca[entry.ca_id]
        for s in entry.serials:
            keys = self._by_serial.get(s)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_serial[s]

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._by_serial.clear()
        self._by_ca.clear()

    def due(self, until: datetime, limit: int) -> list[CachedResponse]:
        """Up to limit distinct live entries whose refresh time comes before until (the
        service re-signs them ahead of time, so hot responses never fall out)."""
        with self._lock:
            seen: dict[int, CachedResponse] = {}
            for entry in self._entries.values():
                if entry.refresh_at <= until and id(entry) not in seen:
                    seen[id(entry)] = entry
                    if len(seen) >= limit:
                        break
            return list(seen.values())

    def invalidate(self, changes: Sequence[Change],
                   voided: list[CachedResponse] | None = None) -> int:
        """Void what a change-feed batch touched; returns how many keys were dropped.
        ``voided`` collects the entries dropped for ``cert`` changes (one certificate's
        status moved: worth re-signing at once; a CRL or CA change drops many and they are
        re-signed when next asked for).

        ``cert``: that certificate's entries. ``crl``: every entry of that CA (a CRL may
        change many statuses at once). ``ca`` and ``all``: everything — a CA that appears or
        changes can turn other responses' ``unknown`` into a status, and CA changes are rare.
        """
        with self._lock:
            self.epoch += 1  # even when nothing was cached: a miss may be in flight
            before = len(self._entries)
            for change in changes:
                if change.kind == "cert" and change.serial is not None:
                    for key in list(self._by_serial.get((change.ca_id, int(change.serial)),
                                                        ())):
                        if voided is not None and key in self._entries:
                            voided.append(self._entries[key])
                        self._drop(key)
                elif change.kind in ("crl", "cert"):
                    for key in list(self._by_ca.get(change.ca_id, ())):
                        self._drop(key)
                else:
                    self._clear()
                    break
            return before - len(self._entries)
