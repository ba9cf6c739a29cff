"""Health check and the /healthz and /metrics routes: the operations listener, and the
public HTTP listener for the client networks ``[ops] public_networks`` allows.

Strategy: ``HealthCheck.check`` asks the store one indexed question (its generation) plus the
short CA list, and reads the feed's and signers' state; every check runs on each request, so a
store that comes back turns the answer to 200 without a restart. The body is short and names
no paths or error texts (the endpoint may be public): details go to the log when the state
changes. ``OpsRoute`` is a plain adapter for the two paths; ``OpsSite`` is the whole site of
the ``[ops]`` listener (those two paths, 404 for any other), and ``server.http.site`` routes
them to it on the public listener only for allowed clients.
With a threaded ``StoreAccess`` the store reads of a check and a whole metrics scrape run in
the store pool and the answer is written when they are done (a full pool: 503).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from server import storeaccess
from server.metrics import CONTENT_TYPE, Metrics
from store.model import CaRecord, Generation
from store.errors import StoreError

log = Logger()
DAY = 86400.0
SCOPES_TTL = 30.0  # seconds between reads of the CRL scopes' nextUpdate


class HealthStore(Protocol):
    def generation(self) -> Generation: ...
    def cas(self) -> list[CaRecord]: ...


class HealthFeed(Protocol):
    healthy: bool
    generation: Generation
    last_error: str | None


class HealthCheck:
    """Decides whether this server is fit to serve, and says why not."""

    def __init__(self, store: HealthStore, feed: HealthFeed | None, now: Callable[[], datetime],
                 signer_expiries: Callable[[], Mapping[str, datetime]],
                 min_signer_days: int = 7, max_import_age: float | None = None,
                 poll_lag: Callable[[], float | None] | None = None,
                 max_poll_lag: float = 60.0, access: Any = None) -> None:
        self.store = store
        # a threaded StoreAccess (store is then its proxy): reads run in its pool
        self.access = access if access is not None and not access.inline else None
        self.feed = feed
        self.now = now
        self.signer_expiries = signer_expiries
        self.min_signer_days = min_signer_days
        self.max_import_age = max_import_age
        self.poll_lag = poll_lag
        self.max_poll_lag = max_poll_lag
        self._file_id = self._identity()
        self._last_reasons: list[str] = []  # logged on change only
        self._last_warnings: list[str] = []
        self._scopes: tuple[float, list[tuple[str, str, datetime]]] = (-1e9, [])

    def _identity(self) -> tuple[int, int] | None:
        path = getattr(self.store, "path", None)
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def check(self) -> tuple[bool, dict[str, Any]]:
        """Run every check, reading the store on this thread; (ok, short JSON-able body)."""
        return self._verdict(self._read_store())

    def check_deferred(self) -> defer.Deferred[tuple[bool, dict[str, Any]]]:
        """``check`` with the store read in the store threads (inline without them)."""
        verdict = storeaccess.read(self.access, self._read_store, unavailable=self._verdict,
                                   then=self._verdict)
        return verdict if isinstance(verdict, defer.Deferred) else defer.succeed(verdict)

    def _read_store(self) -> tuple[int, list[CaRecord]] | StoreError:
        """The store's generation and CAs, or why they cannot be read."""
        try:
            generation, cas = int(self.store.generation()), self.store.cas()
            self._read_scopes(cas)
            return generation, cas
        except StoreError as exc:
            return exc

    def _read_scopes(self, cas: list[CaRecord]) -> None:
        """(CA, scope label, nextUpdate) of every CRL scope (issue 23), read at most every
        SCOPES_TTL seconds (the CRLs themselves are large; nextUpdate moves rarely)."""
        read = getattr(self.store, "crl_scopes", None)
        if read is None or 0 <= time.monotonic() - self._scopes[0] < SCOPES_TTL:
            return
        names = {ca.id: ca.name for ca in cas}
        self._scopes = (time.monotonic(), [
            (names[sc.ca_id], sc.label, sc.next_update) for sc in read()
            if sc.ca_id in names and sc.next_update is not None])

    def _check_crls(self, now: datetime, body: dict[str, Any], warnings: list[str]) -> None:
        """A warning (degraded, still serving) per CRL scope past its nextUpdate: the CA
        stopped publishing, and relying parties will soon refuse its certificates."""
        for ca, scope, next_update in sorted(self._scopes[1]):
            if next_update < now:
                warnings.append(f"CRL of {ca} scope {scope} is past its nextUpdate"
                                f" ({next_update.strftime('%Y-%m-%dT%H:%M:%SZ')})")

    def _verdict(self, reading: tuple[int, list[CaRecord]] | StoreError
                 ) -> tuple[bool, dict[str, Any]]:
        now = self.now()
        reasons: list[str] = []
        details: list[str] = []
        body: dict[str, Any] = {}
        self._check_store(now, reading, body, reasons, details)
        self._check_signers(now, body, reasons)
        self._check_feed(body, reasons, details)
        warnings: list[str] = []
        self._check_crls(now, body, warnings)
        ok = not reasons
        body = {"status": "fail" if not ok else "degraded" if warnings else "ok",
                "reasons": reasons, "warnings": warnings, **body}
        if warnings != self._last_warnings:
            if warnings:
                log.warn("health: warning: {warnings}", warnings="; ".join(warnings))
            self._last_warnings = warnings
        if reasons != self._last_reasons:
            if ok:
                log.info("health: ok again")
            else:
                log.warn("health: failing: {reasons}", reasons="; ".join(reasons + details))
            self._last_reasons = reasons
        return ok, body

    def _check_store(self, now: datetime, reading: tuple[int, list[CaRecord]] | StoreError,
                     body: dict[str, Any], reasons: list[str], details: list[str]) -> None:
        if self._file_id is not None:
            current = self._identity()
            if current is None:
                reasons.append("store file missing")
            elif current != self._file_id:
                reasons.append("store file replaced since start (restart needed)")
        if isinstance(reading, StoreError):
            reasons.append("store unreadable")
            details.append(str(reading))
            body["generation"] = None
            return
        body["generation"], cas = reading
        synced = [c.synced_at for c in cas if c.synced_at is not None]
        last = max(synced) if synced else None
        age = None if last is None else max((now - last).total_seconds(), 0.0)
        body["last_import"] = None if last is None else last.isoformat()
        body["import_age_seconds"] = None if age is None else round(age)
        if self.max_import_age is not None:
            if age is None:
                reasons.append("no import recorded")
            elif age > self.max_import_age:
                reasons.append(f"last import {age:.0f} s ago (max {self.max_import_age:g})")

    def _check_signers(self, now: datetime, body: dict[str, Any], reasons: list[str]) -> None:
        try:
            expiries = dict(self.signer_expiries())
        except Exception:
            log.failure("health: signer expiries unavailable")
            reasons.append("signer expiries unavailable")
            return
        signers: dict[str, float] = {}
        for ca, not_after in sorted(expiries.items()):
            days = (not_after - now).total_seconds() / DAY
            signers[ca] = round(days, 2)
            if days < self.min_signer_days:
                what = "expired" if days <= 0 else f"expires in {days:.1f} days"
                reasons.append(f"signer of {ca} {what} (min {self.min_signer_days})")
        body["signer_days_left"] = signers

    def _check_feed(self, body: dict[str, Any], reasons: list[str], details: list[str]) -> None:
        feed = self.feed
        if feed is None:
            return
        body["feed"] = {"healthy": feed.healthy, "generation": int(feed.generation)}
        if not feed.healthy:
            reasons.append("change feed failing")
            details.append(feed.last_error or "")
        lag = self.poll_lag() if self.poll_lag is not None else None
        if lag is not None:
            body["feed"]["poll_lag_seconds"] = round(lag, 1)
            if lag > self.max_poll_lag:
                reasons.append(f"change feed stalled for {lag:.0f} s")


def health_answer(result: tuple[bool, dict[str, Any]] | Failure) -> tuple[int, bytes]:
    """(status, JSON body) of a health check's result (a Failure: 503, logged)."""
    if isinstance(result, Failure):
        log.failure("health check failed", result)
        result = (False, {"status": "fail", "reasons": ["health check failed"]})
    ok, body = result
    data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    return 200 if ok else 503, data


class OpsRoute:
    """``/healthz`` and ``/metrics`` on the HTTP listener (``server.http.site``)."""

    def __init__(self, health: HealthCheck, metrics: Metrics, access: Any = None,
                 before_scrape: Callable[[], None] | None = None) -> None:
        self.health = health
        self.metrics = metrics
        self.access = access if access is not None and not access.inline else None
        self.before_scrape = before_scrape  # e.g. flush the access log's pending metrics

    @staticmethod
    def _send(request: Any, code: int, content_type: bytes, data: bytes, kind: str,
              date: bytes) -> Any:
        from server.http import wire

        headers = [(b"Content-Type", content_type), (b"Cache-Control", b"no-store")]
        if code == 405:
            headers.insert(0, (b"Allow", b"GET, HEAD"))
        out = wire.response(code, headers, data, version=request.version,
                            keep_alive=request.keep_alive, date=date,
                            head=request.method == b"HEAD")
        return out, code, len(data), {"kind": kind}

    def _not_allowed(self, request: Any, kind: str, date: bytes) -> Any:
        return self._send(request, 405, b"text/plain; charset=utf-8", b"method not allowed\n",
                          kind, date)

    def healthz(self, request: Any, date: bytes) -> Any:
        """GET /healthz: 200 or 503 with a short JSON body."""
        if request.method not in (b"GET", b"HEAD"):
            return self._not_allowed(request, "healthz", date)

        def answer(result: Any) -> Any:
            code, data = health_answer(result)
            return self._send(request, code, b"application/json", data, "healthz", date)

        if self.health.access is not None:
            return self.health.check_deferred().addBoth(answer)
        result: tuple[bool, dict[str, Any]] | Failure
        try:
            result = self.health.check()
        except Exception:
            result = Failure()  # type: ignore[no-untyped-call]
        return answer(result)

    def scrape(self, request: Any, date: bytes) -> Any:
        """GET /metrics: the Prometheus text exposition."""
        if request.method not in (b"GET", b"HEAD"):
            return self._not_allowed(request, "metrics", date)
        if self.before_scrape is not None:
            self.before_scrape()
        self.metrics.flush()  # on the reactor thread, whatever thread renders
        self.metrics.export()  # this worker's own state, fresh
        ctype = CONTENT_TYPE.encode()
        if self.access is None:
            return self._send(request, 200, ctype, self.metrics.render(flush=False), "metrics",
                              date)
        if self.access.busy():
            return self._send(request, 503, b"text/plain; charset=utf-8",
                              b"store threads busy\n", "metrics", date)

        def answer(result: bytes | Failure) -> Any:
            if isinstance(result, Failure):
                log.failure("metrics scrape failed", result)
                return self._send(request, 500, b"text/plain; charset=utf-8",
                                  b"scrape failed\n", "metrics", date)
            return self._send(request, 200, ctype, result, "metrics", date)

        return self.access.run(self.metrics.render, False).addBoth(answer)


OPS_PATHS = (b"/healthz", b"/metrics")


class OpsSite:
    """The ``[ops]`` listener's site (a ``server.http.listener.Handler``): ``/healthz`` and
    ``/metrics``, and 404 for every other path, so the staff-only port shows nothing else."""

    def __init__(self, route: OpsRoute) -> None:
        self.route = route

    def handle(self, request: Any, date: bytes, client: str = "-") -> Any:
        path = request.path
        if path == b"/healthz":
            return self.route.healthz(request, date)
        if path == b"/metrics":
            return self.route.scrape(request, date)
        return self.route._send(request, 404, b"text/plain; charset=utf-8", b"not found\n",
                                "ops", date)

    def replay(self, request: Any) -> None:
        return None  # every answer is computed again
