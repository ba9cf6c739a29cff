"""Overload (issue 18): the signing queue, shedding, fairness, never-issued serials.

Real listener on 127.0.0.1 (port 0), raw sockets and ``openssl ocsp`` as clients. The queue
is filled either by a signer held on purpose (``HeldSigners``: the queue, the service and
the listener are the real ones; only the moment signing ends is the test's) or by a flood
against real signing processes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp as c_ocsp
from twisted.internet import defer, reactor, threads
from twisted.logger import capturedLogs

from server.configtools import ConfigError, Section
from server.http.site import make_http_factory
from server.ocsp.config import parse_http
from server.ocsp.signing import Executor, LocalSigners, SigningQueue
from server.ocsp.signing import ProcessSigners
from server.storeaccess import StoreAccess
from tests.conftest import require_tool
from tests.ocsp.helpers import WallClock, config_for, fill_store, make_ca, request_der

PEER_B = "127.0.0.2"  # a second client address: all of 127/8 is the loopback


class HeldSigners(Executor):
    """Real in-process signing whose results are held until ``release``."""

    def __init__(self, inner: LocalSigners, slots: int) -> None:
        self.inner = inner
        self.slots = slots
        self.held: list[tuple[defer.Deferred[Any], Any]] = []
        self.order: list[int] = []  # the serial of each request handed over

    def free(self) -> bool:
        return len(self.held) < self.slots

    def run(self, der: bytes, now: Any, sign_unknown: bool) -> defer.Deferred[Any]:
        self.order.append(response_serial(der))
        signed = self.inner.service.compute(der, now, sign_unknown=sign_unknown)
        d: defer.Deferred[Any] = defer.Deferred()
        self.held.append((d, signed))
        return d

    def sign_nonce(self, entry: Any, nonce: bytes, now: Any) -> defer.Deferred[Any]:
        self.order.append(entry.summary[0][0])  # signed from the cached answer's parts
        d: defer.Deferred[Any] = self.inner.sign_nonce(entry, nonce, now)
        held: defer.Deferred[Any] = defer.Deferred()
        d.addCallback(lambda signed: self.held.append((held, signed)))
        return held

    def release(self, count: int | None = None) -> None:
        """Let count signatures finish (None: all, also those dispatched meanwhile)."""
        while self.held:
            d, signed = self.held.pop(0)
            d.callback(signed)  # the queue hands the next waiting request over at once
            if count is not None:
                count -= 1
                if count == 0:
                    return


def _serve(tmp_path: Path, *, processes: int = 0, threads_: int = 0,
           location: str | None = None, **http: Any) -> dict[str, Any]:
    from store import open_store

    clock = WallClock()
    ca = make_ca(tmp_path / "pki", "web", at=clock.now)
    for serial in (1, 2, 3):
        ca.subscriber(serial)
    location = location or str(tmp_path / "store.sqlite3")
    store = open_store(location)
    fill_store(store, ca, clock.now - timedelta(seconds=30))
    access = StoreAccess(location, threads_, store=store)
    access.start()
    config = config_for(ca)
    config = dataclasses.replace(config, http=dataclasses.replace(
        config.http, signing_processes=processes, **http))
    site = make_http_factory(config, store, None, clock, reactor, access=access)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    return {"ca": ca, "port": port.getHost().port, "site": site, "clock": clock,
            "store": store, "access": access, "listening": port, "tmp": tmp_path,
            "queue": site.service.signing}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """In-process signing, held: the queue fills when the test says."""
    e = _serve(tmp_path, signing_queue=4, signing_queue_per_address=3)
    queue: SigningQueue = e["queue"]
    held = HeldSigners(queue.executor, slots=2)  # type: ignore[arg-type]
    held.on_free = queue._dispatch
    queue.executor = held
    e["held"] = held
    yield e
    held.release()
    pytest_twisted.blockon(defer.ensureDeferred(_stop(e)))


async def _stop(e: dict[str, Any]) -> None:
    await e["listening"].stopListening()
    await defer.maybeDeferred(e["queue"].stop)  # the signing processes have ended
    e["access"].stop()
    e["store"].close()


# --- a raw HTTP client (requests left pending, chosen source address) -----------------------


def post_bytes(der: bytes) -> bytes:
    return (b"POST /ocsp HTTP/1.1\r\nHost: t\r\nContent-Type: application/ocsp-request\r\n"
            b"Content-Length: %d\r\n\r\n" % len(der)) + der


def send(port: int, der: bytes, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(post_bytes(der))
    return s


def read_one(s: socket.socket) -> bytes:
    """The body of the next answer on s (the connection stays open)."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        if sep and m and len(body) >= int(m.group(1)):
            return body[:int(m.group(1))]
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed without an answer: {data!r}")
        data += chunk


def read_reply(s: socket.socket) -> bytes:
    """The body of the one answer on s (then closed)."""
    try:
        return read_one(s)
    finally:
        s.close()


def exchange(port: int, der: bytes, source: str = "127.0.0.1") -> bytes:
    return read_reply(send(port, der, source))


async def in_thread(fn: Any, *args: Any) -> Any:
    return await threads.deferToThread(fn, *args)


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


def response(der: bytes) -> c_ocsp.OCSPResponse:
    return c_ocsp.load_der_ocsp_response(der)


def nonce_of(resp: c_ocsp.OCSPResponse) -> bytes | None:
    try:
        return resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


def nonce_der(ca: Any, serial: int) -> bytes:
    return request_der(ca, [serial], nonce=os.urandom(16))


async def fill(e: dict[str, Any], count: int, source: str = "127.0.0.1",
               serial: int = 3) -> list[socket.socket]:
    """count nonce requests left waiting in the queue (their connections open)."""
    socks = [await in_thread(send, e["port"], nonce_der(e["ca"], serial), source)
             for _ in range(count)]
    await _sleep(0.2)
    return socks


async def signed_once(e: dict[str, Any], der: bytes) -> bytes:
    """Ask once (the held signer lets it through): its answer is cached from then on."""
    d = threads.deferToThread(exchange, e["port"], der)
    await _sleep(0.2)
    e["held"].release()
    body: bytes = await d
    return body


# --- tests -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cached_answer_served_while_the_signing_queue_is_full(
        env: dict[str, Any]) -> None:
    ca, port, queue = env["ca"], env["port"], env["queue"]
    plain = request_der(ca, [1])
    first = response(await signed_once(env, plain))  # signed once, now cached
    assert first.response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL
    waiting = await fill(env, 3)
    waiting += await fill(env, 1, PEER_B)
    assert queue.held == queue.capacity == 4
    # the queue is full: the cached answer still comes at once, and is the same response
    again = await in_thread(exchange, port, plain)
    assert response(again).response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL
    assert again == first.public_bytes(serialization.Encoding.DER)
    # so do /healthz-free routes of the site: the CA certificate
    code = (await in_thread(exchange_get, port, "/ca/web.crt"))
    assert code == 200
    # the queued requests are answered once signing goes on, each with its own nonce
    env["held"].release()
    for s in waiting:
        resp = response(await in_thread(read_reply, s))
        assert resp.response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL
        assert nonce_of(resp) is not None
    assert queue.held == 0


def exchange_get(port: int, path: str) -> int:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path.encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return int(data.split()[1])


@pytest_twisted.ensureDeferred
async def test_shedding_answers_presigned_without_nonce_or_try_later(
        env: dict[str, Any]) -> None:
    ca, port, queue = env["ca"], env["port"], env["queue"]
    await signed_once(env, request_der(ca, [1]))  # serial 1 is pre-signed; 2 is not
    waiting = await fill(env, 3)
    waiting += await fill(env, 1, PEER_B)
    with capturedLogs() as events:
        # nonce request for serial 1: its pre-signed response, without the nonce
        shed = response(await in_thread(exchange, port, nonce_der(ca, 1)))
        assert shed.response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL
        assert shed.certificate_status == c_ocsp.OCSPCertStatus.GOOD
        assert shed.serial_number == 1 and nonce_of(shed) is None
        # nonce request for serial 2 (nothing pre-signed): tryLater, at once
        for _ in range(3):
            resp = response(await in_thread(exchange, port, nonce_der(ca, 2)))
            assert resp.response_status == c_ocsp.OCSPResponseStatus.TRY_LATER
    assert queue.shed_presigned == 1 and queue.shed_try_later == 3
    lines = [e for e in events if "OCSP overload" in str(e.get("log_format", ""))]
    assert len(lines) == 1, lines  # one line per address per second, not one per request
    # /metrics counts them
    from server.ocsp.signing import OverloadCollector

    families = {m.name: m for m in OverloadCollector(queue).collect()}
    samples = {s.labels["answer"]: s.value for s in families["certpub_ocsp_shed"].samples
               if s.name.endswith("_total")}
    assert samples == {"try_later": 3, "presigned": 1}
    # openssl ocsp (it sends a nonce) accepts the nonce-less pre-signed answer with a warning
    cert = ca.folder / "s1.pem"
    cert.write_bytes(ca.certs[1].public_bytes(serialization.Encoding.PEM))
    r = await threads.deferToThread(subprocess.run, [
        require_tool("openssl"), "ocsp", "-issuer", str(ca.cert_path), "-cert", str(cert),
        "-url", f"http://127.0.0.1:{port}/ocsp", "-CAfile", str(ca.cert_path)],
        capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "WARNING: no nonce in response" in r.stdout + r.stderr
    assert "Response verify OK" in r.stdout + r.stderr and ": good" in r.stdout
    env["held"].release()
    for s in waiting:
        await in_thread(read_reply, s)


@pytest_twisted.ensureDeferred
async def test_shedding_without_presigned_fallback_when_configured(tmp_path: Path) -> None:
    e = _serve(tmp_path, signing_queue=1, signing_queue_per_address=1,
               shed_nonce_with_presigned=False)
    queue: SigningQueue = e["queue"]
    held = HeldSigners(queue.executor, slots=1)  # type: ignore[arg-type]
    queue.executor = held
    try:
        e["held"] = held
        await signed_once(e, request_der(e["ca"], [1]))
        waiting = await fill(e, 1)
        resp = response(await in_thread(exchange, e["port"], nonce_der(e["ca"], 1)))
        assert resp.response_status == c_ocsp.OCSPResponseStatus.TRY_LATER
        held.release()
        await in_thread(read_reply, waiting[0])
    finally:
        held.release()
        await _stop(e)


@pytest_twisted.ensureDeferred
async def test_one_address_cannot_take_the_whole_queue(tmp_path: Path) -> None:
    e = _serve(tmp_path, signing_queue=6, signing_queue_per_address=4)
    queue: SigningQueue = e["queue"]
    held = e["held"] = HeldSigners(queue.executor, slots=1)  # type: ignore[arg-type]
    queue.executor = held
    try:
        ca, port = e["ca"], e["port"]
        a = await fill(e, 4)  # address A's share: 4 of 6 (one signing, three waiting)
        resp = response(await in_thread(exchange, port, nonce_der(ca, 3)))
        assert resp.response_status == c_ocsp.OCSPResponseStatus.TRY_LATER  # A: over its share
        b = await fill(e, 2, PEER_B, serial=2)  # B still gets in
        assert queue.held == 6 and queue.shed_try_later == 1
        held.release()
        answers = [response(await in_thread(read_reply, s)) for s in a + b]
        assert all(r.response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL for r in answers)
        # served in turn, not in arrival order: B's requests did not wait behind all of A's
        assert held.order == [3, 3, 2, 3, 2, 3]
    finally:
        held.release()
        await _stop(e)


def response_serial(der: bytes) -> int:
    from server.ocsp.der import parse_request

    return parse_request(der, 10).cert_ids[0].serial


@pytest_twisted.ensureDeferred
async def test_never_issued_answers_cached_apart_and_rate_limited(tmp_path: Path) -> None:
    e = _serve(tmp_path, unknown_per_address=2.0, unknown_cache_entries=3, cache_entries=50)
    service = e["site"].service
    try:
        ca, port = e["ca"], e["port"]
        await in_thread(exchange, port, request_der(ca, [1]))
        real = len(service.cache)
        first = response(await in_thread(exchange, port, request_der(ca, [0xDEAD01])))
        assert first.certificate_status == c_ocsp.OCSPCertStatus.UNKNOWN
        assert len(service.cache) == real and len(service.unknown) >= 1  # kept apart
        again = await in_thread(exchange, port, request_der(ca, [0xDEAD01]))
        assert again == first.public_bytes(serialization.Encoding.DER)  # from that cache
        # a burst of made-up serials from one address: 2 per second are signed, then tryLater
        answers = [response(await in_thread(exchange, port, request_der(ca, [0xBEEF00 + i])))
                   for i in range(6)]
        kinds = [a.response_status for a in answers]
        assert c_ocsp.OCSPResponseStatus.TRY_LATER in kinds, kinds
        assert e["queue"].unknown_limited >= 1
        assert len(service.unknown) <= 3 and len(service.cache) == real  # bounded, apart
        # another address has its own budget; real answers are never limited
        other = response(await in_thread(exchange, port, request_der(ca, [0xBEEF77]), PEER_B))
        assert other.certificate_status == c_ocsp.OCSPCertStatus.UNKNOWN
        good = response(await in_thread(exchange, port, request_der(ca, [2])))
        assert good.certificate_status == c_ocsp.OCSPCertStatus.GOOD
    finally:
        await _stop(e)


@pytest_twisted.ensureDeferred
async def test_flood_on_signing_processes_is_always_answered(tmp_path: Path,
                                                             store_location: str) -> None:
    """Real signing processes (each with its own SQLite or PostgreSQL connection); a flood of
    nonces and made-up serials beyond the queue's size: every request gets an answer (signed,
    pre-signed or tryLater), none hangs, and a cached answer is served meanwhile."""
    pg = store_location.startswith("postgresql")
    e = _serve(tmp_path, processes=1, signing_queue=8, signing_queue_per_address=6,
               location=store_location if pg else None, threads_=2 if pg else 0)
    queue: SigningQueue = e["queue"]
    assert isinstance(queue.executor, ProcessSigners)
    try:
        ca, port = e["ca"], e["port"]
        plain = request_der(ca, [1])
        cached = await in_thread(exchange, port, plain)
        assert response(cached).response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL

        def flood(i: int) -> c_ocsp.OCSPResponseStatus:
            der = nonce_der(ca, 1 + i % 3) if i % 2 else request_der(ca, [0xF00D000 + i])
            return response(exchange(port, der, PEER_B if i % 5 == 0 else "127.0.0.1")
                            ).response_status

        def burst() -> list[c_ocsp.OCSPResponseStatus]:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(40) as pool:
                return list(pool.map(flood, range(200)))

        pending = threads.deferToThread(burst)
        for _ in range(5):
            assert await in_thread(exchange, port, plain) == cached
        results = await pending
        ok = c_ocsp.OCSPResponseStatus
        assert set(results) <= {ok.SUCCESSFUL, ok.TRY_LATER}, set(results)
        assert ok.SUCCESSFUL in results
        assert queue.held == 0
        assert queue.executor.started == 1  # no signing process died
    finally:
        await _stop(e)
    assert all(c is None or c.ended for c in queue.executor.children)  # none outlives


def test_config_keys_parse_and_refuse_bad_values() -> None:
    http = parse_http(Section({"signing_processes": 2, "signing_queue": 100,
                               "signing_queue_per_address": 10,
                               "shed_nonce_with_presigned": False,
                               "unknown_cache_entries": 500, "unknown_per_address": 5},
                              "http"))
    assert (http.signing_processes, http.signing_queue, http.signing_queue_per_address,
            http.shed_nonce_with_presigned, http.unknown_cache_entries,
            http.unknown_per_address) == (2, 100, 10, False, 500, 5.0)
    defaults = parse_http(Section({}, "http"))
    assert (defaults.signing_processes, defaults.signing_queue,
            defaults.signing_queue_per_address, defaults.shed_nonce_with_presigned) == (
                1, 256, 64, True)
    with pytest.raises(ConfigError, match="signing_queue_per_address"):
        parse_http(Section({"signing_queue": 10, "signing_queue_per_address": 11}, "http"))
    with pytest.raises(ConfigError, match="signing_processes"):
        parse_http(Section({"signing_processes": -1}, "http"))


def test_signing_processes_has_one_default_in_code_and_toml() -> None:
    """Production forks: a config built in code signs in processes too unless it says 0."""
    import tomllib

    from server.ocsp.config import SIGNING_PROCESSES, HttpConfig

    in_code = {f.name: f.default for f in dataclasses.fields(HttpConfig)}["signing_processes"]
    example = Path(__file__).resolve().parents[2] / "conf" / "certpub.example.toml"
    documented = tomllib.loads(example.read_text())["http"]["signing_processes"]
    assert in_code == parse_http(Section({}, "http")).signing_processes == documented \
        == SIGNING_PROCESSES == 1


@pytest_twisted.ensureDeferred
async def test_a_signing_process_that_dies_is_replaced_and_nothing_hangs(
        tmp_path: Path) -> None:
    import signal

    e = _serve(tmp_path, processes=1)
    queue: SigningQueue = e["queue"]
    try:
        ca, port = e["ca"], e["port"]
        first = response(await in_thread(exchange, port, nonce_der(ca, 1)))
        assert first.response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL
        child = queue.executor.children[0]  # type: ignore[attr-defined]
        with capturedLogs() as events:
            os.kill(child.transport.pid, signal.SIGKILL)
            # answered all the same: tryLater while no signer is up, then signed again
            answers = [response(await in_thread(exchange, port, nonce_der(ca, 2)))
                       for _ in range(3)]
            assert all(a.response_status in (c_ocsp.OCSPResponseStatus.SUCCESSFUL,
                                             c_ocsp.OCSPResponseStatus.TRY_LATER)
                       for a in answers)
            for _ in range(100):
                if queue.executor.started == 2 and queue.executor.free():  # type: ignore[attr-defined]
                    break
                await _sleep(0.1)
            again = response(await in_thread(exchange, port, nonce_der(ca, 2)))
            assert again.response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL
            assert nonce_of(again) is not None
        assert any("signing process 0 ended" in str(ev.get("log_format", "")) or
                   "ended (exit" in str(ev.get("log_format", "")) for ev in events)
    finally:
        await _stop(e)


def two_on_one_connection(port: int, first: bytes, second: bytes) -> tuple[bytes, bytes, float]:
    """Send first, read its answer, then send second on the same connection: (answers, the
    time the second took)."""
    import time

    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(post_bytes(first))
        a = read_one(s)
        t0 = time.monotonic()
        s.sendall(post_bytes(second))
        b = read_one(s)
        return a, b, time.monotonic() - t0
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_a_shed_connection_is_read_again_only_after_a_backoff(
        env: dict[str, Any]) -> None:
    from server.ocsp.signing import SHED_BACKOFF

    ca, port = env["ca"], env["port"]
    plain = request_der(ca, [1])
    await signed_once(env, plain)
    waiting = await fill(env, 3)
    waiting += await fill(env, 1, PEER_B)
    # a cached request after a cached one: no wait
    _, _, quick = await in_thread(two_on_one_connection, port, plain, plain)
    # a cached request after a shed one on the same connection: read SHED_BACKOFF later
    shed, cached, slow = await in_thread(two_on_one_connection, port, nonce_der(ca, 2), plain)
    assert response(shed).response_status == c_ocsp.OCSPResponseStatus.TRY_LATER
    assert response(cached).response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL
    assert slow >= SHED_BACKOFF * 0.9 > quick, (slow, quick)
    env["held"].release()
    for s in waiting:
        await in_thread(read_reply, s)
