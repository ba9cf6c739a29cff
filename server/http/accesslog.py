"""The HTTP access log and request metrics: one line per request, written in batches.

Strategy: the listener records each finished request as one tuple (client, method, the
route's log fields, status, body bytes, seconds) — a list append, the only cost on the request
path. The first record of a batch schedules one ``flush`` for the reactor's next turn, which
turns every record into the ``http request`` log event (the same fields as always:
client, method, kind, ca, serials, statuses, nonce, cache, ocsp, status, bytes, duration, and
reason when there is one) and updates the request metrics. A loaded server thus writes one
batch per reactor turn; an idle one writes each line within the same turn. Without a reactor
(tests driving a protocol by hand) each record is flushed at once. Log fields never hold the
request body: routes put only what they decided into them.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

log = Logger(namespace="server.http")

Record = tuple[str, bytes, dict[str, Any], int, int, float]
MAX_BATCH = 512  # records; a fuller batch is flushed at once


class AccessLog:
    """Collects finished requests; writes their lines and metrics once per reactor turn."""

    def __init__(self, reactor: Any = None) -> None:
        self.reactor = reactor
        self._records: list[Record] = []
        self._scheduled: Any = None

    def record(self, client: str, method: bytes, fields: dict[str, Any], status: int,
               sent: int, seconds: float) -> None:
        """One finished request (fields: the route's log fields, never changed afterwards)."""
        records = self._records
        records.append((client, method, fields, status, sent, seconds))
        if self._scheduled is None:
            if self.reactor is None or len(records) >= MAX_BATCH:
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
        emit = log.info
        for client, method, fields, status, sent, seconds in records:
            emit("http request", client=client, method=method.decode("latin-1"), **fields,
                 status=status, bytes=sent, duration=f"{seconds:.6f}")
        _metrics(records)


def _metrics(records: list[Record]) -> None:
    try:
        from server.metrics import get_metrics

        m = get_metrics()
        for _, _, fields, status, _, seconds in records:
            kind = fields.get("kind")
            if kind == "ocsp" and "ocsp" in fields:
                m.request("ocsp", "status", fields["ocsp"], seconds)
                cache = fields.get("cache")
                if cache == "hit" or cache == "miss":
                    m.cache(cache == "hit")
            else:
                m.request("http", str(kind), "done", seconds)
    except Exception:  # noqa: BLE001 - metrics never break a request
        log.failure("metrics update failed")
