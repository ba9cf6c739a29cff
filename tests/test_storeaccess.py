"""Store calls off the reactor: the pool, its per-thread stores, and the services that use it.

Waits are on events and Deferreds with generous timeouts, never on the clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.x509 import ocsp as c_ocsp
from twisted.internet import defer, reactor, threads

from server.feed import ChangeFeed
from server.health import HealthCheck
from server.ocsp.service import OcspService
from server.storeaccess import StoreAccess, ThreadStore, read
from store.model import CaId, RevocationReason, Serial
from store.sqlite import Store, StoreError
from tests.ocsp.helpers import answer, T0, config_for, fill_store, make_ca, request_der

WAIT = 30.0  # seconds any event wait may take before the test fails (never reached normally)


class Clock:
    def __init__(self) -> None:
        self.now = T0 + timedelta(minutes=5)

    def __call__(self) -> Any:
        return self.now


class Gate:
    """Makes a chosen store method wait (in its pool thread) until released."""

    def __init__(self, method: str, after: bool = False) -> None:
        self.method = method
        self.after = after  # block after the read (its result in hand) rather than before
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def passing(self, name: str) -> None:
        if self.armed and name == self.method:
            self.entered.set()
            if not self.release.wait(WAIT):
                raise AssertionError("the gate was never released")


class GatedStore:
    """A store whose reads go through a Gate (a database that hangs, on demand)."""

    def __init__(self, inner: Store, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate
        self.path = inner.path

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr
        gate = self._gate

        def call(*args: Any, **kwargs: Any) -> Any:
            if not gate.after:
                gate.passing(name)
            result = attr(*args, **kwargs)
            if gate.after:
                gate.passing(name)
            return result

        return call

    def close(self) -> None:
        self._inner.close()


class BrokenStore:
    """A store whose every read fails as an unreachable database does."""

    path = None

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise StoreError("could not connect to server: Connection refused")

        return fail

    def close(self) -> None:
        pass


def wait_event(event: threading.Event) -> defer.Deferred[bool]:
    return threads.deferToThread(event.wait, WAIT)


@pytest.fixture
def ocsp_env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ca = make_ca(tmp_path / "pki", "pool")
    for serial in (1, 2, 3):
        ca.subscriber(serial)
    path = tmp_path / "store.sqlite3"
    store = Store.open(path)
    ca_id = fill_store(store, ca, T0)
    yield {"ca": ca, "store": store, "path": path, "ca_id": ca_id}
    store.close()


def threaded(path: Path, opener: Callable[[], Any] | None = None, threads_: int = 2,
             **kw: Any) -> StoreAccess:
    access = StoreAccess(str(path), threads_, opener=opener, **kw)
    access.start()
    return access


# --- the pool itself ----------------------------------------------------------------------


def test_inline_runs_now_on_the_callers_store(ocsp_env: dict[str, Any]) -> None:
    store = ocsp_env["store"]
    access = StoreAccess(str(ocsp_env["path"]), 0, store=store)
    assert access.inline and access.store is store and not access.busy()
    fired: list[Any] = []
    access.run(lambda: (threading.get_ident(), store.generation())).addCallback(fired.append)
    assert fired == [(threading.get_ident(), store.generation())]  # no reactor turn needed
    failed: list[Any] = []
    access.run(store.cert, "not an id", None).addErrback(failed.append)
    assert len(failed) == 1


@pytest_twisted.ensureDeferred
async def test_each_pool_thread_opens_its_own_store(ocsp_env: dict[str, Any]) -> None:
    opened: list[tuple[int, Store]] = []

    def opener() -> Store:
        s = Store.open(ocsp_env["path"], create=False, migrate=False)
        opened.append((threading.get_ident(), s))
        return s

    access = threaded(ocsp_env["path"], opener)
    proxy = access.store
    assert isinstance(proxy, ThreadStore) and proxy.store_type is Store
    try:
        start = threading.Barrier(2, timeout=WAIT)

        def both_threads() -> tuple[int, int]:
            start.wait()  # two jobs at once: two threads, two stores
            return threading.get_ident(), int(proxy.generation())

        results = await defer.gatherResults([access.run(both_threads) for _ in range(2)])
        idents = {ident for ident, _ in results}
        assert len(idents) == 2 and threading.get_ident() not in idents
        assert {ident for ident, _ in opened} == idents and len(opened) == 2
        assert {gen for _, gen in results} == {int(ocsp_env["store"].generation())}
        with pytest.raises(RuntimeError, match="outside its thread pool"):
            proxy.generation()  # the reactor thread never reads the threaded store
    finally:
        access.stop()
    with pytest.raises(Exception, match="closed"):
        opened[0][1].generation()  # stop closed the threads' stores


@pytest_twisted.ensureDeferred
async def test_a_failing_thread_store_is_reopened(ocsp_env: dict[str, Any]) -> None:
    stores: list[Any] = []

    def opener() -> Any:
        s = BrokenStore() if not stores else Store.open(ocsp_env["path"], create=False)
        stores.append(s)
        return s

    access = threaded(ocsp_env["path"], opener, threads_=1)
    try:
        with pytest.raises(StoreError):
            await access.run(lambda: access.store.generation())
        assert await access.run(lambda: int(access.store.generation())) >= 1
        assert len(stores) == 2 and access.pending == 0
    finally:
        access.stop()


def unavailable(exc: StoreError) -> str:
    return f"unavailable: {exc}"


@pytest_twisted.ensureDeferred
async def test_busy_when_the_queue_is_full(ocsp_env: dict[str, Any]) -> None:
    release = threading.Event()
    access = threaded(ocsp_env["path"], threads_=1, max_pending=1)
    try:
        d = access.run(release.wait, WAIT)
        assert access.busy()
        called: list[bool] = []  # read() answers "unavailable" at once, running nothing
        assert read(access, lambda: called.append(True), unavailable=unavailable,
                    then=lambda _: "never") == "unavailable: store threads busy"
        assert not called
        release.set()
        assert await d is True
        assert not access.busy()
    finally:
        release.set()
        access.stop()


# --- read: the one way request paths use the access ------------------------------------


@pytest.mark.parametrize("inline", [False, True], ids=["no access", "inline access"])
def test_read_without_a_pool_answers_at_once(ocsp_env: dict[str, Any], inline: bool) -> None:
    store = ocsp_env["store"]
    access = StoreAccess(str(ocsp_env["path"]), 0, store=store) if inline else None
    generation = int(store.generation())
    assert read(access, lambda: int(store.generation()), unavailable=unavailable,
                then=lambda g: f"gen {g}") == f"gen {generation}"
    assert read(access, lambda x: x + 1, 1, unavailable=unavailable) == 2  # then: the value
    assert read(access, BrokenStore().generation, unavailable=unavailable) == (
        "unavailable: could not connect to server: Connection refused")
    with pytest.raises(ZeroDivisionError):  # anything else is the caller's bug: it propagates
        read(access, lambda: 1 // 0, unavailable=unavailable)


@pytest_twisted.ensureDeferred
async def test_read_with_a_pool_answers_later(ocsp_env: dict[str, Any]) -> None:
    access = threaded(ocsp_env["path"], threads_=1)
    try:
        d = read(access, lambda: int(access.store.generation()), unavailable=unavailable,
                 then=lambda g: (threading.get_ident(), f"gen {g}"))
        assert isinstance(d, defer.Deferred)
        ident, text = await d
        assert ident == threading.get_ident()  # then runs on the reactor thread
        assert text == f"gen {int(ocsp_env['store'].generation())}"
        broken = read(access, BrokenStore().generation, unavailable=unavailable,
                      then=lambda _: "never")
        assert await broken == "unavailable: could not connect to server: Connection refused"
        with pytest.raises(ZeroDivisionError):
            await read(access, lambda: 1 // 0, unavailable=unavailable)
        assert access.pending == 0
    finally:
        access.stop()


# --- OCSP: the stale-insert race, errors from a pool thread ---------------------------------


def signing_queue(service: OcspService, access: Any) -> Any:
    """The server's signing seam on service: the queue, signing in the store threads."""
    from twisted.internet import reactor

    from server.ocsp.signing import LocalSigners, SigningQueue

    service.signing = SigningQueue(service, LocalSigners(service, access, reactor),
                                   service.config, reactor=reactor)
    return service.signing


@pytest_twisted.ensureDeferred
async def test_a_response_read_before_a_revocation_is_not_cached(ocsp_env: dict[str, Any]) -> None:
    """The miss reads ``good``, the feed voids serial 2 while it signs: never cached."""
    gate = Gate("cert", after=True)  # the status row is read, then the thread waits
    path = ocsp_env["path"]
    access = threaded(path, lambda: GatedStore(Store.open(path, create=False), gate))
    clock = Clock()
    service = OcspService(config_for(ocsp_env["ca"]), None, clock, access=access)  # type: ignore[arg-type]
    store = ocsp_env["store"]
    feed = ChangeFeed(store)
    feed.prime()
    feed.subscribe(service.on_changes)
    queue = signing_queue(service, access)
    der = request_der(ocsp_env["ca"], [2])
    try:
        gate.armed = True
        pending = answer(service, der)
        assert isinstance(pending, defer.Deferred)
        assert await wait_event(gate.entered)
        with store.batch(T0) as b:  # the importer revokes meanwhile
            b.revoke(CaId(ocsp_env["ca_id"]), Serial(2), T0, RevocationReason.KEY_COMPROMISE,
                     "t", "t")
        feed.poll()  # inline feed: the invalidation happens now, before the insert
        gate.release.set()
        first = await pending
        # answered from what it read (true when read), but not kept for the next client
        assert first.cache == "miss" and first.statuses == ("good",)
        assert len(service.cache) == 0
        gate.armed = False
        again = await defer.maybeDeferred(answer, service, der)
        assert again.cache == "miss" and again.statuses == ("revoked",)
        third = await defer.maybeDeferred(answer, service, der)
        assert third.cache == "hit" and third.statuses == ("revoked",)
        resp = c_ocsp.load_der_ocsp_response(third.der)
        assert resp.responses and next(iter(resp.responses)).certificate_status == (
            c_ocsp.OCSPCertStatus.REVOKED)
    finally:
        gate.release.set()
        queue.stop()
        access.stop()


def test_an_insert_without_invalidation_in_between_is_kept(ocsp_env: dict[str, Any]) -> None:
    """The epoch check drops only what an invalidation overtook (inline here)."""
    service = OcspService(config_for(ocsp_env["ca"]), ocsp_env["store"], Clock())
    der = request_der(ocsp_env["ca"], [1])
    assert answer(service, der).cache == "miss"
    assert answer(service, der).cache == "hit"
    epoch = service.cache.epoch
    service.on_changes([])  # any batch moves the epoch, even one that voids nothing
    assert service.cache.epoch == epoch + 1


@pytest_twisted.ensureDeferred
async def test_store_errors_in_a_pool_thread_map_to_try_later_and_503(
        ocsp_env: dict[str, Any]) -> None:
    access = threaded(ocsp_env["path"], BrokenStore)
    try:
        service = OcspService(config_for(ocsp_env["ca"]), None, Clock(), access=access)  # type: ignore[arg-type]
        queue = signing_queue(service, access)
        out = await defer.maybeDeferred(answer, service, request_der(ocsp_env["ca"], [1]))
        queue.stop()
        assert out.status == "try_later" and out.der == c_ocsp_try_later()
        health = HealthCheck(access.store, None, Clock(), dict, access=access)
        ok, body = await health.check_deferred()
        assert not ok and body["reasons"] == ["store unreadable"] and body["generation"] is None
    finally:
        access.stop()


def c_ocsp_try_later() -> bytes:
    from server.ocsp.codec import encode_error

    return encode_error("try_later")


# --- the change feed in the pool, and LISTEN ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_threaded_feed_delivers_on_the_reactor_without_overlapping(
        ocsp_env: dict[str, Any]) -> None:
    gate = Gate("generation")
    path = ocsp_env["path"]
    access = threaded(path, lambda: GatedStore(Store.open(path, create=False), gate))
    store = ocsp_env["store"]
    feed = ChangeFeed(access.store, access=access)
    feed.generation = store.generation()
    seen: list[tuple[int, list[Any]]] = []
    feed.subscribe(lambda changes: seen.append((threading.get_ident(), changes)))
    try:
        gate.armed = True
        first = feed.poll()
        assert await wait_event(gate.entered)
        assert feed.poll() is first  # no second read while the first one runs
        with store.batch(T0) as b:
            b.revoke(CaId(ocsp_env["ca_id"]), Serial(3), T0, RevocationReason.KEY_COMPROMISE,
                     "t", "t")
        gate.armed = False
        gate.release.set()
        await first
        while feed.generation != store.generation():  # the re-poll asked for meanwhile
            await deferLater(0.05)
        assert seen and all(ident == threading.get_ident() for ident, _ in seen)
        assert [c.serial for _, batch in seen for c in batch] == [3]
        assert feed.healthy
    finally:
        gate.release.set()
        access.stop()


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_threaded_feed_reports_an_unreadable_store(ocsp_env: dict[str, Any]) -> None:
    access = threaded(ocsp_env["path"], BrokenStore)
    try:
        feed = ChangeFeed(access.store, access=access)
        await feed.poll()
        assert not feed.healthy and "Connection refused" in (feed.last_error or "")
    finally:
        access.stop()


class ListeningStore:
    """A store with ``wait_for_change``: tells the feed about a commit when asked to."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.notify = threading.Event()
        self.closed = threading.Event()

    def wait_for_change(self, timeout: float) -> bool:
        if self.notify.wait(timeout):
            self.notify.clear()
            return True
        return False

    def close(self) -> None:
        self.closed.set()


@pytest_twisted.ensureDeferred
async def test_listen_thread_triggers_an_immediate_poll(ocsp_env: dict[str, Any]) -> None:
    store = ocsp_env["store"]
    listener = ListeningStore(store)
    feed = ChangeFeed(store, interval=3600.0, listen=lambda: listener)  # polling: hourly
    delivered = defer.Deferred[list[Any]]()
    feed.subscribe(lambda changes: delivered.called or delivered.callback(changes))
    feed.start(reactor=reactor)
    try:
        with store.batch(T0) as b:
            b.revoke(CaId(ocsp_env["ca_id"]), Serial(1), T0, RevocationReason.KEY_COMPROMISE,
                     "t", "t")
        listener.notify.set()  # NOTIFY: only the LISTEN thread can deliver within the hour
        changes = await delivered.addTimeout(WAIT, reactor)
        assert [c.serial for c in changes] == [1]
    finally:
        feed.stop()
    assert listener.closed.is_set()  # stop() ended the thread, which closed its store


# --- /healthz and /metrics on a real listener, store reads in the pool -----------------------


def _get(port: int, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest_twisted.ensureDeferred
async def test_health_503_and_metrics_from_a_failing_pool_store(ocsp_env: dict[str, Any]) -> None:
    from server.metrics import Metrics
    from tests.test_health import ops_factory

    path = ocsp_env["path"]
    for opener, healthy in ((lambda: Store.open(path, create=False), True), (BrokenStore, False)):
        access = threaded(path, opener)
        metrics = Metrics(Clock(), process=False)
        metrics.watch(store=access.store)
        health = HealthCheck(access.store, None, Clock(), dict, access=access)
        port = reactor.listenTCP(0, ops_factory(health, metrics, access, reactor),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        try:
            n = port.getHost().port
            status, body = await threads.deferToThread(_get, n, "/healthz")
            assert status == (200 if healthy else 503), body
            status, body = await threads.deferToThread(_get, n, "/metrics")
            assert status == 200 and (b"certpub_store_up 1.0" if healthy
                                      else b"certpub_store_up 0.0") in body
        finally:
            await port.stopListening()
            access.stop()
