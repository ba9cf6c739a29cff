"""/healthz and /metrics: the checks, recovery without restart, headers, and the live routes
(``OpsRoute`` behind the HTTP listener) in memory and on a real listener."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from server.feed import ChangeFeed
from server.health import HealthCheck, OpsRoute
from server.http import wire
from server.http.listener import HttpFactory
from server.http.publication import send
from server.limits import ConnectionLimits
from server.metrics import Metrics
from server.ocsp import publish
from store.model import CaRecord, Generation
from store.sqlite import Store, StoreError
from tests.test_metrics import T0, FakeClock, make_store

SIGNER_OK = {"test-ca": T0 + timedelta(days=300)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = make_store(tmp_path / "store.sqlite3")
    yield s
    s.close()


class OpsSite:
    """The HTTP listener's routing of /healthz and /metrics (as ``HttpSite``), 404 elsewhere."""

    def __init__(self, ops: OpsRoute) -> None:
        self.ops = ops

    def handle(self, request: wire.Request, date: bytes, client: str = "-") -> Any:
        if request.path == b"/healthz":
            return self.ops.healthz(request, date)
        if request.path == b"/metrics":
            return self.ops.scrape(request, date)
        return send(request, publish.not_found(), {"kind": "ocsp"}, date)


def ops_factory(health: HealthCheck, metrics: Metrics | None = None, access: Any = None,
                reactor: Any = None) -> HttpFactory:
    """The HTTP listener serving only the two operations routes (in memory: a Clock)."""
    limits = ConnectionLimits(64, 64, service="http")
    return HttpFactory(OpsSite(OpsRoute(health, metrics or Metrics(FakeClock(), process=False),
                                        access)),
                       max_body=4096, timeout=30.0, reactor=reactor or Clock(), limits=limits)


def parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one HTTP/1.1 response."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def get(factory: HttpFactory, path: bytes, method: bytes = b"GET") -> tuple[int, dict[str, str], bytes]:
    """One request through the listener in memory; the answer parsed from the bytes written."""
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    return parse(transport.value())


def health_body(factory: HttpFactory) -> tuple[int, dict[str, Any]]:
    code, headers, body = get(factory, b"/healthz")
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert headers["content-length"] == str(len(body))
    return code, json.loads(body)


def test_healthy_store_answers_200_with_generation_and_signers(store: Store) -> None:
    health = HealthCheck(store, ChangeFeed(store), FakeClock(), lambda: SIGNER_OK,
                         max_import_age=3600)
    code, body = health_body(ops_factory(health))
    assert code == 200
    assert body["status"] == "ok" and body["reasons"] == []
    assert body["generation"] == int(store.generation())
    assert body["signer_days_left"] == {"test-ca": 300.0}
    assert body["import_age_seconds"] == 0 and body["last_import"].startswith("2030-01-15")
    assert body["feed"]["healthy"] is True


def test_store_file_moved_away_then_back_fails_then_recovers(store: Store, tmp_path: Path) -> None:
    resource = ops_factory(HealthCheck(store, None, FakeClock(), lambda: SIGNER_OK))
    assert health_body(resource)[0] == 200
    aside = tmp_path / "aside.sqlite3"
    store.path.rename(aside)
    code, body = health_body(resource)
    assert code == 503 and body["reasons"] == ["store file missing"]
    aside.rename(store.path)
    assert health_body(resource)[0] == 200  # no restart


def test_store_file_replaced_needs_restart(store: Store, tmp_path: Path) -> None:
    resource = ops_factory(HealthCheck(store, None, FakeClock(), lambda: SIGNER_OK))
    replacement = make_store(tmp_path / "new.sqlite3")
    replacement.close()
    (tmp_path / "new.sqlite3").replace(store.path)
    code, body = health_body(resource)
    assert code == 503 and "store file replaced" in body["reasons"][0]


class FlakyStore:
    """Delegates to a real store unless told to fail like an unreadable file."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.broken = False

    def _check(self) -> None:
        if self.broken:
            raise StoreError("store read failed: file is not a database (/secret/path)")

    def generation(self) -> Generation:
        self._check()
        return self.inner.generation()

    def cas(self) -> list[CaRecord]:
        self._check()
        return self.inner.cas()

    def changes_since(self, generation: int, limit: int = 0) -> list:  # type: ignore[type-arg]
        self._check()
        return self.inner.changes_since(generation, limit)


def test_store_error_gives_503_with_reason_then_200_without_restart(store: Store) -> None:
    flaky = FlakyStore(store)
    feed = ChangeFeed(flaky)
    resource = ops_factory(HealthCheck(flaky, feed, FakeClock(), lambda: SIGNER_OK))
    assert health_body(resource)[0] == 200
    flaky.broken = True
    feed.poll()
    code, body = health_body(resource)
    assert code == 503
    assert body["reasons"] == ["store unreadable", "change feed failing"]
    assert body["generation"] is None
    assert "/secret/path" not in json.dumps(body)  # details go to the log only
    flaky.broken = False
    feed.poll()
    code, body = health_body(resource)
    assert code == 200 and body["feed"]["healthy"] is True


@pytest.mark.parametrize(("days", "reason"), [
    (3, "signer of test-ca expires in 3.0 days (min 7)"),
    (-1, "signer of test-ca expired (min 7)"),
])
def test_signer_expiring_soon_gives_503(store: Store, days: int, reason: str) -> None:
    expiries = {"test-ca": T0 + timedelta(days=days), "other": T0 + timedelta(days=90)}
    ok, body = HealthCheck(store, None, FakeClock(), lambda: expiries).check()
    assert not ok and body["reasons"] == [reason]
    assert body["signer_days_left"] == {"test-ca": float(days), "other": 90.0}
    ok, _ = HealthCheck(store, None, FakeClock(), lambda: expiries, min_signer_days=2).check()
    assert ok is (days >= 2)


def test_import_age_only_checked_when_configured(store: Store, tmp_path: Path) -> None:
    clock = FakeClock()
    lenient = HealthCheck(store, None, clock, lambda: SIGNER_OK)
    strict = HealthCheck(store, None, clock, lambda: SIGNER_OK, max_import_age=3600)
    clock.advance(7200)
    assert lenient.check()[0] is True
    ok, body = strict.check()
    assert not ok and body["reasons"] == ["last import 7200 s ago (max 3600)"]
    with store.batch(clock()) as b:  # the importer confirms the CA again
        b.mark_synced(store.cas()[0].id)
    assert strict.check()[0] is True
    never = make_store(tmp_path / "never.sqlite3", synced=False)
    ok, body = HealthCheck(never, None, clock, dict, max_import_age=3600).check()
    never.close()
    assert not ok and body["reasons"] == ["no import recorded"] and body["last_import"] is None


def test_stalled_poll_loop_gives_503(store: Store) -> None:
    clock = FakeClock()
    metrics = Metrics(clock, process=False)
    feed = ChangeFeed(store)
    metrics.watch(feed=feed)
    health = HealthCheck(store, feed, clock, lambda: SIGNER_OK, poll_lag=metrics.poll_lag,
                         max_poll_lag=60)
    clock.advance(61)
    ok, body = health.check()
    assert not ok and body["reasons"] == ["change feed stalled for 61 s"]
    feed.poll()
    assert health.check()[0] is True


def test_signer_source_failure_is_a_503_not_a_500(store: Store) -> None:
    def boom() -> dict[str, datetime]:
        raise RuntimeError("keys not loaded")

    code, body = health_body(ops_factory(HealthCheck(store, None, FakeClock(), boom)))
    assert code == 503 and body["reasons"] == ["signer expiries unavailable"]


def test_metrics_resource_serves_parseable_text(store: Store) -> None:
    metrics = Metrics(FakeClock(), process=False)
    metrics.watch(store=store)
    metrics.request("ocsp", "status", "successful", 0.001)
    code, headers, body = get(ops_factory(HealthCheck(store, None, FakeClock(), lambda: SIGNER_OK),
                                          metrics), b"/metrics")
    assert code == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["content-length"] == str(len(body))
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"certpub_requests", "certpub_request_seconds", "certpub_store_generation"} <= names


def test_other_methods_and_paths(store: Store) -> None:
    factory = ops_factory(HealthCheck(store, None, FakeClock(), lambda: SIGNER_OK))
    for path in (b"/healthz", b"/metrics"):
        code, headers, _ = get(factory, path, b"POST")
        assert code == 405 and headers["allow"] == "GET, HEAD"
        code, headers, body = get(factory, path, b"HEAD")
        assert code == 200 and int(headers["content-length"]) > 0 and body == b""
    assert get(factory, b"/healthz/x")[0] == 404


def _fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@pytest_twisted.ensureDeferred
async def test_ops_site_on_a_real_listener(store: Store) -> None:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    signers = dict(SIGNER_OK)
    metrics = Metrics(FakeClock(), process=False)
    metrics.watch(store=store, signer_expiries=lambda: signers)
    factory = ops_factory(HealthCheck(store, None, FakeClock(), lambda: signers), metrics,
                          reactor=reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        code, headers, body = await threads.deferToThread(_fetch, base + "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        assert headers["content-length"] == str(len(body))
        assert "transfer-encoding" not in headers
        signers["test-ca"] = T0 + timedelta(days=3)
        code, headers, body = await threads.deferToThread(_fetch, base + "/healthz")
        assert code == 503 and headers["cache-control"] == "no-store"
        code, headers, _ = await threads.deferToThread(_fetch, base + "/healthz", "HEAD")
        assert code == 503 and int(headers["content-length"]) > 0
        code, headers, body = await threads.deferToThread(_fetch, base + "/metrics")
        assert code == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert fams["certpub_signer_expiry_seconds"].samples[0].value == 3 * 86400
        assert (await threads.deferToThread(_fetch, base + "/"))[0] == 404
        code, headers, _ = await threads.deferToThread(_fetch, base + "/healthz", "POST")
        assert code == 405 and headers["allow"] == "GET, HEAD"
    finally:
        await port.stopListening()


def test_state_changes_are_logged_once_with_details(store: Store) -> None:
    from twisted.logger import capturedLogs

    flaky = FlakyStore(store)
    health = HealthCheck(flaky, None, FakeClock(), lambda: SIGNER_OK)
    with capturedLogs() as events:
        health.check()
        flaky.broken = True
        health.check()
        health.check()
        flaky.broken = False
        health.check()
    lines = [e["log_format"].format(**e) for e in events if "health" in e["log_format"]]
    assert len(lines) == 2
    assert "store unreadable" in lines[0] and "/secret/path" in lines[0]
    assert lines[1] == "health: ok again"


class ScopedStore:
    """The store plus CRL scopes (issue 23) with chosen nextUpdate times."""

    def __init__(self, store: Store, scopes: list[Any]) -> None:
        self._store, self.scopes = store, scopes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def crl_scopes(self, ca_id: int | None = None) -> list[Any]:
        return list(self.scopes)


def test_a_crl_scope_past_its_next_update_is_a_warning_not_a_failure(store: Store) -> None:
    from types import SimpleNamespace

    ca = store.cas()[0]
    clock = FakeClock()
    now = clock()

    def scope(label: str, next_update: datetime) -> Any:
        return SimpleNamespace(ca_id=ca.id, label=label, next_update=next_update)

    scoped = ScopedStore(store, [scope("full", now + timedelta(days=1)),
                                 scope("part0.crl", now - timedelta(minutes=5))])
    health = HealthCheck(scoped, ChangeFeed(store), clock, lambda: SIGNER_OK)
    code, body = health_body(ops_factory(health))
    assert code == 200 and body["status"] == "degraded" and body["reasons"] == []
    assert body["warnings"] == [f"CRL of {ca.name} scope part0.crl is past its nextUpdate"
                                f" ({(now - timedelta(minutes=5)).strftime('%Y-%m-%dT%H:%M:%SZ')})"]
    scoped.scopes.pop()
    health._scopes = (-1e9, [])  # (read again at most every SCOPES_TTL seconds)
    code, body = health_body(ops_factory(health))
    assert code == 200 and body["status"] == "ok" and body["warnings"] == []
