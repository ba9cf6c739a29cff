"""The HTTP listener: one thin Twisted protocol over ``server.http.wire``.

Strategy: ``HttpChannel`` feeds the bytes it receives to a ``wire.Connection`` and hands each
request to the site (``server.http.site.HttpSite.handle``), which returns a reply at once —
a cache hit is its pre-built bytes — or a Deferred (store threads, signing). Replies leave in
request order: a Deferred takes a slot in the connection's queue and what is answered after
it waits behind it. What is decided here, once: connection limits (the factory asks
``ConnectionLimits`` in ``buildProtocol``; the slot is released once when the connection is
lost), the idle timeout (no byte for ``idle_timeout``: close), the slow-client deadline (a
request not complete within ``idle_timeout`` of its first byte: 408 and close), closing after
a reply that ends the connection or a refusal, back-pressure (the transport pauses reading
while a client does not read its answers, and reading pauses while ``MAX_PENDING`` answers
are still being computed), and the access log (one record per request, ``accesslog``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from zope.interface import implementer

from server.http import wire
from server.http.accesslog import AccessLog
from server.limits import ConnectionLimits, peer_host

log = Logger(namespace="server.http")

ABORT_TIMEOUT = 15.0  # a connection that does not close this long after we closed it: aborted
MAX_PENDING = 32  # answers in computation per connection before reading pauses

# What a route returns: the complete response bytes, the status, the body size, the log fields.
Reply = tuple[bytes, int, int, dict[str, Any]]


class Handler(TypingProtocol):
    def handle(self, request: wire.Request, date: bytes,
               client: str = "-") -> Reply | Deferred[Reply]: ...


_date_memo: list[Any] = [-1, b""]


def http_date() -> bytes:
    """The Date header value (RFC 9110 §6.6.1), formatted once per second."""
    now = int(time.time())
    if now != _date_memo[0]:
        _date_memo[1] = datetimeToString(now)
        _date_memo[0] = now
    return _date_memo[1]  # type: ignore[no-any-return]


def failed_reply(request: wire.Request, failure: Failure | None = None) -> Reply:
    """A bug: logged with its traceback, answered 500 with an empty body."""
    log.failure("HTTP request failed", failure)
    data = wire.response(500, [], b"", version=request.version, keep_alive=request.keep_alive,
                         date=http_date(), head=request.method == b"HEAD")
    return data, 500, 0, {"kind": "http"}


@implementer(IPushProducer)
class HttpChannel(Protocol):
    """One HTTP connection."""

    transport: Any

    def __init__(self, factory: HttpFactory, slot: Any) -> None:
        self.factory = factory
        self.slot = slot
        self.client = slot.host if slot is not None else "-"
        self.site = factory.site
        self.access = factory.access
        self.wire = wire.Connection(factory.max_body)
        self.timeout = factory.timeout
        self._pending: deque[list[Any]] | None = None  # [ready, bytes] in request order
        self._closing = False  # no more requests: close once the pending answers are out
        self._lost = False
        self._last = 0.0
        self._idle: Any = None
        self._deadline: Any = None
        self._abort: Any = None
        self._paused = 0  # bit 1: transport asked us to pause; 2: too many pending; 4: backoff
        self._backoff: Any = None

    # --- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        if self.timeout:
            self._last = self.factory.reactor.seconds()
            self._idle = self.factory.reactor.callLater(self.timeout, self._idle_check)

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True  # answers still being computed are dropped unwritten
        for call in (self._idle, self._deadline, self._abort, self._backoff):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._deadline = self._abort = self._backoff = None
        if self.slot is not None:
            self.slot.release()

    def pauseProducing(self) -> None:
        self._pause(1)

    def resumeProducing(self) -> None:
        self._resume(1)

    def stopProducing(self) -> None:
        pass

    def _pause(self, why: int) -> None:
        if not self._paused:
            self.transport.pauseProducing()
        self._paused |= why

    def _resume(self, why: int) -> None:
        if self._paused:
            self._paused &= ~why
            if not self._paused and not self._lost:
                self.transport.resumeProducing()

    def _back_off(self, seconds: float) -> None:
        """Read this connection's next request ``seconds`` later (its answer is sent)."""
        if self._backoff is None:
            self._pause(4)
            self._backoff = self.factory.reactor.callLater(seconds, self._backed_off)

    def _backed_off(self) -> None:
        self._backoff = None
        self._resume(4)

    def _idle_check(self) -> None:
        """No byte for ``timeout`` seconds: close (re-armed while bytes keep coming)."""
        reactor = self.factory.reactor
        left = self._last + self.timeout - reactor.seconds()
        if left > 0:
            self._idle = reactor.callLater(left, self._idle_check)
            return
        self._idle = None
        self._close()

    def _too_slow(self) -> None:
        """A request not complete within ``timeout`` of its first byte (slowloris): 408."""
        self._deadline = None
        if self._closing or not self.wire.partial:
            return
        self._refuse(wire.Refusal(408, "request not complete within idle_timeout"))

    def _close(self) -> None:
        self._closing = True
        self.transport.loseConnection()
        if self._abort is None:
            self._abort = self.factory.reactor.callLater(ABORT_TIMEOUT,
                                                         self.transport.abortConnection)

    # --- requests --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self.timeout:
            self._last = self.factory.reactor.seconds()
        events = self.wire.feed(data)
        date = http_date()
        for event in events:
            if type(event) is wire.Request:
                self._request(event, date)
            else:
                self._refuse(event)  # type: ignore[arg-type]
        if self._closing:
            return
        w = self.wire
        if w.closed:
            self._closing = True
            if not self._pending:
                self.transport.loseConnection()
            return
        if w.partial:
            if w.want_continue():
                self._write(wire.CONTINUE)
            if self._deadline is None and self.timeout:
                self._deadline = self.factory.reactor.callLater(self.timeout, self._too_slow)
        elif self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request(self, request: wire.Request, date: bytes) -> None:
        started = time.perf_counter()
        try:
            reply = self.site.handle(request, date, self.client)
        except Exception:  # noqa: BLE001 - a bug: logged with its traceback, answered 500
            reply = failed_reply(request, Failure())  # type: ignore[no-untyped-call]
        if type(reply) is tuple:
            data, status, sent, fields = reply
            if self._pending:
                self._write(data)
            else:
                self.transport.write(data)
            self.access.record(self.client, request.method, fields, status, sent,
                               time.perf_counter() - started)
            if "backoff" in fields:  # a shed request (server.ocsp.signing)
                self._back_off(fields["backoff"])
            return
        slot = [False, b""]
        if self._pending is None:
            self._pending = deque()
        self._pending.append(slot)
        if len(self._pending) >= MAX_PENDING:
            self._pause(2)
        reply.addErrback(lambda f: failed_reply(request, f))  # type: ignore[union-attr]
        reply.addCallback(self._answered, slot, request, started)  # type: ignore[union-attr]

    def _answered(self, reply: Reply, slot: list[Any], request: wire.Request,
                  started: float) -> None:
        data, status, sent, fields = reply
        self.access.record(self.client, request.method, fields, status, sent,
                           time.perf_counter() - started)
        slot[0], slot[1] = True, data
        self._drain()

    def _refuse(self, refusal: wire.Refusal) -> None:
        data = wire.refusal(refusal, http_date())
        self._write(data)
        self.access.record(self.client, b"-", {"kind": "http", "reason": refusal.reason},
                           refusal.status, len(data) - data.index(b"\r\n\r\n") - 4, 0.0)
        self._closing = True
        if not self._pending:
            self.transport.loseConnection()

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
        """Write the answers ready at the head of the queue; then a deferred close."""
        pending = self._pending
        assert pending is not None
        while pending and pending[0][0]:
            data = pending.popleft()[1]
            if data and not self._lost:
                self.transport.write(data)
        if self._lost:
            return
        if len(pending) < MAX_PENDING:
            self._resume(2)
        if not pending and self._closing:
            self.transport.loseConnection()


class HttpFactory(Factory):
    """Builds an ``HttpChannel`` per admitted connection; None (closed at once) over limits."""

    noisy = False

    def __init__(self, site: Handler, *, max_body: int, timeout: float, reactor: Any,
                 limits: ConnectionLimits, access: AccessLog | None = None) -> None:
        self.site = site
        self.max_body = max_body
        self.timeout = timeout
        self.reactor = reactor
        self.limits = limits
        self.access = access if access is not None else AccessLog(reactor)

    def buildProtocol(self, addr: Any) -> HttpChannel | None:  # type: ignore[override]
        slot = self.limits.slot(peer_host(addr))
        if slot is None:
            return None
        channel = HttpChannel(self, slot)
        channel.factory = self
        return channel

    def stopFactory(self) -> None:
        self.access.flush()
