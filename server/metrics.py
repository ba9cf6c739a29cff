"""Prometheus metrics of certpub serve: one exposition for all workers, in registries of its own.

Strategy: request counters, latency histograms, the OCSP cache, connections and the pre-signing
backlog are updated by the protocol code through a handful of plain methods that never raise.
Everything the store knows (generation, certificates by CA and status, imported files) and the
signer expiries are computed when Prometheus scrapes, by one custom collector; the scan-ish
per-CA counts are cached for ``STATS_TTL`` seconds; with a threaded store a scrape is
rendered in a store thread (``OpsRoute.scrape``), as every collector and counter here is
thread-safe. The change-poll lag is measured by wrapping
the feed's ``poll`` (see ``Metrics.watch``), so a poll loop that died shows up as a growing lag.
The registry is not prometheus_client's global one, so tests and processes stay isolated.

Across workers (``certpub serve --workers N``): the supervisor turns on prometheus_client's
multiprocess mode before it forks (``enable_multiprocess``: every value is then a float in a
per-process mmap file of one fresh directory, the mechanism gunicorn deployments use), and a
scrape answered by any worker renders ``MultiProcessCollector`` over all the files, so it shows
the sum over the workers. Counter files of dead workers stay (their counts are kept: a counter
never goes down); the supervisor drops their live gauges (``mark_process_dead``). What each
worker knows only of itself (connections, its feed, its signing queue, its process) comes from
collectors registered with ``register_worker``; ``export`` copies their values into the
worker's files every ``EXPORT_EVERY`` seconds and before the worker's own scrape (gauges with
a ``live*`` mode: summed, or the worst worker's for the feed; ``process_*`` per worker with
a ``worker`` label). What is read from the store, the signer certificates and the spool folders
is the same for every worker, so it is computed by the scraping process, never summed.
Requests are counted without touching the files per request: LDAP operations are tallied in
memory (``tally``), the HTTP access log adds each batch (``add_tallied``), and ``flush`` folds
them into the metric objects — so into the files — before a scrape and, in a worker, every
``EXPORT_EVERY`` seconds: at most one round of file writes per second, whatever the request
rate (bench/metrics_bench.py). A scrape thus shows other workers' requests up to
``EXPORT_EVERY`` late, its own worker's at once. With one process (``--workers 1``, tests)
the same objects count in memory, ``flush`` runs before each scrape and ``export`` does
nothing.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from store.model import CaStats, Generation
from store.errors import StoreError

log = Logger()

PROTOCOLS = ("ldap", "ocsp", "http")
# 0.1 ms .. 1 s: an indexed SQLite read is ~0.1 ms, an RSA-4096 signature a few ms.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0)
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))
STATS_TTL = 30.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXPORT_EVERY = 1.0  # seconds between copies of a worker's own state into its files
# Exported gauges are summed over live workers, except these (Prometheus' multiprocess modes).
GAUGE_MODES = {"certpub_feed_generation": "livemin", "certpub_feed_healthy": "livemin",
               "certpub_change_poll_lag_seconds": "livemax", "python_info": "livemax"}
PER_WORKER = "process_"  # exported families with a worker label (one series per worker slot)

SignerExpiries = Callable[[], Mapping[str, datetime]]


class StoreLike(Protocol):
    def generation(self) -> Generation: ...
    def stats(self, now: datetime) -> list[CaStats]: ...


class FeedLike(Protocol):
    healthy: bool
    generation: Generation

    def poll(self) -> Any: ...  # a Deferred with a threaded store


def latency_bucket(seconds: float) -> int:
    """The index of the latency bucket ``observe(seconds)`` counts in (for
    ``Metrics.requests_tallied``)."""
    return bisect_left(_BOUNDS, seconds)


def wall_clock() -> datetime:
    return datetime.now(UTC)


def import_file_counts(store: Any) -> dict[str, int]:
    """Files the importer recorded, by outcome (``{}`` for a store that does not record them)."""
    counts = getattr(store, "import_file_counts", None)
    return {str(k): int(v) for k, v in counts().items()} if callable(counts) else {}


# --- multiprocess mode -------------------------------------------------------------------

_worker: int | None = None  # this process's worker slot (1..N) under the supervisor


def enable_multiprocess(path: Path) -> None:
    """Count in per-process files under path from now on, in this process and its children
    (the supervisor, before it forks). prometheus_client picks its value class when it is
    first imported; it is picked again here, as the service modules may be imported already."""
    os.environ[MULTIPROC_ENV] = str(path)
    values.ValueClass = values.get_value_class()


def multiprocess_dir() -> Path | None:
    """The shared directory when this process counts in files, else None."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path or not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return Path(path)


def set_worker(index: int | None) -> None:
    """The worker slot of this process (``worker`` label of its per-worker series)."""
    global _worker
    _worker = index


def process_dead(pid: int, path: Path) -> None:
    """The supervisor reaped worker pid: drop its live gauges; its counters stay."""
    from prometheus_client.multiprocess import mark_process_dead

    try:
        mark_process_dead(pid, str(path))
    except OSError as exc:
        log.warn("metrics: files of worker pid {pid} not cleaned: {error}", pid=pid,
                 error=str(exc))


class _Exported:
    """A worker's own collectors written into its multiprocess files (``Metrics.export``)."""

    def __init__(self, worker: int | None) -> None:
        self.worker = "" if worker is None else str(worker)
        self.metrics: dict[str, Any] = {}
        self.counted: dict[tuple[str, tuple[str, ...]], float] = {}

    def write(self, families: Iterator[Metric]) -> None:
        for family in families:
            if family.type not in ("counter", "gauge"):
                continue
            extra = ("worker",) if family.name.startswith(PER_WORKER) and self.worker else ()
            for sample in family.samples:
                if family.type == "counter" and not sample.name.endswith("_total"):
                    continue  # _created: not kept in multiprocess mode
                names = tuple(sample.labels) + extra
                metric = self._metric(family, names)
                if metric is None:
                    continue
                labels = tuple(sample.labels.values()) + ((self.worker,) if extra else ())
                child = metric.labels(*labels) if names else metric
                if family.type == "gauge":
                    child.set(sample.value)
                    continue
                key = (family.name, labels)
                delta = sample.value - self.counted.get(key, 0.0)
                if delta > 0:  # a worker's own counters only grow
                    child.inc(delta)
                    self.counted[key] = sample.value

    def _metric(self, family: Metric, names: tuple[str, ...]) -> Any:
        metric = self.metrics.get(family.name)
        if metric is None:
            if family.type == "gauge":
                metric = Gauge(family.name, family.documentation, names, registry=None,
                               multiprocess_mode=GAUGE_MODES.get(family.name, "livesum"))
            else:
                metric = Counter(family.name, family.documentation, names, registry=None)
            self.metrics[family.name] = metric
        return metric if tuple(metric._labelnames) == names else None


@dataclass
class _StoreSnapshot:
    """The cached scan-ish part of a scrape."""

    taken: datetime
    stats: list[CaStats]
    files: dict[str, int]


class Metrics:
    """The metric objects of one process and the methods protocol code calls."""

    def __init__(self, now: Callable[[], datetime] = wall_clock, *, process: bool = True) -> None:
        self.now = now
        # registry: what a scrape renders; worker_registry: this process's own collectors
        # (the same registry with one process; exported to the shared files with several)
        self.registry = CollectorRegistry()
        self.shared = multiprocess_dir()
        self.worker_registry = CollectorRegistry() if self.shared else self.registry
        self._exported = _Exported(_worker) if self.shared else None
        if self.shared is not None:
            MultiProcessCollector(self.registry, str(self.shared))
        r = None if self.shared else self.registry  # the files are rendered, not the objects
        self.requests = Counter("certpub_requests", "Requests by protocol, operation and result.",
                                ["protocol", "operation", "result"], registry=r)
        self.latency = Histogram("certpub_request_seconds", "Request duration in seconds.",
                                 ["protocol", "operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.ocsp_cache = Counter("certpub_ocsp_cache", "OCSP response cache lookups.",
                                  ["result"], registry=r)
        self._ocsp_lookups = (self.ocsp_cache.labels("miss"), self.ocsp_cache.labels("hit"))
        self.signer_refusals = Counter(
            "certpub_ocsp_signer_unavailable",
            "Signatures refused because the CA's signing token (PKCS#11) did not answer;"
            " the request was answered tryLater.", ["ca"], registry=r)
        self.ldap_answers = Counter("certpub_ldap_answer_cache",
                                    "LDAP pre-encoded answer lookups.", ["result"], registry=r)
        self._ldap_answers = (self.ldap_answers.labels("miss"), self.ldap_answers.labels("hit"))
        # server.privacy counts here: searches refused by the lookup policy or the budget
        self.privacy_refusals = Counter(
            "certpub_privacy_refusals", "Searches (LDAP) and search pages (HTTP) refused by the"
            " [privacy] lookup policy or throttled by its budget, by reason.",
            ["protocol", "reason"], registry=r)
        # counts not folded into the metric objects yet (see ``flush``)
        self._tallies: dict[tuple[str, str, str], list[Any]] = {}
        self._ldap_cache_counts = [0, 0]  # misses, hits
        self._ocsp_cache_counts = [0, 0]  # misses, hits
        if process:
            ProcessCollector(registry=self.worker_registry)
            PlatformCollector(registry=self.worker_registry)
        self.store: StoreLike | None = None
        self.feed: FeedLike | None = None
        self.signer_source: SignerExpiries | None = None
        self._signers: dict[str, datetime] = {}
        self._last_poll: datetime | None = None
        self._snapshot: _StoreSnapshot | None = None
        # Read at scrape time: each listener's ConnectionLimits (server/limits.py), by
        # service ("ldap", "http"), and the OCSP service's count of pre-signed responses.
        self.limits: dict[str, Any] = {}
        self.presigned: Callable[[], int] | None = None
        self.registry.register(_StateCollector(self))
        self.worker_registry.register(_WorkerCollector(self))
        # Backlogs (see _BacklogCollector): the OCSP pre-signing queue and the import spools.
        self.presign_backlog: Callable[[], int] | None = None
        self.spools: tuple[Path, ...] = ()
        self.registry.register(_BacklogCollector(self))
        self.registry.register(_CrlScopeCollector(self))  # store-derived: the scraper's

    def register_worker(self, collector: Collector) -> None:
        """A collector of this process's own state (summed over workers, see ``export``)."""
        self.worker_registry.register(collector)

    def export(self) -> None:
        """Copy this worker's own collectors into its multiprocess files (no-op with one
        process); called every ``EXPORT_EVERY`` seconds, before a scrape and at stop."""
        if self._exported is None:
            return
        try:
            self.flush()
            self._exported.write(self.worker_registry.collect())
        except Exception:  # noqa: BLE001 - metrics never break the server
            log.failure("metrics: export failed")

    def flush(self) -> None:
        """Fold the counts tallied in memory into the metric objects (on the reactor thread:
        before a scrape, every ``EXPORT_EVERY`` seconds in a worker, at stop)."""
        tallies, self._tallies = self._tallies, {}
        for (protocol, operation, result), (count, total, buckets) in tallies.items():
            self.requests_tallied(protocol, operation, result, count, total, buckets)
        for counts, children in ((self._ldap_cache_counts, self._ldap_answers),
                                 (self._ocsp_cache_counts, self._ocsp_lookups)):
            misses, hits = counts
            if misses:
                children[0].inc(misses)
            if hits:
                children[1].inc(hits)
            counts[0] = counts[1] = 0

    # --- called by the protocol code (never raise) ---------------------------------------

    def request(self, protocol: str, operation: str, result: str, seconds: float) -> None:
        """Count one finished request and observe its duration."""
        self.requests.labels(protocol, operation, result).inc()
        self.latency.labels(protocol, operation).observe(max(seconds, 0.0))

    def requests_tallied(self, protocol: str, operation: str, result: str, count: int,
                         seconds: float, buckets: list[int]) -> None:
        """Count ``count`` finished requests of one kind at once: their total ``seconds`` and
        how many took each latency bucket (index ``latency_bucket(s)``), as that many
        ``observe`` calls would (the HTTP access log folds a batch of requests this way)."""
        self.requests.labels(protocol, operation, result).inc(count)
        child = self.latency.labels(protocol, operation)
        # prometheus_client's Histogram keeps one (non-cumulative) value per bucket and the
        # sum; tests/test_metrics.py checks this fold against observe()
        values, total = getattr(child, "_buckets", None), getattr(child, "_sum", None)
        if values is None or total is None or len(values) != len(buckets):
            mean = seconds / count if count else 0.0  # another prometheus_client: observe
            for i, n in enumerate(buckets):           # each bucket's bound (+Inf: the mean)
                for _ in range(n):
                    child.observe(_BOUNDS[i] if i < len(LATENCY_BUCKETS) else mean)
            return
        total.inc(seconds)
        for i, n in enumerate(buckets):
            if n:
                values[i].inc(n)

    def cache_lookups(self, hits: int, misses: int) -> None:
        """Count OCSP response cache lookups (several at once; folded by ``flush``)."""
        counts = self._ocsp_cache_counts
        counts[0] += misses
        counts[1] += hits

    def cache(self, hit: bool) -> None:
        """Count one OCSP response cache lookup."""
        self._ocsp_cache_counts[hit] += 1

    def ldap_cache(self, hit: bool) -> None:
        """Count one lookup of the LDAP pre-encoded answers (folded by ``flush``)."""
        self._ldap_cache_counts[hit] += 1

    def tally(self, protocol: str, operation: str, result: str, seconds: float) -> None:
        """``request`` for the hot path: counted in memory, folded into the metric objects by
        ``flush`` (with several workers a shared file is written per flush, not per request)."""
        tally = self._tallies.get((protocol, operation, result))
        if tally is None:
            tally = self._tallies[protocol, operation, result] = [0, 0.0, [0] * len(_BOUNDS)]
        if seconds < 0:
            seconds = 0.0
        tally[0] += 1
        tally[1] += seconds
        tally[2][bisect_left(_BOUNDS, seconds)] += 1

    def add_tallied(self, protocol: str, operation: str, result: str, count: int,
                    seconds: float, buckets: list[int]) -> None:
        """``requests_tallied`` for the hot path: added to the tallies ``flush`` folds."""
        tally = self._tallies.get((protocol, operation, result))
        if tally is None:
            self._tallies[protocol, operation, result] = [count, seconds, list(buckets)]
            return
        tally[0] += count
        tally[1] += seconds
        totals = tally[2]
        for i, n in enumerate(buckets):
            if n:
                totals[i] += n

    def signer_unavailable(self, ca: str) -> None:
        """Count one signature the CA's token did not make (answered tryLater)."""
        self.signer_refusals.labels(ca).inc()

    def signer_expiry(self, ca: str, not_after: datetime, now: datetime | None = None) -> None:
        """Record a CA's signer notAfter; seconds left are computed at each scrape (now unused)."""
        self._signers[ca] = not_after

    def forget_signer(self, ca: str) -> None:
        """Drop a CA that a reload removed."""
        self._signers.pop(ca, None)

    # --- called by the composition root --------------------------------------------------

    def watch(self, store: StoreLike | None = None, feed: FeedLike | None = None,
              signer_expiries: SignerExpiries | None = None) -> None:
        """Report on store, feed and signers at scrape time; call before ``feed.start()``."""
        if store is not None:
            self.store = store
            self._snapshot = None
        if signer_expiries is not None:
            self.signer_source = signer_expiries
        if feed is not None and feed is not self.feed:
            self.feed = feed
            self._last_poll = self.now()
            inner = feed.poll

            def polled(result: Any = None) -> Any:
                if feed.healthy:
                    self._last_poll = self.now()
                return result

            def poll() -> Any:
                result = inner()
                if isinstance(result, Deferred):  # threaded store: the tick ends later
                    return result.addCallback(polled)
                polled()
                return result

            feed.poll = poll  # type: ignore[method-assign]  # start()'s LoopingCall takes this one

    def poll_lag(self) -> float | None:
        """Seconds since the watched feed last polled the store successfully."""
        if self._last_poll is None:
            return None
        return max((self.now() - self._last_poll).total_seconds(), 0.0)

    def signers(self) -> dict[str, datetime]:
        """Signer notAfter by CA: those recorded, overridden by the bound source."""
        out = dict(self._signers)
        if self.signer_source is not None:
            out.update(self.signer_source())
        return out

    def render(self, flush: bool = True) -> bytes:
        """The Prometheus text exposition (format 0.0.4): all workers' with several.
        flush: fold this process's tallies and export its own state first (only on the
        reactor thread: ``OpsRoute.scrape`` does it there, then renders in a store thread)."""
        if flush:
            self.flush()
            self.export()
        return generate_latest(self.registry)

    def store_snapshot(self, store: StoreLike) -> _StoreSnapshot:
        """Per-CA counts and file outcomes, read at most once every ``STATS_TTL`` seconds."""
        now = self.now()
        snap = self._snapshot
        if snap is None or not 0 <= (now - snap.taken).total_seconds() < STATS_TTL:
            snap = _StoreSnapshot(now, store.stats(now), import_file_counts(store))
            self._snapshot = snap
        return snap


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class _StateCollector(Collector):
    """Families computed at scrape time by the scraping process, the same in every worker:
    the store (one store under all workers: summing would count it N times) and the signer
    certificates (every worker loads the same ones)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._store()
        yield from self._signers()

    def _store(self) -> Iterator[Metric]:
        store = self.m.store
        if store is None:
            return
        up = GaugeMetricFamily("certpub_store_up", "1 when the store could be read.")
        try:
            generation = store.generation()
            snap = self.m.store_snapshot(store)
        except StoreError as exc:
            log.debug("metrics: store unreadable: {error}", error=str(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        gen = GaugeMetricFamily("certpub_store_generation", "Generation committed in the store.")
        gen.add_metric([], int(generation))
        yield gen
        certs = GaugeMetricFamily("certpub_certificates", "Certificates by CA and status"
                                  f" (refreshed every {STATS_TTL:g} s).", labels=["ca", "status"])
        last = GaugeMetricFamily("certpub_ca_last_import_timestamp_seconds",
                                 "When a certificate of the CA was last imported.", labels=["ca"])
        synced = GaugeMetricFamily("certpub_ca_synced_timestamp_seconds",
                                   "When the importer last confirmed the CA's statuses.",
                                   labels=["ca"])
        for s in snap.stats:
            for status, n in (("good", s.good), ("revoked", s.revoked), ("expired", s.expired),
                              ("on_hold", s.on_hold)):
                certs.add_metric([s.ca.name, status], n)
            for family, value in ((last, _ts(s.last_import)), (synced, _ts(s.ca.synced_at))):
                if value is not None:
                    family.add_metric([s.ca.name], value)
        files = CounterMetricFamily("certpub_import_files",
                                    "Input files recorded in the store by the importer.",
                                    labels=["outcome"])
        for outcome, n in sorted(snap.files.items()):
            files.add_metric([outcome], n)
        yield from (certs, last, synced, files)

    def _signers(self) -> Iterator[Metric]:
        try:
            signers = self.m.signers()
        except Exception:
            log.failure("metrics: signer expiries unavailable")
            return
        if not signers:
            return
        family = GaugeMetricFamily("certpub_signer_expiry_seconds",
                                   "Seconds until the CA's OCSP signer certificate expires.",
                                   labels=["ca"])
        now = self.m.now()
        for ca, not_after in sorted(signers.items()):
            family.add_metric([ca], (not_after - now).total_seconds())
        yield family


class _WorkerCollector(Collector):
    """What one process knows only of itself: its connections, its change feed, its OCSP
    pre-signing (exported to the shared files with several workers, see ``Metrics.export``)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._connections()
        yield from self._feed()
        if self.m.presign_backlog is not None:
            backlog = GaugeMetricFamily(
                "certpub_ocsp_presign_backlog",
                "OCSP responses queued for pre-signing (status changed or due for refresh)"
                " and not signed yet.")
            backlog.add_metric([], self.m.presign_backlog())
            yield backlog

    def _connections(self) -> Iterator[Metric]:
        open_ = GaugeMetricFamily("certpub_open_connections", "Open client connections.",
                                  labels=["service"])
        refused = CounterMetricFamily("certpub_connections_refused",
                                      "Connections refused by the connection limits.",
                                      labels=["service"])
        for service, limits in sorted(self.m.limits.items()):
            open_.add_metric([service], limits.total)
            refused.add_metric([service], limits.refused)
        yield from (open_, refused)
        if self.m.presigned is not None:
            pre = CounterMetricFamily("certpub_ocsp_presigned",
                                      "OCSP responses signed ahead of any request for them.")
            pre.add_metric([], self.m.presigned())
            yield pre

    def _feed(self) -> Iterator[Metric]:
        feed = self.m.feed
        if feed is None:
            return
        lag = GaugeMetricFamily("certpub_change_poll_lag_seconds",
                                "Seconds since the change feed last polled the store.")
        lag.add_metric([], self.m.poll_lag() or 0.0)
        gen = GaugeMetricFamily("certpub_feed_generation",
                                "Store generation this server's caches have applied.")
        gen.add_metric([], int(feed.generation))
        healthy = GaugeMetricFamily("certpub_feed_healthy", "1 when the last poll succeeded.")
        healthy.add_metric([], 1 if feed.healthy else 0)
        yield from (lag, gen, healthy)


# --- backlogs: files waiting in the import spools ------------------------

SPOOL_SCAN_LIMIT = 100_000  # entries looked at per spool and scrape (a spool is near empty)


def _spool_waiting(name: str) -> bool:
    """A name the import daemon will read: not one being written (the drop protocol)."""
    return not (name.startswith(".") or name.endswith((".tmp", ".part")))


def spool_backlog(spool: Path, now: float) -> tuple[int, float] | None:
    """(files waiting, age in seconds of the oldest by mtime) in one spool folder, or None
    when it cannot be read (a node without the spool). done/ and rejected/ are folders."""
    count, oldest = 0, now
    try:
        with os.scandir(spool) as entries:
            for i, entry in enumerate(entries):
                if i >= SPOOL_SCAN_LIMIT:
                    break
                if not _spool_waiting(entry.name):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:  # imported (moved away) meanwhile
                    continue
                count += 1
                oldest = min(oldest, mtime)
    except OSError:
        return None
    return count, max(now - oldest, 0.0)


class _BacklogCollector(Collector):
    """Files waiting in the import spools, read at scrape time by the scraping process: the
    import lag an operator sees before the generation moves (the OCSP pre-signing backlog is
    each worker's own: ``_WorkerCollector``)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        if not self.m.spools:
            return
        files = GaugeMetricFamily("certpub_import_spool_files",
                                  "Files waiting in an import spool folder.", labels=["spool"])
        age = GaugeMetricFamily("certpub_import_spool_oldest_seconds",
                                "Age of the oldest file waiting in an import spool folder"
                                " (0 when none).", labels=["spool"])
        now = time.time()
        for spool in self.m.spools:
            found = spool_backlog(spool, now)
            if found is not None:
                files.add_metric([str(spool)], found[0])
                age.add_metric([str(spool)], found[1])
        yield from (files, age)


class _CrlScopeCollector(Collector):
    """Each CRL scope's thisUpdate and nextUpdate (issue 23: full, partitions, deltas), so an
    alert can fire before a CRL goes stale; read at most once every ``STATS_TTL`` seconds."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._taken: float = -1e9
        self._rows: list[tuple[str, str, float, float | None]] = []

    def collect(self) -> Iterator[Metric]:
        store = self.m.store
        read = getattr(store, "crl_scopes", None)
        if read is None:
            return
        if not 0 <= time.monotonic() - self._taken < STATS_TTL:
            try:
                names = {s.ca.id: s.ca.name for s in self.m.store_snapshot(store).stats}
                self._rows = [(names[sc.ca_id], sc.label, sc.this_update.timestamp(),
                               _ts(sc.next_update)) for sc in read() if sc.ca_id in names]
                self._taken = time.monotonic()
            except StoreError:
                return
        this = GaugeMetricFamily("certpub_crl_this_update_timestamp_seconds",
                                 "thisUpdate of the latest CRL of each scope.",
                                 labels=["ca", "scope"])
        nxt = GaugeMetricFamily("certpub_crl_next_update_timestamp_seconds",
                                "nextUpdate of the latest CRL of each scope: past it, the CA"
                                " stopped publishing.", labels=["ca", "scope"])
        for ca, scope, this_update, next_update in self._rows:
            this.add_metric([ca, scope], this_update)
            if next_update is not None:
                nxt.add_metric([ca, scope], next_update)
        yield from (this, nxt)


_current: Metrics | None = None


def get_metrics() -> Metrics:
    """The process's Metrics, created on first use."""
    global _current
    if _current is None:
        _current = Metrics()
    return _current


def set_metrics(metrics: Metrics | None) -> None:
    """Install (or with None, forget) the process's Metrics."""
    global _current
    _current = metrics
