"""OCSP over HTTP (RFC 6960 appendix A, RFC 5019 §5-6): GET and POST at the OCSP paths.

Strategy: a request is identified by what it sends — a POST's raw body, a GET's path — and
a request seen before is answered from ``_Hot``: the complete HTTP response bytes of its
pre-signed response (status line, Connection, Date, Content-Type, the RFC 5019 caching
headers of a GET, Content-Length, the DER; a matching ``If-None-Match`` gets the 304
variant), built once per second (Date and ``max-age`` move each second) and per HTTP
version / persistence. So a hit is one dict lookup and one write, without ASN.1. A hot
answer is only served while it is live: until its refresh time, and while the response
cache has seen no change-feed invalidation since (``ResponseCache.epoch``); otherwise the
request goes back through ``OcspService.lookup``, which knows what is current. Everything
else (a first request, a nonce, a conditional GET with other validators, errors) is answered
through ``OcspService.respond_to`` — the one call that may need a signature and may return
a Deferred: it goes through the bounded, per-address fair signing queue
(``server.ocsp.signing``), which answers at once (``tryLater`` or a pre-signed response)
when that queue is full, so a flood of requests to sign never delays a hit.
A POST is parsed whatever its Content-Type: RFC 6960 A.1 asks for
``application/ocsp-request``, but some clients send none, and the bytes either decode as an
OCSPRequest or get ``malformedRequest`` anyway.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred

from server.http import wire
from server.ocsp import publish
from server.ocsp.cache import CachedResponse
from server.ocsp.codec import MalformedRequest, encode_error
from server.ocsp.service import OcspService, Outcome

OCSP_RESPONSE = b"application/ocsp-response"
RFC_STATUS = {"successful": "successful", "malformed_request": "malformedRequest",
              "internal_error": "internalError", "try_later": "tryLater",
              "sign_required": "sigRequired", "unauthorized": "unauthorized"}
# Requests remembered with their hot answer, per method: the response cache's bound
# (``http.cache_entries``); a full table is cleared (its entries stay in the cache).
GET_MEMO_ENTRIES = 10_000  # GET path -> request DER (a pure function of the path)
Reply = tuple[bytes, int, int, dict[str, Any]]


def decode_get_path(rest: bytes) -> bytes:
    """The DER request from the path after the OCSP prefix (percent-encoded base64)."""
    text = unquote_to_bytes(rest).strip()  # Java encodes / + = as %2F %2B %3D
    text = text.replace(b"-", b"+").replace(b"_", b"/")  # tolerate the URL-safe alphabet
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest("GET path is not base64") from None


_FIELDS_MEMO: dict[tuple[Any, ...], dict[str, Any]] = {}
FIELDS_MEMO_ENTRIES = 4096


def reply_fields(out: Outcome) -> dict[str, Any]:
    """The log fields of one OCSP exchange. Exchanges alike (nonce answers about one
    certificate, say) share one mapping, which the access log then encodes once per batch
    instead of once per line (log fields are never changed once made)."""
    key = (out.ca, out.serials, out.statuses, out.nonce, out.cache, out.status, out.reason,
           out.backoff)
    fields = _FIELDS_MEMO.get(key)
    if fields is None:
        if len(_FIELDS_MEMO) >= FIELDS_MEMO_ENTRIES:
            _FIELDS_MEMO.clear()
        fields = _FIELDS_MEMO[key] = _reply_fields(out)
    return fields


def _reply_fields(out: Outcome) -> dict[str, Any]:
    fields = {"kind": "ocsp", "ca": out.ca or "-",
              "serials": ",".join(format(s, "x") for s in out.serials) or "-",
              "statuses": ",".join(out.statuses) or "-",
              "nonce": "yes" if out.nonce else "no", "cache": out.cache,
              "ocsp": RFC_STATUS.get(out.status, out.status)}
    if out.reason:
        fields["reason"] = out.reason
    if out.backoff:
        fields["backoff"] = out.backoff  # the listener reads this connection later
    return fields


def _cacheable(out: Outcome) -> bool:
    return out.status == "successful" and out.etag is not None and out.next_update is not None


def get_headers(out: Outcome, now: datetime) -> list[tuple[bytes, bytes]]:
    """The RFC 5019 §6 caching headers of a successful GET answer (after Content-Type)."""
    assert out.next_update is not None and out.etag is not None
    max_age = max(0, int((out.next_update - now).total_seconds()))
    headers = [(b"Cache-Control", b"max-age=%d, public, no-transform, must-revalidate" % max_age),
               (b"ETag", out.etag.encode())]
    if out.this_update is not None:
        headers.append((b"Last-Modified", publish.http_date(out.this_update)))
    headers.append((b"Expires", publish.http_date(out.next_update)))
    return headers


def ocsp_reply(out: Outcome, get_now: datetime | None, if_none_match: bytes | None,
               if_modified_since: bytes | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(code, headers, body) of an OCSP answer; ``get_now`` is the time of a GET, else None."""
    headers = [(b"Content-Type", OCSP_RESPONSE)]
    if not _cacheable(out):
        headers.append((b"Cache-Control", b"no-store"))  # never cache unsigned errors
        return 200, headers, out.der
    if get_now is None:
        return 200, headers, out.der
    headers += get_headers(out, get_now)
    if not_modified(if_none_match, if_modified_since, out):
        return 304, headers, b""
    return 200, headers, out.der


def not_modified(if_none_match: bytes | None, if_modified_since: bytes | None,
                 out: Outcome) -> bool:
    """RFC 9110 §13.1.2 (If-None-Match, which wins) and §13.1.3 (If-Modified-Since)."""
    if if_none_match is not None:
        tags = {t.strip().removeprefix("W/") for t in if_none_match.decode("latin-1").split(",")}
        return "*" in tags or (out.etag or "") in tags
    if if_modified_since is not None and out.this_update is not None:
        try:
            since = parsedate_to_datetime(if_modified_since.decode("latin-1"))
        except (TypeError, ValueError):
            return False
        return since.tzinfo is not None and out.this_update.replace(microsecond=0) <= since
    return False


_NEVER = datetime.min.replace(tzinfo=UTC)
_SECOND = timedelta(seconds=1)


class _Hot:
    """A pre-signed response as complete HTTP bytes, per variant, for the current second.

    The variants hold while the Date is the same and the service's clock is inside
    ``[lo, hi)``: before the refresh time and, for a GET, while ``max-age`` (whole seconds
    to nextUpdate) keeps its value; so a hit compares, and does no date arithmetic."""

    __slots__ = ("entry", "epoch", "fields", "get", "date", "lo", "hi", "variants", "etag",
                 "size")

    def __init__(self, entry: CachedResponse, epoch: int, get: bool) -> None:
        self.entry = entry
        self.epoch = epoch
        self.get = get
        self.fields = reply_fields(OcspService.outcome(entry, "hit"))
        self.etag = entry.etag.encode()
        self.size = len(entry.der)
        self.date = b""
        self.lo = self.hi = _NEVER
        self.variants: dict[tuple[bytes, bool, bool], bytes] = {}

    def answer(self, service: OcspService, key: tuple[bytes, bool, bool], not_mod: bool,
               date: bytes) -> Reply | None:
        """The reply of variant key (version, keep-alive, no body) at date; None when this
        answer is no longer live (a change-feed invalidation, its refresh time)."""
        if self.epoch != service.cache.epoch:
            return None
        now = service.now()
        if date != self.date or not self.lo <= now < self.hi:
            entry = self.entry
            if now >= entry.refresh_at:
                return None
            self.variants.clear()
            self.date = date
            self.lo, self.hi = _NEVER, entry.refresh_at
            if self.get:  # max-age = int(next_update - now) stays m on (next - m - 1, next - m]
                m = max(0, int((entry.next_update - now).total_seconds()))
                if m:
                    self.lo = max(self.lo, entry.next_update - (m + 1) * _SECOND
                                  + timedelta(microseconds=1))
                    self.hi = min(self.hi, entry.next_update - m * _SECOND
                                  + timedelta(microseconds=1))
        service.cache.hits += 1
        data = self.variants.get(key)
        if data is None:
            data = self.variants[key] = self._bytes(key, not_mod, date, now)
        return data, 304 if not_mod else 200, 0 if key[2] else self.size, self.fields

    def _bytes(self, key: tuple[bytes, bool, bool], not_mod: bool, date: bytes,
               now: datetime) -> bytes:
        entry = self.entry
        headers = [(b"Content-Type", OCSP_RESPONSE)]
        if self.get:
            headers += get_headers(OcspService.outcome(entry, "hit"), now)
        return wire.response(304 if not_mod else 200, headers, entry.der, version=key[0],
                             keep_alive=key[1], date=date, head=key[2])


class OcspRoute:
    """Answers OCSP GETs and POSTs; pre-signed answers straight from bytes."""

    def __init__(self, service: OcspService, paths: tuple[str, ...]) -> None:
        self.service = service
        self.set_paths(paths)
        self._post_hot: dict[bytes, _Hot] = {}
        self._get_hot: dict[bytes, _Hot] = {}
        self._get_memo: dict[bytes, bytes] = {}

    def set_paths(self, paths: tuple[str, ...]) -> None:
        """The OCSP paths (a reload may change them)."""
        self.paths = paths
        self.post_paths = frozenset(p.encode("latin-1") for p in paths)
        # "/ocsp/x" before "/x"; under "/" only what looks like base64 DER (a SEQUENCE
        # encodes as "M...") is OCSP, so /favicon.ico and friends get 404, not malformedRequest
        self.get_prefixes = tuple(sorted((p.rstrip("/").encode("latin-1") + b"/" for p in paths),
                                         key=len, reverse=True))
        self._get_hot = {}
        self._get_memo = {}

    def forget(self) -> None:
        """Drop every hot answer (a reload: new signers)."""
        self._post_hot = {}
        self._get_hot = {}

    def is_get(self, path: bytes) -> bool:
        """Whether a GET of path is an OCSP request."""
        for p in self.get_prefixes:
            if path.startswith(p) and len(path) > len(p) and (p != b"/" or path[1:2] == b"M"):
                return True
        return False

    # --- requests -----------------------------------------------------------------------

    def post(self, request: wire.Request, date: bytes,
             client: str = "-") -> Reply | Deferred[Reply]:
        hot = self._post_hot.get(request.body)
        if hot is not None:
            reply = self._hot_reply(hot, request, date)
            if reply is not None:
                return reply
        return self._answer(request, request.body, date, client, get=False)

    def get(self, request: wire.Request, date: bytes,
            client: str = "-") -> Reply | Deferred[Reply]:
        """GET (or HEAD) of ``prefix/<base64 DER>``; ``is_get(path)`` is true."""
        hot = self._get_hot.get(request.path)
        if hot is not None:
            reply = self._hot_reply(hot, request, date)
            if reply is not None:
                return reply
        der = self._get_memo.get(request.path)
        if der is None:
            try:
                der = self._get_der(request.path)
            except MalformedRequest as exc:
                out = Outcome(encode_error("malformed_request"), "malformed_request", "-",
                              reason=str(exc))
                return self._reply(out, request, date, None)
        return self._answer(request, der, date, client, get=True)

    def _get_der(self, path: bytes) -> bytes:
        for p in self.get_prefixes:
            if path.startswith(p) and len(path) > len(p) and (p != b"/" or path[1:2] == b"M"):
                der = decode_get_path(path[len(p):])
                memo = self._get_memo
                if len(memo) >= GET_MEMO_ENTRIES:
                    memo.clear()
                memo[path] = der
                return der
        raise MalformedRequest("not an OCSP path")  # is_get said it was: a bug

    @staticmethod
    def _variant(hot: _Hot, request: wire.Request) -> tuple[tuple[bytes, bool, bool], bool] | None:
        """(variant key, 304?) of the hot answer to request; None when the request carries
        validators only the general path decides."""
        headers = request.headers
        not_mod = False
        if hot.get and (b"if-none-match" in headers or b"if-modified-since" in headers):
            if headers.get(b"if-none-match") != hot.etag:
                return None  # other validators: answered the general way
            not_mod = True  # (a POST is never answered 304)
        return (request.version, request.keep_alive, request.method == b"HEAD" or not_mod), not_mod

    def _hot_reply(self, hot: _Hot, request: wire.Request, date: bytes) -> Reply | None:
        """The hot answer to request, or None when it is no longer live (or not for it)."""
        variant = self._variant(hot, request)
        if variant is None:
            return None
        return hot.answer(self.service, variant[0], variant[1], date)

    def replay(self, request: wire.Request) -> Callable[[bytes], Reply | None] | None:
        """How to answer the same request again from its hot answer (the listener's memo of
        whole requests), or None when it has none."""
        if request.method == b"POST":
            hot = self._post_hot.get(request.body)
        else:
            hot = self._get_hot.get(request.path)
        if hot is None:
            return None
        variant = self._variant(hot, request)
        if variant is None:
            return None
        return partial(hot.answer, self.service, variant[0], variant[1])

    def _answer(self, request: wire.Request, der: bytes, date: bytes, client: str, *,
                get: bool) -> Reply | Deferred[Reply]:
        service = self.service
        now = service.now()
        entry = service.lookup(der, now)
        if entry is not None:
            hot = _Hot(entry, service.cache.epoch, get)
            table = self._get_hot if get else self._post_hot
            if len(table) >= service.cache.max_entries:
                table.clear()
            table[request.path if get else der] = hot
            reply = self._hot_reply(hot, request, date)
            if reply is not None:
                service.cache.hits -= 1  # lookup counted this hit already
                return reply
            return self._reply(service.outcome(entry, "hit"), request, date,
                               now if get else None)
        outcome = service.respond_to(der, now, client)
        if isinstance(outcome, Deferred):
            return outcome.addCallback(self._reply, request, date, now if get else None)
        return self._reply(outcome, request, date, now if get else None)

    @staticmethod
    def _reply(out: Outcome, request: wire.Request, date: bytes,
               get_now: datetime | None) -> Reply:
        headers = request.headers
        code, hdrs, body = ocsp_reply(out, get_now if get_now is not None and _cacheable(out)
                                      else None, headers.get(b"if-none-match"),
                                      headers.get(b"if-modified-since"))
        data = wire.response(code, hdrs, body, version=request.version,
                             keep_alive=request.keep_alive, date=date,
                             head=request.method == b"HEAD")
        return data, code, len(body), reply_fields(out)
