"""Answers that need a fresh signature: the server's signing seam (``OcspService.signing``).

Strategy: one module per job, re-exported here — ``fairqueue`` (``SigningQueue``: bounded,
fair per client address, shedding when full), ``pacer`` (``Pacer``: how fast requests are
handed over while cheap answers need the event loop), ``executors`` (``Executor``,
``LocalSigners``: who signs), ``processes`` (``ProcessSigners``: the signing processes and
their pipes) and ``collector`` (``OverloadCollector``: /metrics). This package is the only
part of ``server.ocsp`` that imports Twisted (Deferreds, the reactor, child processes);
docs/ocsp.md has the whole path.
"""

from __future__ import annotations

from server.ocsp.signing.collector import OverloadCollector
from server.ocsp.signing.executors import Executor, LocalSigners
from server.ocsp.signing.fairqueue import (
    MAX_RUN,
    MAX_WAIT,
    SHED_BACKOFF,
    Job,
    ShedLog,
    SigningQueue,
    TokenBuckets,
    try_later,
)
from server.ocsp.signing.pacer import Pacer
from server.ocsp.signing.processes import ProcessSigners

__all__ = ["MAX_RUN", "MAX_WAIT", "SHED_BACKOFF", "Executor", "Job", "LocalSigners",
           "OverloadCollector", "Pacer", "ProcessSigners", "ShedLog", "SigningQueue",
           "TokenBuckets", "try_later"]
