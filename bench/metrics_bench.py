"""The per-request cost of counting a request, one process vs the workers' shared files.

Usage: python bench/metrics_bench.py [-n 200000] [--rounds 5]

``certpub serve --workers N`` counts in prometheus_client's multiprocess mode
(``server.metrics``): every value is a float in an mmap file, and each ``inc`` takes a lock,
checks the pid and packs the new value into the file. This prints CPU µs per request of:

- ``observe``: what the LDAP listener did per operation before (``Counter.inc`` plus
  ``Histogram.observe``), in memory (one process) and in the shared files;
- ``tally``: what it does now (``Metrics.tally``: a dict and a bucket in memory, folded into
  the metric objects by ``Metrics.flush``, which a worker runs once a second; here once per
  ``--flush-every`` operations), in both modes;
- ``access log``: the HTTP listener's path (``AccessLog.record``, its batch of 64 written as
  one log event and added to the tallies, and the tallies folded once per ``--flush-every``
  requests), in both modes;
- ``scrape``: one ``render`` of a registry with the shared files of two workers.

Each mode runs in a child process of its own (prometheus_client picks the value class at
import), rounds alternate between the modes, the median of the rounds is printed. Never asserts
on time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64


def child(n: int, every: int) -> dict[str, float]:
    """In a child process: µs per request of each path, in this process's mode."""
    sys.path.insert(0, str(ROOT))
    from twisted.logger import globalLogPublisher

    from server import metrics as m
    from server.http.accesslog import AccessLog

    globalLogPublisher._observers = []  # the access log's events go nowhere (not measured)
    metrics = m.Metrics(process=False)
    m.set_metrics(metrics)
    out: dict[str, float] = {}

    counter = metrics.requests.labels("ldap", "search", "success")
    latency = metrics.latency.labels("ldap", "search")
    t = time.process_time()
    for i in range(n):
        counter.inc()
        latency.observe(0.0002 + (i & 7) * 1e-5)
    out["observe"] = (time.process_time() - t) / n * 1e6

    t = time.process_time()
    for i in range(n):
        metrics.tally("ldap", "search", "success", 0.0002 + (i & 7) * 1e-5)
        if i % every == every - 1:
            metrics.flush()
    metrics.flush()
    out["tally"] = (time.process_time() - t) / n * 1e6

    log = AccessLog(None)
    log.reactor = object()  # batches: flushed by hand below, never scheduled
    log._scheduled = object()
    fields = {"kind": "ocsp", "ocsp": "good", "cache": "hit"}
    t = time.process_time()
    for i in range(n):
        log.record("127.0.0.1", b"GET", fields, 200, 500, 0.00005)
        if i % BATCH == BATCH - 1:
            log._scheduled = None
            log.flush()
            log._scheduled = object()
        if i % every == every - 1:
            metrics.flush()
    metrics.flush()
    out["access log"] = (time.process_time() - t) / n * 1e6

    if metrics.shared is not None:  # a second worker's files, as under --workers 2
        other = os.fork()
        if other == 0:
            second = m.Metrics(process=False)
            second.requests.labels("ldap", "search", "success").inc(5)
            os._exit(0)
        os.waitpid(other, 0)
    rounds = 200
    t = time.process_time()
    for _ in range(rounds):
        metrics.render()
    out["scrape (ms)"] = (time.process_time() - t) / rounds * 1e6 / 1000
    return out


def run_child(shared: bool, n: int, every: int) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with tempfile.TemporaryDirectory(prefix="certpub-metrics-bench-") as folder:
        if shared:
            env["PROMETHEUS_MULTIPROC_DIR"] = folder
        r = subprocess.run([sys.executable, __file__, "--child", str(n),
                            "--flush-every", str(every)], env=env,
                           capture_output=True, text=True, check=True)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flush-every", type=int, default=1000,
                        help="requests per Metrics.flush (a worker flushes once a second)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.flush_every)))
        return
    results: dict[str, list[dict[str, float]]] = {"one process": [], "shared files": []}
    for _ in range(args.rounds):
        for mode in results:  # alternating rounds: the machine's load hits both alike
            results[mode].append(run_child(mode == "shared files", args.n, args.flush_every))
    keys = list(results["one process"][0])
    print(f"µs CPU per request (median of {args.rounds} rounds, n={args.n}, a flush every"
          f" {args.flush_every}; scrape in ms)")
    print(f"{'':<14}" + "".join(f"{k:>14}" for k in keys))
    for mode, rounds in results.items():
        print(f"{mode:<14}" + "".join(
            f"{statistics.median(r[k] for r in rounds):>14.3f}" for k in keys))


if __name__ == "__main__":
    main()
