"""The Prometheus metrics: families after calls, scrape-time store gauges, poll lag, isolation."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from server import metrics as metrics_module
from server.feed import ChangeFeed
from server.limits import ConnectionLimits
from server.metrics import LATENCY_BUCKETS, STATS_TTL, Metrics, get_metrics, set_metrics
from store.model import Generation
from store.sqlite import Store, StoreError

T0 = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)


class FakeClock:
    """A settable wall clock."""

    def __init__(self, now: datetime = T0) -> None:
        self.t = now

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


def ca_der(cn: str = "Test CA") -> bytes:
    """A small self-signed CA certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "MO"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(T0 - timedelta(days=365)).not_valid_after(T0 + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def make_store(path: Path, now: datetime = T0, synced: bool = True) -> Store:
    """A store holding one CA (synced at now) and one recorded import file."""
    store = Store.open(path)
    with store.batch(now) as b:
        ca_id, _ = b.ensure_ca("test-ca", ca_der())
        if synced:
            b.mark_synced(ca_id)
        b.record_file(hashlib.sha256(b"file-1").digest(), "file-1.pem", "accepted")
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = make_store(tmp_path / "store.sqlite3")
    yield s
    s.close()


def families(m: Metrics) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """Parsed exposition: family name -> {(sample name, sorted labels): value}."""
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        out[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
    return out


def value(fams: dict, family: str, sample: str | None = None, **labels: str) -> float:  # type: ignore[type-arg]
    return fams[family][(sample or family, tuple(sorted(labels.items())))]  # type: ignore[no-any-return]


def test_request_cache_connection_and_backlog_families() -> None:
    m = Metrics(FakeClock())
    m.request("ldap", "search", "success", 0.0004)
    m.request("ldap", "search", "success", 0.002)
    m.request("ocsp", "status", "tryLater", 0.3)
    m.cache(True)
    m.cache(False)
    m.cache(False)
    ldap_limits = ConnectionLimits(10, 2, service="ldap")
    http_limits = ConnectionLimits(10, 1, service="http")
    assert ldap_limits.admit("192.0.2.1") and ldap_limits.admit("192.0.2.2")
    assert http_limits.admit("192.0.2.1") and not http_limits.admit("192.0.2.1")
    m.limits.update(ldap=ldap_limits, http=http_limits)
    m.presigned = lambda: 42
    f = families(m)
    assert value(f, "certpub_requests", "certpub_requests_total", protocol="ldap",
                 operation="search", result="success") == 2
    assert value(f, "certpub_requests", "certpub_requests_total", protocol="ocsp",
                 operation="status", result="tryLater") == 1
    h = "certpub_request_seconds"
    assert value(f, h, h + "_bucket", protocol="ldap", operation="search", le="0.0001") == 0
    assert value(f, h, h + "_bucket", protocol="ldap", operation="search", le="0.0005") == 1
    assert value(f, h, h + "_bucket", protocol="ldap", operation="search", le="1.0") == 2
    assert value(f, h, h + "_count", protocol="ocsp", operation="status") == 1
    assert value(f, "certpub_ocsp_cache", "certpub_ocsp_cache_total", result="hit") == 1
    assert value(f, "certpub_ocsp_cache", "certpub_ocsp_cache_total", result="miss") == 2
    assert value(f, "certpub_open_connections", service="ldap") == 2
    assert value(f, "certpub_open_connections", service="http") == 1
    refused = "certpub_connections_refused"
    assert value(f, refused, refused + "_total", service="http") == 1
    assert value(f, refused, refused + "_total", service="ldap") == 0
    assert value(f, "certpub_ocsp_presigned", "certpub_ocsp_presigned_total") == 42
    assert "process_cpu_seconds" in f or "process_start_time_seconds" in f


def test_registries_are_isolated_from_each_other_and_the_global_one() -> None:
    a, b = Metrics(process=False), Metrics(process=False)
    a.request("http", "crl", "ok", 0.01)
    assert "certpub_requests" in families(a)
    assert not families(b)["certpub_requests"]
    assert REGISTRY.get_sample_value("certpub_requests_total",
                                     {"protocol": "http", "operation": "crl", "result": "ok"}) is None


def test_get_and_set_metrics() -> None:
    saved = metrics_module._current
    try:
        set_metrics(None)
        first = get_metrics()
        assert get_metrics() is first
        mine = Metrics(process=False)
        set_metrics(mine)
        assert get_metrics() is mine
    finally:
        set_metrics(saved)


def test_store_feed_and_signer_gauges(store: Store) -> None:
    clock = FakeClock()
    m = Metrics(clock, process=False)
    feed = ChangeFeed(store)
    m.watch(store=store, feed=feed,
            signer_expiries=lambda: {"test-ca": T0 + timedelta(days=3)})
    m.signer_expiry("other-ca", T0 + timedelta(days=10), T0)
    feed.prime()
    f = families(m)
    assert value(f, "certpub_store_up") == 1
    assert value(f, "certpub_store_generation") == int(store.generation()) >= 1
    assert value(f, "certpub_feed_generation") == int(store.generation())
    assert value(f, "certpub_certificates", ca="test-ca", status="good") == 0
    assert value(f, "certpub_certificates", ca="test-ca", status="revoked") == 0
    assert value(f, "certpub_ca_synced_timestamp_seconds", ca="test-ca") == T0.timestamp()
    assert value(f, "certpub_import_files", "certpub_import_files_total", outcome="accepted") == 1
    assert value(f, "certpub_signer_expiry_seconds", ca="test-ca") == 3 * 86400
    assert value(f, "certpub_signer_expiry_seconds", ca="other-ca") == 10 * 86400
    clock.advance(86400)  # seconds left are relative to the scrape, not to the call
    assert value(families(m), "certpub_signer_expiry_seconds", ca="test-ca") == 2 * 86400


def test_store_stats_are_cached_for_the_ttl(store: Store) -> None:
    clock = FakeClock()
    m = Metrics(clock, process=False)
    m.watch(store=store)
    key = ("certpub_import_files", "certpub_import_files_total")
    assert value(families(m), *key, outcome="accepted") == 1
    with store.batch(T0) as b:
        b.record_file(hashlib.sha256(b"file-2").digest(), "file-2.pem", "accepted")
    clock.advance(STATS_TTL - 1)
    f = families(m)
    assert value(f, *key, outcome="accepted") == 1  # cached
    assert value(f, "certpub_store_generation") == int(store.generation())  # never cached
    clock.advance(2)
    assert value(families(m), *key, outcome="accepted") == 2


class BrokenStore:
    """A store whose every read fails, as a vanished or corrupt file would."""

    def generation(self) -> Generation:
        raise StoreError("store read failed: disk I/O error")

    def stats(self, now: datetime) -> list:  # type: ignore[type-arg]
        raise StoreError("store read failed: disk I/O error")

    def changes_since(self, generation: int, limit: int = 0) -> list:  # type: ignore[type-arg]
        raise StoreError("store read failed: disk I/O error")


def test_unreadable_store_still_scrapes_with_store_up_zero() -> None:
    m = Metrics(FakeClock(), process=False)
    m.watch(store=BrokenStore())
    f = families(m)
    assert value(f, "certpub_store_up") == 0
    assert "certpub_store_generation" not in f


def test_poll_lag_grows_while_polls_fail_and_resets_on_success(store: Store) -> None:
    clock = FakeClock()
    m = Metrics(clock, process=False)
    source: dict[str, Any] = {"s": store}

    class Switch:
        def generation(self) -> Generation:
            return Generation(source["s"].generation())

        def changes_since(self, generation: int, limit: int = 0) -> list:  # type: ignore[type-arg]
            return list(source["s"].changes_since(generation, limit))

    feed = ChangeFeed(Switch())
    m.watch(feed=feed)
    clock.advance(5)
    assert value(families(m), "certpub_change_poll_lag_seconds") == 5
    feed.poll()
    assert value(families(m), "certpub_change_poll_lag_seconds") == 0
    source["s"] = BrokenStore()
    clock.advance(3)
    feed.poll()
    f = families(m)
    assert value(f, "certpub_change_poll_lag_seconds") == 3
    assert value(f, "certpub_feed_healthy") == 0
    source["s"] = store
    feed.poll()
    assert value(families(m), "certpub_change_poll_lag_seconds") == 0


def test_watch_before_start_measures_the_real_poll_loop(store: Store) -> None:
    clock = FakeClock()
    m = Metrics(clock, process=False)
    feed = ChangeFeed(store, interval=0.2)
    m.watch(store=store, feed=feed)
    reactor_clock = Clock()
    feed.start(reactor_clock)
    try:
        clock.advance(10)
        assert m.poll_lag() == 10
        reactor_clock.advance(0.2)  # the LoopingCall runs the wrapped poll
        assert m.poll_lag() == 0
    finally:
        feed.stop()


def test_presign_and_spool_backlogs(tmp_path: Path) -> None:
    """Files waiting in a spool (not those being written, not done/ or rejected/), the age of
    the oldest; an unreadable spool is left out; the pre-signing backlog as the service says."""
    import os
    import time

    spool, missing = tmp_path / "spool", tmp_path / "absent"
    (spool / "done").mkdir(parents=True)
    (spool / "done" / "old.pem").write_text("x")
    for name in ("a.pem", "b.crl", ".c.pem.tmp", "d.pem.part", ".e"):
        (spool / name).write_text("x")
    old = time.time() - 300
    os.utime(spool / "a.pem", (old, old))
    os.utime(spool / "d.pem.part", (old - 600, old - 600))  # being written: not waiting
    m = Metrics(FakeClock(), process=False)
    m.spools = (spool, missing)
    m.presign_backlog = lambda: 7
    f = families(m)
    assert value(f, "certpub_import_spool_files", spool=str(spool)) == 2
    assert 299 <= value(f, "certpub_import_spool_oldest_seconds", spool=str(spool)) < 330
    assert ("certpub_import_spool_files", (("spool", str(missing)),)) \
        not in f["certpub_import_spool_files"]
    assert value(f, "certpub_ocsp_presign_backlog") == 7
    for name in ("a.pem", "b.crl"):
        (spool / name).rename(spool / "done" / name)
    f = families(m)
    assert value(f, "certpub_import_spool_files", spool=str(spool)) == 0
    assert value(f, "certpub_import_spool_oldest_seconds", spool=str(spool)) == 0


def test_a_tally_counts_as_its_observations() -> None:
    """requests_tallied (the access log's fold of a batch) gives what observe() would."""
    from server.metrics import latency_bucket

    seconds = [0.0, 0.00005, 0.0001, 0.00011, 0.003, 0.3, 1.0, 7.5]
    a, b = Metrics(process=False), Metrics(process=False)
    for s in seconds:
        a.request("http", "crl", "ok", s)
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    for s in seconds:
        buckets[latency_bucket(s)] += 1
    b.requests_tallied("http", "crl", "ok", len(seconds), sum(seconds), buckets)
    fa, fb = families(a), families(b)
    assert fa["certpub_requests"] == fb["certpub_requests"]
    assert fa["certpub_request_seconds"] == fb["certpub_request_seconds"]


def test_export_copies_a_workers_own_families_counters_only_grow() -> None:
    """What a worker writes into the shared files (here in memory): gauges as they are,
    counters by their growth, process_* with the worker's slot as a label."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from server.metrics import _Exported

    exported = _Exported(worker=2)

    def families(refused: float, rss: float) -> Iterator[Any]:
        c = CounterMetricFamily("certpub_connections_refused", "x", labels=["service"])
        c.add_metric(["http"], refused)
        g = GaugeMetricFamily("process_resident_memory_bytes", "x")
        g.add_metric([], rss)
        yield from (c, g)

    exported.write(families(5, 100))
    exported.write(families(8, 90))
    exported.write(families(3, 80))  # never down (a counter of this process only grows)
    refused = exported.metrics["certpub_connections_refused"]
    assert refused.labels("http")._value.get() == 8
    rss = exported.metrics["process_resident_memory_bytes"]
    assert rss._labelnames == ("worker",) and rss.labels("2")._value.get() == 80
    assert rss._multiprocess_mode == "livesum"
    assert metrics_module.GAUGE_MODES["certpub_feed_generation"] == "livemin"


def test_each_crl_scope_exports_its_next_update(store: Store) -> None:
    from types import SimpleNamespace

    from tests.test_health import ScopedStore

    ca = store.cas()[0]
    scopes = [SimpleNamespace(ca_id=ca.id, label=label, this_update=T0,
                              next_update=T0 + timedelta(hours=h))
              for label, h in (("full", 24), ("part0.crl", 6), ("part0.crl (delta)", 1))]
    m = Metrics(FakeClock(), process=False)
    m.watch(store=ScopedStore(store, scopes))
    f = families(m)
    for s in scopes:
        assert value(f, "certpub_crl_next_update_timestamp_seconds", ca=ca.name,
                     scope=s.label) == s.next_update.timestamp()
        assert value(f, "certpub_crl_this_update_timestamp_seconds", ca=ca.name,
                     scope=s.label) == T0.timestamp()
