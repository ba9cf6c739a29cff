"""Overload (issue 18): a well-behaved OCSP client's cached GETs while a flood needs signatures.

Usage: python bench/ocsp_flood.py DATA [--workers 1,2] [--rounds 2] [--duration 5]
                                       [--flood-connections 32] [--set KEY=VALUE ...]
                                       [--ldap-seconds 3] [--no-ldap] [--work DIR]

DATA is a directory written by ``bench/gen_certs.py`` and imported (see bench/ocsp_bench.py).
certpub is started from a copy of DATA/certpub.toml (HTTP only, a free 127.0.0.1 port,
one log line per request to a file, ``[server] workers``; ``--set KEY=VALUE`` adds ``[http]``
keys, e.g. ``--set signing_processes=0`` for the in-process signing of before).

Per worker count, in each round:
- quiet: ``wrk -t1 -c4`` GETs of one certificate's request (a pre-signed answer), alone;
- flood ``unknown``: the same while a second wrk (``--flood-connections``, default 32) POSTs
  requests for random 16-octet serials the CA never issued (each would need a signed
  ``unknown``), started 1 s before and ending after the measured window;
- flood ``nonce``: the same with POSTs carrying a fresh random 32-octet nonce for an issued
  certificate (each would need a signature).
The well-behaved client's rate and p99 are compared with the quiet run of the same round
(targets: ≥ 0.5× the rate, p99 ≤ 5×). The flood client counts its answers by kind (a Lua
``response`` hook, so its own rate is somewhat lower than a bare wrk's): ``signed`` (a signed
answer to what it asked), ``presigned`` (shed: the certificate's pre-signed answer without
the nonce), ``tryLater`` (shed, or never-issued serials over the per-address rate); wrk's
socket errors (connect/read/write, e.g. connections over ``max_connections_per_address``
closed at once) and timeouts (a request left unanswered for 10 s) are shown apart. Figures are medians over rounds.

LDAP: ``(mail=x)`` searches (4 connections, 8 outstanding each, bench/ldap_bench.py's client,
``[store] threads = --ldap-store-threads``, default 2)
alone and while 16 connections send unindexed ``(cn=*e*)`` searches (size limit 100, as
Thunderbird's autocomplete asks; one outstanding per connection); the ratio of the two
rates is the figure (issue: ≥ 0.16×, slapd 0.17×).

Run under ``flock -x /tmp/certpub-cpu.lock``; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

import ldap_bench
import ocsp_bench
from ocsp_bench import LUA_GET, LUA_NONCE, LUA_RESOLVE, Certpub, http_raw, tree_cpu

SERIAL_OCTETS = 16

# A random never-issued serial per request: the request DER ends with the serial's octets.
LUA_UNKNOWN = """
local f = assert(io.open(os.getenv("OCSP_BODY"), "rb"))
local prefix = f:read("*a")
f:close()
local headers = {["Content-Type"] = "application/ocsp-request"}
math.randomseed(os.time())
local char, random, concat = string.char, math.random, table.concat
request = function()
  local t = {char(random(16, 127))}
  for i = 2, %d do t[i] = char(random(0, 255)) end
  return wrk.format("POST", "/", headers, prefix .. concat(t))
end
""" % SERIAL_OCTETS

# Counts the flood's answers by kind: tryLater is 5 octets (30 03 0a 01 03); a pre-signed
# answer without nonce has the cached answer's length; anything else was signed for it.
LUA_COUNT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  try_later = 0; presigned = 0; signed = 0
  presigned_len = tonumber(os.getenv("PRESIGNED_LEN") or "-1")
end
function response(status, headers, body)
  local n = #body
  if n == 5 then try_later = try_later + 1
  elseif n == presigned_len then presigned = presigned + 1
  else signed = signed + 1 end
end
function done(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("try_later"); b = b + t:get("presigned"); c = c + t:get("signed")
  end
  io.write(string.format("COUNTS try_later=%d presigned=%d signed=%d\\n", a, b, c))
end
"""


def requests_for(data: Path, serial: int) -> dict[str, bytes]:
    ca = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((data / "certs" / f"{serial:X}.pem").read_bytes())
    plain = (ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1()).build()
             .public_bytes(serialization.Encoding.DER))
    with_nonce = (ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1())
                  .add_extension(x509.OCSPNonce(b"\x00" * 32), critical=False).build()
                  .public_bytes(serialization.Encoding.DER))
    assert with_nonce.endswith(b"\x00" * 32)
    probe = 0x7F << (8 * (SERIAL_OCTETS - 1))
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        _name_hash(ca), _key_hash(ca), probe, hashes.SHA1())
    unknown = builder.build().public_bytes(serialization.Encoding.DER)
    tail = probe.to_bytes(SERIAL_OCTETS, "big")
    assert unknown.endswith(tail)
    return {"plain": plain, "nonce_prefix": with_nonce[:-32],
            "unknown_prefix": unknown[:-SERIAL_OCTETS]}


def _name_hash(ca: x509.Certificate) -> bytes:
    h = hashes.Hash(hashes.SHA1())
    h.update(ca.subject.public_bytes())
    return h.finalize()


def _key_hash(ca: x509.Certificate) -> bytes:
    """SHA-1 of the CA's subjectPublicKey bits (RFC 6960 §4.1.1 issuerKeyHash)."""
    return x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest


def wrk(port: int, script: Path, conns: int, seconds: float, env: dict[str, str]
        ) -> subprocess.Popen[bytes]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{int(seconds)}s", "--latency", "--timeout", "10s",
           "-s", str(script), f"http://127.0.0.1:{port}/"]
    return subprocess.Popen(cmd, env=dict(os.environ, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def wrk_result(proc: subprocess.Popen[bytes]) -> dict[str, float]:
    out = (proc.communicate()[0] or b"").decode()
    if proc.returncode != 0 or "Requests/sec" not in out:
        raise SystemExit(f"wrk failed:\n{out}")
    sec = ocsp_bench._seconds
    r = {"rps": float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1)),  # type: ignore[union-attr]
         "p99": sec(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))}  # type: ignore[union-attr]
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     out)
    r["errors"] = sum(int(x) for x in errs.groups()) if errs else 0
    r["timeouts"] = int(errs.group(4)) if errs else 0  # requests left unanswered 10 s
    counts = re.search(r"COUNTS try_later=(\d+) presigned=(\d+) signed=(\d+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if counts and total:
        secs = sec(total.group(2) + total.group(3))
        r["try_later"] = int(counts.group(1)) / secs
        r["presigned"] = int(counts.group(2)) / secs
        r["signed"] = int(counts.group(3)) / secs
    return r


def one_round(target: Certpub, files: dict[str, Path], args: argparse.Namespace,
              presigned_len: int) -> dict[str, dict[str, float]]:
    port = target.port
    good_env = {"OCSP_PATH": str(files["get_path"]), "OCSP_CLOSE": "0"}
    out: dict[str, dict[str, float]] = {}
    cpu0, t0 = tree_cpu(target.proc.pid), time.monotonic()
    out["quiet"] = wrk_result(wrk(port, files["get.lua"], 4, args.duration, good_env))
    out["quiet"]["server_cpu"] = (tree_cpu(target.proc.pid) - cpu0) / (time.monotonic() - t0)
    for flood in ("unknown", "nonce"):
        env = {"OCSP_BODY": str(files[f"{flood}_prefix"]), "OCSP_CLOSE": "0",
               "PRESIGNED_LEN": str(presigned_len)}
        flooder = wrk(port, files[f"{flood}.lua"], args.flood_connections,
                      args.duration + 2, env)
        time.sleep(1.0)
        cpu0, t0 = tree_cpu(target.proc.pid), time.monotonic()
        good = wrk_result(wrk(port, files["get.lua"], 4, args.duration, good_env))
        good["server_cpu"] = (tree_cpu(target.proc.pid) - cpu0) / (time.monotonic() - t0)
        fl = wrk_result(flooder)
        out[flood] = good
        out[flood + "_flood"] = fl
    return out


def median(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rounds)


def ocsp_part(args: argparse.Namespace, work: Path) -> list[str]:
    data: Path = args.data
    reqs = requests_for(data, args.serial)
    files: dict[str, Path] = {}
    for name, blob in reqs.items():
        files[name] = work / f"{name}.der"
        files[name].write_bytes(blob)
    b64 = urllib.parse.quote(base64.b64encode(reqs["plain"]).decode(), safe="")
    files["get_path"] = work / "get_path.txt"
    files["get_path"].write_text("/ocsp/" + b64)
    for name, script in (("get.lua", LUA_RESOLVE + LUA_GET),
                         ("unknown.lua", LUA_RESOLVE + LUA_UNKNOWN + LUA_COUNT),
                         ("nonce.lua", LUA_RESOLVE + LUA_NONCE + LUA_COUNT)):
        files[name] = work / name
        files[name].write_text(script)
    # wrk's GET script reads the path from the environment, not a file
    files["get_path"] = Path("/ocsp/" + b64)
    config = work / "base.toml"
    text = (data / "certpub.toml").read_text()
    extra = "".join(f"{k} = {v}\n" for k, v in (s.split("=", 1) for s in args.set))
    text = re.sub(r"(?ms)^(\[http\]\nlisten = \[.*?\]\n)", lambda m: m.group(1) + extra, text)
    if args.store_threads is not None:
        text = re.sub(r"(?m)^\[store\]\n", f"[store]\nthreads = {args.store_threads}\n", text)
    config.write_text(text)
    lines = []
    header = (f"{'workers':>7} {'scenario':<8} {'good/s':>8} {'p99 ms':>7} {'× rate':>6}"
              f" {'× p99':>6} {'srv cpu':>7} | {'flood/s':>8} {'signed/s':>8}"
              f" {'presig/s':>8} {'tryLtr/s':>8} {'sockerr':>7} {'timeout':>7}")
    lines.append(header)
    for workers in args.workers:
        target = Certpub(data, work, workers, name=f"certpub-w{workers}", config=config)
        try:
            code, _, body = http_raw(target.port, b"POST /ocsp HTTP/1.1\r\nHost: b\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(reqs["plain"])
                                     + reqs["plain"])
            assert code == 200
            presigned_len = len(body)
            for _ in range(3 * workers):  # each worker signs it once
                http_raw(target.port, b"GET %s HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
                         % str(files["get_path"]).encode())
                http_raw(target.port, b"POST /ocsp HTTP/1.1\r\nHost: b\r\nConnection: close"
                         b"\r\nContent-Length: %d\r\n\r\n" % len(reqs["plain"]) + reqs["plain"])
            rounds = [one_round(target, files, args, presigned_len) for _ in range(args.rounds)]
        finally:
            target.stop()
        quiet = [r["quiet"] for r in rounds]
        q_rps, q_p99 = median(quiet, "rps"), median(quiet, "p99")
        lines.append(f"{workers:>7} {'quiet':<8} {q_rps:>8.0f} {q_p99 * 1e3:>7.2f} {1.0:>6.2f}"
                     f" {1.0:>6.2f} {median(quiet, 'server_cpu'):>7.2f} |")
        for flood in ("unknown", "nonce"):
            good = [r[flood] for r in rounds]
            fl = [r[flood + "_flood"] for r in rounds]
            # ratios per round (against that round's quiet run), then the median
            x_rate = statistics.median(g["rps"] / q["rps"] for g, q in zip(good, quiet))
            x_p99 = statistics.median(g["p99"] / q["p99"] for g, q in zip(good, quiet))
            lines.append(
                f"{workers:>7} {flood:<8} {median(good, 'rps'):>8.0f}"
                f" {median(good, 'p99') * 1e3:>7.2f} {x_rate:>6.2f} {x_p99:>6.2f}"
                f" {median(good, 'server_cpu'):>7.2f} | {median(fl, 'rps'):>8.0f}"
                f" {median(fl, 'signed'):>8.0f} {median(fl, 'presigned'):>8.0f}"
                f" {median(fl, 'try_later'):>8.0f} {median(fl, 'errors'):>7.0f}"
                f" {median(fl, 'timeouts'):>7.0f}")
    return lines


# --- LDAP -----------------------------------------------------------------------------------


def _substring_any(attr: str, value: str) -> bytes:
    tlv = ldap_bench._tlv
    return tlv(0xA4, tlv(0x04, attr.encode()) + tlv(0x30, tlv(0x81, value.encode())))


_plain_request = ldap_bench.request


def _request(kind: str, i: int) -> bytes:
    """bench/ldap_bench.py's requests, and ``substr``: Thunderbird's autocomplete shape,
    ``(cn=*e*)`` under c=MO with a size limit of 100 (no index serves it: a scan)."""
    if kind != "substr":
        return _plain_request(kind, i)
    tlv = ldap_bench._tlv
    body = (tlv(0x04, b"c=MO") + tlv(0x0A, b"\x02") + tlv(0x0A, b"\x00")
            + tlv(0x02, b"\x64") + tlv(0x02, b"\x00") + tlv(0x01, b"\x00")
            + _substring_any("cn", "e")
            + tlv(0x30, b"".join(tlv(0x04, a.encode()) for a in ldap_bench.ATTRS)))
    return tlv(0x63, body)


def ldap_part(args: argparse.Namespace) -> list[str]:
    ldap_bench.request = _request  # the client processes (fork) build (cn=*e*) with it
    users = sum(1 for _ in open(args.data / "index.txt"))  # noqa: SIM115
    config = Path(tempfile.mkdtemp(prefix="ocsp-flood-ldap-")) / "certpub.toml"
    text = (args.data / "certpub.toml").read_text()
    config.write_text(re.sub(r"(?m)^\[store\]\n",
                             f"[store]\nthreads = {args.ldap_store_threads}\n", text))
    target = ldap_bench.Certpub(config, "warn", [])
    rows = []
    try:
        pid = target.pid
        for r in range(args.rounds):
            quiet = ldap_bench.run_round(target.port, pid, 4, "mail", users, 8, 1,
                                         args.ldap_seconds, seed=r)
            ctx = mp.get_context("fork")
            q: mp.Queue[Any] = ctx.Queue()
            t_meas = time.monotonic() + 0.3
            t_end = t_meas + args.ldap_seconds + 2.5
            flood = ctx.Process(target=ldap_bench.client,
                                args=(target.port, 16, "substr", users, 1, t_meas, t_end,
                                      99, q))
            flood.start()
            time.sleep(0.8)
            loaded = ldap_bench.run_round(target.port, pid, 4, "mail", users, 8, 1,
                                          args.ldap_seconds, seed=r)
            fl = q.get(timeout=60)
            flood.join(10)
            rows.append((quiet, loaded, fl["done"] / (args.ldap_seconds + 2.5)))
    finally:
        target.close()
    x = statistics.median(lo["rate"] / qu["rate"] for qu, lo, _ in rows)
    return [f"LDAP ([store] threads = {args.ldap_store_threads}) (mail=x), 4 conns x 8: quiet {statistics.median(q['rate'] for q, _, _ in rows):.0f}/s"
            f" p99 {statistics.median(q['p99_ms'] for q, _, _ in rows):.2f} ms; under 16 conns of"
            f" (cn=*e*): {statistics.median(lo['rate'] for _, lo, _ in rows):.0f}/s p99"
            f" {statistics.median(lo['p99_ms'] for _, lo, _ in rows):.2f} ms ->"
            f" {x:.2f}x quiet (target >= 0.16x); (cn=*e*) answered"
            f" {statistics.median(f for _, _, f in rows):.0f}/s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--flood-connections", type=int, default=32)
    p.add_argument("--serial", type=lambda s: int(s, 0), default=0x1000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an [http] key for certpub (TOML value), e.g. signing_processes=0")
    p.add_argument("--store-threads", type=int, default=None,
                   help="[store] threads (with --set signing_processes=0: sign in threads)")
    p.add_argument("--ldap-seconds", type=float, default=3.0)
    p.add_argument("--ldap-store-threads", type=int, default=2,
                   help="[store] threads of the LDAP run (0: scans cooperate on the reactor)")
    p.add_argument("--no-ldap", action="store_true")
    p.add_argument("--no-ocsp", action="store_true")
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    args.data = args.data.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="ocsp-flood-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {ocsp_bench.machine()}; load average before: {os.getloadavg()}")
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(f"# well-behaved: wrk -t1 -c4 GET (cached), {args.duration:g}s; flood: wrk -t1"
          f" -c{args.flood_connections} POST; medians of {args.rounds} rounds")
    if not args.no_ocsp:
        for line in ocsp_part(args, work):
            print(line, flush=True)
    if not args.no_ldap:
        for line in ldap_part(args):
            print(line, flush=True)
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
