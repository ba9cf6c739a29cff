"""Search pages under load (issue 17): requests/s of the search pages against the cached
OCSP rate of the same server.

Usage: python bench/web_bench.py DATA [--rounds 3] [--duration 5] [--connections 4]
                                      [--workers 1] [--serial 0x1000] [--work DIR]

DATA is a directory written by ``bench/gen_certs.py`` and already imported (e.g. a copy of
/work/benchdata/d100k; the store is migrated to this certpub's schema when the server opens
it). One ``certpub serve`` (HTTP only, ``[server] workers`` = --workers, one log line per
request to a file, as in production) answers every scenario; each measurement is one
``wrk --latency -t1 -cC -dD`` run of keep-alive GETs, rounds rotate the scenario order, and the
figures are medians over the rounds with the ratio to the OCSP GET of the same round:

- ``ocsp``: a cached OCSP GET (the peer: certpub's fastest path, pre-built answer bytes);
- ``mail``: the search page for one e-mail address (``/?q=user<i>@bench.example``: one
  index lookup, one certificate read, the HTML page in English with the CA table);
- ``mail_api``: the same search as JSON (``/api/v1/search?q=…``);
- ``name``: a broad name prefix (``/?q=User 1&type=name``: 100 index entries, a page of 20);
- ``cert``: the certificate page ``/cert/bench/<serial>`` (one DER parse, fingerprints).

Every scenario's answer is checked once before the runs (status 200 and what it must say).
The load generator's CPU (wrk user+sys) and the server's (its process tree) are reported per
run: the machine's cores are shared by the server and the load generator.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import statistics
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

from ocsp_bench import (  # the bench scripts' shared helpers
    LUA_GET, LUA_RESOLVE, Certpub, _seconds, http_raw, machine, make_requests, tree_cpu,
)


def scenarios(serial: int, ocsp_path: str) -> dict[str, tuple[str, bytes]]:
    """name -> (path, a byte string the answer must contain)."""
    i = serial - 0x1000
    mail = urllib.parse.quote(f"user{i}@bench.example")
    return {
        "ocsp": (ocsp_path, b""),
        "mail": (f"/?q={mail}", b"One certificate was found"),
        "mail_api": (f"/api/v1/search?q={mail}", b'"total": 1'),
        "name": ("/?q=User%201&type=name", b"More than 100 certificates match"),
        "cert": (f"/cert/bench/{serial:x}", b"SHA-256 fingerprint"),
    }


def run_wrk(port: int, pid: int, path: str, script: Path, args: argparse.Namespace
            ) -> dict[str, float]:
    env = dict(os.environ, OCSP_PATH=path, OCSP_CLOSE="0")
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
           "-s", str(script), f"http://127.0.0.1:{port}/"]
    cpu0, t0 = tree_cpu(pid), time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_bytes = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    server_cpu = tree_cpu(pid) - cpu0
    out = out_bytes.decode()
    if status != 0 or "Requests/sec" not in out:
        raise SystemExit(f"wrk failed on {path}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"^\s*99%\s+(\S+)", out, re.MULTILINE).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if bad:
        raise SystemExit(f"{bad.group(1)} answers were not 2xx on {path}")
    return {"rps": rps, "p99": p99, "wrk_cpu": (usage.ru_utime + usage.ru_stime) / wall,
            "server_cpu": server_cpu / wall,
            "server_us_per_req": 1e6 * server_cpu / max(rps * wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="certpub worker processes")
    parser.add_argument("--serial", type=lambda s: int(s, 0), default=0x1000)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    data = args.data.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="web-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    requests = make_requests(data, args.serial)
    ocsp_path = "/" + urllib.parse.quote(base64.b64encode(requests["plain"]).decode(), safe="")
    wanted = scenarios(args.serial, ocsp_path)
    script = work / "get.lua"
    script.write_text(LUA_RESOLVE + LUA_GET)
    print(f"machine: {machine()}; load average before: {os.getloadavg()}")
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s, keep-alive GETs; "
          f"{args.rounds} rounds; certpub workers={args.workers}")
    server = Certpub(data, work, args.workers)
    try:
        for name, (path, must) in wanted.items():  # each answer right before it is timed
            code, _, body = http_raw(server.port, f"GET {path} HTTP/1.1\r\nHost: b\r\n"
                                     "Connection: close\r\n\r\n".encode())
            if code != 200 or must not in body:
                raise SystemExit(f"{name}: {path} answered {code}: {body[:300]!r}")
        for _name, (path, _) in wanted.items():  # warm up (store pages, OCSP cache)
            run_wrk(server.port, server.proc.pid, path, script,
                    argparse.Namespace(connections=args.connections, duration=1))
        results: dict[str, list[dict[str, float]]] = {n: [] for n in wanted}
        ratios: dict[str, list[float]] = {n: [] for n in wanted}
        names = list(wanted)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            this: dict[str, float] = {}
            for name in order:
                res = run_wrk(server.port, server.proc.pid, wanted[name][0], script, args)
                results[name].append(res)
                this[name] = res["rps"]
            for name in names:
                ratios[name].append(this[name] / this["ocsp"])
        print()
        print(f"{'scenario':10} {'req/s':>9} {'x OCSP':>7} {'p99 ms':>7} {'server CPU':>10} "
              f"{'us/req':>7} {'wrk CPU':>7}")
        for name in names:
            runs = results[name]
            print(f"{name:10} {statistics.median(r['rps'] for r in runs):9.0f} "
                  f"{statistics.median(ratios[name]):7.3f} "
                  f"{1e3 * statistics.median(r['p99'] for r in runs):7.2f} "
                  f"{statistics.median(r['server_cpu'] for r in runs):10.2f} "
                  f"{statistics.median(r['server_us_per_req'] for r in runs):7.0f} "
                  f"{statistics.median(r['wrk_cpu'] for r in runs):7.2f}")
        print(f"\nload average after: {os.getloadavg()}; work folder {work}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
