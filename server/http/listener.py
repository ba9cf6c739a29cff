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

A request seen before is answered without parsing: when a read is exactly one complete
keep-alive request, arriving on a connection with nothing buffered and nothing pending (so
the same bytes always parse the same way), and its route can replay the answer
(``Handler.replay``: an OCSP cache hit), the factory remembers read → replay. The next read
of the same bytes on any connection calls the replay with the current Date — it says again
whether the answer is live (the response cache's epoch, the refresh time, the Date second)
and gives the bytes or None (then the read takes the normal path and the entry is dropped).
The memo is bounded (``MEMO_ENTRIES`` reads of at most ``MEMO_READ_BYTES``, cleared when
full) and cleared by a reload (new limits, paths or signers). Everything per request still
happens once per request: the access record, the idle clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol as TypingProtocol

from twisted.internet import tcp
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

perf_counter = time.perf_counter

log = Logger(namespace="server.http")

ABORT_TIMEOUT = 15.0  # a connection that does not close this long after we closed it: aborted
MAX_PENDING = 32  # answers in computation per connection before reading pauses
MEMO_ENTRIES = 4096  # remembered reads (one whole request each) per listener
MEMO_READ_BYTES = 2048  # longer reads are never remembered
# Answers longer than this (a large CRL) go through the transport's buffer whole: it sends
# them in memoryview slices, where a direct send would copy what the socket did not take.
DIRECT_MAX = 256 * 1024

# What a route returns: the complete response bytes, the status, the body size, the log fields.
Reply = tuple[bytes, int, int, dict[str, Any]]


# A remembered answer: called with the Date, the reply while it is live, else None.
Replay = Callable[[bytes], Reply | None]


class Handler(TypingProtocol):
    def handle(self, request: wire.Request, date: bytes,
               client: str = "-") -> Reply | Deferred[Reply]: ...

    def replay(self, request: wire.Request) -> Replay | None:
        """For a request just answered at once: how to answer the same bytes again."""


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


def direct_send(transport: Any) -> Callable[[bytes], int] | None:
    """The socket's ``send`` when transport is a plain TCP connection whose write buffer we
    can see (Twisted's ``tcp.Connection``), else None (TLS, test transports).

    ``transport.write`` only buffers: the bytes leave on the reactor's next turn, when epoll
    says the socket is writable, at the price of two ``epoll_ctl`` calls and a ``doWrite``
    dispatch per answer — a third of the reactor's own cost of a small answer. An answer
    written while nothing is buffered goes straight to the socket instead (what the kernel
    does not take, and everything while something is buffered, goes through
    ``transport.write``, so the order of bytes and the producer's back-pressure stay the
    transport's)."""
    if (type(transport) is not tcp.Server or getattr(transport, "TLS", True)
            or not hasattr(transport, "_tempDataBuffer") or not hasattr(transport, "dataBuffer")):
        return None
    sock = getattr(transport, "socket", None)
    return sock.send if sock is not None else None  # type: ignore[no-any-return]


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
        self.memo = factory.memo
        self.wire = wire.Connection(factory.max_body)
        self.timeout = factory.timeout
        self._seconds = factory.reactor.seconds if factory.timeout else None
        self._pending: deque[list[Any]] | None = None  # [ready, bytes] in request order
        self._closing = False  # no more requests: close once the pending answers are out
        self._lost = False
        self._last = 0.0
        self._idle: Any = None
        self._deadline: Any = None
        self._abort: Any = None
        self._paused = 0  # bit 1: transport asked us to pause; 2: too many pending; 4: backoff
        self._backoff: Any = None
        self._socket_send: Callable[[bytes], int] | None = None

    # --- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self._socket_send = direct_send(self.transport)
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
        self._lose()
        if self._abort is None:
            self._abort = self.factory.reactor.callLater(ABORT_TIMEOUT,
                                                         self.transport.abortConnection)

    # --- requests --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._seconds is not None:
            self._last = self._seconds()
        w = self.wire
        whole = False
        if not self._pending and w.fresh:
            known = self.memo.get(data)
            if known is not None:
                started = perf_counter()
                reply = known[0](http_date())
                if reply is not None:
                    self._send(reply[0])
                    self.access.record(self.client, known[1], reply[3], reply[1], reply[2],
                                       perf_counter() - started)
                    return
                self.memo.pop(data, None)
            whole = len(data) <= MEMO_READ_BYTES
        events = w.feed(data)
        date = http_date()
        if whole and len(events) == 1 and w.fresh and type(events[0]) is wire.Request:
            self._request(events[0], date, data)  # a keep-alive request, the whole read
        else:
            for event in events:
                if type(event) is wire.Request:
                    self._request(event, date)
                else:
                    self._refuse(event)  # type: ignore[arg-type]
        if self._closing:
            return
        if w.closed:
            self._closing = True
            if not self._pending:
                self._lose()
            return
        if w.partial:
            if w.want_continue():
                self._write(wire.CONTINUE)
            if self._deadline is None and self.timeout:
                self._deadline = self.factory.reactor.callLater(self.timeout, self._too_slow)
        elif self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request(self, request: wire.Request, date: bytes, read: bytes | None = None) -> None:
        """Answer request; read: the bytes of the read that was this request alone."""
        started = perf_counter()
        try:
            reply = self.site.handle(request, date, self.client)
        except Exception:  # noqa: BLE001 - a bug: logged with its traceback, answered 500
            reply = failed_reply(request, Failure())  # type: ignore[no-untyped-call]
        if type(reply) is tuple:
            data, status, sent, fields = reply
            if self._pending:
                self._write(data)
            else:
                self._send(data)
            self.access.record(self.client, request.method, fields, status, sent,
                               perf_counter() - started)
            if "backoff" in fields:  # a shed request (server.ocsp.signing)
                self._back_off(fields["backoff"])
            elif read is not None and status < 400:
                self._remember(read, request)
            return
        slot = [False, b""]
        if self._pending is None:
            self._pending = deque()
        self._pending.append(slot)
        if len(self._pending) >= MAX_PENDING:
            self._pause(2)
        reply.addErrback(lambda f: failed_reply(request, f))  # type: ignore[union-attr]
        reply.addCallback(self._answered, slot, request, started)  # type: ignore[union-attr]

    def _remember(self, read: bytes, request: wire.Request) -> None:
        try:
            replay = self.site.replay(request)
        except Exception:  # noqa: BLE001 - a bug: logged, the request was answered anyway
            log.failure("HTTP replay failed")
            return
        if replay is not None and self.wire.max_body == self.factory.max_body:  # not reloaded
            memo = self.memo
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[read] = (replay, request.method)

    def _answered(self, reply: Reply, slot: list[Any], request: wire.Request,
                  started: float) -> None:
        data, status, sent, fields = reply
        self.access.record(self.client, request.method, fields, status, sent,
                           perf_counter() - started)
        slot[0], slot[1] = True, data
        self._drain()

    def _refuse(self, refusal: wire.Refusal) -> None:
        data = wire.refusal(refusal, http_date())
        self._write(data)
        self.access.record(self.client, b"-", {"kind": "http", "reason": refusal.reason},
                           refusal.status, len(data) - data.index(b"\r\n\r\n") - 4, 0.0)
        self._closing = True
        if not self._pending:
            self._lose()

    def _lose(self) -> None:
        """Close once what is buffered is written. The producer goes first: a transport
        that drains its buffer while it has paused a streaming producer resumes the
        producer instead of closing (Twisted's ``FileDescriptor.doWrite``), and the
        connection would stay open until the idle timeout."""
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _send(self, data: bytes) -> None:
        """Write data now when the transport has nothing buffered (see ``direct_send``),
        else (and whatever the socket did not take) through the transport's buffer."""
        send = self._socket_send
        if send is not None and len(data) <= DIRECT_MAX:
            t = self.transport
            if (not t.dataBuffer and not t._tempDataBuffer and t.connected and not t.TLS
                    and not t.disconnecting):
                try:
                    n = send(data)
                except OSError:  # EAGAIN; or an error the transport reports once it writes
                    n = 0
                if n == len(data):
                    return
                data = data[n:]
        self.transport.write(data)

    def _write(self, data: bytes) -> None:
        """Send data after the pending answers (at once when there are none)."""
        pending = self._pending
        if not pending:
            self._send(data)
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
                self._send(data)
        if self._lost:
            return
        if len(pending) < MAX_PENDING:
            self._resume(2)
        if not pending and self._closing:
            self._lose()


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
        # read -> (replay, method): whole requests answered again without parsing
        self.memo: dict[bytes, tuple[Replay, bytes]] = {}

    def buildProtocol(self, addr: Any) -> HttpChannel | None:  # type: ignore[override]
        slot = self.limits.slot(peer_host(addr))
        if slot is None:
            return None
        channel = HttpChannel(self, slot)
        channel.factory = self
        return channel

    def stopFactory(self) -> None:
        self.access.flush()
