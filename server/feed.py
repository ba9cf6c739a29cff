"""The change feed: poll the store's generation, hand each batch's changes to the caches.

Strategy: one indexed read of one row per tick; only when the generation moved are the change
rows read, and every subscriber gets them in order. A store that cannot be read is reported
through ``healthy`` and retried on the next tick; nothing is dropped, because the feed only
advances its own generation after the changes were delivered.

With a threaded ``StoreAccess`` the reads of a tick run in the store pool and the changes are
delivered on the reactor thread; a tick never overlaps the previous one (a tick asked for
meanwhile runs right after it). A store that can wait for a commit (``wait_for_change(timeout)
-> bool``: PostgreSQL's LISTEN) gets a daemon thread blocked on it, which asks the reactor for
an immediate tick on each notification; the interval polling stays, as the fallback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from store.model import CaId, Change, Generation
from store.errors import StoreError

log = Logger()
CHANGE_PAGE = 5000
LISTEN_TIMEOUT = 1.0  # seconds a LISTEN wait lasts, so that stop() is heard soon
LISTEN_RETRY = 5.0  # seconds before reopening a LISTEN connection that failed


class FeedSource(Protocol):
    def generation(self) -> Generation: ...
    def changes_since(self, generation: int, limit: int = ...) -> list[Change]: ...


Subscriber = Callable[[list[Change]], None]


class ChangeFeed:
    """Polls a store for committed batches and notifies subscribers."""

    def __init__(self, store: FeedSource, interval: float = 0.2, *, access: Any = None,
                 listen: Callable[[], Any] | None = None) -> None:
        """``access``: a threaded StoreAccess runs the reads in its pool (``store`` is then
        its proxy). ``listen``: opens a store with ``wait_for_change`` for the LISTEN thread."""
        self.store = store
        self.interval = interval
        self.generation = Generation(0)
        self.healthy = True
        self.last_error: str | None = None
        self._subscribers: list[Subscriber] = []
        self._loop: LoopingCall | None = None
        self._access = access if access is not None and not access.inline else None
        self._running: defer.Deferred[None] | None = None  # the tick in the pool
        self._again = False  # a tick was asked for while one ran
        self._listen = listen
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self._reactor: Any = None

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def prime(self) -> None:
        """Start from the store's current generation (caches start empty)."""
        self.generation = self.store.generation()

    def poll(self) -> defer.Deferred[None] | None:
        """One tick: deliver every change committed since the last one (threaded: a
        Deferred that fires once delivered, never with a failure)."""
        if self._access is None:
            self._poll_inline()
            return None
        if self._running is not None:
            self._again = True
            return self._running
        d: defer.Deferred[None] = self._access.run(self._read, self.generation)
        self._running = d
        d.addBoth(self._read_done)
        return d

    def _read(self, since: Generation) -> tuple[Generation, list[list[Change]]]:
        """In a store thread: the batches committed after since, and the generation reached."""
        current = self.store.generation()
        batches: list[list[Change]] = []
        while current > since:
            changes = self.store.changes_since(since, CHANGE_PAGE)
            if not changes or len(changes) >= CHANGE_PAGE:
                batches.append([Change(current, "all", CaId(0), None, None)])
                since = current
                break
            batches.append(changes)
            since = changes[-1].generation
        return since, batches

    def _read_done(self, result: Any) -> None:
        self._running = None
        if isinstance(result, Failure):
            if result.check(StoreError):  # type: ignore[no-untyped-call]
                self._unhealthy(str(result.value))
            else:
                log.failure("change feed poll failed", result)
                self._unhealthy("internal error")
        else:
            reached, batches = result
            for changes in batches:
                self._deliver(changes)
            self.generation = reached
            self._healthy_again()
        if self._again:
            self._again = False
            self.poll()

    def _unhealthy(self, error: str) -> None:
        if self.healthy:
            log.warn("store unreadable: {error}", error=error)
        self.healthy = False
        self.last_error = error

    def _healthy_again(self) -> None:
        if not self.healthy:
            log.info("store readable again at generation {generation}", generation=self.generation)
        self.healthy = True
        self.last_error = None

    def _poll_inline(self) -> None:
        try:
            current = self.store.generation()
            while current > self.generation:
                changes = self.store.changes_since(self.generation, CHANGE_PAGE)
                if not changes or len(changes) >= CHANGE_PAGE:
                    # Too many to list (a bulk import) or no rows: every cache starts over.
                    self._deliver([Change(current, "all", CaId(0), None, None)])
                    self.generation = current
                    break
                self._deliver(changes)
                self.generation = changes[-1].generation
        except StoreError as exc:
            self._unhealthy(str(exc))
            return
        self._healthy_again()

    def _deliver(self, changes: list[Change]) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(changes)
            except Exception:
                log.failure("change subscriber failed")

    def start(self, clock: object | None = None, reactor: Any = None) -> None:
        """Prime, then poll every ``interval``; with ``listen``, start the LISTEN thread."""
        # A threaded store proxy is not read here: the store opened at start primes instead.
        source = self.store if self._access is None else getattr(self.store, "sample", None)
        if source is not None:
            self.generation = source.generation()
        self._loop = LoopingCall(lambda: self.poll())  # the attribute: Metrics wraps poll
        if clock is not None:
            self._loop.clock = clock  # type: ignore[assignment]
        self._loop.start(self.interval, now=False)
        if self._listen is not None:
            if reactor is None:
                from twisted.internet import reactor as default_reactor

                reactor = default_reactor
            self._reactor = reactor
            self._stopping.clear()
            self._listener = threading.Thread(target=self._listen_loop, daemon=True,
                                              name="certpub-feed-listen")
            self._listener.start()

    def _listen_loop(self) -> None:
        """The LISTEN thread: an immediate tick on the reactor after every notification."""
        assert self._listen is not None
        store: Any = None
        lost = False  # warned once per outage, not every retry
        try:
            while not self._stopping.is_set():
                try:
                    if store is None:
                        store = self._listen()
                    changed = store.wait_for_change(LISTEN_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - polling carries on meanwhile
                    if not lost:
                        self._reactor.callFromThread(
                            log.warn, "change notifications lost, polling only: {error}",
                            error=str(exc))
                    lost = True
                    _close(store)
                    store = None
                    self._stopping.wait(LISTEN_RETRY)
                    continue
                if lost:
                    lost = False
                    self._reactor.callFromThread(log.info, "change notifications back")
                if changed and not self._stopping.is_set():
                    self._reactor.callFromThread(self._notified)
        finally:
            _close(store)

    def _notified(self) -> None:
        if self._loop is not None and self._loop.running:
            self.poll()

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        listener, self._listener = self._listener, None
        if listener is not None:
            self._stopping.set()
            listener.join(LISTEN_TIMEOUT * 3)  # within one wait; a daemon thread anyway


def _close(store: Any) -> None:
    """Close a LISTEN store quietly (it may be the one that failed)."""
    if store is not None:
        try:
            store.close()
        except Exception:  # noqa: BLE001 - dropping it anyway
            log.debug("closing the LISTEN store failed")
