"""Requests that need a fresh signature: a bounded, per-address fair queue and a signing pool.

Strategy: ``SigningQueue.submit`` is what ``OcspService.respond_to`` calls for a request the
pre-signed cache did not answer. Cheap answers leave at once, on the reactor thread: a
malformed request, and a request whose CertIDs are cached under other bytes. The rest waits
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
How fast requests are handed over is paced (``Pacer``) so that, on a busy server, cheap
answers keep most of the event loop.

Who signs (``Executor``): ``ProcessSigners`` (``server.ocsp.signprocs``) — child processes
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
from abc import ABC, abstractmethod
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
from server.ocsp.codec import OcspError, encode_error
from server.ocsp.der import NonceShapes
from server.ocsp.service import OcspService, Outcome, Signed, nonce_signing

log = Logger(namespace="server.ocsp")

MAX_WAIT = 10.0  # seconds a request may wait for a signer before it is answered tryLater
MAX_RUN = 30.0  # seconds a request may be signed before it is answered tryLater anyway
ADDRESSES = 10_000  # per-address state (token buckets, log times) kept at most
# A shed answer leaves at once, but the connection's next request is read this much later:
# shed answers cost as little as cached ones, so a client asking again at once on many
# connections would otherwise compete with everybody's cached answers at full speed.
SHED_BACKOFF = 0.1


def try_later(reason: str) -> Outcome:
    return Outcome(encode_error("try_later"), "try_later", "-", reason=reason)


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


# --- pacing ---------------------------------------------------------------------------------


class Pacer:
    """How fast requests may be handed to the signers, so that answers needing a signature
    cannot take the event loop from those that need none.

    A request signed in a signing process still costs the server process several times what
    a cached answer does (reading and parsing it, handing it over, sending the answer). As
    long as the server process has CPU to spare, or everything it answers needs a signature,
    requests are handed over as fast as the signers take them. Once, over a ``TICK``, the
    process used ``BUSY`` of a core or more, answered ``OTHERS`` requests or more without a
    signature (a client is there to protect, not just a health check; however few they are
    next to the flood, which is what a flood does to them), and spent more than ``SHARE`` of
    the time on the signing path (``SigningQueue`` measures its own part of that cost:
    submitting, handing over, answering), the hand-over rate is cut to ``CUT`` of what it was
    (never below ``MIN_RATE``); each ``TICK`` that is no longer so it grows by ``GROW``, and
    it becomes unlimited again once well above what is handed over. Requests held back wait
    in the queue, which sheds as always when full."""

    TICK = 0.1  # seconds between looks at the load
    BUSY = 0.8  # share of one core the server process may use before signing is slowed
    SHARE = 0.1  # of the time, measured on the signing path, it may then take
    CUT = 0.7
    GROW = 1.25
    MIN_RATE = 50.0  # hand-overs per second, whatever the load
    OTHERS = 10  # answers without a signature in a tick that make a client worth protecting

    def __init__(self, clock: Callable[[], float],
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.clock = clock
        self.cpu = cpu
        self.rate: float | None = None  # hand-overs per second; None: as fast as taken
        self._tokens = 0.0
        self._at = clock()
        self.handed = 0  # hand-overs in the current tick
        self._start = (clock(), cpu())

    def allow(self) -> bool:
        """Whether one more request may be handed over now (counted if so)."""
        rate = self.rate
        if rate is not None:
            now = self.clock()
            burst = max(1.0, rate * 0.01)
            self._tokens = min(burst, self._tokens + (now - self._at) * rate)
            self._at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
        self.handed += 1
        return True

    def delay(self) -> float:
        """Seconds until ``allow`` can say yes again."""
        return 0.0 if self.rate is None else max(0.001, (1.0 - self._tokens) / self.rate)

    def tick(self, signing: int, other: int, spent: float) -> None:
        """The end of a tick in which ``signing`` requests needed a signature (``spent``
        seconds measured on their path) and ``other`` requests were answered without one."""
        now, cpu = self.clock(), self.cpu()
        wall = max(now - self._start[0], 1e-6)
        busy = (cpu - self._start[1]) / wall
        handed = self.handed / wall
        self._start = (now, cpu)
        self.handed = 0
        if busy >= self.BUSY and other >= self.OTHERS and signing and spent / wall > self.SHARE:
            base = handed if self.rate is None else min(handed, self.rate)
            self.rate = max(self.MIN_RATE, self.CUT * base)
            self._tokens = min(self._tokens, 1.0)
            self._at = now
        elif self.rate is not None:
            self.rate *= self.GROW
            if self.rate > 2.0 * handed + self.MIN_RATE:
                self.rate = None

    def reset(self) -> None:
        """Idle: nothing waits, nothing was asked for over a tick."""
        self.rate = None
        self.handed = 0
        self._start = (self.clock(), self.cpu())


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
                 reactor: Any, clock: Callable[[], float] = time.monotonic) -> None:
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
        self.pacer = Pacer(clock)
        # requests the HTTP listener answered so far, all kinds (set by its factory): the
        # pacing compares them with those that came here
        self.requests: Callable[[], int] | None = None
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
        self.shapes = NonceShapes(http.max_certids)

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
        try:
            request = self.shapes.parse(der)
        except OcspError as exc:
            return Outcome(encode_error(exc.status), exc.status, "-", reason=str(exc))
        cached = service.cached_answer(der, request, now)
        if cached is not None:
            return cached
        held = self._held.get(client, 0)
        if self.held >= self.capacity or held >= self.per_address or self.executor.refuses():
            return self._shed(request, now, client)
        job = Job(der, now, client, self.clock(), parts=service.nonce_parts(request, now),
                  nonce=request.nonce or b"")
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
        self._answer(job, Outcome(encode_error("internal_error"), "internal_error", "-",
                                  reason="internal error"))
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


# --- who signs ------------------------------------------------------------------------------


class Executor(ABC):
    """Runs ``OcspService.compute`` somewhere; ``on_free`` is called when a slot frees up.
    ``free`` and ``run`` are what each kind of signer must say; the rest has defaults."""

    on_free: Callable[[], None] = staticmethod(lambda: None)  # type: ignore[assignment]

    @abstractmethod
    def free(self) -> bool:
        """Whether a request can be handed over now."""

    def refuses(self) -> bool:
        """Whether requests must be shed now, queue or not."""
        return False

    @abstractmethod
    def run(self, der: bytes, now: datetime, sign_unknown: bool) -> defer.Deferred[Signed]:
        """Compute the answer to der at now (signing ``unknown`` answers when sign_unknown)."""

    @abstractmethod
    def sign_nonce(self, entry: CachedResponse, nonce: bytes,
                   now: datetime) -> defer.Deferred[Signed]:
        """Sign the answer to a nonce request from the parts of entry, the cached answer to
        its CertIDs (``OcspService.sign_nonce``)."""

    def flush(self) -> None:
        """Send the requests handed over so far (an executor may gather them)."""

    def reload(self, config: Any) -> None:
        """New signers (SIGHUP); the server's own service has reloaded already."""

    def stop(self) -> Any:
        return None


class LocalSigners(Executor):
    """Signs in the server process: in the store threads, or on the reactor one per turn."""

    def __init__(self, service: OcspService, access: Any, reactor: Any) -> None:
        self.service = service
        self.access = access if access is not None and not access.inline else None
        self.reactor = reactor
        self.slots = self.access.threads if self.access is not None else 1
        self.busy = 0

    def refuses(self) -> bool:
        return self.access is not None and self.access.busy()  # a dead database

    def free(self) -> bool:
        return self.busy < self.slots

    def run(self, der: bytes, now: datetime, sign_unknown: bool) -> defer.Deferred[Signed]:
        self.busy += 1
        compute = self.service.compute
        if self.access is not None:
            d: defer.Deferred[Signed] = self.access.run(compute, der, now,
                                                        sign_unknown=sign_unknown, peek=False)
        else:  # inline: on the reactor thread, as without a queue
            d = defer.succeed(compute(der, now, sign_unknown=sign_unknown, peek=False))
        return d.addBoth(self._done)

    def sign_nonce(self, entry: CachedResponse, nonce: bytes,
                   now: datetime) -> defer.Deferred[Signed]:
        self.busy += 1
        service = self.service
        args = nonce_signing(entry, nonce, now)
        if self.access is not None:
            d: defer.Deferred[Any] = self.access.run(service.sign_nonce, *args)
        else:
            d = defer.succeed(service.sign_nonce(*args))
        d.addCallback(lambda r: Signed(service.nonce_outcome(entry, r)))
        return d.addBoth(self._done)

    def _done(self, result: Any) -> Any:
        self.busy -= 1
        return result


class OverloadCollector:
    """``/metrics``: the signing queue's fill and what it shed (read at scrape time)."""

    def __init__(self, queue: SigningQueue) -> None:
        self.queue = queue

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.queue.counters()
        shed = CounterMetricFamily(
            "certpub_ocsp_shed", "OCSP requests needing a signature answered at once because"
            " the signing queue (or this address's share of it) was full, by answer.",
            labels=["answer"])
        shed.add_metric(["try_later"], c["shed_try_later"])
        shed.add_metric(["presigned"], c["shed_presigned"])
        yield shed
        limited = CounterMetricFamily(
            "certpub_ocsp_unknown_limited", "Requests about never-issued serials answered"
            " tryLater unsigned: over unknown_per_address.")
        limited.add_metric([], c["unknown_limited"])
        yield limited
        expired = CounterMetricFamily(
            "certpub_ocsp_signing_expired", "Requests answered tryLater because no signer"
            " answered in time.")
        expired.add_metric([], c["expired"])
        yield expired
        queue = GaugeMetricFamily("certpub_ocsp_signing_queue",
                                  "Requests waiting for a signer or being signed.",
                                  labels=["state"])
        queue.add_metric(["waiting"], c["waiting"])
        queue.add_metric(["signing"], c["running"])
        yield queue
        unknown = GaugeMetricFamily("certpub_ocsp_unknown_cached",
                                    "Signed answers about never-issued serials kept.")
        unknown.add_metric([], c["unknown_cached"])
        yield unknown
        paced = GaugeMetricFamily(
            "certpub_ocsp_signing_paced_rate", "Requests per second the signing queue may"
            " hand to the signers now, while cached answers need the event loop; 0: not"
            " paced.")
        paced.add_metric([], c["paced_rate"])
        yield paced
        hits = CounterMetricFamily("certpub_ocsp_unknown_cache_hits",
                                   "Requests answered from the never-issued answers' cache.")
        hits.add_metric([], c["unknown_hits"])
        yield hits
