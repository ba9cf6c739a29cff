"""Python calls per OCSP request in the server process, in process: a figure the machine's load
does not move, for comparing two versions of the code on a busy machine (issue 24).

Usage: python bench/ocsp_calls.py DATA [-n 5000] [--top 0]

DATA as for ``bench/http_hit_bench.py``. The listener's factory is built as there (the store
inline, the access log to a file, signing in process: ``LocalSigners``); then, for each
kind — a cached GET and POST arriving as a whole read (the listener's memo), the same with
the memo off (parsed, routed, answered from the hot table), and a POST with a fresh nonce
(triage, the signing queue, a signature from the cached answer's parts, the reply) —
``-n`` requests are fed one per ``dataReceived`` under cProfile (the access log flushed every
1,024, as ``http_hit_bench.py --batch 1024``), whose call count divided by ``-n`` is printed. ``--top N`` prints the N most called functions of each kind (to diff two
checkouts). Run it from each checkout with its own venv; never asserts.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import os
import pstats
import sys
import tempfile
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from twisted.internet.address import IPv4Address  # noqa: E402

from http_hit_bench import Transport, Turns  # noqa: E402
from ocsp_bench import make_requests  # noqa: E402
from server.config import load_config  # noqa: E402
from server.http import listener  # noqa: E402
from server.http.site import make_http_factory  # noqa: E402
from server.logs import start_logging  # noqa: E402
from server.metrics import Metrics, set_metrics  # noqa: E402
from store import open_store  # noqa: E402


def post(body: bytes) -> bytes:
    return (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\n"
            b"Content-Type: application/ocsp-request\r\n\r\n" % len(body) + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--top", type=int, default=0)
    args = parser.parse_args()
    data = args.data.resolve()
    config = load_config(data / "certpub.toml")
    start_logging("logfmt", "info", path=Path(tempfile.mkdtemp(prefix="ocsp-calls-")) / "a.log")
    set_metrics(Metrics())
    store = open_store(config.store.read_location, migrate=False)
    turns = Turns()
    factory = make_http_factory(config, store, None, lambda: datetime.now(UTC), turns)
    reqs = make_requests(data, 0x1000)
    path = b"/" + urllib.parse.quote(base64.b64encode(reqs["plain"]).decode(), safe="").encode()
    get = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
    kinds = {"GET": lambda: get, "POST": lambda: post(reqs["plain"]),
             "GET --no-memo": lambda: get, "POST --no-memo": lambda: post(reqs["plain"]),
             "nonce POST": lambda: post(reqs["nonce_prefix"] + os.urandom(32))}
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(Transport())
    import server

    print(f"{Path(server.__file__).parent.parent}: Python calls per request, {args.n} requests each")
    for name, make in kinds.items():
        listener.MEMO_READ_BYTES = -1 if "no-memo" in name else 2048
        factory.memo.clear()
        for _ in range(20):  # warm: signed, hot, remembered, nonce shapes learnt
            proto.dataReceived(make())
            turns.turn()
        reads = [make() for _ in range(args.n)]
        reads = [r[:1] + r[1:] for r in reads]  # new bytes objects, as recv gives
        prof = cProfile.Profile()
        prof.enable()
        for i, r in enumerate(reads):
            proto.dataReceived(r)
            if i % 1024 == 1023:  # the access log's flush, as under 16 connections
                turns.turn()
        turns.turn()
        prof.disable()
        stats = pstats.Stats(prof)
        print(f"{name:15} {stats.total_calls / args.n:7.1f}")
        if args.top:
            stats.sort_stats("ncalls").print_stats(args.top)


if __name__ == "__main__":
    main()
