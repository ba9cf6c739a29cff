"""Where the servers' store calls run: inline on the reactor, or in a pool of threads.

Strategy: with ``[store] threads = 0`` (the SQLite default) ``StoreAccess.run`` calls inline
and services read the one store the composition root opened, exactly as before. With
``threads > 0`` (the PostgreSQL default) every request path hands its store-touching work to
``run``, which returns a Deferred fired on the reactor thread; the work runs in a Twisted
``ThreadPool``, and each pool thread lazily opens a store of its own (a store is a
one-thread-at-a-time object: an SQLite connection, a PostgreSQL session). Code written
against "a store" runs unchanged in the pool through ``ThreadStore``, which stands for the
store and sends each call to the calling thread's own; it refuses to be used outside the pool
(a reactor-thread read that slipped through would block the reactor on a network round trip).
A thread whose store raised ``StoreError`` closes it and opens a fresh one on its next call,
so a dropped database connection heals itself. ``busy`` tells callers when the queue in front
of the pool is full (a dead database): they answer busy/tryLater at once instead of queueing
without bound.

``iterate`` is the same seam for work done in steps (an LDAP search: one step per entry):
inline it runs the steps on the reactor for up to ``INLINE_BUDGET`` seconds and hands the
rest to a ``Cooperator``, so one long search does not starve the other clients; threaded it
runs them all in a pool thread. Either way the caller gets a Deferred fired on the reactor
thread once the steps are done (or failed), and writes the answer then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from store import open_store
from store.errors import StoreError

log = Logger()
T = TypeVar("T")
INLINE_BUDGET = 0.002  # seconds inline steps run before they become cooperative
PENDING_PER_THREAD = 64  # jobs queued or running per pool thread before callers are refused
_MISSING = object()


class StoreAccess:
    """Runs store work inline (threads = 0) or in a thread pool with a store per thread."""

    def __init__(self, location: str, threads: int, *, store: Any = None,
                 opener: Callable[[], Any] | None = None, reactor: Any = None,
                 max_pending: int | None = None) -> None:
        if threads < 0:
            raise ValueError("threads must be 0 or more")
        if threads == 0 and store is None:
            raise ValueError("inline store access needs the store")
        self.location = location
        self.threads = threads
        self.inline = threads == 0
        self.main = store  # the store the composition root opened (None in some tests)
        self._opener = opener or (lambda: open_store(location, create=False, migrate=False))
        self._reactor = reactor
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[Any] = []
        self.pending = 0  # jobs handed to the pool and not yet answered (reactor thread only)
        self.max_pending = max_pending or max(threads, 1) * PENDING_PER_THREAD
        self.pool: ThreadPool | None = None
        self._trigger: Any = None
        # what services use as their store: the store itself inline, else the per-thread proxy
        self.store: Any = store if self.inline else ThreadStore(self, store)

    # --- lifecycle --------------------------------------------------------------------------

    def _the_reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def start(self) -> None:
        """Start the pool (threaded mode), stopped again when the reactor shuts down."""
        if self.inline or self.pool is not None:
            return
        self.pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="certpub-store")
        self.pool.start()
        self._trigger = self._the_reactor().addSystemEventTrigger(
            "during", "shutdown", self.stop)

    def stop(self) -> None:
        """Stop the pool (waiting for the jobs running now) and close the threads' stores."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if self._trigger is not None:
            trigger, self._trigger = self._trigger, None
            try:
                self._the_reactor().removeSystemEventTrigger(trigger)
            except (KeyError, ValueError, TypeError):  # fired already: this is that call
                pass
        pool.stop()
        with self._lock:
            opened, self._opened = self._opened, []
        for store in opened:  # their threads have ended: nobody else holds them
            try:
                store.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                log.debug("closing a thread store failed")

    # --- running work -----------------------------------------------------------------------

    def busy(self) -> bool:
        """True when the pool's queue is full: refuse now rather than queue."""
        return not self.inline and self.pending >= self.max_pending

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """fn(*args, **kwargs) inline or in a pool thread; its result (or Failure) on the reactor."""
        if self.inline:
            return defer.execute(fn, *args, **kwargs)
        if self.pool is None:
            return defer.fail(StoreError("store threads are not running"))
        self.pending += 1
        d = deferToThreadPool(self._the_reactor(), self.pool, self._call, fn, args, kwargs)
        d.addBoth(self._answered)
        return d

    def iterate(self, steps: Iterator[Any], cooperate: Callable[[Iterator[Any]], Any],
                timer: Callable[[], float]) -> defer.Deferred[None]:
        """Run every step of ``steps``: inline (the first ``INLINE_BUDGET`` seconds at once,
        the rest through ``cooperate``, a ``Cooperator.cooperate``) or in a pool thread."""
        if not self.inline:
            return self.run(_drain, steps)
        deadline = timer() + INLINE_BUDGET
        try:
            for _ in steps:
                if timer() > deadline:
                    done: defer.Deferred[None] = cooperate(steps).whenDone()
                    return done.addCallback(lambda _: None)
        except Exception:  # noqa: BLE001 - the caller's errback reports it
            return defer.fail()
        return defer.succeed(None)

    def _answered(self, result: Any) -> Any:
        self.pending -= 1
        return result

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        self._local.worker = True
        try:
            return fn(*args, **kwargs)
        except StoreError:
            self._discard()  # a broken connection: the next job opens a fresh one
            raise

    # --- the calling thread's store ----------------------------------------------------------

    def local_store(self) -> Any:
        """The calling pool thread's store, opened on first use."""
        local = self._local
        store = getattr(local, "store", None)
        if store is not None:
            return store
        if not getattr(local, "worker", False):
            raise RuntimeError("the threaded store was used outside its thread pool")
        store = self._opener()
        local.store = store
        with self._lock:
            self._opened.append(store)
        return store

    def _discard(self) -> None:
        store = getattr(self._local, "store", None)
        if store is None:
            return
        self._local.store = None
        with self._lock:
            if store in self._opened:
                self._opened.remove(store)
        try:
            store.close()
        except Exception:  # noqa: BLE001 - it is being dropped because it failed
            log.debug("closing a failed thread store failed")


def _drain(steps: Iterator[Any]) -> None:
    for _ in steps:
        pass


class ThreadStore:
    """Stands for the store inside pool threads: each call goes to the calling thread's store.

    ``store_type`` and ``path`` describe the store without opening one (the reactor thread may
    ask); ``sample`` is the store the composition root opened, for checks made once at start.
    """

    def __init__(self, access: StoreAccess, sample: Any = None) -> None:
        self._access = access
        self.sample = sample
        if sample is not None:
            self.store_type: type = type(sample)
        else:
            from store import is_postgres_url

            if is_postgres_url(access.location):
                from store.postgres import PostgresStore

                self.store_type = PostgresStore
            else:
                from store.sqlite import Store

                self.store_type = Store
        self.path = getattr(sample, "path", None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self.store_type, name, _MISSING)
        if attr is _MISSING or not callable(attr):  # instance attributes and properties
            return getattr(self._access.local_store(), name)
        local_store = self._access.local_store

        def call(*args: Any, **kwargs: Any) -> Any:
            return getattr(local_store(), name)(*args, **kwargs)

        call.__name__ = name
        self.__dict__[name] = call  # built once per method name
        return call

    def close(self) -> None:
        """Nothing to close here: the pool closes its threads' stores when it stops."""
