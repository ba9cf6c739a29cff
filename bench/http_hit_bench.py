"""The Python cost of one cached OCSP answer on the HTTP listener (issue 12), in process.

Usage: python bench/http_hit_bench.py DATA [-n 100000] [--rounds 3] [--batch 8] [--no-memo]
                                           [--profile OUT]

DATA is a directory written by ``bench/gen_certs.py`` and imported (as for
``bench/ocsp_bench.py``). The listener's factory is built from DATA/certpub.toml as ``certpub
serve`` builds it (``make_http_factory``, the store inline), logging one access line per
request to a file in a temporary directory (logfmt, as in production). Then wrk's requests —
the same GET and POST as ``bench/ocsp_bench.py`` — are fed to ``HttpChannel.dataReceived``
one per call over 16 connections in turn, with a transport that only keeps what is written.
The access log is flushed every ``--batch`` requests (the requests one reactor turn sees under
16 connections), so each figure holds the whole Python of a hit: parse, route, lookup, write
call, the access record and its share of the batched line and metrics. What it leaves out is
the reactor's own part (epoll, recv, send), which ``bench/ocsp_floor.py`` measures in
``bench/ocsp_bench.py``. ``--no-memo`` turns the listener's memo of whole reads off, so every
request is parsed and routed (what a read seen for the first time costs). Prints CPU µs per
request, the median over the rounds; never asserts on time.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import statistics
import sys
import tempfile
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from twisted.internet.address import IPv4Address  # noqa: E402

from ocsp_bench import make_requests  # noqa: E402
from server.config import load_config  # noqa: E402
from server.http import listener  # noqa: E402
from server.http.site import make_http_factory  # noqa: E402
from server.logs import start_logging  # noqa: E402
from server.metrics import Metrics, set_metrics  # noqa: E402
from store import open_store  # noqa: E402


class Transport:
    """What the listener needs of a TCP transport; keeps the byte count written."""

    disconnecting = False

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.written += sum(map(len, seq))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def loseConnection(self) -> None:
        self.disconnecting = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)


class Turns:
    """A reactor stand-in for the access log: its flush runs when ``turn()`` says so."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callLater(self, delay: float, fn: Any, *args: Any) -> Any:
        call = _Call(fn, args)
        if delay < 1.0:  # the access log's flush; not the idle timeouts (never due here)
            self.calls.append(call)
        return call

    def seconds(self) -> float:
        return time.monotonic()

    def turn(self) -> None:
        calls, self.calls = self.calls, []
        for call in calls:
            if call.live:
                call.live = False
                call.fn(*call.args)


class _Call:
    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args, self.live = fn, args, True

    def active(self) -> bool:
        return self.live

    def cancel(self) -> None:
        self.live = False

    def reset(self, delay: float) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-memo", action="store_true")
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    if args.no_memo:
        listener.MEMO_READ_BYTES = -1
    data = args.data.resolve()
    config = load_config(data / "certpub.toml")
    tmp = Path(tempfile.mkdtemp(prefix="http-hit-"))
    start_logging("logfmt", "info", path=tmp / "access.log")
    set_metrics(Metrics())
    store = open_store(config.store.read_location, migrate=False)
    turns = Turns()
    factory = make_http_factory(config, store, None, lambda: datetime.now(UTC), turns)
    reqs = make_requests(data, 0x1000)
    der = reqs["plain"]
    path = b"/" + urllib.parse.quote(base64.b64encode(der).decode(), safe="").encode()
    shapes = {
        "GET": b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
        "POST": (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\n"
                 b"Content-Type: application/ocsp-request\r\n\r\n" % len(der) + der),
    }
    addr = IPv4Address("TCP", "127.0.0.1", 40000)
    print(f"{args.n} requests per round over {args.connections} connections, access log flushed"
          f" every {args.batch}{', no memo' if args.no_memo else ''}; CPU µs per request, median"
          f" of {args.rounds} rounds")
    for name, raw in shapes.items():
        chans = []
        for _ in range(args.connections):
            proto = factory.buildProtocol(addr)
            proto.makeConnection(Transport())
            chans.append(proto)
        for proto in chans:  # warm: the first answer signs or reads the store
            proto.dataReceived(raw)
        turns.turn()
        assert chans[0].transport.written > 0
        figures = []
        prof = cProfile.Profile() if args.profile else None
        for _ in range(args.rounds):
            # a new bytes object per read, as recv gives (its hash is not cached yet)
            reads = [raw[:1] + raw[1:] for _ in range(args.n)]
            t0 = time.process_time()
            if prof is not None:
                prof.enable()
            _drive(chans, reads, args.batch, turns)
            if prof is not None:
                prof.disable()
            figures.append(1e6 * (time.process_time() - t0) / args.n)
        print(f"{name:5} {statistics.median(figures):6.2f} µs"
              f"  (rounds: {', '.join(f'{f:.2f}' for f in figures)})")
        if prof is not None:
            prof.dump_stats(f"{args.profile}.{name}")
        for proto in chans:
            proto.connectionLost(None)
    factory.stopFactory()
    store.close()


def _drive(chans: list[Any], reads: list[bytes], batch: int, turns: Turns) -> None:
    k = len(chans)
    for i in range(len(reads)):
        chans[i % k].dataReceived(reads[i])
        if i % batch == batch - 1:
            turns.turn()
    turns.turn()


if __name__ == "__main__":
    main()
