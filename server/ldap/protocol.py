"""The LDAP connection: framing, answer order, back-pressure, the connection's lifecycle.

Strategy: a PDU's length header is checked before its body is buffered (oversized,
indefinite or malformed → Notice of Disconnection with protocolError, then close); the input
buffer is a ``bytearray`` consumed once per read, and a PDU is decoded only when it is
complete. A PDU that names a pre-encoded answer (``Session.answer_raw``) is answered without
being decoded; any other goes to the connection's ``server.ldap.session.Session``, which
decides everything LDAP. A reply's store work (a search or a compare) runs through the one
store seam, ``StoreAccess.iterate``: inline on the reactor (cooperatively once it takes
longer than a moment) or in a store thread. Every answer of a connection takes its turn in
a queue of slots, so answers leave in request order even when a later request finishes
first; an abandoned search, an unbind or a lost connection drops the pending slots
unwritten. A full store queue answers busy (51).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import FilteringLogObserver, Logger, LogLevel, globalLogPublisher
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from server.ldap import codec
from server.ldap.errors import ProtocolError, ResultCode
from server.ldap.session import Job, Reply, Session, clean
from server.limits import bytes_waiting
from server.logs import LevelFilter

if TYPE_CHECKING:
    from server.ldap.server import LdapFactory

log = Logger(namespace="certpub.ldap")


def info_enabled(namespace: str = "certpub.ldap") -> bool:
    """False only when every global log observer is a filter that drops info events here
    (``server.logs.LevelFilter`` at warn or error, or a ``FilteringLogObserver`` whose
    predicate refuses them): then the session skips its per-operation lines altogether."""
    observers = getattr(globalLogPublisher, "_observers", None)
    if not observers:
        return True
    probe = {"log_level": LogLevel.info, "log_namespace": namespace, "log_format": ""}
    for observer in observers:
        if isinstance(observer, LevelFilter):  # what ``certpub serve`` installs
            if LogLevel.info in observer.levels:
                return True
            continue
        should = getattr(observer, "_shouldLogEvent", None)
        if not isinstance(observer, FilteringLogObserver) or should is None:
            return True
        try:
            if should(dict(probe)):  # twisted's shouldLogEvent: a bool
                return True
        except (TypeError, KeyError, AttributeError, ValueError):
            return True
    return False


class _SessionLog:
    """The session's log: twisted.logger, with exceptions turned into Failures."""

    info = log.info

    @staticmethod
    def failure(format: str, failure: Any, **kwargs: Any) -> None:
        if isinstance(failure, BaseException):
            failure = Failure(failure, type(failure), failure.__traceback__)
        log.failure(format, failure, **kwargs)


class _Slot:
    """One answer's place in the connection's output order."""

    __slots__ = ("chunks", "ready")

    def __init__(self, ready: bool, chunks: list[bytes]) -> None:
        self.ready = ready
        self.chunks = chunks


class LdapProtocol(Protocol, TimeoutMixin):
    """One client connection."""

    def __init__(self, factory: LdapFactory, conn: int, peer: str) -> None:
        self.factory = factory
        self.conn = conn
        self.peer = peer
        self._buf = bytearray()
        self._closing = False
        self.session = Session(factory, conn, _SessionLog(),
                               info=getattr(factory, "log_info", True) is not False,
                               host=peer.rsplit(":", 1)[0])
        self._slots: deque[_Slot] = deque()  # answers waiting for earlier ones
        if factory.call_later is not None:
            self.callLater = factory.call_later

    # --- connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.session.tls = ISSLTransport.providedBy(self.transport)
        # Nagle + the client's delayed ACK would hold a SearchResultDone written after its
        # entries for up to 40 ms: answers are written whole, so send them at once.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass
        host = self.transport.getHost()  # type: ignore[union-attr]
        log.info("conn={conn} ACCEPT from IP={peer} (IP={local})", conn=self.conn,
                 peer=self.peer, local=f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}")
        self.setTimeout(self.factory.config.idle_timeout)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        self._closing = True  # answers still being computed are dropped
        self._slots.clear()
        self.session.abandon_all()
        self.factory.connection_closed(self.peer)
        log.info("conn={conn} closed", conn=self.conn)

    def timeoutConnection(self) -> None:
        # Not idle: answers still being computed, or a request already in the socket (the
        # reactor runs timers before it reads: closing now would drop it unanswered, and the
        # client would see "session terminated by server"); it is read next, then the clock
        # starts again.
        # (setTimeout, not resetTimeout: the mixin has dropped the call that fired, and
        # resetting nothing would leave the connection without an idle timeout for good)
        if self.session.jobs or self._slots or bytes_waiting(self.transport):
            self.setTimeout(self.factory.config.idle_timeout)
            return
        log.info("conn={conn} idle timeout", conn=self.conn)
        self._disconnect(ResultCode.UNAVAILABLE, "idle timeout")

    def _disconnect(self, code: ResultCode, message: str) -> None:
        """Notice of Disconnection (RFC 4511 §4.4.1), then close at once."""
        if self._closing:
            return
        self._closing = True
        self._buf.clear()
        self.transport.write(codec.notice_of_disconnection(code, message))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    # --- output order -----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Answers of this connection still being computed."""
        return sum(1 for slot in self._slots if not slot.ready)

    def _send(self, data: bytes) -> None:
        if self._closing or not data:
            return
        if self._slots:  # an earlier answer is still being computed: queue behind it
            tail = self._slots[-1]
            if tail.ready:
                tail.chunks.append(data)
            else:
                self._slots.append(_Slot(True, [data]))
            return
        self.transport.write(data)  # type: ignore[union-attr]

    def _fill(self, slot: _Slot, data: bytes) -> None:
        """slot's answer is complete: write every ready answer at the head of the queue."""
        slot.chunks.append(data)
        slot.ready = True
        slots = self._slots
        while slots and slots[0].ready:
            chunks = slots.popleft().chunks
            if chunks and not self._closing:
                out = b"".join(chunks)
                if out:
                    self.transport.write(out)  # type: ignore[union-attr]

    # --- framing --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._buf:  # per PDU, not per byte: slow dribbling is cut at idle_timeout
            self.resetTimeout()
        buf = self._buf
        buf += data
        pos = 0
        max_bytes = self.factory.config.max_request_bytes
        session = self.session
        try:
            while not self._closing:
                total = codec.frame_length(bytes(buf[pos : pos + 6]), max_bytes)
                if total is None or len(buf) - pos < total:
                    break
                pdu = bytes(buf[pos : pos + total])
                pos += total
                self.resetTimeout()  # a whole PDU arrived
                answer = session.answer_raw(pdu)
                if answer is not None:
                    self._send(answer)
                    continue
                self._handle(pdu)
        except ProtocolError as exc:
            log.info("conn={conn} PROTOCOL ERROR ({error}); closing", conn=self.conn,
                     error=clean(exc.message))
            self._disconnect(ResultCode.PROTOCOL_ERROR, exc.message)
            return
        except Exception:  # a bug here must not keep the connection in an unknown state
            log.failure("conn={conn} internal error; closing", conn=self.conn)
            self._disconnect(ResultCode.OTHER, "internal error")
            return
        if not self._closing:
            del buf[:pos]

    def _handle(self, pdu: bytes) -> None:
        f = self.factory
        cfg = f.config
        msg = codec.decode_message(pdu, cfg.max_filter_depth, cfg.max_filter_items)
        access = f.access
        reply: Reply = self.session.receive(msg, busy=access.busy())
        if reply.job is not None:
            slot = _Slot(False, [])
            self._slots.append(slot)
            job = reply.job
            access.iterate(job.steps(), f.cooperator.cooperate, f.timer).addBoth(
                self._finished, job, slot)
            return
        self._send(reply.data)
        if reply.start_tls:
            self.transport.startTLS(self.factory.tls)  # type: ignore[union-attr]
        if reply.close:
            self._closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _finished(self, result: Any, job: Job, slot: _Slot) -> None:
        """On the reactor: a job's store work is done; its answer takes its turn."""
        failure = result if isinstance(result, Failure) else None
        data = self.session.finish(job, failure)
        if self._closing:
            return
        self._fill(slot, data)
