"""Soak: load, a stream of imports and process deaths at once; no answer may be wrong.

Usage: python bench/soak.py [--minutes 10 | --seconds S] [--store sqlite|postgresql]
                            [--workers 2] [--ocsp-rate 150] [--nonce-rate 30] [--ldap-rate 60]
                            [--worker-kill-every 30] [--importer-kill-every 120]
                            [--initial 300] [--dir DIR] [--json OUT]

Everything runs on 127.0.0.1, on ports chosen at run time, and stops at the end (also on
failure or Ctrl-C). Started here: a small CA (EC P-256; ``--initial`` subscribers, one e-mail
each, imported with ``certpub import``), then ``certpub serve --workers N`` and
``certpub importd`` on one store: an SQLite file, or with ``--store postgresql`` a database in
a throwaway cluster (``tests/pg.py``, as the tests start one).

While it runs:
- load, at steady rates: OCSP POSTs without a nonce (answered from the pre-signed cache) and
  with a nonce (signed per request; the nonce must come back), LDAP searches by mail for
  ``userCertificate;binary`` (what a mail client asks), each client on a keep-alive
  connection that it re-opens when it breaks;
- imports: every second one file is dropped into the spool (written under a dot name, then
  renamed): a new certificate, or every third second a full CRL revoking one or two more
  certificates;
- faults: every ``--worker-kill-every`` s a worker is killed with SIGKILL (the supervisor
  restarts it); every ``--importer-kill-every`` s the import daemon is killed with SIGKILL and
  started again; with PostgreSQL, the database server is stopped (``pg_ctl -m fast``) for
  5 s once, half-way through.

Ground truth: the soak knows every certificate it issued and every revocation it dropped.
When a file is committed is read from the store itself: a thread of this process polls the
store's generation every 20 ms and, when it moves, reads the rows of the certificates still
pending; the commit time is the time of the first poll that sees the row (at most ~20 ms after
the real commit, never before it). An answer is **wrong** when it was asked more than 1 s
after such a commit and says ``good`` (OCSP) or offers the certificate as usable (LDAP) for a
revoked certificate, or says ``revoked`` / offers nothing for a certificate never revoked, or
when a nonce is not echoed. Answers about certificates not committed yet are not asked.

Printed at the end: requests per protocol, error answers (OCSP tryLater and other non-
successful statuses, LDAP 51/52, refused or broken connections) per fault window (within 5 s
after a worker kill, an importer kill, while the database is down and 5 s after), wrong
answers, revocation propagation (drop → commit, commit → first OCSP ``revoked`` and first LDAP
search without the certificate, p50/p99/max), RSS at start and end of each process, files left
unimported or rejected, certificates or revocations missing from the store. Exit status 1 when
an answer was wrong or a file or row is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from soak_parts import (  # noqa: E402
    CA_NAME,
    GRACE,
    WINDOW,
    SoakCa,
    Paced,
    Tally,
    Truth,
    ldap_client,
    now_mono,
    ocsp_client,
    revocation_watcher,
    store_watcher,
)

__all__ = ["Tally", "Truth", "main"]


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# --- processes --------------------------------------------------------------------------------


def certpub(*args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


READY_IN_A_ROW = 10  # /healthz answers in a row before the load starts


def wait_ready(ops_port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until every worker answers: the supervisor binds the sockets before its workers are
    up, so a port that accepts says nothing. /healthz on the ops listener answered 200 by
    READY_IN_A_ROW connections in a row (each reaches a worker the kernel picks; one not up
    yet holds its connection past the short timeout)."""
    import urllib.request

    end, in_a_row = now_mono() + timeout, 0
    while now_mono() < end and in_a_row < READY_IN_A_ROW:
        if proc.poll() is not None:
            raise RuntimeError(f"certpub serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/healthz", timeout=2) as r:
                in_a_row = in_a_row + 1 if r.status == 200 else 0
        except OSError:
            in_a_row = 0
            time.sleep(0.2)
    if in_a_row < READY_IN_A_ROW:
        raise RuntimeError(f"certpub serve not ready after {timeout} s")


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    end = now_mono() + timeout
    while now_mono() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    """SIGTERM, SIGKILL after timeout, then SIGKILL to what is left of its process group."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Soak:
    args: argparse.Namespace
    folder: Path
    ca: SoakCa
    config: Path
    location: str
    ldap_port: int
    http_port: int
    cluster: Any = None
    serve: subprocess.Popen[bytes] | None = None
    importd: subprocess.Popen[bytes] | None = None
    importd_starts: int = 0
    rss: dict[str, list[float]] = field(default_factory=dict)
    ops_port: int = 0

    def start_serve(self) -> None:
        log = open(self.folder / "serve.log", "ab")
        self.serve = subprocess.Popen(
            certpub("serve", "--workers", str(self.args.workers), "--config", str(self.config)),
            stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
            start_new_session=True)
        log.close()
        wait_port(self.ldap_port, self.serve)
        wait_port(self.http_port, self.serve)
        wait_ready(self.ops_port, self.serve)  # load starts once every worker answers
        end = now_mono() + 60
        while len(children(self.serve.pid)) < self.args.workers and now_mono() < end:
            time.sleep(0.1)

    def start_importd(self) -> None:
        log = open(self.folder / "importd.log", "ab")
        self.importd = subprocess.Popen(certpub("importd", "--config", str(self.config)),
                                        stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                        cwd=ROOT, start_new_session=True)
        log.close()
        self.importd_starts += 1

    def workers(self) -> list[int]:
        return children(self.serve.pid) if self.serve is not None else []

    def sample_rss(self) -> None:
        procs: dict[str, int | None] = {
            "supervisor": self.serve.pid if self.serve else None,
            "importd": self.importd.pid if self.importd else None,
        }
        for i, pid in enumerate(sorted(self.workers())):
            procs[f"worker {i + 1}"] = pid
        if self.cluster is not None and self.cluster.folder is not None:
            pidfile = self.cluster.folder / "data" / "postmaster.pid"
            with contextlib.suppress(OSError, ValueError):
                postmaster = int(pidfile.read_text().split()[0])
                total = sum(filter(None, (rss_mib(p)
                                          for p in [postmaster, *children(postmaster)])))
                self.rss.setdefault("postgres (all)", []).append(total)
        for name, pid in procs.items():
            if pid is not None and (value := rss_mib(pid)) is not None:
                self.rss.setdefault(name, []).append(value)


def write_config(folder: Path, location: str, ldap_port: int, http_port: int,
                 threads: int, ops_port: int) -> Path:
    store = (f'url = "{location}"\nthreads = {threads}' if location.startswith("postgresql")
             else f'path = "{location}"')
    text = f"""# written by bench/soak.py
[store]
{store}

[import]
spool = ["{folder / 'spool'}"]
processed = "move"
poll_interval = 0.25

[[ca]]
name = "{CA_NAME}"
certificate = "{folder / 'ca' / 'ca.pem'}"
[ca.ocsp]
signer_certificate = "{folder / 'ca' / 'ocsp.pem'}"
signer_key = "{folder / 'ca' / 'ocsp.key'}"

[ldap]
listen = ["tcp:{ldap_port}:interface=127.0.0.1"]

[http]
listen = ["tcp:{http_port}:interface=127.0.0.1"]

[ops]
listen = ["tcp:{ops_port}:interface=127.0.0.1"]

[log]
level = "warn"
"""
    path = folder / "certpub.toml"
    path.write_text(text)
    return path


def drop(spool: Path, name: str, data: bytes) -> float:
    """Write under a dot name, then rename (the drop protocol); the time of the rename."""
    tmp = spool / f".{name}.tmp"
    tmp.write_bytes(data)
    os.rename(tmp, spool / name)
    return now_mono()


def feeder(soak: Soak, truth: Truth, stop: threading.Event, dropped: list[str]) -> None:
    """One file a second: a new certificate, or every third a CRL revoking one or two."""
    rng = random.Random(11)
    spool = soak.folder / "spool"
    tick = 0
    for _ in Paced(1.0, stop):
        tick += 1
        if tick % 3 == 0:
            with truth.lock:
                candidates = [s for s in truth.usable if s not in truth.dropped_revocations]
            if candidates:
                chosen = rng.sample(candidates, min(len(candidates), rng.choice((1, 2))))
                pem = soak.ca.crl(chosen)
                name = f"crl-{soak.ca.crl_number}.crl"
                with truth.lock:  # recorded before the rename: never answered before it
                    for serial in chosen:
                        truth.dropped_revocations[serial] = now_mono()
                        truth.usable.remove(serial)
                t = drop(spool, name, pem)
                with truth.lock:
                    for serial in chosen:
                        truth.dropped_revocations[serial] = t
                dropped.append(name)
                continue
        cert = soak.ca.issue()
        with truth.lock:
            truth.certs[cert.serial] = cert
        name = f"cert-{cert.serial:X}.pem"
        drop(spool, name, cert.obj.public_bytes(serialization.Encoding.PEM))
        dropped.append(name)


# --- the run ----------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, folder: Path) -> tuple[Soak, Truth]:
    ca = SoakCa(folder / "ca")
    (folder / "spool").mkdir(parents=True, exist_ok=True)
    truth = Truth()
    initial = [ca.issue() for _ in range(args.initial)]
    bundle = folder / "initial.pem"
    bundle.write_bytes(b"".join(c.obj.public_bytes(serialization.Encoding.PEM) for c in initial))
    crl = folder / "initial-crl.pem"
    crl.write_bytes(ca.crl([]))
    cluster = None
    if args.store == "postgresql":
        from tests.pg import PgCluster, find_bindir

        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("soak: PostgreSQL is not installed (apt-get install postgresql)")
        cluster = PgCluster.start(bindir)
    try:
        location = cluster.create_database() if cluster else str(folder / "store.sqlite3")
        ldap_port, http_port, ops_port = free_port(), free_port(), free_port()
        config = write_config(folder, location, ldap_port, http_port, args.threads, ops_port)
        soak = Soak(args, folder, ca, config, location, ldap_port, http_port, cluster,
                    ops_port=ops_port)
        r = subprocess.run(certpub("import", str(bundle), str(crl), "--config", str(config)),
                           env=child_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=300, check=False)
        if r.returncode != 0:
            raise SystemExit(f"soak: the initial import failed: {r.stderr.strip()}")
    except BaseException:
        if cluster is not None:
            cluster.stop()
        raise
    for cert in initial:
        truth.certs[cert.serial] = cert
    return soak, truth


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    soak, truth = prepare(args, folder)
    tally = Tally()
    stop_load, stop_feed, stop_watch = threading.Event(), threading.Event(), threading.Event()
    store_errors: list[str] = []
    dropped: list[str] = []
    threads: list[threading.Thread] = []
    try:
        watcher = threading.Thread(target=store_watcher, name="store-watcher",
                                   args=(soak.location, truth, stop_watch, store_errors))
        watcher.start()
        end = now_mono() + 60
        while len(truth.committed) < args.initial and now_mono() < end:
            time.sleep(0.05)
        if len(truth.committed) < args.initial:
            raise SystemExit(f"soak: only {len(truth.committed)} of {args.initial} initial"
                             " certificates visible in the store")
        soak.start_serve()
        soak.start_importd()
        time.sleep(1.0)
        soak.sample_rss()
        rss_start = {k: v[-1] for k, v in soak.rss.items()}
        load = [
            *(threading.Thread(target=ocsp_client, name=f"ocsp-{i}", args=(
                soak.http_port, soak.ca, truth, tally, args.ocsp_rate / 2, False, stop_load,
                100 + i)) for i in range(2)),
            threading.Thread(target=ocsp_client, name="ocsp-nonce", args=(
                soak.http_port, soak.ca, truth, tally, args.nonce_rate, True, stop_load, 200)),
            *(threading.Thread(target=ldap_client, name=f"ldap-{i}", args=(
                soak.ldap_port, truth, tally, args.ldap_rate / 2, stop_load, 300 + i))
              for i in range(2)),
            threading.Thread(target=revocation_watcher, name="watcher", args=(
                soak.http_port, soak.ldap_port, truth, tally, stop_load)),
        ]
        feed = threading.Thread(target=feeder, name="feeder",
                                args=(soak, truth, stop_feed, dropped))
        threads = [*load, feed]
        for t in threads:
            t.start()
        started = now_mono()
        duration = args.seconds if args.seconds else args.minutes * 60
        next_worker = started + args.worker_kill_every
        # Offset by half a worker period: each fault gets a window of its own.
        next_importer = started + args.importer_kill_every + args.worker_kill_every / 2
        # Half-way, between two worker kills, so that the windows do not overlap.
        db_at = (started + min(duration / 2 + args.worker_kill_every / 2,
                               duration - args.db_down - 2 * WINDOW)
                 if soak.cluster is not None else None)
        next_rss = started + 5
        kills = Counter[str]()
        victim = 0
        print(f"soak: {duration:g} s, store {args.store}, {args.workers} workers, "
              f"ports ldap {soak.ldap_port} http {soak.http_port}, folder {folder}",
              file=sys.stderr, flush=True)
        while (t := now_mono()) < started + duration:
            if t >= next_worker:
                next_worker += args.worker_kill_every
                pids = sorted(soak.workers())
                if pids:
                    pid = pids[victim % len(pids)]
                    victim += 1
                    at = now_mono()  # before the kill: requests in flight then are its
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    tally.fault("worker kill", at, now_mono())
                    kills["worker"] += 1
            if t >= next_importer:
                next_importer += args.importer_kill_every
                assert soak.importd is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(soak.importd.pid, signal.SIGKILL)
                soak.importd.wait(10)
                tally.fault("importer kill", at := now_mono(), at)
                kills["importer"] += 1
                soak.start_importd()
            if db_at is not None and t >= db_at:
                db_at = None
                fault = tally.fault("database down", now_mono())
                soak.cluster.stop_server()
                time.sleep(args.db_down)
                soak.cluster.start_server()
                tally.fault_over(fault, now_mono())
                kills["database"] += 1
            if t >= next_rss:
                next_rss += 5
                soak.sample_rss()
            if soak.serve is not None and soak.serve.poll() is not None:
                raise SystemExit(f"soak: certpub serve exited ({soak.serve.returncode})")
            if soak.importd is not None and soak.importd.poll() is not None:
                # It died by itself: restarted as its systemd unit would (Restart=on-failure,
                # RestartSec=2s), and counted.
                kills[f"importer exited by itself ({soak.importd.returncode})"] += 1
                tally.fault("importer exit", at := now_mono(), at)
                time.sleep(2.0)
                soak.start_importd()
            time.sleep(0.05)
        stop_feed.set()
        feed.join(30)
        # Drain: every dropped file imported (the importer is alive), every row seen.
        drain_end = now_mono() + 60
        while now_mono() < drain_end:
            new, rev = truth.pending()
            if not new and not rev and not waiting_files(folder / "spool"):
                break
            time.sleep(0.1)
        time.sleep(GRACE + 0.5)  # the last revocations: answers checked past their grace
        stop_load.set()
        for t_ in load:
            t_.join(30)
        soak.sample_rss()
        rss_end = {k: v[-1] for k, v in soak.rss.items()}
        rss_max = {k: max(v) for k, v in soak.rss.items()}
        stop_watch.set()
        watcher.join(30)
        missing = final_check(soak.location, truth)
        left = waiting_files(folder / "spool")
        rejected = sorted(p.name for p in (folder / "spool" / "rejected").glob("*")
                          if not p.name.endswith(".reason"))
        return summarize(args, duration, truth, tally, kills, dropped, left, rejected, missing,
                         rss_start, rss_end, rss_max, store_errors)
    finally:
        stop_load.set()
        stop_feed.set()
        stop_watch.set()
        for t_ in threads:
            t_.join(30)
        stop_process(soak.importd)
        stop_process(soak.serve)
        if soak.cluster is not None:
            soak.cluster.stop()


def waiting_files(spool: Path) -> list[str]:
    return sorted(e.name for e in spool.iterdir() if e.is_file()
                  and not e.name.startswith(".") and not e.name.endswith((".tmp", ".part")))


def final_check(location: str, truth: Truth) -> list[str]:
    """Rows the store should hold and does not: every certificate, every revocation."""
    from store import open_store

    store = open_store(location, create=False, migrate=False)
    try:
        ca = store.ca_by_name(CA_NAME)
        missing = []
        for serial in sorted(truth.certs):
            row = store.cert(ca.id, serial)
            if row is None:
                missing.append(f"certificate {serial:X} not in the store")
            elif (str(row.status.value) == "revoked") != (serial in truth.dropped_revocations):
                missing.append(f"certificate {serial:X}: status {row.status.value}")
        return missing
    finally:
        store.close()


def summarize(args: argparse.Namespace, duration: float, truth: Truth, tally: Tally,
              kills: Counter[str], dropped: list[str], left: list[str], rejected: list[str],
              missing: list[str], rss_start: dict[str, float], rss_end: dict[str, float],
              rss_max: dict[str, float], store_errors: list[str]) -> dict[str, Any]:
    prop: dict[str, list[float]] = {"drop → commit": [], "commit → OCSP revoked": [],
                                    "commit → LDAP not offered": [], "drop → both": []}
    unanswered = 0
    for serial, committed in truth.revoked.items():
        dropped_at = truth.dropped_revocations[serial]
        prop["drop → commit"].append(committed - dropped_at)
        o, ld = truth.first_answer.get((serial, "ocsp")), truth.first_answer.get((serial, "ldap"))
        if o is not None:
            prop["commit → OCSP revoked"].append(max(o - committed, 0.0))
        if ld is not None:
            prop["commit → LDAP not offered"].append(max(ld - committed, 0.0))
        if o is not None and ld is not None:
            prop["drop → both"].append(max(o, ld) - dropped_at)
        else:
            unanswered += 1
    load1, load5, _ = os.getloadavg()
    return {
        "seconds": duration, "store": args.store, "workers": args.workers,
        "rates": {"ocsp": args.ocsp_rate, "ocsp-nonce": args.nonce_rate, "ldap": args.ldap_rate},
        "served": dict(tally.served),
        "errors": {f"{w} | {p} | {k}": n for (w, p, k), n in sorted(tally.errors.items())},
        "faults": dict(kills),
        "wrong": tally.wrong,
        "propagation": {k: {"n": len(v), "p50": pct(v, 0.5), "p99": pct(v, 0.99),
                            "max": max(v) if v else None} for k, v in prop.items()},
        "revocations": len(truth.dropped_revocations), "revocations_unanswered": unanswered,
        "certificates": len(truth.certs), "files_dropped": len(dropped),
        "files_left": left, "files_rejected": rejected, "missing": missing,
        "rss_mib": {k: {"start": rss_start.get(k), "end": rss_end.get(k), "max": rss_max.get(k)}
                    for k in sorted(set(rss_start) | set(rss_end))},
        "store_watch_errors": store_errors[:5],
        "steady_error_samples": tally.steady_samples,
        "in_flight_at_fault": tally.in_flight,
        "loadavg_end": [round(load1, 2), round(load5, 2)],
    }


def report(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms"

    lines = [f"soak: {r['seconds']:g} s, store {r['store']}, {r['workers']} workers; target "
             f"rates/s ocsp {r['rates']['ocsp']:g}, ocsp-nonce {r['rates']['ocsp-nonce']:g}, "
             f"ldap {r['rates']['ldap']:g}; load average at the end {r['loadavg_end']}",
             "faults: " + ", ".join(f"{k} x{n}" for k, n in sorted(r["faults"].items())),
             "requests answered: " + ", ".join(f"{k} {n}" for k, n in sorted(r["served"].items())),
             "error answers (fault window | protocol | kind: count):"]
    lines += [f"  {k}: {n}" for k, n in r["errors"].items()] or ["  none"]
    lines += [f"  (steady: {e})" for e in r["steady_error_samples"][:5]]
    lines.append(f"of the fault errors, asked before the fault and failed in it: "
                 f"{len(r['in_flight_at_fault'])}")
    lines += [f"  ({e})" for e in r["in_flight_at_fault"][:10]]
    lines.append(f"WRONG ANSWERS: {len(r['wrong'])}")
    lines += [f"  {w}" for w in r["wrong"][:20]]
    lines.append(f"revocations: {r['revocations']} dropped, {r['revocations_unanswered']} "
                 "without both a revoked OCSP answer and an LDAP search without it")
    for name, p in r["propagation"].items():
        lines.append(f"  {name:<26} n={p['n']:<4} p50 {ms(p['p50']):>7}  p99 {ms(p['p99']):>7}"
                     f"  max {ms(p['max']):>7}")
    lines.append("RSS MiB (start → end, max):")
    for name, v in r["rss_mib"].items():
        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f}"
        lines.append(f"  {name:<16} {f(v['start']):>7} → {f(v['end']):>7}  ({f(v['max'])})")
    lines.append(f"files: {r['files_dropped']} dropped, {len(r['files_left'])} left unimported, "
                 f"{len(r['files_rejected'])} rejected; {r['certificates']} certificates, "
                 f"{len(r['missing'])} missing or wrong in the store")
    lines += [f"  {m}" for m in (r["files_left"] + r["files_rejected"] + r["missing"])[:20]]
    return "\n".join(lines)


def failed(r: dict[str, Any]) -> bool:
    return bool(r["wrong"] or r["files_left"] or r["files_rejected"] or r["missing"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=0.0, help="overrides --minutes")
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=4, help="[store] threads (PostgreSQL)")
    p.add_argument("--ocsp-rate", type=float, default=150.0)
    p.add_argument("--nonce-rate", type=float, default=30.0)
    p.add_argument("--ldap-rate", type=float, default=60.0)
    p.add_argument("--worker-kill-every", type=float, default=30.0)
    p.add_argument("--importer-kill-every", type=float, default=120.0)
    p.add_argument("--db-down", type=float, default=5.0, help="seconds the database is stopped")
    p.add_argument("--initial", type=int, default=300)
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.minutes <= 0 and args.seconds <= 0:
        p.error("--minutes or --seconds must be positive")
    if min(args.ocsp_rate, args.nonce_rate, args.ldap_rate) <= 0 or args.initial < 10:
        p.error("rates must be positive and --initial at least 10")
    return args


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.dir.resolve() if args.dir else Path(tempfile.mkdtemp(prefix="certpub-soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM: clean up as Ctrl-C
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(args, folder)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 1 if failed(result) else 0


if __name__ == "__main__":
    sys.exit(main())
