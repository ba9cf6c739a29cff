"""The HTTP fast path: OCSP over plain HTTP/1.x answered below twisted.web.

Strategy: every HTTP connection starts with ``FastChannel``, a raw ``Protocol`` that parses
the request line and headers itself for the common OCSP requests — a POST with
``Content-Length`` at an OCSP path, a GET of ``<path>/<base64>`` — and answers them directly:
a cache hit from bytes pre-built once per cache entry (the full HTTP tail: Content-Type,
Content-Length, the RFC 5019 caching headers of a GET, the DER), anything else through
``OcspService`` and the same ``ocsp_reply`` the twisted.web resource uses. No request object,
no ASN.1 parsing of a request whose exact bytes (POST body, or the DER a GET path decodes to)
were answered before. The first request it does not handle (another path, HEAD, chunked,
``Expect``, ``Upgrade``, a query string, a duplicate or malformed header, an oversize body,
bare-LF line ends, HTTP/0.9, anything odd) and everything after it on that connection goes to
twisted.web: the fast path builds the site's ``HTTPChannel`` on the same transport and replays
the unanswered bytes into it. Answers are the ones twisted.web would send, header for header
(same ``Server``/``Date``, same persistence rules: HTTP/1.1 keep-alive unless
``Connection: close``, HTTP/1.0 only with ``Connection: keep-alive``), and each request writes
the same one log line and the same metrics as on the twisted.web path.

Pre-built bytes hang off the cache entry (``CachedResponse.extra``): when the change feed or
the refresh time drops the entry, its bytes go with it, so a changed status is never served
from here. The only state of the fast path itself is a bounded memo of GET path → request
DER, a pure function of the path.

With a threaded store a miss is answered in the store threads (``OcspService.miss`` returns a
Deferred): its answer takes a slot in the connection's queue of pending answers, and answers
computed meanwhile (hits of later pipelined requests) wait behind it, so replies leave in
request order; a handover to twisted.web, or the close a ``Connection: close`` asked for,
waits until that queue is empty; a lost connection drops the pending answers unwritten.
"""

from __future__ import annotations

import re
import time
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.server import version as SERVER_VERSION
from zope.interface import implementer

from server.ocsp import http as web
from server.ocsp.cache import CachedResponse
from server.ocsp.codec import MalformedRequest
from server.ocsp.service import OcspService

if TYPE_CHECKING:
    from server.ocsp.http import OcspSite

log = web.log  # the same logger (namespace server.ocsp.http) as the twisted.web path

MAX_HEAD = 16_384  # HTTPChannel's own header limit; longer heads go there
GET_MEMO_ENTRIES = 10_000
ABORT_TIMEOUT = 15.0  # like HTTPChannel: abort a connection that does not close after this
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HANDED = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"http2-settings"))
_KNOWN = frozenset((b"content-length", b"connection", b"if-none-match", b"if-modified-since"))
_SERVER_DATE = b"Server: " + SERVER_VERSION + b"\r\nDate: "
_STATUS = {(v, c): v + b" %d " % c + RESPONSES[c] + b"\r\n"
           for v in (b"HTTP/1.0", b"HTTP/1.1") for c in (200, 304, 500)}
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"

_date_cache: list[Any] = [-1, b""]


def _date() -> bytes:
    """The Date header value, formatted once per second (as twisted.web formats it)."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[1] = datetimeToString(now)
        _date_cache[0] = now
    return _date_cache[1]  # type: ignore[no-any-return]


class _Handover(Exception):
    """This request is for twisted.web."""


@implementer(IPushProducer)
class FastChannel(Protocol, TimeoutMixin):
    """One HTTP connection: fast OCSP answers until a request needs twisted.web."""

    _inner: Any = None
    _buf = b""
    _closing = False
    _abort: Any = None
    _deadline: Any = None  # a partial request must complete within idle_timeout (408)
    _client = "-"
    _pending: Any = None  # deque of [ready, bytes]: answers in request order (store threads)
    _handover_data: bytes | None = None  # for twisted.web once the pending answers are out
    _lost = False
    slot: Any = None  # the connection's place in site.limits (set by OcspSite.buildProtocol)
    transport: Any

    def __init__(self, site: OcspSite, addr: Any) -> None:
        self.site = site
        self.addr = addr
        self.timeOut = site.timeOut
        reactor = getattr(site, "reactor", None)
        if reactor is not None:
            self.callLater = reactor.callLater

    # --- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._client = getattr(self.transport.getPeer(), "host", "-")
        # A client that pipelines without reading its answers makes the transport pause us.
        self.transport.registerProducer(self, True)
        self.setTimeout(self.timeOut)

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    def timeoutConnection(self) -> None:
        self._closing = True
        self.transport.loseConnection()
        self._abort = self.callLater(ABORT_TIMEOUT, self.transport.abortConnection)

    def _too_slow(self) -> None:
        """Like _Channel: a request not complete within idle_timeout of its first byte."""
        self._deadline = None
        if self._inner is not None or self._closing:
            return
        self._closing = True
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
        log.info("http request", client=self._client, kind="ocsp", status=408, bytes=0,
                 reason="request not complete within idle_timeout")
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True  # answers still in the store threads are dropped
        self.setTimeout(None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        try:
            if self._inner is not None:
                self._inner.connectionLost(reason)
        finally:  # the slot stays with this outer protocol after a handover: released once
            if self.slot is not None:
                self.slot.release()

    def _handover(self, data: bytes) -> None:
        """From now on twisted.web serves this connection, starting with data."""
        self.setTimeout(None)
        if self._deadline is not None:  # twisted.web starts its own for this request
            self._deadline.cancel()
            self._deadline = None
        self._buf = b""
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.resumeProducing()
        inner = self.site.slow_channel(self.addr)
        self._inner = inner
        inner.makeConnection(transport)
        if data:
            inner.dataReceived(data)

    # --- requests --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._handover_data is not None:  # twisted.web's, once the pending answers are out
            self._handover_data += data
            return
        if self._closing:
            return
        self.resetTimeout()  # type: ignore[no-untyped-call]
        buf = self._buf + data if self._buf else data
        self._buf = b""
        out: list[bytes] = []
        pos, size = 0, len(buf)
        handover = -1
        while pos < size:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                rest = buf[pos:]
                if len(rest) > MAX_HEAD or rest.count(b"\n") != rest.count(b"\r\n"):
                    handover = pos
                else:
                    self._buf = rest
                break
            try:
                nxt = self._request(buf, pos, end, out)
            except _Handover:
                handover = pos
                break
            if nxt < 0:  # body incomplete
                self._buf = buf[pos:]
                break
            pos = nxt
            if self._closing:
                break
        if out:
            if self._pending:
                self._write(b"".join(out))
            else:
                self.transport.write(b"".join(out))
        if handover >= 0:
            if self._pending:
                self._handover_data = buf[handover:]
            else:
                self._handover(buf[handover:])
        elif self._closing:
            if not self._pending:
                self.transport.loseConnection()
        elif self._buf:
            if self._deadline is None and self.timeOut:
                self._deadline = self.callLater(self.timeOut, self._too_slow)
        elif self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request(self, buf: bytes, pos: int, end: int, out: list[bytes]) -> int:
        """Answer the request whose head is buf[pos:end]; the position after it, or -1."""
        head = buf[pos:end]
        if (end - pos > MAX_HEAD or head.count(b"\n") != head.count(b"\r\n")
                or head.count(b"\r") != head.count(b"\r\n") or b"\x00" in head):
            raise _Handover
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise _Handover
        method, path, version = parts
        if ((method != b"POST" and method != b"GET")
                or (version != b"HTTP/1.1" and version != b"HTTP/1.0")):
            raise _Handover
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or _TOKEN.fullmatch(name) is None:
                raise _Handover
            name = name.lower()
            if name in _KNOWN:
                if name in headers:
                    raise _Handover
                headers[name] = value.strip(b" \t")
            elif name in _HANDED:
                raise _Handover
        site = self.site
        resource = site.ocsp_resource
        if (path[:1] != b"/" or b"?" in path or path.startswith((b"/ca/", b"/crl/"))
                or (site.resource is not resource and not self._reaches_ocsp(path))):
            raise _Handover
        body_end = end + 4
        length = headers.get(b"content-length")
        if method == b"POST":
            if length is None or not length.isdigit():
                raise _Handover
            n = int(length)
            if n > site.max_request_bytes or path.decode("latin-1") not in resource.ocsp_paths:
                raise _Handover
            if body_end + n > len(buf):
                return -1
            der = buf[body_end:body_end + n]
            body_end += n
            get = False
        else:
            if length is not None or path == b"/":
                raise _Handover
            der = self._get_der(path, resource.ocsp_paths)
            get = True
        self._answer(method, version, headers, der, get, out)
        return body_end

    def _reaches_ocsp(self, path: bytes) -> bool:
        """Whether a root wrapping the OCSP resource (mount_ops) hands this path to it."""
        root = self.site.resource
        children = getattr(root, "children", None)
        if getattr(root, "inner", None) is not self.site.ocsp_resource or children is None:
            return False
        segment = path[1:].split(b"/", 1)[0]
        if b"%" in segment:
            segment = unquote_to_bytes(segment)
        return segment not in children

    def _get_der(self, path: bytes, ocsp_paths: tuple[str, ...]) -> bytes:
        memo = self.site.get_memo
        found = memo.get(path)
        if found is not None and found[0] is ocsp_paths:
            return found[1]  # type: ignore[no-any-return]
        for prefix in sorted(ocsp_paths, key=len, reverse=True):  # as OcspResource routes
            p = prefix.rstrip("/").encode() + b"/"
            if path.startswith(p) and len(path) > len(p) and (p != b"/" or path[1:2] == b"M"):
                try:
                    der = web.decode_get_path(path[len(p):])
                except MalformedRequest:
                    raise _Handover from None
                if len(memo) >= GET_MEMO_ENTRIES:
                    memo.clear()
                memo[path] = (ocsp_paths, der)
                return der
        raise _Handover  # 404 and friends

    def _answer(self, method: bytes, version: bytes, headers: dict[bytes, bytes], der: bytes,
                get: bool, out: list[bytes]) -> None:
        started = time.perf_counter()
        connection = headers.get(b"connection")
        if version == b"HTTP/1.1":
            if connection is not None and b"close" in connection.lower().split(b" "):
                conn, self._closing = _CLOSE, True  # HTTPChannel.checkPersistence
            else:
                conn = b""
        elif connection is not None and b"keep-alive" in {
                t.strip().lower() for t in connection.split(b",")}:
            conn = _KEEP_ALIVE  # _Channel.checkPersistence
        else:
            conn, self._closing = b"", True
        service: OcspService = self.site.service
        now = service.now()
        inm = headers.get(b"if-none-match")
        ims = headers.get(b"if-modified-since")
        entry = service.lookup(der, now)
        if entry is not None and inm is None and ims is None:
            extra = entry.extra
            fields = extra.get("log")
            if fields is None:
                fields = extra["log"] = {"kind": "ocsp", **web.reply_fields(
                    service._from_entry(entry, "hit"))}
            tail = self._get_tail(entry, now) if get else extra.get("post")
            if tail is None:
                tail = extra["post"] = (b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n"
                                        % (web.OCSP_RESPONSE, len(entry.der)) + entry.der)
            out.append(b"".join((_STATUS[version, 200], conn, _SERVER_DATE, _date(), b"\r\n",
                                 tail)))
            code, sent = 200, len(entry.der)
        else:
            try:
                outcome: Any = (service._from_entry(entry, "hit") if entry is not None
                                else service.miss(der, now))
            except Exception:  # noqa: BLE001 - a bug: logged with its traceback, answered 500
                outcome = Failure()  # type: ignore[no-untyped-call]
            if isinstance(outcome, Deferred):  # in the store threads: answered in its turn
                if out:
                    self._write(b"".join(out))
                    out.clear()
                if self._pending is None:
                    self._pending = deque()
                slot = [False, b""]
                self._pending.append(slot)
                outcome.addBoth(self._answered, slot, method, version, conn, get, now, inm,
                                ims, started)
                return
            fields, code, data, sent = self._reply(outcome, version, conn, get, now, inm, ims)
            out.append(data)
        seconds = time.perf_counter() - started
        log.info("http request", client=self._client, method=method.decode("latin-1"),
                 **fields, status=code, bytes=sent, duration=f"{seconds:.6f}")
        web._metrics(fields, seconds)

    def _reply(self, outcome: Any, version: bytes, conn: bytes, get: bool, now: datetime,
               inm: bytes | None, ims: bytes | None) -> tuple[dict[str, Any], int, bytes, int]:
        """(log fields, status, HTTP bytes, body size) of an answer built per request."""
        try:
            if isinstance(outcome, Failure):
                outcome.raiseException()
            fields = {"kind": "ocsp", **web.reply_fields(outcome)}
            code, hdrs, body = web.ocsp_reply(outcome, now if get else None, inm, ims)
        except Exception:  # noqa: BLE001 - a bug: logged with its traceback, answered 500
            log.failure("HTTP request failed")
            fields, code, hdrs, body = {"kind": "ocsp"}, 500, [], b""
        parts = [_STATUS[version, code], conn, _SERVER_DATE, _date(), b"\r\n"]
        for name, value in hdrs:
            parts += (name, b": ", value, b"\r\n")
        parts += (b"Content-Length: %d\r\n\r\n" % len(body), body)
        return fields, code, b"".join(parts), len(body)

    def _answered(self, outcome: Any, slot: list[Any], method: bytes, version: bytes,
                  conn: bytes, get: bool, now: datetime, inm: bytes | None, ims: bytes | None,
                  started: float) -> None:
        """A miss came back from the store threads: log it, then send what is now in turn."""
        fields, code, data, sent = self._reply(outcome, version, conn, get, now, inm, ims)
        seconds = time.perf_counter() - started
        log.info("http request", client=self._client, method=method.decode("latin-1"),
                 **fields, status=code, bytes=sent, duration=f"{seconds:.6f}")
        web._metrics(fields, seconds)
        slot[0], slot[1] = True, data
        self._drain()

    def _write(self, data: bytes) -> None:
        """Send data after the pending answers (at once when there are none)."""
        pending = self._pending
        if not pending:
            self.transport.write(data)
        elif pending[-1][0]:
            pending[-1][1] += data
        else:
            pending.append([True, data])

    def _drain(self) -> None:
        """Write the answers ready at the head of the queue; then a deferred handover/close."""
        pending = self._pending
        while pending and pending[0][0]:
            data = pending.popleft()[1]
            if data and not self._lost:
                self.transport.write(data)
        if pending or self._lost:
            return
        if self._handover_data is not None:
            data, self._handover_data = self._handover_data, None
            self._handover(data)
        elif self._closing:
            self.transport.loseConnection()

    @staticmethod
    def _get_tail(entry: CachedResponse, now: datetime) -> bytes:
        """Content-Type … Expires, Content-Length and the DER of a GET hit (per max-age)."""
        max_age = max(0, int((entry.next_update - now).total_seconds()))
        cached = entry.extra.get("get")
        if cached is not None and cached[0] == max_age:
            return cached[1]  # type: ignore[no-any-return]
        outcome = OcspService._from_entry(entry, "hit")
        parts = [b"Content-Type: ", web.OCSP_RESPONSE, b"\r\n"]
        for name, value in web.get_headers(outcome, now):
            parts += (name, b": ", value, b"\r\n")
        parts += (b"Content-Length: %d\r\n\r\n" % len(entry.der), entry.der)
        tail = b"".join(parts)
        entry.extra["get"] = (max_age, tail)
        return tail
