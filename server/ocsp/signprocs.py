"""The signing processes of ``server.ocsp.signing``: ``ProcessSigners`` starts, feeds,
restarts and stops ``server.ocsp.signworker`` children.

Strategy: each child is spawned with ``reactor.spawnProcess`` (stdin/stdout pipes, stderr
shared with the server), told the configuration, the store location and the service's time,
and then handed up to ``DEPTH`` requests at a time (they hide the pipe's round trip: with
nonce answers signed from parts in ~50 µs, 2 left the process idle half the time, 16 measured
best of 4, 8, 16 and 32); its answers come back as ``Signed`` values. A nonce request whose
CertIDs have a cached answer goes as a ``nonce`` message carrying that answer's parts (see
``OcspService.sign_nonce``), anything else as a ``job`` with the request. Requests handed over
during one reactor turn (or while answers are read) are written together, straight to the
pipe when Twisted holds nothing for it (``flush``): no extra reactor turn and no epoll change
per request. A child that ends has its requests in flight
answered ``tryLater`` and is started again after a delay doubling from ``RESTART_DELAY``
to ``MAX_RESTART_DELAY``. Log lines a child writes come to the server's log at their level;
``signer_unavailable`` counts (a PKCS#11 token gone) to the server's /metrics. At reactor
shutdown (or ``stop``) the children's stdin is closed, which ends them; one still alive after
``STOP_TIMEOUT`` is killed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from server.ocsp.cache import CachedResponse
from server.ocsp.service import OcspService, Signed, nonce_signing
from server.ocsp.signing import Executor, try_later
from server.ocsp.signworker import frame, split_frames

log = Logger(namespace="server.ocsp")

DEPTH = 16  # requests handed to one signing process at once (hides the pipe's round trip)
RESTART_DELAY = 0.5  # first restart delay of a signing process that died, doubled, up to
MAX_RESTART_DELAY = 30.0
STOP_TIMEOUT = 5.0  # seconds a signing process has to exit once its pipe is closed
FORWARDED_METRICS = frozenset({"signer_unavailable"})  # counted by a signing process


class _Child(protocol.ProcessProtocol):
    """One signing process, as the server sees it."""

    def __init__(self, pool: ProcessSigners, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ready = False
        self.ended = False
        # id -> (answer, sent at, the cached answer a nonce job is signed from)
        self.jobs: dict[int, tuple[defer.Deferred[Signed], float, CachedResponse | None]] = {}
        self._buf = bytearray()
        self.pending: list[bytes] = []  # frames not written yet (``ProcessSigners.flush``)

    def send(self, message: Any) -> None:
        self.transport.write(frame(message))

    def flush(self) -> None:
        """Write the pending frames: straight to the pipe when Twisted holds nothing for it
        (no extra turn of the reactor, no epoll change per request), else through it."""
        data = b"".join(self.pending)
        self.pending.clear()
        writer = self.transport.pipes.get(0)
        if writer is None:
            return  # the process is ending: its jobs are answered by processEnded
        written = 0
        if not writer.dataBuffer and not writer._tempDataBuffer:
            try:
                written = os.write(writer.fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # a broken pipe: processEnded follows
        if written < len(data):
            self.transport.write(data[written:])

    def outReceived(self, data: bytes) -> None:
        self._buf += data
        pool = self.pool
        pool.holding = True  # the answers' next requests go out together, after the loop
        try:
            for message in split_frames(self._buf):
                pool.received(self, message)
        finally:
            pool.holding = False
        pool.flush()

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.pool.ended(self, reason)


class ProcessSigners(Executor):
    """``count`` signing processes (``server.ocsp.signworker``), ``DEPTH`` requests each."""

    def __init__(self, config: Any, location: str, count: int, reactor: Any,
                 now: Callable[[], datetime]) -> None:
        self.config = config
        self.now = now  # the service's clock: signers are checked as valid at its time
        self.location = location
        self.count = count
        self.reactor = reactor
        self.children: list[_Child | None] = [None] * count
        self._next_id = 0
        self._delays = [RESTART_DELAY] * count
        self._stopping = False
        self._stopped: defer.DeferredList[Any] | None = None
        self.started = 0  # processes started so far (restarts included)
        self.holding = False  # while answers are read: requests handed over wait for flush
        self._trigger = reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        for i in range(count):
            self._spawn(i)

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        child = _Child(self, index)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # a signer makes no metric of its own
        self.reactor.spawnProcess(child, sys.executable,
                                  [sys.executable, "-m", "server.ocsp.signworker",
                                   str(os.getpid())],
                                  env=env, childFDs={0: "w", 1: "r", 2: 2})
        self.children[index] = child
        self.started += 1
        child.send(("init", self.config, self.location, self.now()))

    def free(self) -> bool:
        for c in self.children:
            if c is not None and c.ready and len(c.jobs) < DEPTH:
                return True
        return False

    def _least_busy(self) -> _Child:
        best: _Child | None = None
        for c in self.children:
            if c is not None and c.ready and (best is None or len(c.jobs) < len(best.jobs)):
                best = c
        assert best is not None, "free() said a signing process was ready"
        return best

    def run(self, der: bytes, now: datetime, sign_unknown: bool) -> defer.Deferred[Signed]:
        return self._hand_over("job", None, (der, now, sign_unknown))

    def sign_nonce(self, entry: CachedResponse, nonce: bytes,
                   now: datetime) -> defer.Deferred[Signed]:
        return self._hand_over("nonce", entry, nonce_signing(entry, nonce, now))

    def _hand_over(self, kind: str, entry: CachedResponse | None,
                   args: tuple[Any, ...]) -> defer.Deferred[Signed]:
        """Queue a (kind, id, *args) message for the least busy process (written by
        ``flush``); entry: the cached answer a ``nonce`` job is signed from."""
        child = self._least_busy()
        self._next_id += 1
        d: defer.Deferred[Signed] = defer.Deferred()
        child.jobs[self._next_id] = (d, time.monotonic(), entry)
        child.pending.append(frame((kind, self._next_id, *args)))
        return d

    def flush(self) -> None:
        if self.holding:
            return
        for child in self.children:
            if child is not None and child.pending:
                child.flush()

    def received(self, child: _Child, message: Any) -> None:
        kind = message[0]
        # an answer frees a slot: the queue's callback hands the next request over
        if kind == "signed":
            found = child.jobs.pop(message[1], None)
            if found is not None and found[2] is not None:
                found[0].callback(Signed(OcspService.nonce_outcome(found[2], message[2])))
        elif kind == "done":
            found = child.jobs.pop(message[1], None)
            if found is not None:
                found[0].callback(message[2])
        elif kind == "metric" and message[1] in FORWARDED_METRICS:
            from server.metrics import get_metrics

            getattr(get_metrics(), message[1])(*message[2])
        elif kind == "ready":
            child.ready = True
            self._delays[child.index] = RESTART_DELAY
            self.on_free()
        elif kind == "log":  # the process's own log line, at its level
            level = LogLevel.levelWithName(message[2]) if len(message) > 2 else LogLevel.error
            log.emit(level, "OCSP signing process {index}: {text}", index=child.index,
                     text=message[1])
        elif kind == "failed":  # could not start (or reload): it exits after this
            log.error("OCSP signing process {index} cannot sign: {text}", index=child.index,
                      text=message[1])

    def ended(self, child: _Child, reason: Failure) -> None:
        jobs, child.jobs = child.jobs, {}
        for d, _, _ in jobs.values():
            d.callback(Signed(try_later("signing process ended")))
        if self.children[child.index] is not child:
            return
        self.children[child.index] = None
        if self._stopping:
            return
        code = getattr(reason.value, "exitCode", None)
        delay = self._delays[child.index]
        self._delays[child.index] = min(delay * 2, MAX_RESTART_DELAY)
        log.error("OCSP signing process {index} ended (exit {code}); restarting in {delay}s",
                  index=child.index, code=code, delay=delay)
        self.reactor.callLater(delay, self._spawn, child.index)
        self.on_free()

    def reload(self, config: Any) -> None:
        self.config = config
        for child in self.children:
            if child is not None and not child.ended:
                child.send(("reload", config, self.now()))

    def stop(self) -> Any:
        """Close the children's pipes (they exit), kill those still alive after a while;
        a Deferred fired once every signing process has ended (on every call)."""
        if self._stopping:
            if self._stopped is None or self._stopped.called:
                return defer.succeed(None)
            later: defer.Deferred[None] = defer.Deferred()
            self._stopped.addBoth(lambda r: (later.callback(None), r)[1])
            return later
        self._stopping = True
        try:
            self.reactor.removeSystemEventTrigger(self._trigger)
        except (KeyError, ValueError, TypeError):
            pass
        waits = []
        for child in self.children:
            if child is None or child.ended:
                continue
            d: defer.Deferred[None] = defer.Deferred()
            ended = child.processEnded

            def on_end(reason: Failure, ended: Any = ended, d: Any = d) -> None:
                ended(reason)
                if not d.called:
                    d.callback(None)

            child.processEnded = on_end  # type: ignore[method-assign]
            child.transport.closeStdin()
            kill = self.reactor.callLater(STOP_TIMEOUT, _kill, child)
            d.addBoth(lambda r, kill=kill: kill.cancel() if kill.active() else None)
            waits.append(d)
        self._stopped = defer.DeferredList(waits) if waits else None
        return self._stopped


def _kill(child: _Child) -> None:
    try:
        child.transport.signalProcess("KILL")
    except error.ProcessExitedAlready:
        pass
