"""The cost of one info log line (issues 3, 4, 7): CPU µs per line, from ``log.info`` to the file.

Usage: python bench/log_bench.py [-n 50000] [--rounds 5] [--format logfmt|json]
                                 [--target file|devnull|pipe] [--no-reactor] [--module FILE]
                                 [--profile OUT]

Events as the servers emit them: the OCSP ``http request`` line as one ``log.info`` with twelve
keyword fields (how the access line was written before issue 12), the HTTP listener's access log
(``server.http.accesslog``: "record only" is its cost on the request path, "whole line" adds the
line's share of rendering and writing its batch, one batch per 8 records, and the metrics) and the LDAP ``SEARCH
RESULT`` line (a slapd-style format string whose fields are all in the message, as
``server.ldap.protocol`` logs it). Each goes through the whole path a server uses:
``twisted.logger.Logger.info`` → the global publisher → the level filter → ``LineObserver``
→ a real file (``--target file``, in a temporary directory), ``/dev/null``, or a pipe read by
``cat`` (``--target pipe``, as stdout to journald). The rounds run
inside a running reactor, as in a server, so the observer may buffer; each round ends by
flushing what is pending, and that is counted (``--no-reactor``: without a reactor, every line
written at once). ``--module FILE`` measures another ``server/logs.py`` (e.g. a copy of the
previous one) for before/after figures. Prints the median over the rounds; never asserts on
time.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.logger import Logger

from server import logs as current_logs

logs: Any = current_logs
OCSP = Logger(namespace="server.ocsp.access")
LDAP = Logger(namespace="server.ldap.protocol")


def ocsp_line(i: int) -> None:
    OCSP.info("http request", client="127.0.0.1", method="POST", kind="ocsp", ca="rsa-ca",
              serials="1a2b3c4d", statuses="good", nonce="no", cache="hit",
              ocsp="successful", status=200, bytes=1523, duration="0.000041")


_ACCESS: Any = None
_FIELDS = {"kind": "ocsp", "ca": "rsa-ca", "serials": "1a2b3c4d", "statuses": "good",
           "nonce": "no", "cache": "hit", "ocsp": "successful"}  # one cache entry's, shared
BATCH = 8  # records per flush: what a reactor turn of bench/ocsp_bench.py's 16 connections sees


def access_record(i: int) -> None:
    """The HTTP listener's cost on the request path: one record (server.http.accesslog)."""
    _ACCESS.record("127.0.0.1", b"POST", _FIELDS, 200, 1523, 0.000041)


def access_line(i: int) -> None:
    """The whole cost of an access line: the record, plus its share of the batch's
    render and write (one batch event per reactor turn, as in the server)."""
    _ACCESS.record("127.0.0.1", b"POST", _FIELDS, 200, 1523, 0.000041)
    if i % BATCH == BATCH - 1:
        _ACCESS.flush()


def ldap_line(i: int) -> None:
    LDAP.info('conn={conn} op={op} SEARCH RESULT tag=101 err={err} nentries={nentries} '
              'etime={etime:.4f} text="{text}"', conn=1001, op=i, err=0, nentries=1,
              etime=0.000842, text="")


def measure(emit: Any, n: int) -> float:
    flush = getattr(logs, "flush_buffered", None)
    started = time.process_time()
    for i in range(n):
        emit(i)
    if flush is not None:
        flush()
    return (time.process_time() - started) / n * 1e6


class _Hold:
    """A reactor stand-in whose callLater never runs: records stay until flushed."""

    def callLater(self, *_: Any) -> Any:  # noqa: N802 - the reactor's name
        return _Never()


class _Never:
    def active(self) -> bool:
        return False


def load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("bench_logs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--format", default="logfmt", choices=("logfmt", "json"))
    ap.add_argument("--target", default="file", choices=("file", "devnull", "pipe"))
    ap.add_argument("--no-reactor", action="store_true", help="run without a reactor")
    ap.add_argument("--module", type=Path, help="the logs module to measure (a .py file)")
    ap.add_argument("--profile", type=Path, help="write a cProfile of one OCSP round here")
    args = ap.parse_args()
    global logs
    if args.module is not None:
        logs = load_module(args.module)
    if args.no_reactor:
        run(args)
        return
    from twisted.internet import reactor as installed

    reactor: Any = installed

    def inside() -> None:
        try:
            run(args)
        finally:
            reactor.stop()

    reactor.callWhenRunning(inside)
    reactor.run()


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(os.devnull) if args.target == "devnull" else Path(tmp) / "bench.log"
        if args.target == "pipe":
            r, w = os.pipe()
            reader = subprocess.Popen(["cat"], stdin=r, stdout=subprocess.DEVNULL)
            os.close(r)
            logs.start_logging(args.format, "info", stream=os.fdopen(w, "w", encoding="utf-8"))
        else:
            logs.start_logging(args.format, "info", path=path)
        global _ACCESS
        from server.http import accesslog
        from server.http.accesslog import AccessLog

        max_batch = accesslog.MAX_BATCH
        from server.metrics import Metrics, set_metrics

        set_metrics(Metrics(process=False))
        for name, emit in (("ocsp http request", ocsp_line),
                           ("access: record only", access_record),
                           ("access: whole line", access_line),
                           ("ldap SEARCH RESULT", ldap_line)):
            # record only: flushed (not measured) after each round; whole line: a batch
            # rendered and written every BATCH records, metrics included
            _ACCESS = AccessLog(_Hold())
            accesslog.MAX_BATCH = 10**9 if emit is access_record else max_batch
            measure(emit, min(args.n, 2000))  # warm-up
            _ACCESS.flush()
            figures = []
            for _ in range(args.rounds):
                figures.append(measure(emit, args.n))
                _ACCESS.flush()
            print(f"{name:20s} {statistics.median(figures):7.2f} µs/line "
                  f"(min {min(figures):.2f}, max {max(figures):.2f}; {args.format}, "
                  f"{args.target}, {'no reactor' if args.no_reactor else 'reactor'}, "
                  f"n={args.n}, rounds={args.rounds})")
        if args.profile is not None:
            cProfile.runctx("measure(ocsp_line, n)", globals(),
                            {"measure": measure, "ocsp_line": ocsp_line, "n": args.n},
                            str(args.profile))
        if args.target == "pipe":
            reader.kill()
            reader.wait()
        if args.target == "file":
            with open(path, "rb") as f:
                print("last line:", f.read().splitlines()[-1].decode())


if __name__ == "__main__":
    main()
