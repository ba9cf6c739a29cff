"""The HTTP access log and request metrics: one line per request, written in batches.

Strategy: the listener records each finished request as one tuple (client, method, the
route's log fields, status, body bytes, seconds) — a list append, the only cost on the request
path. The first record of a batch schedules one ``flush`` for the reactor's next turn, which
publishes the batch as one ``http request`` log event whose ``log_batch`` holds the fields of
each request (``server.logs`` writes one line per request from it: client, method, kind, ca,
serials, statuses, nonce, cache, ocsp, status, bytes, duration, and reason when there is
one; a route's fields are one mapping shared by every answer from the same cache entry, so
they are encoded once per batch) and updates the request metrics by kind. A loaded server
thus renders and writes a batch per reactor turn; an idle one each line within the same turn.
Without a reactor (tests driving a protocol by hand) each record is flushed at once. Log
fields never hold the request body: routes put only what they decided into them.
``lines(events)`` gives the per-request field dicts of captured events (for tests).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="server.ocsp.access")  # system=ocsp on the line, as always

Record = tuple[str, bytes, dict[str, Any], int, int, float]
MAX_BATCH = 512  # records; a fuller batch is flushed at once
MEMO_ENTRIES = 4096  # (client, method) and (status, bytes) mappings kept between batches


class AccessLog:
    """Collects finished requests; writes their lines and metrics once per reactor turn."""

    def __init__(self, reactor: Any = None) -> None:
        self.reactor = reactor
        self._records: list[Record] = []
        self._scheduled: Any = None
        self._heads: dict[tuple[str, bytes], dict[str, Any]] = {}
        self._tails: dict[tuple[int, int], dict[str, Any]] = {}

    def record(self, client: str, method: bytes, fields: dict[str, Any], status: int,
               sent: int, seconds: float) -> None:
        """One finished request (fields: the route's log fields, never changed afterwards)."""
        records = self._records
        records.append((client, method, fields, status, sent, seconds))
        if self._scheduled is None:
            if self.reactor is None:
                self.flush()
            else:
                self._scheduled = self.reactor.callLater(0, self.flush)
        elif len(records) >= MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        """Write every pending line and update the metrics (also on stop and before /metrics)."""
        scheduled, self._scheduled = self._scheduled, None
        if scheduled is not None and scheduled.active():
            scheduled.cancel()
        records, self._records = self._records, []
        if not records:
            return
        heads, tails = self._heads, self._tails
        if len(heads) > MEMO_ENTRIES or len(tails) > MEMO_ENTRIES:
            heads.clear()
            tails.clear()
        batch = []
        for client, method, fields, status, sent, seconds in records:
            # mappings shared by many lines are encoded once per batch (server.logs)
            head = heads.get((client, method))
            if head is None:
                head = heads[client, method] = {"client": client,
                                                "method": method.decode("latin-1")}
            tail = tails.get((status, sent))
            if tail is None:
                tail = tails[status, sent] = {"status": status, "bytes": sent}
            batch.append((head, fields, tail, {"duration": "%.6f" % seconds}))
        log.info("http request", log_batch=batch)
        _metrics(records)


def lines(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fields of every access log line in captured events, in order."""
    out = []
    for event in events:
        if event.get("log_format") == "http request" and "log_batch" in event:
            for item in event["log_batch"]:
                fields: dict[str, Any] = {}
                for mapping in item:
                    fields.update(mapping)
                out.append(fields)
    return out


def _metrics(records: list[Record]) -> None:
    try:
        from server.metrics import get_metrics

        by_kind: dict[tuple[str, str, str], list[float]] = {}
        hits = misses = 0
        for _, _, fields, _, _, seconds in records:
            kind = fields.get("kind")
            if kind == "ocsp" and "ocsp" in fields:
                key = ("ocsp", "status", fields["ocsp"])
                cache = fields.get("cache")
                if cache == "hit":
                    hits += 1
                elif cache == "miss":
                    misses += 1
            else:
                key = ("http", str(kind), "done")
            found = by_kind.get(key)
            if found is None:
                by_kind[key] = [seconds]
            else:
                found.append(seconds)
        m = get_metrics()
        for (protocol, operation, result), seconds_list in by_kind.items():
            m.requests_done(protocol, operation, result, seconds_list)
        m.cache_lookups(hits, misses)
    except Exception:  # noqa: BLE001 - metrics never break a request
        log.failure("metrics update failed")
