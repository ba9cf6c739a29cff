"""One LDAP connection's operations, sans I/O: decoded messages in, PDUs out.

Strategy: ``Session.receive`` takes a decoded ``codec.Message`` and returns a ``Reply``: the
PDUs to write now, or a ``Job`` (a search or a compare: store work), and whether to start
TLS or close. A job's ``steps()`` is the one routine that does its store work — run inline
on the reactor or in a store thread by ``server.storeaccess`` (the adapter's choice, not the
session's) — and ``Session.finish`` turns its outcome into the result PDU, the log line and
the metrics, always on the reactor thread. Nothing here knows of sockets, transports, threads
or Twisted; the adapter (``server.ldap.protocol``) frames bytes, keeps answers in request
order and applies back-pressure.

Result codes, each decided here once: anonymous bind → success; simple bind with a password →
invalidCredentials (49); a DN with an empty password → unwillingToPerform (53, RFC 4513
§5.1.2); SASL → authMethodNotSupported (7); LDAPv2 → protocolError (2); add, delete, modify,
modify DN → unwillingToPerform (53); StartTLS without a TLS configuration → unavailable (52),
on a TLS connection or with operations outstanding → operationsError (1); WhoAmI → the empty
authzId (anonymous, RFC 4532); another extended operation → protocolError (2); an unknown
critical control → unavailableCriticalExtension (12); more than ``max_outstanding``
operations, or a full store queue → busy (51). Search and compare errors (``outcome``): a bad
DN → invalidDNSyntax (34); a directory error → its own code (noSuchObject with the matched
DN, adminLimitExceeded); the store unreadable → unavailable (52); a bug → other (80), logged.
Compare: a type outside the schema → undefinedAttributeType (17), outside the allowlist or
absent → noSuchAttribute (16), no equality rule → inappropriateMatching (18). Limits: the
size limit is the client's or the server's, whichever is smaller (sizeLimitExceeded after
that many entries), the time limit likewise (timeLimitExceeded); paging (RFC 2696) has its
page size capped by the server's size limit and resumes from a cookie bound to the search
(a foreign cookie → unwillingToPerform).

The lookup policy (``server.privacy``, the service's ``privacy``; None: none) is decided
here before any store work and before an answer is taken from the cache: for a client
outside the exempt networks, a search it refuses gets unwillingToPerform naming the policy,
an allowed search is capped at ``max_entries``, and a search that may only list glue, CA and
CRL entries ends unwillingToPerform at the first subscriber entry. The budget: each
subscriber entry is paid for as it is shown (a lookup by e-mail address costs nothing), a
client past its budget gets busy at the first one it would be shown, and a listing (scope
one or subtree) past it is refused before any store work. Only answers that any client would
get alike are kept (allowed for every client, within the cap, no subscriber entry withheld),
so a kept answer needs no judging — only its cost is charged to the client's budget, and a
client past it is not served from the kept answers.

Pre-encoded answers (``server.ldap.answers``): ``answer_raw`` answers a PDU whose bytes after
the messageID name a kept answer without decoding it; a decoded search looks its normalised
key up; a finished search that qualifies is kept. While the change feed cannot read the store
(``answers_current`` is false) no answer is served from or added to the cache: an import may
have committed unseen. Log lines follow slapd's ``stats`` format
(one per request, one per result) and are not even built when info events are dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from server.ldap import codec
from server.ldap.answers import Answer, AnswerCache, NormalKey, frame, split_message_id
from server.ldap.config import LdapConfig
from server.ldap.directory import NEVER, Directory, Hit, Position
from server.ldap.entries import parse_dn, render
from server.ldap.errors import LdapError, ResultCode
from server.ldap.filters import Match, evaluate, to_text
from server.ldap.schema import describe, select
from server.privacy import BUDGET, OPEN, PRIVATE_KINDS, LdapRule
from server.privacy import message as privacy_message
from store import names
from store.errors import StoreError

STARTTLS = "1.3.6.1.4.1.1466.20037"
WHOAMI = "1.3.6.1.4.1.4203.1.11.3"
PAGED = "1.2.840.113556.1.4.319"
MANAGE_DSA_IT = "2.16.840.1.113730.3.4.2"  # no referrals here, so it changes nothing
KNOWN_CONTROLS = (PAGED, MANAGE_DSA_IT)
SEARCH_DONE, BIND, COMPARE, EXTENDED = 0x65, 0x61, 0x6F, 0x78
WRITE_TAGS = {"ADD": 0x69, "DEL": 0x6B, "MOD": 0x67, "MODRDN": 0x6D}
_REQUEST_TAGS: dict[type, int] = {codec.SearchRequest: SEARCH_DONE, codec.BindRequest: BIND,
                                  codec.CompareRequest: COMPARE,
                                  codec.ExtendedRequest: EXTENDED}
_OPERATION = {SEARCH_DONE: "search", BIND: "bind", COMPARE: "compare", EXTENDED: "extended",
              **{tag: "write" for tag in WRITE_TAGS.values()}}
CANDIDATES = 5  # index candidates a capped search reads, per entry of its cap
_UNSAFE = re.compile(r'[\x00-\x1f"\\]')


def clean(text: str, limit: int = 1024) -> str:
    """Text safe inside a quoted log field: control characters and quotes escaped, cut."""
    out = _UNSAFE.sub(lambda m: f"\\{ord(m.group()):02x}", text[:limit])
    return out + ("..." if len(text) > limit else "")


def outcome(exc: BaseException) -> tuple[ResultCode, str, str]:
    """(result code, diagnostic message, matched DN) of an operation that raised exc."""
    if isinstance(exc, names.DNSyntaxError):
        return ResultCode.INVALID_DN_SYNTAX, str(exc), ""
    if isinstance(exc, LdapError):
        return exc.code, exc.message, exc.matched
    if isinstance(exc, StoreError):
        return ResultCode.UNAVAILABLE, "store unavailable", ""
    return ResultCode.OTHER, "internal error", ""


class Service(Protocol):
    """What every session of a listener shares (``server.ldap.server.LdapFactory``)."""

    config: LdapConfig
    directory: Directory
    answers: AnswerCache
    tls: Any | None
    clock: Callable[[], datetime]
    timer: Callable[[], float]

    def record(self, operation: str, code: int, seconds: float) -> None: ...
    def record_cache(self, hit: bool) -> None: ...
    def answers_current(self) -> bool: ...


class Log(Protocol):
    """Where log lines go; ``failure`` takes the exception (or the adapter's Failure)."""

    def info(self, format: str, **kwargs: Any) -> None: ...
    def failure(self, format: str, failure: Any, **kwargs: Any) -> None: ...


@dataclass(frozen=True)
class Ended:
    """How a job ended: the result code and what goes with it."""

    code: ResultCode
    entries: int = 0
    message: str = ""
    matched: str = ""
    controls: bytes = b""


class Job:
    """A search or compare's store work and its outcome; ``steps()`` runs once."""

    def __init__(self, session: Session, op: int, message_id: int, started: float) -> None:
        self.session = session
        self.op = op
        self.message_id = message_id
        self.started = started
        self.abandoned = False
        self.ops: list[bytes] = []  # encoded protocolOps of the entries found
        self.ended: Ended | None = None
        self.error: BaseException | None = None  # a bug, logged on the reactor thread

    def steps(self) -> Iterator[None]:  # pragma: no cover - overridden
        return iter(())


class SearchJob(Job):
    def __init__(self, session: Session, op: int, message_id: int, started: float,
                 req: codec.SearchRequest, paged: tuple[int, bytes] | None,
                 fingerprint: bytes, after: Position | None, now: datetime,
                 cache_key: NormalKey | None, rest: bytes, epoch: int,
                 rule: LdapRule = OPEN, public: LdapRule = OPEN) -> None:
        super().__init__(session, op, message_id, started)
        self.rule = rule  # the privacy policy's decision for this client
        self.public = public  # and for a client that is not exempt (what may be kept)
        self.private = 0  # subscriber and certificate entries shown
        # its subscriber entries cost the client's budget (checked at the first one)
        self.budgeted = session.judged and not rule.free
        self.throttled = 0.0  # seconds the client was told to wait
        self.req = req
        self.paged = paged
        self.fingerprint = fingerprint
        self.after = after
        self.now = now
        self.cache_key = cache_key
        self.rest = rest
        self.epoch = epoch
        self.until = NEVER
        self.filter_text = ""
        self.keys: set[str] | None = set()  # entry keys shown; None: depends on any change

    def steps(self) -> Iterator[None]:
        """The one search routine: base, hits, limits, paging; abandon checked per step."""
        s = self.session
        service = s.service
        cfg = service.config
        directory = service.directory
        req = self.req
        count = 0
        try:
            base = directory.base_hit(req.base, self.now)
            if req.scope == 0 and base.entry.kind in ("glue", "subject", "ca", "crldp"):
                self.keys = {base.entry.key}  # the answer depends on this entry alone
                self.until = base.until
            else:
                self.keys = None
            rule = self.rule
            # a capped search reads a bounded number of index candidates (the privacy cap
            # makes every typed search capped: a harvester's loop costs little store work)
            results = directory.search(base, req.scope, req.filter, self.now, self.after,
                                       None if rule.cap is None else CANDIDATES * rule.cap)
            size = min(req.size_limit or cfg.size_limit, cfg.size_limit)
            if rule.cap is not None:
                size = min(size, rule.cap)
            deadline = self.started + min(req.time_limit or cfg.time_limit, cfg.time_limit)
            page = min(self.paged[0], cfg.size_limit) if self.paged is not None else None
            if page is not None:
                size = req.size_limit or (1 << 62)
            selection = select(req.attributes)
            allow = directory.allow
            timer = service.timer
            last: Position | None = None
            for hit in results:
                if self.abandoned:
                    return
                if timer() > deadline:
                    self.ended = Ended(ResultCode.TIME_LIMIT_EXCEEDED, count)
                    return
                if hit is None:
                    yield None
                    continue
                if count >= size:
                    self.ended = Ended(ResultCode.SIZE_LIMIT_EXCEEDED, count)
                    return
                if page is not None and count >= page and last is not None:
                    cookie = _encode_cookie(last, self.fingerprint)
                    self.ended = Ended(ResultCode.SUCCESS, count, controls=_paged(cookie))
                    return
                if hit.entry.kind in PRIVATE_KINDS:
                    if rule.structural:  # a listing reached the subscribers
                        self.ended = Ended(ResultCode.UNWILLING_TO_PERFORM, count, rule.message)
                        return
                    if self.budgeted:  # each subscriber entry is paid for as it is shown
                        wait = s.privacy.wait(s.host)
                        if wait > 0:
                            self.throttled = wait
                            self.ended = Ended(ResultCode.BUSY, count, _busy(s.privacy, wait))
                            return
                        s.privacy.charge(s.host, 1)
                    self.private += 1
                self._show(hit, render(hit.entry, selection, allow, req.types_only))
                count += 1
                last = hit.position
                yield None
        except Exception as exc:  # noqa: BLE001 - every error becomes its result code
            code, message, matched = outcome(exc)
            if code == ResultCode.OTHER:
                self.error = exc
            self.ended = Ended(code, count, message, matched)
            return
        self.ended = Ended(ResultCode.SUCCESS, count,
                           controls=_paged(b"") if self.paged is not None else b"")

    def _show(self, hit: Hit, attrs: list[tuple[str, list[bytes]]]) -> None:
        self.ops.append(codec.entry_op(hit.entry.dn, attrs))
        if hit.until < self.until:
            self.until = hit.until
        if self.keys is not None:
            self.keys.add(hit.entry.key)


class CompareJob(Job):
    def __init__(self, session: Session, op: int, message_id: int, started: float,
                 req: codec.CompareRequest, now: datetime) -> None:
        super().__init__(session, op, message_id, started)
        self.req = req
        self.now = now

    def steps(self) -> Iterator[None]:
        try:
            self.ended = Ended(self._compare())
        except Exception as exc:  # noqa: BLE001 - every error becomes its result code
            code, message, matched = outcome(exc)
            if code == ResultCode.OTHER:
                self.error = exc
            self.ended = Ended(code, 0, message, matched)
        yield from ()  # a generator: the work runs where it is iterated

    def _compare(self) -> ResultCode:
        directory = self.session.service.directory
        req = self.req
        entry = directory.lookup(parse_dn(req.dn), self.now)
        if entry is None:
            return ResultCode.NO_SUCH_OBJECT
        t, ok = describe(req.attribute)
        allow = directory.allow
        if t is None:
            return ResultCode.UNDEFINED_ATTRIBUTE_TYPE
        if not ok or not allow.allows(t, entry.meta) or not entry.values(t.name):
            return ResultCode.NO_SUCH_ATTRIBUTE
        if t.equality is None:
            return ResultCode.INAPPROPRIATE_MATCHING
        truth = evaluate(Match("=", req.attribute, req.value), entry, allow)
        return {True: ResultCode.COMPARE_TRUE, False: ResultCode.COMPARE_FALSE}.get(
            truth, ResultCode.INVALID_ATTRIBUTE_SYNTAX)  # type: ignore[arg-type]


@dataclass
class Reply:
    """What the adapter does with a message: write ``data``, run ``job`` through the store
    seam (then write ``Session.finish(job)``), start TLS after writing, or close."""

    data: bytes = b""
    job: Job | None = None
    start_tls: bool = False
    close: bool = False


class Session:
    """The operations of one connection: bind, search, compare, extended, abandon, unbind."""

    def __init__(self, service: Service, conn: int, log: Log, *, info: bool = True,
                 tls: bool = False, host: str = "") -> None:
        self.service = service
        self.conn = conn
        self.host = host  # the client's address (the privacy policy's exemptions, budget)
        privacy = getattr(service, "privacy", None)
        self.privacy = privacy  # server.privacy.Privacy, or None: no policy
        self.judged = privacy is not None and not privacy.exempt(host)
        self.log = log
        self.info = info  # build per-operation log lines
        self.tls = tls
        self.op = -1
        self.jobs: dict[int, Job] = {}  # running jobs by messageID

    # --- the hot path ------------------------------------------------------------------------

    def answer_raw(self, pdu: bytes) -> bytes | None:
        """A kept answer for a search PDU, found by its bytes alone; None: decode it."""
        answers = self.service.answers
        if not answers or not self.service.answers_current():
            return None
        split = split_message_id(pdu)
        if split is None:
            return None
        message_id, rest = split
        service = self.service
        now = service.clock()
        answer = answers.by_raw(rest, now.timestamp())
        if answer is None:
            return None
        if self.judged and answer.cost and self.privacy.wait(self.host) > 0:
            return None  # decoded, run, and answered busy
        self.op += 1
        if self.info:
            self._log_search(answer.log)
        data = answer.encode(message_id)
        service.record_cache(True)
        self._searched(ResultCode.SUCCESS, answer.entries, 0.0, "")
        self._charge(answer.cost)
        return data

    # --- messages ----------------------------------------------------------------------------

    def receive(self, msg: codec.Message, busy: bool = False) -> Reply:
        """The reply to one decoded message; ``busy``: the store's queue is full."""
        self.op += 1
        req = msg.request
        if isinstance(req, codec.UnbindRequest):
            self.log.info("conn={conn} op={op} UNBIND", conn=self.conn, op=self.op)
            self.abandon_all()
            return Reply(close=True)
        if isinstance(req, codec.AbandonRequest):
            self.log.info("conn={conn} op={op} ABANDON msg={target}", conn=self.conn,
                          op=self.op, target=req.message_id)
            job = self.jobs.pop(req.message_id, None)
            if job is not None:
                job.abandoned = True
            return Reply()
        paged: tuple[int, bytes] | None = None
        critical = False
        for control in msg.controls:
            if control.oid == PAGED and isinstance(req, codec.SearchRequest):
                paged = codec.decode_paged_value(control.value)
                critical = control.critical
            elif control.critical and control.oid not in KNOWN_CONTROLS:
                tag = (WRITE_TAGS[req.kind] if isinstance(req, codec.WriteRequest)
                       else _REQUEST_TAGS.get(type(req)))
                if tag is None:
                    return Reply()
                return Reply(self._result(msg.message_id, tag,
                                          ResultCode.UNAVAILABLE_CRITICAL_EXTENSION,
                                          message=f"control {control.oid} is not supported"))
        if isinstance(req, codec.SearchRequest):
            return self._search(msg, req, paged, busy, critical)
        if isinstance(req, codec.BindRequest):
            return Reply(self._bind(msg.message_id, req))
        if isinstance(req, codec.CompareRequest):
            return self._compare(msg.message_id, req, busy)
        if isinstance(req, codec.ExtendedRequest):
            return self._extended(msg.message_id, req)
        assert isinstance(req, codec.WriteRequest)
        self.log.info('conn={conn} op={op} {kind} dn="{dn}"', conn=self.conn, op=self.op,
                      kind=req.kind, dn=clean(req.dn))
        return Reply(self._result(msg.message_id, WRITE_TAGS[req.kind],
                                  ResultCode.UNWILLING_TO_PERFORM,
                                  message="the directory is read-only"))

    def abandon_all(self) -> None:
        """The connection ends: no running job is answered."""
        for job in self.jobs.values():
            job.abandoned = True
        self.jobs.clear()

    def finish(self, job: Job, failure: Any = None) -> bytes:
        """On the reactor thread, once ``job.steps()`` ran (``failure``: it raised): the PDUs
        of its answer, empty when it was abandoned."""
        if self.jobs.get(job.message_id) is job:
            del self.jobs[job.message_id]
        if failure is not None:
            self.log.failure("conn={conn} op={op} internal error", failure, conn=self.conn,
                             op=job.op)
            job.ended = Ended(ResultCode.OTHER, len(job.ops), "internal error")
        elif job.error is not None:
            self.log.failure("conn={conn} op={op} internal error", job.error,
                             conn=self.conn, op=job.op)
        if job.abandoned or job.ended is None:
            return b""
        ended = job.ended
        if isinstance(job, CompareJob):
            return self._result(job.message_id, COMPARE, ended.code, ended.matched,
                                ended.message, op=job.op, started=job.started)
        assert isinstance(job, SearchJob)
        mid = job.message_id
        done = codec.result_op(SEARCH_DONE, int(ended.code), ended.matched, ended.message,
                               b"", ended.controls)
        data = b"".join([frame(mid, op) for op in job.ops]) + frame(mid, done)
        self._searched(ended.code, ended.entries, self.service.timer() - job.started,
                       ended.message, op=job.op)
        public = job.public
        cost = 0 if public.free else job.private  # what a kept answer costs (paid above)
        if (job.rule.structural and ended.code == ResultCode.UNWILLING_TO_PERFORM
                and self.privacy is not None):
            self.privacy.refused("ldap", job.rule.reason)
        if job.throttled:
            self.privacy.throttled(self.host, "ldap", job.throttled)
        if (job.cache_key is not None and ended.code == ResultCode.SUCCESS
                and not public.refused and not (public.structural and job.private)
                and (public.cap is None or ended.entries <= public.cap)):
            req = job.req
            answer = Answer((*job.ops, done), ended.entries, job.until,
                            None if job.keys is None else frozenset(job.keys),
                            (req.base, req.scope, req.deref, job.filter_text,
                             " ".join(req.attributes)), cost=cost)
            self.service.answers.put(job.cache_key, job.rest, answer, job.epoch)
        return data

    def _charge(self, cost: int) -> None:
        """The client was shown ``cost`` subscriber entries (its privacy budget)."""
        if cost and self.judged:
            self.privacy.charge(self.host, cost)

    # --- bind, compare, extended -------------------------------------------------------------

    def _bind(self, message_id: int, req: codec.BindRequest) -> bytes:
        method = {"simple": 128, "sasl": 163}.get(req.method, 0)
        self.log.info('conn={conn} op={op} BIND dn="{dn}" method={method}', conn=self.conn,
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
        return self._result(message_id, BIND, code, message=text)

    def _compare(self, message_id: int, req: codec.CompareRequest, busy: bool) -> Reply:
        self.log.info('conn={conn} op={op} CMP dn="{dn}" attr="{attr}"', conn=self.conn,
                      op=self.op, dn=clean(req.dn), attr=clean(req.attribute))
        refusal = self._refusal(busy)
        if refusal is not None:
            return Reply(self._result(message_id, COMPARE, ResultCode.BUSY, message=refusal))
        service = self.service
        job = CompareJob(self, self.op, message_id, service.timer(), req, service.clock())
        self.jobs[message_id] = job
        return Reply(job=job)

    def _extended(self, message_id: int, req: codec.ExtendedRequest) -> Reply:
        self.log.info("conn={conn} op={op} EXT oid={oid}", conn=self.conn, op=self.op,
                      oid=clean(req.name, 128))
        if req.name == WHOAMI:
            return Reply(self._extended_result(message_id, ResultCode.SUCCESS, value=b""))
        if req.name != STARTTLS:
            return Reply(self._extended_result(message_id, ResultCode.PROTOCOL_ERROR,
                                               "unsupported extended operation"))
        if self.service.tls is None:
            code, text = ResultCode.UNAVAILABLE, "TLS is not configured"
        elif self.tls:
            code, text = ResultCode.OPERATIONS_ERROR, "TLS is already established"
        elif self.jobs:
            code, text = ResultCode.OPERATIONS_ERROR, "operations are outstanding"
        else:
            self.tls = True
            return Reply(self._extended_result(message_id, ResultCode.SUCCESS, name=STARTTLS),
                         start_tls=True)
        return Reply(self._extended_result(message_id, code, text, STARTTLS))

    def _extended_result(self, message_id: int, code: ResultCode, message: str = "",
                         name: str | None = None, value: bytes | None = None) -> bytes:
        self._logged_result(EXTENDED, code, message, self.op, 0.0)
        return codec.encode_extended(message_id, int(code), message, name, value)

    def _refusal(self, busy: bool) -> str | None:
        if len(self.jobs) >= self.service.config.max_outstanding:
            return "too many outstanding operations"
        return "server busy" if busy else None

    def _result(self, message_id: int, tag: int, code: ResultCode, matched: str = "",
                message: str = "", op: int | None = None, started: float | None = None
                ) -> bytes:
        seconds = 0.0 if started is None else self.service.timer() - started
        self._logged_result(tag, code, message, self.op if op is None else op, seconds)
        return codec.encode_result(message_id, tag, int(code), matched, message)

    def _logged_result(self, tag: int, code: ResultCode, message: str, op: int,
                       seconds: float) -> None:
        self.log.info('conn={conn} op={op} RESULT tag={tag} err={err} text="{text}"',
                      conn=self.conn, op=op, tag=tag, err=int(code), text=clean(message))
        self.service.record(_OPERATION.get(tag, "other"), int(code), seconds)

    # --- search ------------------------------------------------------------------------------

    def _search(self, msg: codec.Message, req: codec.SearchRequest,
                paged: tuple[int, bytes] | None, busy: bool, critical: bool = False) -> Reply:
        service = self.service
        filter_text = to_text(req.filter, 1 << 20)  # once: the log line, the cache key
        if self.info:
            self._log_search((req.base, req.scope, req.deref, filter_text,
                              " ".join(req.attributes)))
        message_id = msg.message_id
        started = service.timer()
        refusal = self._refusal(busy)
        if refusal is not None:
            return Reply(self._search_done(message_id, ResultCode.BUSY, 0, refusal, started))
        rule = public = OPEN
        privacy = self.privacy
        if privacy is not None:
            public = privacy.ldap(req.filter, req.scope, None if paged is None else critical)
            if self.judged:
                rule = public
                if rule.refused:
                    privacy.refused("ldap", rule.reason)
                    return Reply(self._search_done(message_id, ResultCode.UNWILLING_TO_PERFORM,
                                                   0, rule.message, started))
                if not rule.paging:
                    paged = None  # a non-critical control: answered as without it
                if req.scope != 0 and not rule.free:  # a listing past the budget: no work
                    wait = privacy.wait(self.host)
                    if wait > 0:
                        privacy.throttled(self.host, "ldap", wait)
                        return Reply(self._search_done(message_id, ResultCode.BUSY, 0,
                                                       _busy(privacy, wait), started))
        fingerprint = b""
        after: Position | None = None
        if paged is not None:
            fingerprint = hashlib.sha256(
                json.dumps([req.base, req.scope, filter_text]).encode()
            ).digest()[:8]
            if paged[1]:
                after = _decode_cookie(paged[1], fingerprint)
                if after is None:
                    return Reply(self._search_done(message_id, ResultCode.UNWILLING_TO_PERFORM,
                                                   0, "invalid paging cookie", started))
            if paged[0] == 0:  # RFC 2696 §3: size 0 ends a paged search
                return Reply(self._search_done(message_id, ResultCode.SUCCESS, 0, "", started,
                                               controls=_paged(b"")))
        now = service.clock()
        answers = service.answers
        key: NormalKey | None = None
        rest = b""
        if answers.enabled and not msg.controls and service.answers_current():
            key = self._normal_key(req, filter_text, rule.cap)
            split = split_message_id(msg.raw) if msg.raw else None
            if key is not None and split is not None:
                rest = split[1]
                answer = answers.by_normal(key, rest, now.timestamp())
                if (answer is not None and answer.cost and self.judged
                        and privacy.wait(self.host) > 0):
                    answer = None  # run, and answered busy
                service.record_cache(answer is not None)
                if answer is not None:
                    self._searched(ResultCode.SUCCESS, answer.entries, 0.0, "")
                    self._charge(answer.cost)
                    return Reply(answer.encode(message_id))
            else:
                key = None
        job = SearchJob(self, self.op, message_id, started, req, paged, fingerprint, after, now,
                        key, rest, answers.epoch, rule, public)
        job.filter_text = filter_text
        self.jobs[message_id] = job
        return Reply(job=job)

    def _normal_key(self, req: codec.SearchRequest, filter_text: str,
                    cap: int | None = None) -> NormalKey | None:
        """What determines a search's answer (None: its base is not a DN)."""
        try:
            base = parse_dn(req.base).key
        except names.DNSyntaxError:
            return None
        cfg = self.service.config
        size = min(req.size_limit or cfg.size_limit, cfg.size_limit, cap or cfg.size_limit)
        return (base, req.scope, filter_text,
                tuple(a.lower() for a in req.attributes), req.types_only, size)

    def _search_done(self, message_id: int, code: ResultCode, count: int, message: str,
                     started: float, controls: bytes = b"") -> bytes:
        self._searched(code, count, self.service.timer() - started, message)
        return frame(message_id, codec.result_op(SEARCH_DONE, int(code), "", message, b"",
                                                 controls))

    def _log_search(self, fields: tuple[str, int, int, str, str]) -> None:
        base, scope, deref, filter_text, attrs = fields
        self.log.info('conn={conn} op={op} SRCH base="{base}" scope={scope} deref={deref} '
                      'filter="{filter}" attrs="{attrs}"', conn=self.conn, op=self.op,
                      base=clean(base), scope=scope, deref=deref, filter=clean(filter_text),
                      attrs=clean(attrs))

    def _searched(self, code: ResultCode, count: int, seconds: float, message: str,
                  op: int | None = None) -> None:
        if self.info:
            self.log.info('conn={conn} op={op} SEARCH RESULT tag=101 err={err} '
                          'nentries={nentries} etime={etime:.4f} text="{text}"',
                          conn=self.conn, op=self.op if op is None else op, err=int(code),
                          nentries=count, etime=seconds, text=clean(message))
        self.service.record("search", int(code), seconds)


def _busy(privacy: Any, wait: float) -> str:
    return f"{privacy_message(BUDGET, privacy.config)} (in {wait:.0f} s)"


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
