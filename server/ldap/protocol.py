"""The LDAP connection: framing, dispatch, limits, logging. Read-only, anonymous.

Strategy: a PDU's length header is checked before its body is buffered (oversized, indefinite
or malformed → Notice of Disconnection with protocolError, then close); the input buffer is a
``bytearray`` consumed once per read, and a PDU is decoded only when it is complete. Searches
are generators from ``server.ldap.directory`` driven by a Twisted ``Cooperator``, one entry per
step, so the size limit (the client's and the server's, whichever is smaller), the time limit,
abandon and paging are checked between entries and other clients are served meanwhile.
Result codes: anonymous bind → success; simple bind with a password → invalidCredentials (49);
a DN with an empty password → unwillingToPerform (53, RFC 4513 §5.1.2); SASL →
authMethodNotSupported (7); add/delete/modify/modify DN → unwillingToPerform (53); StartTLS
without a TLS configuration → unavailable (52), on a TLS connection → operationsError (1);
WhoAmI → the empty authzId (anonymous, RFC 4532); another extended operation → protocolError
(2); an unknown critical control → unavailableCriticalExtension (12); the store unreadable →
unavailable (52). Compare: a type outside the schema → undefinedAttributeType (17), outside the
allowlist or absent → noSuchAttribute (16), no equality rule → inappropriateMatching (18).
Log lines follow slapd's ``stats`` format; passwords are never logged.

Threaded store (``[store] threads > 0``, ``server.storeaccess``): a search's or compare's
store work runs in a pool thread — a search is materialised there whole (its entries encoded,
at most the size limit or the page size of them, the time limit and abandon checked between
entries) and its PDUs written on the reactor thread. Every answer of a connection takes its
turn in a queue of slots, so answers leave in request order even when a later request (a
bind, a root DSE search answered from memory) finishes first; an abandoned search, an unbind
or a lost connection drops the pending slots unwritten. A full pool queue answers busy (51).

Hot path (bench/ldap_bench.py, docs/performance.md): a search runs inline in ``dataReceived``
for up to ``INLINE_BUDGET`` seconds (a one-entry search finishes there: one reactor turn, one
write), and only a longer one is handed to the Cooperator; the per-search log lines are not
even built when the log observers drop info events (``info_enabled``); the paging fingerprint
is computed only for a paged search.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import TaskFinished
from twisted.logger import FilteringLogObserver, Logger, LogLevel, globalLogPublisher
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from server.ldap import codec
from server.ldap.directory import Position
from server.ldap.entries import parse_dn, render
from server.ldap.errors import LdapError, ProtocolError, ResultCode
from server.ldap.filters import Match, evaluate, to_text
from server.ldap.schema import describe, select
from store import names
from store.sqlite import StoreError

if TYPE_CHECKING:
    from server.ldap.server import LdapFactory

log = Logger(namespace="certpub.ldap")

STARTTLS = "1.3.6.1.4.1.1466.20037"
WHOAMI = "1.3.6.1.4.1.4203.1.11.3"
PAGED = "1.2.840.113556.1.4.319"
MANAGE_DSA_IT = "2.16.840.1.113730.3.4.2"  # no referrals here, so it changes nothing
KNOWN_CONTROLS = (PAGED, MANAGE_DSA_IT)
WRITE_TAGS = {"ADD": 0x69, "DEL": 0x6B, "MOD": 0x67, "MODRDN": 0x6D}
INLINE_BUDGET = 0.002  # seconds a search may run inside dataReceived before it is cooperative
_UNSAFE = re.compile(r'[\x00-\x1f"\\]')


def clean(text: str, limit: int = 1024) -> str:
    """Text safe inside a quoted log field: control characters and quotes escaped, cut."""
    out = _UNSAFE.sub(lambda m: f"\\{ord(m.group()):02x}", text[:limit])
    return out + ("..." if len(text) > limit else "")


def info_enabled(namespace: str = "certpub.ldap") -> bool:
    """False only when every global log observer is a filter that drops info events here."""
    observers = getattr(globalLogPublisher, "_observers", None)
    if not observers:
        return True
    probe = {"log_level": LogLevel.info, "log_namespace": namespace, "log_format": ""}
    for observer in observers:
        should = getattr(observer, "_shouldLogEvent", None)
        if not isinstance(observer, FilteringLogObserver) or should is None:
            return True
        try:
            if should(dict(probe)):  # twisted's shouldLogEvent: a bool
                return True
        except (TypeError, KeyError, AttributeError, ValueError):
            return True
    return False


class _Search:
    """One running search: what the driver needs between steps."""

    def __init__(self, op: int, message_id: int, started: float) -> None:
        self.op = op
        self.message_id = message_id
        self.started = started
        self.abandoned = False
        self.task: Any = None


class _Slot:
    """One answer's place in the connection's output order (threaded store only)."""

    __slots__ = ("chunks", "ready")

    def __init__(self, ready: bool, chunks: list[bytes]) -> None:
        self.ready = ready
        self.chunks = chunks


Emit = Callable[[bytes], None]
Ended = tuple[tuple[Any, ...], dict[str, Any]]  # the arguments of LdapProtocol._done


class LdapProtocol(Protocol, TimeoutMixin):
    """One client connection."""

    def __init__(self, factory: LdapFactory, conn: int, peer: str) -> None:
        self.factory = factory
        self.conn = conn
        self.peer = peer
        self.op = -1
        self._buf = bytearray()
        self._closing = False
        self._tls = False
        self._searches: dict[int, _Search] = {}
        self._info = getattr(factory, "log_info", True)
        access = getattr(factory, "access", None)
        self._access = access if access is not None and not access.inline else None
        self._slots: deque[_Slot] = deque()  # answers waiting for earlier ones (threaded)
        self._in_pool = 0  # operations of this connection running in the store threads
        if factory.call_later is not None:
            self.callLater = factory.call_later

    # --- connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._tls = ISSLTransport.providedBy(self.transport)
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
        self._closing = True  # answers still in the store threads are dropped
        self._slots.clear()
        for search in self._searches.values():
            search.abandoned = True
            if search.task is not None:
                with contextlib.suppress(TaskFinished):  # done already: closed mid-search
                    search.task.stop()
        self._searches.clear()
        self.factory.connection_closed(self.peer)
        log.info("conn={conn} closed", conn=self.conn)

    def timeoutConnection(self) -> None:
        if self._searches or self._in_pool:
            self.resetTimeout()
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

    def _send(self, data: bytes) -> None:
        if self._closing:
            return
        if self._slots:  # an earlier answer is still being computed: queue behind it
            tail = self._slots[-1]
            if tail.ready:
                tail.chunks.append(data)
            else:
                self._slots.append(_Slot(True, [data]))
            return
        self.transport.write(data)  # type: ignore[union-attr]

    def _slot(self) -> _Slot:
        """A place in the output order for an answer computed in the store threads."""
        slot = _Slot(False, [])
        self._slots.append(slot)
        self._in_pool += 1
        return slot

    def _fill(self, slot: _Slot) -> None:
        """slot's answer is complete: write every ready answer at the head of the queue."""
        self._in_pool -= 1
        slot.ready = True
        slots = self._slots
        while slots and slots[0].ready:
            chunks = slots.popleft().chunks
            if chunks and not self._closing:
                self.transport.write(b"".join(chunks))  # type: ignore[union-attr]

    # --- framing --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._buf:  # per PDU, not per byte: slow dribbling is cut at idle_timeout
            self.resetTimeout()
        buf = self._buf
        buf += data
        pos = 0
        try:
            while not self._closing:
                total = codec.frame_length(bytes(buf[pos : pos + 6]),
                                           self.factory.config.max_request_bytes)
                if total is None or len(buf) - pos < total:
                    break
                pdu = bytes(buf[pos : pos + total])
                pos += total
                self.resetTimeout()  # a whole PDU arrived
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
        cfg = self.factory.config
        self.op += 1
        msg = codec.decode_message(pdu, cfg.max_filter_depth, cfg.max_filter_items)
        req = msg.request
        if isinstance(req, codec.UnbindRequest):
            log.info("conn={conn} op={op} UNBIND", conn=self.conn, op=self.op)
            self._closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if isinstance(req, codec.AbandonRequest):
            log.info("conn={conn} op={op} ABANDON msg={target}", conn=self.conn, op=self.op,
                     target=req.message_id)
            search = self._searches.pop(req.message_id, None)
            if search is not None:
                search.abandoned = True
            return
        paged: tuple[int, bytes] | None = None
        for control in msg.controls:
            if control.oid == PAGED and isinstance(req, codec.SearchRequest):
                paged = codec.decode_paged_value(control.value)
            elif control.critical and control.oid not in KNOWN_CONTROLS:
                self._refuse(msg, ResultCode.UNAVAILABLE_CRITICAL_EXTENSION,
                             f"control {control.oid} is not supported")
                return
        if isinstance(req, codec.SearchRequest):
            self._search(msg.message_id, req, paged)
        elif isinstance(req, codec.BindRequest):
            self._bind(msg.message_id, req)
        elif isinstance(req, codec.CompareRequest):
            self._compare(msg.message_id, req)
        elif isinstance(req, codec.ExtendedRequest):
            self._extended(msg.message_id, req)
        elif isinstance(req, codec.WriteRequest):
            log.info('conn={conn} op={op} {kind} dn="{dn}"', conn=self.conn, op=self.op,
                     kind=req.kind, dn=clean(req.dn))
            self._result(msg.message_id, WRITE_TAGS[req.kind], ResultCode.UNWILLING_TO_PERFORM,
                         message="the directory is read-only")

    def _refuse(self, msg: codec.Message, code: ResultCode, text: str) -> None:
        req = msg.request
        tag = {codec.SearchRequest: 0x65, codec.BindRequest: 0x61, codec.CompareRequest: 0x6F,
               codec.ExtendedRequest: 0x78}.get(type(req))
        if isinstance(req, codec.WriteRequest):
            tag = WRITE_TAGS[req.kind]
        if tag is not None:
            self._result(msg.message_id, tag, code, message=text)

    def _result(self, message_id: int, tag: int, code: ResultCode, matched: str = "",
                message: str = "", extra: bytes = b"", controls: bytes = b"",
                op: int | None = None, emit: Emit | None = None, **fields: Any) -> None:
        (emit or self._send)(codec.encode_result(message_id, tag, int(code), matched, message,
                                                 extra, controls))
        log.info('conn={conn} op={op} RESULT tag={tag} err={err} text="{text}"', conn=self.conn,
                 op=self.op if op is None else op, tag=tag, err=int(code), text=clean(message),
                 **fields)

    # --- bind, compare, extended ------------------------------------------------------------

    def _bind(self, message_id: int, req: codec.BindRequest) -> None:
        method = {"simple": 128, "sasl": 163}.get(req.method, 0)
        log.info('conn={conn} op={op} BIND dn="{dn}" method={method}', conn=self.conn,
                 op=self.op, dn=clean(req.name), method=method)
        if req.version != 3:
            code, text = ResultCode.PROTOCOL_ERROR, "only LDAPv3 is supported"
        elif req.method != "simple":
            code, text = ResultCode.AUTH_METHOD_NOT_SUPPORTED, "only anonymous access"
        elif req.password:
            code, text = ResultCode.INVALID_CREDENTIALS, ""
        elif req.name:
            code, text = ResultCode.UNWILLING_TO_PERFORM, "unauthenticated bind is not allowed"
        else:
            code, text = ResultCode.SUCCESS, ""
        self._result(message_id, 0x61, code, message=text)

    def _compare(self, message_id: int, req: codec.CompareRequest) -> None:
        log.info('conn={conn} op={op} CMP dn="{dn}" attr="{attr}"', conn=self.conn, op=self.op,
                 dn=clean(req.dn), attr=clean(req.attribute))
        now = self.factory.clock()
        if self._access is None:
            code, text = self._compare_outcome(req, now)
            self._result(message_id, 0x6F, code, message=text)
            return
        if self._access.busy() or self._in_pool >= self.factory.config.max_outstanding:
            self._result(message_id, 0x6F, ResultCode.BUSY, message="server busy")
            return
        op, slot = self.op, self._slot()

        def answered(outcome: Any) -> None:
            if isinstance(outcome, Failure):
                log.failure("conn={conn} op={op} internal error", outcome, conn=self.conn, op=op)
                outcome = (ResultCode.OTHER, "internal error")
            self._result(message_id, 0x6F, outcome[0], message=outcome[1], op=op,
                         emit=slot.chunks.append)
            self._fill(slot)

        self._access.run(self._compare_outcome, req, now).addBoth(answered)

    def _compare_outcome(self, req: codec.CompareRequest, now: Any) -> tuple[ResultCode, str]:
        """The result code of a compare (and its text); reads the store."""
        try:
            entry = self.factory.directory.lookup(parse_dn(req.dn), now)
        except names.DNSyntaxError as exc:
            return ResultCode.INVALID_DN_SYNTAX, str(exc)
        except StoreError:
            return ResultCode.UNAVAILABLE, "store unavailable"
        if entry is None:
            return ResultCode.NO_SUCH_OBJECT, ""
        t, ok = describe(req.attribute)
        allow = self.factory.directory.allow
        if t is None:
            code = ResultCode.UNDEFINED_ATTRIBUTE_TYPE
        elif not ok or not allow.allows(t, entry.meta) or not entry.values(t.name):
            code = ResultCode.NO_SUCH_ATTRIBUTE
        elif t.equality is None:
            code = ResultCode.INAPPROPRIATE_MATCHING
        else:
            truth = evaluate(Match("=", req.attribute, req.value), entry, allow)
            code = {True: ResultCode.COMPARE_TRUE, False: ResultCode.COMPARE_FALSE}.get(
                truth, ResultCode.INVALID_ATTRIBUTE_SYNTAX)  # type: ignore[arg-type]
        return code, ""

    def _extended(self, message_id: int, req: codec.ExtendedRequest) -> None:
        log.info('conn={conn} op={op} EXT oid={oid}', conn=self.conn, op=self.op,
                 oid=clean(req.name, 128))
        if req.name == WHOAMI:
            self._ext_result(message_id, ResultCode.SUCCESS, value=b"")
        elif req.name == STARTTLS:
            tls = self.factory.tls
            if tls is None:
                self._ext_result(message_id, ResultCode.UNAVAILABLE, "TLS is not configured",
                                 STARTTLS)
            elif self._tls:
                self._ext_result(message_id, ResultCode.OPERATIONS_ERROR,
                                 "TLS is already established", STARTTLS)
            elif self._searches or self._slots:
                self._ext_result(message_id, ResultCode.OPERATIONS_ERROR,
                                 "operations are outstanding", STARTTLS)
            else:
                self._ext_result(message_id, ResultCode.SUCCESS, name=STARTTLS)
                self.transport.startTLS(tls)  # type: ignore[union-attr]
                self._tls = True
        else:
            self._ext_result(message_id, ResultCode.PROTOCOL_ERROR,
                             "unsupported extended operation")

    def _ext_result(self, message_id: int, code: ResultCode, message: str = "",
                    name: str | None = None, value: bytes | None = None) -> None:
        self._send(codec.encode_extended(message_id, int(code), message, name, value))
        log.info('conn={conn} op={op} RESULT tag=120 err={err} text="{text}"', conn=self.conn,
                 op=self.op, err=int(code), text=clean(message))

    # --- search ---------------------------------------------------------------------------

    def _search(self, message_id: int, req: codec.SearchRequest,
                paged: tuple[int, bytes] | None) -> None:
        f = self.factory
        if self._info:
            log.info('conn={conn} op={op} SRCH base="{base}" scope={scope} deref={deref} '
                     'filter="{filter}" attrs="{attrs}"', conn=self.conn, op=self.op,
                     base=clean(req.base), scope=req.scope, deref=req.deref,
                     filter=clean(to_text(req.filter)), attrs=clean(" ".join(req.attributes)))
        search = _Search(self.op, message_id, f.timer())
        if len(self._searches) >= f.config.max_outstanding:
            self._done(search, ResultCode.BUSY, 0, "too many outstanding operations")
            return
        if self._access is not None and (self._access.busy()
                                         or self._in_pool >= f.config.max_outstanding):
            self._done(search, ResultCode.BUSY, 0, "server busy")
            return
        fingerprint = b""
        if paged is not None:
            fingerprint = hashlib.sha256(
                json.dumps([req.base, req.scope, to_text(req.filter, 1 << 20)]).encode()
            ).digest()[:8]
        after: Position | None = None
        if paged is not None and paged[1]:
            after = _decode_cookie(paged[1], fingerprint)
            if after is None:
                self._done(search, ResultCode.UNWILLING_TO_PERFORM, 0, "invalid paging cookie")
                return
        if paged is not None and paged[0] == 0:  # RFC 2696 §3: size 0 ends a paged search
            self._done(search, ResultCode.SUCCESS, 0, controls=_paged(b""))
            return
        if self._access is not None:
            self._searches[message_id] = search
            slot = self._slot()
            d = self._access.run(self._collect, search, req, paged, fingerprint, after,
                                 f.clock())
            d.addBoth(self._collected, search, slot)
            return
        try:
            now = f.clock()
            base = f.directory.base_text(req.base, now)
            results = f.directory.search(base, req.scope, req.filter, now, after)
        except names.DNSyntaxError as exc:
            self._done(search, ResultCode.INVALID_DN_SYNTAX, 0, str(exc))
            return
        except LdapError as exc:
            self._done(search, exc.code, 0, exc.message, exc.matched)
            return
        except StoreError:
            self._done(search, ResultCode.UNAVAILABLE, 0, "store unavailable")
            return
        self._searches[message_id] = search
        steps = self._drive(search, req, results, paged, fingerprint, self._send, self._done)
        # Run inline while it is quick (most searches end here); the rest is cooperative.
        deadline = f.timer() + INLINE_BUDGET
        for _ in steps:
            if f.timer() > deadline:
                search.task = f.cooperator.cooperate(steps)
                return

    def _collect(self, search: _Search, req: codec.SearchRequest,
                 paged: tuple[int, bytes] | None, fingerprint: bytes, after: Position | None,
                 now: Any) -> tuple[list[bytes], Ended | None]:
        """A whole search in a store thread: its entries' PDUs and how it ended (the
        arguments of ``_done`` after the search; None when abandoned)."""
        chunks: list[bytes] = []
        ended: list[Ended] = []

        def finish(_: _Search, *args: Any, **kwargs: Any) -> None:
            ended.append((args, kwargs))

        f = self.factory
        try:
            base = f.directory.base_text(req.base, now)
            results = f.directory.search(base, req.scope, req.filter, now, after)
        except names.DNSyntaxError as exc:
            return chunks, ((ResultCode.INVALID_DN_SYNTAX, 0, str(exc)), {})
        except LdapError as exc:
            return chunks, ((exc.code, 0, exc.message, exc.matched), {})
        except StoreError:
            return chunks, ((ResultCode.UNAVAILABLE, 0, "store unavailable"), {})
        for _ in self._drive(search, req, results, paged, fingerprint, chunks.append, finish):
            pass
        return chunks, ended[0] if ended else None

    def _collected(self, result: Any, search: _Search, slot: _Slot) -> None:
        """On the reactor: a search the store threads finished takes its turn to be sent."""
        if isinstance(result, Failure):
            log.failure("conn={conn} op={op} internal error", result, conn=self.conn,
                        op=search.op)
            result = ([], ((ResultCode.OTHER, 0, "internal error"), {}))
        chunks, ended = result
        if search.abandoned or ended is None:  # abandoned or disconnected: no answer at all
            self._searches.pop(search.message_id, None)
        else:
            slot.chunks.extend(chunks)
            args, kwargs = ended
            self._done(search, *args, **{**kwargs, "emit": slot.chunks.append})
        self._fill(slot)

    def _drive(self, search: _Search, req: codec.SearchRequest, results: Iterator[Any],
               paged: tuple[int, bytes] | None, fingerprint: bytes, emit: Emit,
               finish: Callable[..., None]) -> Iterator[None]:
        f = self.factory
        cfg = f.config
        size = min(req.size_limit or cfg.size_limit, cfg.size_limit)
        limit_time = min(req.time_limit or cfg.time_limit, cfg.time_limit)
        deadline = search.started + limit_time
        page = min(paged[0], cfg.size_limit) if paged is not None else None
        if page is not None:
            size = req.size_limit or (1 << 62)
        selection = select(req.attributes)
        allow = f.directory.allow
        count = 0
        last: Position | None = None
        try:
            for hit in results:
                if search.abandoned or self._closing:
                    return
                if f.timer() > deadline:
                    finish(search, ResultCode.TIME_LIMIT_EXCEEDED, count)
                    return
                if hit is None:
                    yield None
                    continue
                if count >= size:
                    finish(search, ResultCode.SIZE_LIMIT_EXCEEDED, count)
                    return
                if page is not None and count >= page and last is not None:
                    finish(search, ResultCode.SUCCESS, count,
                           controls=_paged(_encode_cookie(last, fingerprint)))
                    return
                attrs = render(hit.entry, selection, allow, req.types_only)
                emit(codec.encode_entry(search.message_id, hit.entry.dn, attrs))
                count += 1
                last = hit.position
                yield None
        except LdapError as exc:
            finish(search, exc.code, count, exc.message, exc.matched)
            return
        except StoreError:
            finish(search, ResultCode.UNAVAILABLE, count, "store unavailable")
            return
        except Exception:
            log.failure("conn={conn} op={op} internal error", conn=self.conn, op=search.op)
            finish(search, ResultCode.OTHER, count, "internal error")
            return
        finish(search, ResultCode.SUCCESS, count,
               controls=_paged(b"") if paged is not None else b"")

    def _done(self, search: _Search, code: ResultCode, count: int, message: str = "",
              matched: str = "", controls: bytes = b"", emit: Emit | None = None) -> None:
        self._searches.pop(search.message_id, None)
        (emit or self._send)(codec.encode_result(search.message_id, 0x65, int(code), matched, message,
                                       b"", controls))
        if self._info:
            log.info('conn={conn} op={op} SEARCH RESULT tag=101 err={err} nentries={nentries} '
                     'etime={etime:.4f} text="{text}"', conn=self.conn, op=search.op,
                     err=int(code), nentries=count, etime=self.factory.timer() - search.started,
                     text=clean(message))


def _paged(cookie: bytes) -> bytes:
    return codec.encode_controls([(PAGED, False, codec.paged_value(0, cookie))])


def _encode_cookie(position: Position, fingerprint: bytes) -> bytes:
    return fingerprint + json.dumps(list(position), ensure_ascii=False).encode("utf-8")


def _decode_cookie(cookie: bytes, fingerprint: bytes) -> Position | None:
    if not cookie.startswith(fingerprint) or len(cookie) > 4096:
        return None
    try:
        phase, first, key, cert = json.loads(cookie[len(fingerprint):].decode("utf-8"))
    except (ValueError, TypeError):
        return None
    if not (isinstance(phase, int) and isinstance(first, int) and isinstance(key, str)
            and isinstance(cert, int)):
        return None
    return (phase, first, key, cert)
