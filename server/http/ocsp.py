"""OCSP over HTTP (RFC 6960 appendix A, RFC 5019 §5-6): GET and POST at the OCSP paths.

Strategy: every request goes to ``OcspService.answer`` (DER and ``now`` in, an outcome out,
or a Deferred of one when it needs a signature: the signing queue, ``server.ocsp.signing``,
which answers at once — ``tryLater`` or a pre-signed response — when it is full, so a flood
of requests to sign never delays a hit). A hit by raw bytes comes with the cache's
``Ready`` of it, which this route keeps in a table of hot requests per method (a POST's
raw body, a GET's path): views of the one cache of ready answers (``server.ocsp.cache``).
The next time, the request is answered from the view — the complete HTTP response bytes
(status line, Connection, Date, Content-Type, the RFC 5019 caching headers of a GET,
Content-Length, the DER; a matching ``If-None-Match`` gets the 304 variant), kept per HTTP
version / persistence in ``Ready.views`` — by ``Ready.serve``, once it found the answer live
(no change-feed invalidation since, before its refresh time, same Date second and max-age);
so a hit is one dict lookup, that check and one write, without ASN.1. A dead view sends the
request back to ``OcspService.answer``, which knows what is current.
A POST is parsed whatever its Content-Type: RFC 6960 A.1 asks for
``application/ocsp-request``, but some clients send none, and the bytes either decode as an
OCSPRequest or get ``malformedRequest`` anyway.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred

from server.http import wire
from server.http.listener import Reply
from server.ocsp import publish
from server.ocsp.cache import Ready
from server.ocsp.codec import MalformedRequest
from server.ocsp.service import OcspService, Outcome

OCSP_RESPONSE = b"application/ocsp-response"
RFC_STATUS = {"successful": "successful", "malformed_request": "malformedRequest",
              "internal_error": "internalError", "try_later": "tryLater",
              "sign_required": "sigRequired", "unauthorized": "unauthorized"}
# Requests remembered with their hot answer, per method: the response cache's bound
# (``http.cache_entries``); a full table is cleared (its entries stay in the cache).


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


Variant = tuple[bytes, bool, bool, bool]  # (HTTP version, keep-alive, no body, 304)


def _build_post(ready: Ready, key: Variant, date: bytes) -> Reply:
    """A view's reply to a POST of variant key at date (``Ready.build``)."""
    return _build(ready, key, date, None)


def _build_get(ready: Ready, key: Variant, date: bytes) -> Reply:
    """A view's reply to a GET or HEAD of variant key at date, with the caching headers."""
    return _build(ready, key, date, ready.clock())


def _build(ready: Ready, key: Variant, date: bytes, get_now: datetime | None) -> Reply:
    entry = ready.entry
    headers = [(b"Content-Type", OCSP_RESPONSE)]
    if get_now is not None:
        headers += get_headers(OcspService.outcome(entry, "hit"), get_now)
    not_mod = key[3]
    data = wire.response(304 if not_mod else 200, headers, entry.der, version=key[0],
                         keep_alive=key[1], date=date, head=key[2])
    return data, 304 if not_mod else 200, 0 if key[2] else len(entry.der), ready.fields


class OcspRoute:
    """Answers OCSP GETs and POSTs; pre-signed answers straight from the cache's views."""

    def __init__(self, service: OcspService, paths: tuple[str, ...]) -> None:
        self.service = service
        self.set_paths(paths)
        self._post_hot: dict[bytes, Ready] = {}  # POST body -> view
        self._get_hot: dict[bytes, Ready] = {}  # GET path -> view

    def set_paths(self, paths: tuple[str, ...]) -> None:
        """The OCSP paths (a reload may change them)."""
        self.paths = paths
        self.post_paths = frozenset(p.encode("latin-1") for p in paths)
        # "/ocsp/x" before "/x"; under "/" only what looks like base64 DER (a SEQUENCE
        # encodes as "M...") is OCSP, so /favicon.ico and friends get 404, not malformedRequest
        self.get_prefixes = tuple(sorted((p.rstrip("/").encode("latin-1") + b"/" for p in paths),
                                         key=len, reverse=True))
        self._get_hot = {}

    def forget(self) -> None:
        """Drop every view (a reload: new signers)."""
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
        ready = self._post_hot.get(request.body)
        if ready is not None:
            reply = self._hot_reply(ready, request, date)
            if reply is not None:
                return reply
        return self._answer(request, request.body, date, client, get=False)

    def get(self, request: wire.Request, date: bytes,
            client: str = "-") -> Reply | Deferred[Reply]:
        """GET (or HEAD) of ``prefix/<base64 DER>``; ``is_get(path)`` is true."""
        ready = self._get_hot.get(request.path)
        if ready is not None:
            reply = self._hot_reply(ready, request, date)
            if reply is not None:
                return reply
            der = ready.der  # the path's decoding, kept by the view
        else:
            try:
                der = self._get_der(request.path)
            except MalformedRequest as exc:
                return self._reply(Outcome.error(exc), request, date, None)
        return self._answer(request, der, date, client, get=True)

    def _get_der(self, path: bytes) -> bytes:
        for p in self.get_prefixes:
            if path.startswith(p) and len(path) > len(p) and (p != b"/" or path[1:2] == b"M"):
                return decode_get_path(path[len(p):])
        raise MalformedRequest("not an OCSP path")  # is_get said it was: a bug

    @staticmethod
    def _variant(ready: Ready, request: wire.Request) -> Variant | None:
        """The variant of the view's answer to request; None when the request carries
        validators only the general path decides."""
        headers = request.headers
        not_mod = False
        if ready.build is _build_get and (b"if-none-match" in headers
                                          or b"if-modified-since" in headers):
            if headers.get(b"if-none-match") != ready.entry.etag.encode():
                return None  # other validators: answered the general way
            not_mod = True  # (a POST is never answered 304)
        return (request.version, request.keep_alive, request.method == b"HEAD" or not_mod,
                not_mod)

    def _hot_reply(self, ready: Ready, request: wire.Request, date: bytes) -> Reply | None:
        """The view's answer to request, or None when it is no longer live (or not for it)."""
        variant = self._variant(ready, request)
        if variant is None:
            return None
        return ready.serve(variant, date)  # type: ignore[no-any-return]

    def replay(self, request: wire.Request) -> Callable[[bytes], Reply | None] | None:
        """How to answer the same request again from its view (the listener's memo of
        whole requests: a view of the same ``Ready``), or None when it has none."""
        if request.method == b"POST":
            ready = self._post_hot.get(request.body)
        else:
            ready = self._get_hot.get(request.path)
        if ready is None:
            return None
        variant = self._variant(ready, request)
        if variant is None:
            return None
        return partial(ready.serve, variant)

    def _answer(self, request: wire.Request, der: bytes, date: bytes, client: str, *,
                get: bool) -> Reply | Deferred[Reply]:
        service = self.service
        now = service.now()
        out = service.answer(der, now, client)
        if type(out) is not Outcome:
            return out.addCallback(self._reply, request, date,  # type: ignore[no-any-return]
                                   now if get else None)
        ready = out.ready
        if ready is not None:  # a hit by raw bytes: keep its view
            ready.fields = reply_fields(out)
            ready.build = _build_get if get else _build_post
            table = self._get_hot if get else self._post_hot
            if len(table) >= service.cache.max_entries:
                table.clear()
            table[request.path if get else der] = ready
            variant = self._variant(ready, request)
            if variant is not None:
                reply = ready.serve(variant, date, False)  # answer() counted this hit
                if reply is not None:
                    return reply  # type: ignore[no-any-return]
        return self._reply(out, request, date, now if get else None)

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
