"""``/metrics`` of the signing queue (a Prometheus collector, read at scrape time)."""

from __future__ import annotations

from typing import Any

from server.ocsp.signing.fairqueue import SigningQueue


class OverloadCollector:
    """``/metrics``: the signing queue's fill and what it shed (read at scrape time)."""

    def __init__(self, queue: SigningQueue) -> None:
        self.queue = queue

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.queue.counters()
        shed = CounterMetricFamily(
            "certpub_ocsp_shed", "OCSP requests needing a signature answered at once because"
            " the signing queue (or this address's share of it) was full, by answer.",
            labels=["answer"])
        shed.add_metric(["try_later"], c["shed_try_later"])
        shed.add_metric(["presigned"], c["shed_presigned"])
        yield shed
        limited = CounterMetricFamily(
            "certpub_ocsp_unknown_limited", "Requests about never-issued serials answered"
            " tryLater unsigned: over unknown_per_address.")
        limited.add_metric([], c["unknown_limited"])
        yield limited
        expired = CounterMetricFamily(
            "certpub_ocsp_signing_expired", "Requests answered tryLater because no signer"
            " answered in time.")
        expired.add_metric([], c["expired"])
        yield expired
        queue = GaugeMetricFamily("certpub_ocsp_signing_queue",
                                  "Requests waiting for a signer or being signed.",
                                  labels=["state"])
        queue.add_metric(["waiting"], c["waiting"])
        queue.add_metric(["signing"], c["running"])
        yield queue
        unknown = GaugeMetricFamily("certpub_ocsp_unknown_cached",
                                    "Signed answers about never-issued serials kept.")
        unknown.add_metric([], c["unknown_cached"])
        yield unknown
        paced = GaugeMetricFamily(
            "certpub_ocsp_signing_paced_rate", "Requests per second the signing queue may"
            " hand to the signers now, while cached answers need the event loop; 0: not"
            " paced.")
        paced.add_metric([], c["paced_rate"])
        yield paced
        hits = CounterMetricFamily("certpub_ocsp_unknown_cache_hits",
                                   "Requests answered from the never-issued answers' cache.")
        hits.add_metric([], c["unknown_hits"])
        yield hits
