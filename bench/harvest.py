"""A harvester against the lookup policy ([privacy], server/privacy.py): the share of the
subscribers' addresses it obtains, while simulated mail clients keep doing exact lookups.

Usage:
  python bench/gen_certs.py DATA 100000 && certpub import --config DATA/certpub.toml --openssl \
      && certpub import --config DATA/certpub.toml DATA/crl.pem
  python bench/harvest.py DATA [--seconds 60] [--mail-clients 64] [--baseline 10]
                          [--privacy 'lookups = "open"' ...] [--json OUT]

certpub is started (one worker, ``[log] level = "warn"``) from a copy of DATA/certpub.toml
with the default ``[privacy]`` (plus any ``--privacy`` lines). The strategies run at the same
time for ``--seconds``, each from its own source addresses on 127.0.0.0/8 (the client socket
is bound to them), so each meets its own budget — as separate attackers would:

  ldap-1conn     one connection from 127.0.1.1: presence and one-letter tries, then a prefix
                 loop (``(mail=P*)``, breadth first from ``use``; a capped answer is refined)
  ldap-16conn    the same loop over 16 connections from one address (127.0.2.1)
  ldap-paged     paged presence searches (``(mail=*)``, ``(objectClass=*)``, critical and not)
                 from 127.0.3.1, again and again
  json-prefix    the JSON API over keep-alive HTTP from 127.0.4.1: ``/api/v1/search?q=P``,
                 pages 1 to 5, the same refinement over names
  ldap-16addr    the LDAP loop from 16 addresses of one network (127.0.5.1-16)
  ldap-16nets    the LDAP loop from 16 addresses in 16 networks (127.6.N.1): what 16 unrelated
                 attackers get together

A harvester past its budget waits what the answer says (busy / 429 Retry-After) and goes on.
Meanwhile ``--mail-clients`` connections from one address (127.0.100.1: an organisation behind
NAT) look up random subscribers by address, ``(mail=userN@bench.example)`` with
``userCertificate;binary``, as fast as they can. Before that, the same mail clients run alone
for ``--baseline`` seconds against the same server with the policy and against a second one
with ``lookups = "open"`` and no budget (rounds alternate), for their rate without the policy.
Then the whole harvest runs again, with the mail clients, against the server without the
policy (its paged loop reads the first page of each search only: the figures of that run are
a lower bound of what an open directory gives away).
Reported: unique addresses obtained per strategy and their share of the store's subscribers;
the mail clients' lookups/s and refusals, alone and during each harvest, and the ratios
policy / open.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import random
import sqlite3
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ldap_bench import Certpub  # noqa: E402
from server.ldap import codec  # noqa: E402
from tests.hostile import wire  # noqa: E402

PAGED = "1.2.840.113556.1.4.319"
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz.@_-"
NAMES = " 0123456789abcdefghijklmnopqrstuvwxyz"


def paged_control(size: int, critical: bool) -> bytes:
    return codec.encode_controls([(PAGED, critical, codec.paged_value(size, b""))])


class Loot:
    """Addresses one strategy obtained (thread-safe enough: set.add under the GIL)."""

    def __init__(self) -> None:
        self.mails: set[bytes] = set()
        self.queries = 0
        self.refused: dict[int, int] = {}

    def result(self, code: int) -> None:
        self.queries += 1
        if code not in (0, 4):
            self.refused[code] = self.refused.get(code, 0) + 1


def wait_of(text: str) -> float:
    """The wait an answer names ('(in 12 s)'), else 1 s."""
    if "(in " in text:
        try:
            return max(0.2, float(text.split("(in ", 1)[1].split(" ", 1)[0]))
        except ValueError:
            pass
    return 1.0


def ldap_loop(port: int, sources: list[str], conns_per_source: int, loot: Loot,
              end: float) -> None:
    """A prefix loop over LDAP shared by the connections of these sources."""
    queue: deque[str] = deque(["use"])
    lock = threading.Lock()

    def one(source: str) -> None:
        try:
            client = wire.LdapClient(("127.0.0.1", port), timeout=30, source=source)
        except OSError:
            return
        with client:
            for filt in (wire.present("mail"), wire.present("objectClass"),
                         wire.substr("mail", "u")):
                r = client.search("c=MO", filt, ["mail"])
                loot.result(r.code)
                take(r)
            while time.monotonic() < end:
                with lock:
                    prefix = queue.popleft() if queue else ""
                if not prefix:  # the others are still refining: wait for their prefixes
                    time.sleep(0.05)
                    continue
                try:
                    r = client.search("c=MO", wire.substr("mail", prefix), ["mail"])
                except (OSError, TimeoutError, ConnectionError):
                    return
                loot.result(r.code)
                take(r)
                if r.code == 51:
                    with lock:
                        queue.appendleft(prefix)
                    time.sleep(min(wait_of(r.text), max(0.0, end - time.monotonic())))
                elif r.code == 4 or (r.code == 0 and len(r.entries) >= 100):
                    with lock:
                        queue.extend(prefix + c for c in ALPHABET)

    def take(r: wire.SearchResult) -> None:
        for _, attrs in r.entries:
            for v in attrs.get("mail", []):
                loot.mails.add(v.lower())

    def guarded(source: str) -> None:
        try:
            one(source)
        except (OSError, TimeoutError, ConnectionError, ValueError, AssertionError):
            loot.result(-1)  # the server did not answer in 30 s (an overloaded server)

    threads = [threading.Thread(target=guarded, args=(s,), daemon=True)
               for s in sources for _ in range(conns_per_source)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end - time.monotonic()) + 30)


def paged_loop(port: int, source: str, loot: Loot, end: float) -> None:
    try:
        _paged_loop(port, source, loot, end)
    except (OSError, TimeoutError, ConnectionError, ValueError, AssertionError):
        loot.result(-1)


def _paged_loop(port: int, source: str, loot: Loot, end: float) -> None:
    with wire.LdapClient(("127.0.0.1", port), timeout=30, source=source) as client:
        while time.monotonic() < end:
            for filt in (wire.present("mail"), wire.present("objectClass")):
                for critical in (False, True):
                    mid = client.request(wire.search_op("c=MO", filt, ["mail"]),
                                         paged_control(500, critical))
                    code = -1
                    while True:
                        pdu = client.read_pdu()
                        if pdu is None:
                            return
                        if pdu.message_id != mid:
                            continue
                        if pdu.tag == 0x64:
                            for v in pdu.entry()[1].get("mail", []):
                                loot.mails.add(v.lower())
                        elif pdu.tag == 0x65:
                            code = pdu.code
                            break
                    loot.result(code)
            time.sleep(0.2)


def json_loop(http_port: int, source: str, loot: Loot, end: float) -> None:
    try:
        _json_loop(http_port, source, loot, end)
    except (OSError, TimeoutError, ValueError):
        loot.result(-1)


def _json_loop(http_port: int, source: str, loot: Loot, end: float) -> None:
    queue: deque[str] = deque(["use"])
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30,
                                      source_address=(source, 0))
    while time.monotonic() < end and queue:
        prefix = queue.popleft()
        for page in range(1, 6):
            try:
                conn.request("GET", f"/api/v1/search?q={quote(prefix)}&type=name&page={page}")
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30,
                                                  source_address=(source, 0))
                continue
            loot.result({200: 0, 429: 51}.get(resp.status, resp.status))
            if resp.status == 429:
                queue.appendleft(prefix)
                time.sleep(min(float(resp.headers.get("Retry-After", "1")),
                               max(0.0, end - time.monotonic())))
                break
            if resp.status != 200:
                break
            doc = json.loads(body)
            for row in doc["results"]:
                for m in row["emails"]:
                    loot.mails.add(m.lower().encode())
            if page == 1 and doc["truncated"]:
                queue.extend(prefix + c for c in NAMES)
            if page >= doc["pages"]:
                break


def mail_clients(port: int, source: str, clients: int, users: int, seconds: float,
                 out: Any) -> None:
    """``clients`` connections doing exact lookups by address (run in a process of its own)."""
    end = time.monotonic() + seconds
    done = [0] * clients
    refused = [0] * clients
    failed = [0] * clients

    def one(i: int) -> None:
        rng = random.Random(i)
        try:
            with wire.LdapClient(("127.0.0.1", port), timeout=30, source=source) as client:
                while time.monotonic() < end:
                    n = rng.randrange(users)
                    r = client.search("c=MO", wire.eq("mail", f"user{n}@bench.example"),
                                      ["userCertificate;binary"])
                    if r.code != 0 or len(r.entries) != 1:
                        refused[i] += 1
                    done[i] += 1
        except (OSError, TimeoutError, ConnectionError, ValueError, AssertionError):
            failed[i] += 1  # no answer in 30 s: an overloaded server

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    elapsed = time.monotonic() - start
    out.put({"lookups": sum(done), "per_s": sum(done) / elapsed, "refused": sum(refused),
             "timed_out": sum(failed)})


def run_mail(port: int, args: argparse.Namespace, users: int, seconds: float) -> Any:
    q: Any = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(
        target=mail_clients, args=(port, "127.0.100.1", args.mail_clients, users, seconds, q))
    p.start()
    return p, q


def harvest(server: Any, args: argparse.Namespace, users: int) -> tuple[dict[str, Loot], Any]:
    """Every strategy at once for ``--seconds``, with the mail clients."""
    end = time.monotonic() + args.seconds
    loots = {name: Loot() for name in ("ldap-1conn", "ldap-16conn", "ldap-paged",
                                       "json-prefix", "ldap-16addr", "ldap-16nets")}
    port, http_port = server.port, server.http_port
    jobs = [
        (ldap_loop, (port, ["127.0.1.1"], 1, loots["ldap-1conn"], end)),
        (ldap_loop, (port, ["127.0.2.1"], 16, loots["ldap-16conn"], end)),
        (paged_loop, (port, "127.0.3.1", loots["ldap-paged"], end)),
        (json_loop, (http_port, "127.0.4.1", loots["json-prefix"], end)),
        (ldap_loop, (port, [f"127.0.5.{i}" for i in range(1, 17)], 1, loots["ldap-16addr"],
                     end)),
        (ldap_loop, (port, [f"127.6.{i}.1" for i in range(1, 17)], 1, loots["ldap-16nets"],
                     end)),
    ]
    p, q = run_mail(port, args, users, args.seconds)
    threads = [threading.Thread(target=fn, args=a, daemon=True) for fn, a in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end - time.monotonic()) + 60)
    during = q.get()
    p.join()
    return loots, during


def config_with(data: Path, lines: list[str], name: str) -> Path:
    text = (data / "certpub.toml").read_text()
    path = data / f"harvest-{name}.toml"
    path.write_text(text + "\n[privacy]\n" + "\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--mail-clients", type=int, default=64)
    ap.add_argument("--baseline", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--privacy", action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    db = sqlite3.connect(args.data / "store.sqlite3")
    users = db.execute("SELECT COUNT(DISTINCT value) FROM cert_attrs WHERE attr = 'mail'"
                       ).fetchone()[0]
    db.close()
    extra = ["--workers", "1"]
    guarded = Certpub(config_with(args.data, args.privacy, "default"), "warn", extra)
    open_ = Certpub(config_with(args.data, ['lookups = "open"', "budget_per_minute = 0"],
                                "open"), "warn", extra)
    report: dict[str, Any] = {"subscribers": users, "seconds": args.seconds,
                              "privacy": args.privacy, "baseline": []}
    try:
        for server in (guarded, open_):  # warm-up: the store's pages into the page cache
            p, q = run_mail(server.port, args, users, min(args.baseline, 3.0))
            q.get()
            p.join()
        # the mail clients alone: with the policy and without, alternating
        for r in range(args.rounds):
            order = [("policy", guarded), ("open", open_)]
            for name, server in order if r % 2 == 0 else reversed(order):
                p, q = run_mail(server.port, args, users, args.baseline)
                result = q.get()
                p.join()
                result["server"] = name
                report["baseline"].append(result)
                print(f"mail clients alone, {name}: {result['per_s']:.0f} lookups/s,"
                      f" {result['refused']} refused", flush=True)
        base_open = [b["per_s"] for b in report["baseline"] if b["server"] == "open"]
        base_policy = [b["per_s"] for b in report["baseline"] if b["server"] == "policy"]
        # the harvest, every strategy at once, with the mail clients: against the policy,
        # then the same against the server without it
        report["harvest"] = {}
        for name, server in (("policy", guarded), ("open", open_)):
            loots, during = harvest(server, args, users)
            report["harvest"][name] = {"mail_clients": during, "strategies": {}}
            for strategy, loot in loots.items():
                share = 100.0 * len(loot.mails) / users
                report["harvest"][name]["strategies"][strategy] = {
                    "addresses": len(loot.mails), "share_pct": share, "queries": loot.queries,
                    "refused": loot.refused}
                print(f"{name:6s} {strategy:12s} {len(loot.mails):7d} addresses ="
                      f" {share:6.2f} % of {users} ({loot.queries} queries, refused by code"
                      f" {loot.refused})", flush=True)
            print(f"{name:6s} mail clients during the harvest: {during['per_s']:.0f} lookups/s,"
                  f" {during['refused']} refused, {during['timed_out']} connections timed out",
                  flush=True)
        alone_policy = sum(base_policy) / len(base_policy)
        alone_open = sum(base_open) / len(base_open)
        during_policy = report["harvest"]["policy"]["mail_clients"]["per_s"]
        during_open = report["harvest"]["open"]["mail_clients"]["per_s"]
        report["ratios"] = {"alone_policy_to_open": alone_policy / alone_open,
                            "harvest_policy_to_open_alone": during_policy / alone_open}
        print(f"mail clients, policy / open: alone {alone_policy:.0f}/{alone_open:.0f}/s ="
              f" {alone_policy / alone_open:.2f}; during the harvest {during_policy:.0f}"
              f" (policy) and {during_open:.0f} (open) lookups/s; during the harvest with the"
              f" policy / alone without it = {during_policy / alone_open:.2f}", flush=True)
    finally:
        guarded.close()
        open_.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
