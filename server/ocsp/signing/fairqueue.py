"""Requests that need a fresh signature: a bounded, per-address fair queue (the server's
signing seam, ``OcspService.signing``).

Strategy: ``SigningQueue.submit`` is what ``OcspService.answer`` calls for a request the
pre-signed cache did not answer. Cheap answers leave at once, on the reactor thread
(``OcspService.triage``): a malformed request, and a request whose CertIDs are cached under
other bytes. The rest waits
in a queue bounded in all (``signing_queue``) and per client address
(``signing_queue_per_address``), with one FIFO per address served round-robin, so one
address can neither fill the queue nor delay the others' requests by more than one of its
own each turn. When a request does not fit, it is shed at once: a nonce request whose
certificate has a pre-signed response gets that response without the nonce (RFC 5019 §2.1
lets a responder leave the nonce out; ``shed_nonce_with_presigned``), anything else
``tryLater`` (RFC 6960 §2.3). Shed requests are counted (``/metrics``) and logged at most
once per second per address, with the count since the last line; the connection of a shed
request reads its next request only ``SHED_BACKOFF`` later (the answer itself leaves at
once), so that clients asking again at once cannot turn shedding into a flood of cheap
answers that crowds out everyone's cached ones. A request waiting longer
than ``MAX_WAIT`` is answered ``tryLater`` too: a flood is always answered, never left
hanging.

Signed answers about never-issued serials cost as much as real ones and are what an attacker
sends most cheaply; ``OcspService.settle`` keeps them in their own bounded cache, and each
address may have ``unknown_per_address`` of them signed per second (a token bucket): past
it, a request found to be about never-issued serials is answered ``tryLater`` unsigned.

A nonce request for CertIDs whose answer is cached costs one signature: its job carries
that answer (looked up again when it is handed over: it may have been voided meanwhile) and
the signer builds the ResponseData from its pre-encoded parts (``OcspService.sign_nonce``).
How fast requests are handed over is paced (``server.ocsp.signing.pacer.Pacer``, fed the
listener's request count passed in as ``requests``) so that, on a busy server, cheap answers
keep most of the event loop.

Who signs (``server.ocsp.signing.executors.Executor``): ``ProcessSigners``
(``server.ocsp.signing.processes``) — child processes
(``server.ocsp.signworker``, spawned with ``reactor.spawnProcess``, length-prefixed pickles
over pipes), each
with its own store connection and signers, run at a lower CPU priority than the server so
that the kernel, too, serves cheap work first. Not threads: ``cryptography`` (50) releases the
GIL around the OpenSSL signature itself, but with a P-256 key that is ~24 of a miss's ~126 µs;
the rest (parsing, the store read, DER building) is Python holding the GIL, so signing
threads take the interpreter away from the reactor: docs/performance.md has the measurement.
``LocalSigners`` (``signing_processes = 0``) signs in the server process — in the store
threads when the store is threaded, else on the reactor one request per turn.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from time import perf_counter
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from server.ocsp.cache import CachedResponse
from server.ocsp.codec import InternalError, TryLater
from server.ocsp.service import OcspService, Outcome, Signed, Work
from server.ocsp.signing.executors import Executor
from server.ocsp.signing.pacer import Pacer

log = Logger(namespace="server.ocsp")

MAX_WAIT = 10.0  # seconds a request may wait for a signer before it is answered tryLater
MAX_RUN = 30.0  # seconds a request may be signed before it is answered tryLater anyway
ADDRESSES = 10_000  # per-address state (token buckets, log times) kept at most
# A shed answer leaves at once, but the connection's next request is read this much later:
# shed answers cost as little as cached ones, so a client asking again at once on many
# connections would otherwise compete with everybody's cached answers at full speed.
SHED_BACKOFF = 0.1


def try_later(reason: str) -> Outcome:
    return Outcome.error(TryLater(reason))


# --- per-address bookkeeping --------------------------------------------------------------


class TokenBuckets:
    """A token bucket per address: ``rate`` per second, up to ``rate`` (one second) saved."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def available(self, address: str) -> bool:
        found = self._buckets.get(address)
        if found is None:
            return True
        tokens, at = found
        return tokens + (self.clock() - at) * self.rate >= 1.0

    def take(self, address: str) -> None:
        now = self.clock()
        tokens, at = self._buckets.get(address, (self.rate, now))
        tokens = min(self.rate, tokens + (now - at) * self.rate) - 1.0
        if len(self._buckets) >= ADDRESSES and address not in self._buckets:
            self._buckets.clear()  # bounded: forgetting only lets a few more through
        self._buckets[address] = (tokens, now)


class ShedLog:
    """At most one log line per address per second about shed requests."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # address -> (logged at, shed since)

    def shed(self, address: str, outcome: Outcome) -> None:
        now = self.clock()
        at, count = self._last.get(address, (-2.0, 0))
        count += 1
        if now - at < 1.0:
            self._last[address] = (at, count)
            return
        if len(self._last) >= ADDRESSES and address not in self._last:
            self._last.clear()
        self._last[address] = (now, 0)
        log.info("OCSP overload: shed {count} request(s) from {client} since the last line"
                 " ({answer}: {reason})", count=count, client=address,
                 answer=outcome.status if outcome.status != "successful" else "pre-signed",
                 reason=outcome.reason or "signing queue full")


# --- the queue ------------------------------------------------------------------------------


@dataclass
class Job:
    der: bytes
    now: datetime
    client: str
    queued: float
    started: float = 0.0
    done: defer.Deferred[Outcome] = field(default_factory=defer.Deferred)
    answered: bool = False
    result: Outcome | None = None
    # a nonce request whose CertIDs have a cached answer: (CertIDs key, that answer) and the
    # nonce; signed from the answer's pre-encoded parts (``OcspService.nonce_parts``)
    parts: tuple[bytes, CachedResponse] | None = None
    nonce: bytes = b""


class SigningQueue:
    """Bounded, fair per client address, shedding when full; see the module docstring."""

    def __init__(self, service: OcspService, executor: Executor, config: Any, *,
                 reactor: Any, requests: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 pacer: Pacer | None = None) -> None:
        self.service = service
        self.executor = executor
        self.reactor = reactor
        self.clock = clock
        self._configure(config)
        self._waiting: dict[str, deque[Job]] = {}
        self._ring: deque[str] = deque()  # addresses with waiting requests, in turn
        self._held: dict[str, int] = {}  # waiting + being signed, per address
        self._running: dict[int, Job] = {}  # by id()
        self.waiting = 0
        self.running = 0
        self.shed_try_later = 0
        self.shed_presigned = 0
        self.unknown_limited = 0  # never-issued answers refused by the per-address rate
        self.expired = 0  # waited or ran too long: answered tryLater
        self._shed_log = ShedLog(clock)
        self._watch: Any = None
        self.pacer = pacer if pacer is not None else Pacer(clock)
        # requests the HTTP listener answered so far, all kinds (its access log's count):
        # the pacing compares them with those that came here; None: no pacing
        self.requests = requests
        self._submitted = 0  # requests that came here during the current tick
        self._spent = 0.0  # seconds this tick's requests here took on the reactor
        self._requests_at_tick = 0
        self._tick: Any = None
        self._paced: Any = None
        executor.on_free = self._dispatch

    def _configure(self, config: Any) -> None:
        http = config.http
        self.capacity = http.signing_queue
        self.per_address = http.signing_queue_per_address
        self.presigned_for_nonce = http.shed_nonce_with_presigned
        self.unknown = TokenBuckets(http.unknown_per_address, self.clock)

    def reload(self, config: Any) -> None:
        self._configure(config)
        self.executor.reload(config)

    def stop(self) -> Any:
        for jobs in self._waiting.values():
            for job in jobs:
                self._answer(job, try_later("server stopping"))
        self._waiting.clear()
        self._ring.clear()
        self.waiting = 0
        for call in (self._watch, self._tick, self._paced):
            if call is not None and call.active():
                call.cancel()
        self._watch = self._tick = self._paced = None
        return self.executor.stop()

    @property
    def held(self) -> int:
        """Requests waiting for or being signed (the queue's fill)."""
        return self.waiting + self.running

    def counters(self) -> dict[str, int]:
        return {"shed_try_later": self.shed_try_later, "shed_presigned": self.shed_presigned,
                "unknown_limited": self.unknown_limited, "expired": self.expired,
                "waiting": self.waiting, "running": self.running,
                "unknown_cached": len(self.service.unknown),
                "unknown_hits": self.service.unknown.hits,
                "paced_rate": int(self.pacer.rate or 0)}

    # --- requests --------------------------------------------------------------------------

    def submit(self, der: bytes, now: datetime, client: str) -> Outcome | defer.Deferred[Outcome]:
        """The answer to a request the raw-bytes cache did not answer (see module doc)."""
        started = perf_counter()
        try:
            return self._submit(der, now, client)
        finally:
            self._spent += perf_counter() - started

    def _submit(self, der: bytes, now: datetime,
                client: str) -> Outcome | defer.Deferred[Outcome]:
        service = self.service
        self._submitted += 1
        if self._tick is None and self.requests is not None:
            self._requests_at_tick = self.requests()
            self.pacer.reset()
            self._tick = self.reactor.callLater(Pacer.TICK, self._on_tick)
        work = service.triage(der, now, client)
        if type(work) is not Work:
            return work  # type: ignore[return-value]
        request = work.request
        held = self._held.get(client, 0)
        if self.held >= self.capacity or held >= self.per_address or self.executor.refuses():
            return self._shed(request, now, client)
        job = Job(der, now, client, self.clock(), parts=work.parts, nonce=request.nonce or b"")
        self._held[client] = held + 1
        queue = self._waiting.get(client)
        if queue is None:
            queue = self._waiting[client] = deque()
            self._ring.append(client)
        queue.append(job)
        self.waiting += 1
        self._dispatch()
        if job.answered:  # signed at once (inline)
            return job.result  # type: ignore[return-value]
        if self._watch is None:
            self._watch = self.reactor.callLater(1.0, self._expire)
        return job.done

    def _shed(self, request: Any, now: datetime, client: str) -> Outcome:
        out = None
        if self.presigned_for_nonce and request.nonce is not None:
            out = self.service.presigned_answer(request, now)
        if out is not None:
            self.shed_presigned += 1
        else:
            self.shed_try_later += 1
            out = try_later("signing queue full" if self.held >= self.capacity
                            else "store threads busy" if self.executor.refuses()
                            else "signing queue share of this address full")
        self._shed_log.shed(client, out)
        return replace(out, backoff=SHED_BACKOFF)

    def _on_tick(self) -> None:
        self._tick = None
        assert self.requests is not None
        requests = self.requests()
        signing, spent = self._submitted, self._spent
        other = max(0, requests - self._requests_at_tick - signing)
        self._submitted = 0
        self._spent = 0.0
        self._requests_at_tick = requests
        if signing == 0 and not self.held:
            self.pacer.reset()  # idle: the next request starts a new tick
            return
        self.pacer.tick(signing, other, spent)
        self._tick = self.reactor.callLater(Pacer.TICK, self._on_tick)
        self._dispatch()

    def _paced_dispatch(self) -> None:
        self._paced = None
        self._dispatch()

    def _dispatch(self) -> None:
        executor, ring, waiting, pacer = self.executor, self._ring, self._waiting, self.pacer
        while ring and executor.free():
            if not pacer.allow():  # the event loop is for cheap answers first: see Pacer
                if self._paced is None:
                    self._paced = self.reactor.callLater(pacer.delay(), self._paced_dispatch)
                break
            client = ring.popleft()
            jobs = waiting[client]
            job = jobs.popleft()
            if jobs:
                ring.append(client)
            else:
                del waiting[client]
            self.waiting -= 1
            self.running += 1
            job.started = self.clock()
            self._running[id(job)] = job
            epoch = self.service.cache.epoch  # before the signer's store reads
            entry = self._parts(job)
            if entry is not None:
                d = executor.sign_nonce(entry, job.nonce, job.now)
            else:
                d = executor.run(job.der, job.now, self.unknown.available(client))
            d.addCallbacks(self._signed, self._failed, callbackArgs=(job, epoch),
                           errbackArgs=(job,))
        executor.flush()

    def _parts(self, job: Job) -> CachedResponse | None:
        """The cached answer whose parts sign job's nonce answer, if still live now (it may
        have been voided, or re-signed, while the job waited)."""
        if job.parts is None:
            return None
        current = self.service.cache.peek(job.parts[0], job.now)
        return current if current is not None and current.responses else None

    def _signed(self, signed: Signed, job: Job, epoch: int) -> None:
        started = perf_counter()
        try:
            self._settle(signed, job, epoch)
        finally:
            self._spent += perf_counter() - started

    def _settle(self, signed: Signed, job: Job, epoch: int) -> None:
        self.running -= 1
        self._running.pop(id(job), None)
        self._release(job.client)
        out = signed.outcome
        if signed.unknown:
            if out.status == "try_later":
                self.unknown_limited += 1
            elif out.cache != "hit":
                self.unknown.take(job.client)
        out = self.service.settle(signed, epoch)
        self._answer(job, out)
        self._dispatch()

    def _failed(self, failure: Failure, job: Job) -> None:
        self.running -= 1
        self._running.pop(id(job), None)
        self._release(job.client)
        log.failure("OCSP signing failed", failure)
        self._answer(job, Outcome.error(InternalError("internal error")))
        self._dispatch()

    def _release(self, client: str) -> None:
        left = self._held.get(client, 1) - 1
        if left > 0:
            self._held[client] = left
        else:
            self._held.pop(client, None)

    def _answer(self, job: Job, out: Outcome) -> None:
        if not job.answered:
            job.answered = True
            job.result = out
            job.done.callback(out)

    def _expire(self) -> None:
        """Answer tryLater what waited ``MAX_WAIT`` or was being signed for ``MAX_RUN`` (no
        signer free, a store that hangs): the late signature, if any, is cached only."""
        self._watch = None
        now = self.clock()
        for job in list(self._running.values()):
            if not job.answered and job.started <= now - MAX_RUN:
                self.expired += 1
                self._answer(job, try_later("not signed within %gs" % MAX_RUN))
        limit = now - MAX_WAIT
        for client in list(self._ring):
            jobs = self._waiting[client]
            while jobs and jobs[0].queued <= limit:
                job = jobs.popleft()
                self.waiting -= 1
                self.expired += 1
                self._release(client)
                self._answer(job, try_later("no signer free within %gs" % MAX_WAIT))
            if not jobs:
                del self._waiting[client]
                self._ring.remove(client)
        if self.waiting or self._running:
            self._watch = self.reactor.callLater(1.0, self._expire)
        self._dispatch()  # a signer may have come back (a restarted process)
