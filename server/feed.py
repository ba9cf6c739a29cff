"""The change feed: poll the store's generation, hand each batch's changes to the caches.

Strategy: one indexed read of one row per tick; only when the generation moved are the change
rows read, and every subscriber gets them in order. A store that cannot be read is reported
through ``healthy`` and retried on the next tick; nothing is dropped, because the feed only
advances its own generation after the changes were delivered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from store.model import CaId, Change, Generation
from store.sqlite import StoreError

log = Logger()
CHANGE_PAGE = 5000


class FeedSource(Protocol):
    def generation(self) -> Generation: ...
    def changes_since(self, generation: int, limit: int = ...) -> list[Change]: ...


Subscriber = Callable[[list[Change]], None]


class ChangeFeed:
    """Polls a store for committed batches and notifies subscribers."""

    def __init__(self, store: FeedSource, interval: float = 0.2) -> None:
        self.store = store
        self.interval = interval
        self.generation = Generation(0)
        self.healthy = True
        self.last_error: str | None = None
        self._subscribers: list[Subscriber] = []
        self._loop: LoopingCall | None = None

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def prime(self) -> None:
        """Start from the store's current generation (caches start empty)."""
        self.generation = self.store.generation()

    def poll(self) -> None:
        """One tick: deliver every change committed since the last one."""
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
            if self.healthy:
                log.warn("store unreadable: {error}", error=str(exc))
            self.healthy = False
            self.last_error = str(exc)
            return
        if not self.healthy:
            log.info("store readable again at generation {generation}", generation=self.generation)
        self.healthy = True
        self.last_error = None

    def _deliver(self, changes: list[Change]) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(changes)
            except Exception:
                log.failure("change subscriber failed")

    def start(self, clock: object | None = None) -> None:
        self.prime()
        self._loop = LoopingCall(self.poll)
        if clock is not None:
            self._loop.clock = clock  # type: ignore[assignment]
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
