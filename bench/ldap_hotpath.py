"""The LDAP server's CPU cost per search, in-process, without sockets: µs per search.

Usage: python bench/ldap_hotpath.py STORE.sqlite3 [--kind mail|base] [-n 20000] [--users N]
                                    [--seed 1] [--profile OUT.pstats] [--log-level warn]

Feeds pre-encoded search requests (those of bench/ldap_bench.py) to one ``LdapProtocol``
built by ``make_ldap_factory`` over the store, with a transport that only counts bytes and a
Cooperator run to completion after each request; logging as ``certpub serve`` sets it up at
the given level, to a discarded stream. This is the server's share of a search minus the
reactor and the kernel — the part ``server/ldap`` controls.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldap_bench import message, request
from twisted.internet.task import Cooperator

from server.ldap.config import DEFAULT_ATTRIBUTES, LdapConfig
from server.ldap.server import make_ldap_factory
from store.sqlite import Store


class _Call:
    def cancel(self) -> None:
        pass


class Transport:
    def __init__(self) -> None:
        self.bytes = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self.writes += 1

    def writeSequence(self, seq: list[bytes]) -> None:
        for d in seq:
            self.write(d)

    def loseConnection(self) -> None:
        raise SystemExit("the server closed the connection")

    def getHost(self) -> object:
        return type("H", (), {"host": "127.0.0.1", "port": 389})()

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--kind", default="mail", choices=("mail", "base"))
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--users", type=int, default=0, help="default: the certificates in the store")
    ap.add_argument("--distinct", type=int, default=0,
                    help="cycle through this many distinct requests (0: every one drawn anew),"
                         " e.g. 4096 as each ldap_bench.py client process does")
    ap.add_argument("--seed", type=int, default=1,
                    help="which users are asked for (another seed: other pages of the store)")
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--log-level", default="warn")
    args = ap.parse_args()
    from server.logs import start_logging

    start_logging("logfmt", args.log_level, stream=io.StringIO())
    store = Store.open(args.store, create=False)
    users = args.users or store._query("SELECT count(*) FROM certs")[0][0]
    pending: list = []
    coop = Cooperator(scheduler=lambda f: pending.append(f) or _Call(), started=True)
    config = LdapConfig(listen=(), naming_contexts=(), attributes=DEFAULT_ATTRIBUTES,
                        size_limit=500, time_limit=10.0, max_request_bytes=262_143)
    feed = type("Feed", (), {"subscribe": lambda self, f: None, "healthy": True})()  # caches on
    factory = make_ldap_factory(config, store, feed, None, lambda: datetime.now(UTC))
    factory.cooperator = coop
    proto = factory.buildProtocol(type("A", (), {"host": "127.0.0.1", "port": 1})())
    transport = Transport()
    proto.makeConnection(transport)
    proto.setTimeout(None)
    rng = random.Random(args.seed)
    ops = [request(args.kind, rng.randrange(users)) for _ in range(args.distinct or args.n)]
    msgs = [message(0x01000000 + i, ops[i % len(ops)]) for i in range(args.n)]

    def run(batch: list[bytes]) -> None:
        for m in batch:
            proto.dataReceived(m)
            while pending:
                pending.pop(0)()

    run(msgs[:500])  # warm-up
    prof = cProfile.Profile() if args.profile else None
    before = transport.writes
    t0, w0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    run(msgs[500:])
    if prof:
        prof.disable()
        prof.dump_stats(args.profile)
    took = time.process_time() - t0
    wall = time.perf_counter() - w0
    n = len(msgs) - 500
    a = factory.answers
    print(f"{args.kind}: {took / n * 1e6:.1f} µs CPU per search ({n / took:.0f}/s on one core), "
          f"{wall / n * 1e6:.1f} µs wall (waits for the disk show here), "
          f"{(transport.writes - before) / n:.2f} writes per search, {users} users, "
          f"answer cache {a.hits} hits {a.misses} misses {len(a)} kept {a.bytes >> 20} MiB")


if __name__ == "__main__":
    main()
