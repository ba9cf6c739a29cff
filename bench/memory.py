"""Memory (issue 7, item 5): importer peak RSS and server RSS after a warm-up, per store size.

Usage:
  python bench/memory.py import DATA [--openssl] [--pythonpath TREE] [--log FILE]
  python bench/memory.py server DATA [DATA...] [--pythonpath TREE] [--workers N] [--json OUT]
  python bench/memory.py slapadd LDIF [--rounds 3]      (as root)

``import`` runs ``certpub import --config DATA/certpub.toml DATA/certs DATA/crl.pem`` (or,
with ``--openssl``, ``... --openssl`` then ``... DATA/crl.pem``) into DATA's store, which must
not exist yet, and samples the VmRSS of the importer's whole process tree (the importer and
its spawned verification workers) every 0.2 s: the peak of that sum is "peak RSS (tree)"; the
largest single process (ru_maxrss of the children) is shown too. Every line the importer
prints (its progress, every 10 s) is copied with the elapsed seconds and the tree RSS in
front, and the rate between two progress lines is added, so a rate that falls as the store
grows shows. Prints certificates/s over the wall time and the CPU time used.

``slapadd`` times ``slapadd -q`` of an LDIF into a new mdb database (``bench/slapd_env.py``:
the slapd it then starts is stopped at once), ``--rounds`` times.

``server`` starts ``certpub serve`` on each DATA in turn (free 127.0.0.1 ports chosen at run
time, ``[log] level = "warn"``, default workers unless --workers), reads the process tree's
VmRSS when idle, then warms it up — 1 s of ``(mail=...)`` and 1 s of base searches at 16
connections with ``bench/ldap_bench.py``'s load generator, then ``--ocsp`` distinct cached
OCSP POSTs over 4 keep-alive connections (each twice: miss, then hit) — and reads it again,
then after a second, identical warm-up (a size-dependent leak would show as growth between
the two). Prints a table: certificates, store file size, RSS idle / after warm-up / after the
second warm-up, per process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp
from ldap_bench import Certpub, memory_mib, run_round, tree_pids, wait_port


def tree_rss_mib(pid: int) -> float:
    total = 0
    for p in tree_pids(pid):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        if m:
            total += int(m.group(1))
    return total / 1024


def certpub_cmd(pythonpath: str | None) -> tuple[list[str], dict[str, str] | None]:
    if pythonpath:
        return [sys.executable, "-m", "server.cli"], dict(os.environ, PYTHONPATH=pythonpath)
    exe = Path(sys.executable).parent / "certpub"
    return [str(exe)], None


def sampled_run(cmd: list[str], env: dict[str, str] | None, log: Any) -> dict[str, float]:
    """Run cmd, copying its output with timestamps, sampling its tree's RSS; the figures."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_mib(proc.pid))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    last: tuple[float, int] | None = None
    assert proc.stdout is not None
    for line in proc.stdout:
        t = time.monotonic() - t0
        extra = ""
        m = re.search(r"(\d+) certificates,", line)
        if m:
            n = int(m.group(1))
            if last is not None and t > last[0]:
                extra = f"  [{(n - last[1]) / (t - last[0]):.0f}/s since last line]"
            last = (t, n)
        text = f"{t:8.1f}s rss {tree_rss_mib(proc.pid):6.0f} MiB | {line.rstrip()}{extra}"
        print(text, file=log, flush=True)
    proc.wait()
    took = time.monotonic() - t0
    stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": took,
        "rc": proc.returncode,
        "peak_tree_rss_mib": peak[0],
        "peak_process_rss_mib": after.ru_maxrss / 1024,
        "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }


def cmd_import(args: argparse.Namespace) -> None:
    data = args.data.resolve()
    config = data / "certpub.toml"
    store = re.search(r'^path = "(.*)"', config.read_text(), re.MULTILINE)
    if store and Path(store.group(1)).exists():
        raise SystemExit(f"{store.group(1)} exists: the import figure needs an empty store")
    with open(data / "index.txt") as index:
        n = sum(1 for _ in index)
    base, env = certpub_cmd(args.pythonpath)
    steps = (
        [
            [*base, "import", "--config", str(config), "--openssl"],
            [*base, "import", "--config", str(config), str(data / "crl.pem")],
        ]
        if args.openssl
        else [
            [*base, "import", "--config", str(config), str(data / "certs"), str(data / "crl.pem")]
        ]
    )
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(args.log, "a")) if args.log else sys.stdout
        _import_steps(steps, env, log, n, store.group(1) if store else None)


def _import_steps(
    steps: list[list[str]], env: dict[str, str] | None, log: Any, n: int, store: str | None
) -> None:
    total = {"seconds": 0.0, "cpu_s": 0.0, "peak_tree_rss_mib": 0.0, "peak_process_rss_mib": 0.0}
    for cmd in steps:
        print("$ " + " ".join(cmd), file=log, flush=True)
        r = sampled_run(cmd, env, log)
        if r["rc"] not in (0, 3):
            raise SystemExit(f"import failed with exit code {r['rc']}")
        total["seconds"] += r["seconds"]
        total["cpu_s"] += r["cpu_s"]
        total["peak_tree_rss_mib"] = max(total["peak_tree_rss_mib"], r["peak_tree_rss_mib"])
        total["peak_process_rss_mib"] = max(
            total["peak_process_rss_mib"], r["peak_process_rss_mib"]
        )
    size = Path(store).stat().st_size / 2**20 if store else 0
    print(
        f"import of {n} certificates: {total['seconds']:.1f} s = {n / total['seconds']:.0f}"
        f" certificates/s, CPU {total['cpu_s']:.1f} s ({100 * total['cpu_s'] / total['seconds']:.0f}"
        f" % of one core), peak RSS {total['peak_tree_rss_mib']:.0f} MiB (process tree),"
        f" {total['peak_process_rss_mib']:.0f} MiB (largest process); store {size:.0f} MiB",
        file=log,
        flush=True,
    )
    if log is not sys.stdout:
        print(
            f"import of {n} certificates: {total['seconds']:.1f} s = {n / total['seconds']:.0f}"
            f" certificates/s, peak RSS {total['peak_tree_rss_mib']:.0f} MiB"
        )


# --- server memory ----------------------------------------------------------------------


def ocsp_request(ca: x509.Certificate, serial: int) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    # the CertID of the subscriber certificate, without reading its file
    h = hashes.Hash(hashes.SHA1())
    h.update(ca.subject.public_bytes())
    name_hash = h.finalize()
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash, _key_hash(ca), serial, hashes.SHA1()
    )
    return builder.build().public_bytes(Encoding.DER)


def _key_hash(ca: x509.Certificate) -> bytes:
    # SHA-1 of the subjectPublicKey BIT STRING contents: RFC 6960's issuerKeyHash, and the
    # RFC 5280 §4.2.1.2 method (1) key identifier
    return x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest


class HttpClient:
    """One keep-alive HTTP/1.1 connection, POSTing OCSP requests."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/ocsp-request\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        length = int(m.group(1)) if m else 0
        while len(rest) < length:
            self.buf = head + b"\r\n\r\n" + rest
            self._more()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = rest[length:]
        return int(head.split()[1]), rest[:length]

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def ocsp_warmup(port: int, ca: x509.Certificate, serials: list[int], conns: int = 4) -> int:
    bodies = [ocsp_request(ca, s) for s in serials]
    good = [0]

    def run(part: list[bytes]) -> None:
        c = HttpClient(port)
        for body in part:
            for _ in range(2):
                status, resp = c.post(body)
                if status == 200 and resp[:1] == b"\x30":
                    good[0] += 1
        c.close()

    threads = [threading.Thread(target=run, args=(bodies[i::conns],)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return good[0]


def server_memory(data: Path, args: argparse.Namespace) -> dict[str, Any]:
    with open(data / "index.txt") as index:
        users = sum(1 for _ in index)
    extra = [] if args.workers is None else ["--workers", str(args.workers)]
    cp = Certpub(data / "certpub.toml", "warn", extra, args.pythonpath)
    try:
        wait_port(cp.http_port, cp.proc)
        time.sleep(1.0)
        ca = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
        rng = random.Random(7)
        out: dict[str, Any] = {
            "certificates": users,
            "store_mib": _store_size(data) / 2**20,
            "idle": memory_mib(cp.pid),
        }
        for phase in ("warm1", "warm2"):
            c0 = time.monotonic()
            for kind in ("mail", "base"):
                run_round(cp.port, cp.pid, 16, kind, users, 8, 2, 1.0, rng.randrange(1 << 30))
            serials = [0x1000 + rng.randrange(users) for _ in range(args.ocsp)]
            ok = ocsp_warmup(cp.http_port, ca, serials)
            out[phase] = memory_mib(cp.pid)
            out[phase]["ocsp_ok"] = ok
            out[phase]["seconds"] = time.monotonic() - c0
        return out
    finally:
        cp.close()


def _store_size(data: Path) -> int:
    m = re.search(r'^path = "(.*)"', (data / "certpub.toml").read_text(), re.MULTILINE)
    return Path(m.group(1)).stat().st_size if m else 0


def cmd_server(args: argparse.Namespace) -> None:
    rows = []
    for data in args.data:
        r = server_memory(data.resolve(), args)
        rows.append(r)
        print(
            f"{r['certificates']:>9} certificates: idle {r['idle']['rss']:.0f} MiB"
            f" {r['idle']['rss_each']}, after warm-up {r['warm1']['rss']:.0f} MiB"
            f" {r['warm1']['rss_each']}, after a second warm-up {r['warm2']['rss']:.0f} MiB"
            f" {r['warm2']['rss_each']} (OCSP answers {r['warm1']['ocsp_ok']}"
            f" + {r['warm2']['ocsp_ok']})",
            flush=True,
        )
    print(
        f"\n{'certificates':>12} | {'store MiB':>9} | {'idle':>6} | {'warm-up':>7} |"
        f" {'2nd warm-up':>11} | per process after warm-up (MiB)"
    )
    for r in rows:
        print(
            f"{r['certificates']:>12,} | {r['store_mib']:9.0f} | {r['idle']['rss']:6.0f} |"
            f" {r['warm1']['rss']:7.0f} | {r['warm2']['rss']:11.0f} | {r['warm2']['rss_each']}"
        )
    if len(rows) > 1:
        print(
            f"largest / smallest store, RSS after warm-up: "
            f"{rows[-1]['warm2']['rss'] / rows[0]['warm2']['rss']:.2f}×"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def cmd_slapadd(args: argparse.Namespace) -> None:
    from slapd_env import Slapd

    for r in range(args.rounds):
        s = Slapd(args.ldif)
        try:
            s.__enter__()
        finally:
            s.__exit__(None, None, None)
        a = s.slapadd
        print(
            f"slapadd round {r + 1}: {a['entries']:.0f} entries in {a['seconds']:.2f} s ="
            f" {a['entries_per_s']:.0f} entries/s, CPU {a['cpu_s']:.2f} s, peak RSS"
            f" {a['peak_rss_mib']:.0f} MiB (largest child so far)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("import", help="import DATA into its (new) store, sampling RSS")
    p.add_argument("data", type=Path)
    p.add_argument("--openssl", action="store_true", help="index.txt, then the CRL")
    p.add_argument("--pythonpath", help="run certpub from this source tree")
    p.add_argument("--log", type=Path, help="append the timestamped output here")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("server", help="server RSS idle and after warm-ups, per DATA")
    p.add_argument("data", type=Path, nargs="+")
    p.add_argument("--pythonpath", help="run certpub from this source tree")
    p.add_argument("--workers", type=int)
    p.add_argument("--ocsp", type=int, default=2000, help="distinct OCSP requests per warm-up")
    p.add_argument("--json", type=Path)
    p.set_defaults(func=cmd_server)
    p = sub.add_parser("slapadd", help="time slapadd -q of an LDIF (bench/slapd_env.py)")
    p.add_argument("ldif", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(func=cmd_slapadd)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
