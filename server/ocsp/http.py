"""The HTTP listener: OCSP over POST and GET (RFC 6960 appendix A, RFC 5019 §5-6), /ca, /crl.

Strategy: common OCSP requests are answered below twisted.web by ``server.ocsp.fast``,
which hands every other request to this module's twisted.web site. Here, a ``twisted.web`` Site whose root is one leaf resource that routes on the raw
path (so a base64 request containing ``/`` stays whole) and hands bytes to ``OcspService``.
Every answer is rendered as bytes, so twisted.web always sends ``Content-Length`` and never
chunks. The channel adds what twisted.web lacks: HTTP/1.0 keep-alive (on request), and a
body limit answered with 413 as soon as the headers announce too much — or the chunked body
passes the limit — without reading the rest. A POST is parsed whatever its Content-Type:
RFC 6960 A.1 asks for ``application/ocsp-request``, but some clients send none, and the
bytes either decode as an OCSPRequest or get ``malformedRequest`` anyway. With a threaded
store (``access``) a miss or a CRL read runs in the store threads: the resource answers
``NOT_DONE_YET`` and writes the bytes (with their ``Content-Length``) when they are ready.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from server.limits import ConnectionLimits, Slot, peer_host
from server.ocsp import publish
from server.ocsp.codec import MalformedRequest, encode_error
from server.ocsp.config import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS
from server.ocsp.service import OcspService, Outcome
from store.sqlite import StoreError

log = Logger()

OCSP_RESPONSE = b"application/ocsp-response"
RFC_STATUS = {"successful": "successful", "malformed_request": "malformedRequest",
              "internal_error": "internalError", "try_later": "tryLater",
              "sign_required": "sigRequired", "unauthorized": "unauthorized"}


def decode_get_path(rest: bytes) -> bytes:
    """The DER request from the path after the OCSP prefix (percent-encoded base64)."""
    text = unquote_to_bytes(rest).strip()  # Java encodes / + = as %2F %2B %3D
    text = text.replace(b"-", b"+").replace(b"_", b"/")  # tolerate the URL-safe alphabet
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest("GET path is not base64") from None


class _Request(Request):
    """Counts the body of a chunked upload against the limit."""

    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        channel: _Channel = self.channel  # type: ignore[assignment]
        if self._received > channel.site.max_request_bytes:
            channel.refuse_too_large()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]


class _Channel(HTTPChannel):
    """HTTPChannel with HTTP/1.0 keep-alive and a request body limit (413)."""

    site: OcspSite
    _refused = False
    slot: Slot | None = None  # set by OcspSite.buildProtocol, unless the fast path owns it

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if version == b"HTTP/1.0":
            header = request.requestHeaders.getRawHeaders(b"Connection") or [b""]
            tokens = {t.strip().lower() for t in header[0].split(b",")}
            if b"keep-alive" in tokens:  # every answer carries Content-Length, so we can
                request.responseHeaders.setRawHeaders(b"Connection", [b"keep-alive"])
                return True
        return bool(super().checkPersistence(request, version))  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.site.max_request_bytes:
            self.refuse_too_large()
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def refuse_too_large(self) -> None:
        if self._refused:
            return
        self._refused = True
        body = b"request body too large\n"
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        log.info("http request", client=getattr(transport.getPeer(), "host", "-"), kind="ocsp",
                 status=413, bytes=len(body), reason="body over max_request_bytes")
        transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            if self._deadline is None and self.timeOut:  # a request's first bytes
                self._deadline = self.callLater(self.timeOut, self._refuse_too_slow)
            super().dataReceived(data)  # type: ignore[no-untyped-call]

    # The idle timeout restarts with every byte, so a client dribbling headers or a body
    # (slowloris) would hold the connection forever: a whole request must also arrive
    # within idle_timeout of its first byte, else 408 and close.
    _deadline: Any = None

    def allContentReceived(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def _refuse_too_slow(self) -> None:
        self._deadline = None
        if self._refused:
            return
        self._refused = True
        transport: Any = self.transport
        transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
        log.info("http request", client=getattr(transport.getPeer(), "host", "-"), kind="ocsp",
                 status=408, bytes=0, reason="request not complete within idle_timeout")
        transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        try:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
        finally:
            if self.slot is not None:
                self.slot.release()


class OcspResource(Resource):
    """The whole site as one leaf: routing on the raw path, OCSP and publication."""

    isLeaf = True

    def __init__(self, service: OcspService, store: Any, ocsp_paths: tuple[str, ...],
                 now: Callable[[], datetime], access: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.service = service
        # a threaded StoreAccess: store reads (OCSP misses, CRLs) run in its pool, and the
        # answer is written when they are done (NOT_DONE_YET)
        self.access = access if access is not None and not access.inline else None
        self.store = access.store if self.access is not None else store
        self.now = now
        self.ocsp_paths = ocsp_paths

    def render(self, request: Any) -> bytes | int:
        started = time.perf_counter()
        fields: dict[str, Any] = {"kind": "ocsp"}
        try:
            body = self._route(request, fields)
        except Exception:  # noqa: BLE001 - a bug: logged with its traceback, answered 500
            body = _failed(request, Failure())  # type: ignore[no-untyped-call]
        if isinstance(body, Deferred):
            return self._later(request, body, fields, started)
        return self._done(request, body, fields, started)

    def _later(self, request: Any, pending: Deferred[bytes], fields: dict[str, Any],
               started: float) -> int:
        """Finish request when its store work is done (unless the client left meanwhile)."""
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def finish(body: bytes | Failure) -> None:
            if isinstance(body, Failure):
                body = _failed(request, body)
            body = self._done(request, body, fields, started)
            if gone:
                return
            # twisted.web sets Content-Length only for bodies returned by render: never chunk
            request.setHeader(b"Content-Length", b"%d" % len(body))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        pending.addBoth(finish)
        return NOT_DONE_YET

    def _done(self, request: Any, body: bytes, fields: dict[str, Any], started: float) -> bytes:
        peer = request.getClientAddress()
        seconds = time.perf_counter() - started
        log.info("http request", client=getattr(peer, "host", "-"),
                 method=request.method.decode("latin-1"), **fields, status=request.code,
                 bytes=len(body), duration=f"{seconds:.6f}")
        _metrics(fields, seconds)
        return body

    def _route(self, request: Any, fields: dict[str, Any]) -> bytes | Deferred[bytes]:
        method, path = request.method, request.path
        if path.startswith((b"/ca/", b"/crl/")):
            fields["kind"] = "ca" if path.startswith(b"/ca/") else "crl"
            if method not in (b"GET", b"HEAD"):
                return _not_allowed(request, b"GET, HEAD")
            return self._publication(request, path, fields)
        if method == b"POST":
            if path.decode("latin-1") not in self.ocsp_paths:
                return _send(request, publish.not_found())
            return self._ocsp(request, request.content.read(), fields)
        if method not in (b"GET", b"HEAD"):
            return _not_allowed(request, b"GET, HEAD, POST")
        if path == b"/":
            fields["kind"] = "index"
            return _then(self._records(), lambda records: _send(request, publish.index_page(
                list(self.service.published.values()), records, self.ocsp_paths)))
        for prefix in sorted(self.ocsp_paths, key=len, reverse=True):  # "/ocsp/x" before "/x"
            p = prefix.rstrip("/").encode() + b"/"
            # Under "/" only what looks like base64 DER (a SEQUENCE encodes as "M...") is
            # OCSP, so /favicon.ico and friends get 404 instead of malformedRequest.
            if path.startswith(p) and len(path) > len(p) and (p != b"/" or path[1:2] == b"M"):
                try:
                    der = decode_get_path(path[len(p):])
                except MalformedRequest:
                    return self._reply(request, Outcome(encode_error("malformed_request"),
                                                        "malformed_request", "-"), fields)
                return self._ocsp(request, der, fields, get=True)
        return _send(request, publish.not_found())

    def _records(self) -> dict[str, Any] | Deferred[dict[str, Any]]:
        if self.access is not None:
            if self.access.busy():
                return {}
            records: Deferred[dict[str, Any]] = self.access.run(self._read_records)
            return records
        return self._read_records()

    def _read_records(self) -> dict[str, Any]:
        try:
            return {name: self.store.ca_by_name(name) for name in self.service.published}
        except StoreError:
            return {}

    def _ca_record(self, name: str) -> Any:
        """The CA's store record (or Deferred of it); StoreError when unreadable."""
        if self.access is None:
            return self.store.ca_by_name(name)
        if self.access.busy():
            raise StoreError("store threads busy")
        return self.access.run(self.store.ca_by_name, name)

    def _publication(self, request: Any, path: bytes,
                     fields: dict[str, Any]) -> bytes | Deferred[bytes]:
        name, _, ext = path.rsplit(b"/", 1)[-1].decode("latin-1").rpartition(".")
        fields["ca"] = name or "-"
        ca = self.service.published.get(name)
        if ca is None:
            return _send(request, publish.not_found())
        if fields["kind"] == "ca" and ext in ("crt", "pem"):
            return _send(request, publish.ca_certificate(ca, pem=ext == "pem"))
        if fields["kind"] == "crl" and ext == "crl":
            def unavailable(failure: Failure) -> bytes:
                failure.trap(StoreError)  # type: ignore[no-untyped-call]
                return _send(request, (503, [(b"Retry-After", b"10")], b"store unavailable\n"))

            try:
                record = self._ca_record(name)
            except StoreError:
                return unavailable(Failure())  # type: ignore[no-untyped-call]
            if isinstance(record, Deferred):
                return record.addCallbacks(lambda r: _send(request, publish.crl(r)), unavailable)
            return _send(request, publish.crl(record))
        return _send(request, publish.not_found())

    def _ocsp(self, request: Any, der: bytes, fields: dict[str, Any], *,
              get: bool = False) -> bytes | Deferred[bytes]:
        return _then(self.service.respond_later(der),
                     lambda out: self._reply(request, out, fields, get=get))

    def _reply(self, request: Any, out: Outcome, fields: dict[str, Any], *,
               get: bool = False) -> bytes:
        fields.update(reply_fields(out))
        code, headers, body = ocsp_reply(
            out, self.now() if get and _cacheable(out) else None,
            request.getHeader(b"If-None-Match"), request.getHeader(b"If-Modified-Since"))
        if code != 200:
            request.setResponseCode(code)
        for name, value in headers:
            request.setHeader(name, value)
        return body


def _then(value: Any, then: Callable[[Any], bytes]) -> bytes | Deferred[bytes]:
    """then(value), or then chained on value when it is a Deferred (store threads)."""
    if isinstance(value, Deferred):
        chained: Deferred[bytes] = value.addCallback(then)
        return chained
    return then(value)


def _failed(request: Any, failure: Failure) -> bytes:
    """A bug: logged with its traceback, answered 500 with an empty body."""
    log.failure("HTTP request failed", failure)
    request.setResponseCode(500)
    return b""


def reply_fields(out: Outcome) -> dict[str, Any]:
    """The log fields of one OCSP exchange (after ``kind``)."""
    fields = {"ca": out.ca or "-",
              "serials": ",".join(format(s, "x") for s in out.serials) or "-",
              "statuses": ",".join(out.statuses) or "-",
              "nonce": "yes" if out.nonce else "no", "cache": out.cache,
              "ocsp": RFC_STATUS.get(out.status, out.status)}
    if out.reason:
        fields["reason"] = out.reason
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
    """(code, headers, body) of an OCSP answer; ``get_now`` is the time of a GET, else None.

    Shared by the twisted.web resource and the fast path, so both answer alike."""
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


def _if_none_match(request: Any) -> set[str] | None:
    raw = request.getHeader(b"If-None-Match")
    if raw is None:
        return None
    return {t.strip().removeprefix("W/") for t in raw.decode("latin-1").split(",")}


def _send(request: Any, reply: publish.Reply) -> bytes:
    code, headers, body = reply
    request.setResponseCode(code)
    for name, value in headers:
        request.setHeader(name, value)
    if code == 200 and request.method in (b"GET", b"HEAD"):
        etag = dict(headers).get(b"ETag")
        tags = _if_none_match(request)
        if etag is not None and tags is not None and (etag.decode() in tags or "*" in tags):
            request.setResponseCode(304)
            return b""
    return body


def _not_allowed(request: Any, allow: bytes) -> bytes:
    request.setResponseCode(405)
    request.setHeader(b"Allow", allow)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b"method not allowed\n"


def _metrics(fields: dict[str, Any], seconds: float) -> None:
    try:
        from server.metrics import get_metrics

        m = get_metrics()
        if fields.get("kind") == "ocsp" and "ocsp" in fields:
            m.request("ocsp", "status", fields["ocsp"], seconds)
            if fields.get("cache") in ("hit", "miss"):
                m.cache(fields["cache"] == "hit")
        else:
            m.request("http", str(fields.get("kind")), "done", seconds)
    except Exception:  # noqa: BLE001 - metrics never break a request
        log.failure("metrics update failed")


class OcspSite(Site):
    """The HTTP site; ``service`` is what the composition root reloads."""

    def __init__(self, resource: OcspResource, service: OcspService, max_request_bytes: int,
                 idle_timeout: float, reactor: IReactorTime | None = None,
                 limits: ConnectionLimits | None = None) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            resource, timeout=idle_timeout, reactor=reactor)
        self.service = service
        self.ocsp_resource = resource  # stays reachable if the root wraps it (mount_ops)
        self.max_request_bytes = max_request_bytes
        self.requestFactory = _Request
        self.displayTracebacks = False
        self.noisy = False
        self._clock = reactor
        self._expiry_check: LoopingCall | None = None
        self._refresh: LoopingCall | None = None
        self.fast_path = True  # False: every connection goes to twisted.web
        self.get_memo: dict[bytes, tuple[tuple[str, ...], bytes]] = {}  # see server.ocsp.fast
        self.limits = limits or ConnectionLimits(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS,
                                                 service="http", log=log)

    def protocol(self) -> _Channel:  # type: ignore[override]
        return _Channel()  # type: ignore[no-untyped-call]

    def buildProtocol(self, addr: Any) -> Any:
        """The fast path (server.ocsp.fast), which hands odd requests to twisted.web; None
        (the connection is closed at once) over the connection limits."""
        slot = self.limits.slot(peer_host(addr))
        if slot is None:
            return None
        channel: Any
        if not self.fast_path:
            channel = self.slow_channel(addr)
        else:
            from server.ocsp.fast import FastChannel

            channel = FastChannel(self, addr)
        channel.slot = slot  # released once, by whichever protocol owns the connection
        return channel

    def slow_channel(self, addr: Any) -> _Channel:
        """The twisted.web channel of this site."""
        return super().buildProtocol(addr)  # type: ignore[no-any-return]

    def log(self, request: Any) -> None:
        pass  # OcspResource writes the one line per request

    def startFactory(self) -> None:
        super().startFactory()
        if self._expiry_check is None and self._clock is not None:
            # The 30-day signer warning, logged at start and then daily.
            self._expiry_check = LoopingCall(self.service.warn_expiring)
            self._expiry_check.clock = self._clock
            self._expiry_check.start(86400, now=False)
        if self._refresh is None and self._clock is not None:
            # Cached responses near their refresh time are re-signed before they drop out.
            from server.ocsp.service import REFRESH_EVERY

            self._refresh = LoopingCall(self.service.refresh_due)
            self._refresh.clock = self._clock
            self._refresh.start(REFRESH_EVERY, now=False)

    def stopFactory(self) -> None:
        if self._expiry_check is not None and self._expiry_check.running:
            self._expiry_check.stop()
        self._expiry_check = None
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        self._refresh = None
        super().stopFactory()

    def reload(self, config: Any) -> None:
        """SIGHUP: new signers and CA files; raises (keeping the old ones) when bad."""
        self.service.reload(config)
        self.max_request_bytes = config.http.max_request_bytes
        self.ocsp_resource.ocsp_paths = config.http.ocsp_paths
        self.limits.set_limits(config.http.max_connections,
                               config.http.max_connections_per_address)


def make_http_factory(config: Any, store: Any, feed: Any, clock_now: Callable[[], datetime],
                      reactor: Any, access: Any = None) -> OcspSite:
    """The HTTP listener's factory; raises SignerError when a signer is unusable. ``access``
    (a threaded StoreAccess) runs its store reads in the store threads."""
    service = OcspService(config, store, clock_now, access=access)
    service.warn_expiring()
    if feed is not None:
        feed.subscribe(service.on_changes)
    resource = OcspResource(service, store, config.http.ocsp_paths, clock_now, access)
    limits = ConnectionLimits(config.http.max_connections, config.http.max_connections_per_address,
                              service="http", log=log)
    site = OcspSite(resource, service, config.http.max_request_bytes,
                    getattr(config.http, "idle_timeout", 30.0), reactor, limits)
    return site
