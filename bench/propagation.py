"""Propagation (issue 7, item 4): a CRL dropped into the spool → OCSP and LDAP say "revoked".

Usage: python bench/propagation.py DATA [--runs 10] [--poll-ms 5] [--timeout 15]
                                        [--workers N] [--pythonpath TREE] [--json OUT]

DATA is a ``bench/gen_certs.py`` directory, already imported. Started here, on free 127.0.0.1
ports chosen at run time: ``certpub serve`` (a copy of DATA/certpub.toml; default workers,
``[log] level = "info"`` to a file, as in production) and ``certpub importd`` (the same config
without ``[[import.openssl]]``, so only the spool is watched; spool DATA/spool).

Each run picks a certificate not revoked yet, then:
1. asks OCSP (POST, no nonce, one keep-alive connection) twice and checks the two answers
   are byte-identical and "good" — the response is cached before the drop, so the run
   measures the cache invalidation, not a first lookup; and asks LDAP (one connection, a base
   search at the certificate's entry ``certpubSerialNumber=<HEX>+certpubCA=<ca>,<subject DN>``
   for ``certpubStatus``) until it says ``valid`` (certpub reads certificate entries from the
   store per search; its entry cache holds subscriber entries);
2. writes a new CRL, signed by the bench CA with the next CRL number (above any number used
   before: a state file DATA/propagation.json keeps the serials revoked by earlier runs, all
   of which stay on every new CRL, with the CRL of gen_certs.py), revoking the CRL's previous
   entries plus this certificate, to ``spool/.propagation-<k>.tmp``, and renames it to
   ``propagation-<k>.crl`` (the drop protocol) — t = 0 at the rename;
3. polls OCSP and LDAP every ``--poll-ms`` (two threads, one per protocol, each on its own
   connection) until each answers revoked: the time of the first answer that says so, measured
   at its arrival, is that protocol's propagation time.
importd's log line for the file (``file ... outcome=accepted``, written after the commit)
gives the import's share. DATA/propagation-importd.log keeps importd's log of the last run.
Prints per-run times, and median / p90 / max over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from ldap_bench import Certpub, _tlv, message, search_op, wait_port
from memory import HttpClient, ocsp_request


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class LdapClient:
    """One LDAP connection sending pre-encoded base searches, reading the certpubStatus value."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.msgid = 0x01000000
        self.buf = b""

    def status(self, dn: str) -> str:
        self.msgid += 1
        op = search_op(dn, 0, _tlv(0x87, b"objectClass"), ["certpubStatus"])
        self.sock.sendall(message(self.msgid, op))
        found = "absent"
        while True:
            msg = self._message()
            # LDAPMessage: 30 L  02 04 <id>  <op tag> ...
            tag = msg[msg.index(b"\x02\x04") + 6]
            if tag == 0x64:  # SearchResultEntry: the value follows the attribute name
                m = re.search(rb"certpubStatus1[\x00-\x7f]\x04.(\w+)", msg, re.IGNORECASE)
                found = m.group(1).decode() if m else "no status"
            elif tag == 0x65:
                return found

    def _message(self) -> bytes:
        while True:
            if len(self.buf) >= 2:
                first = self.buf[1]
                if first < 0x80:
                    hl, total = 2, 2 + first
                else:
                    n = first & 0x7F
                    hl = 2 + n
                    total = (
                        hl + int.from_bytes(self.buf[2:hl], "big")
                        if len(self.buf) >= hl
                        else 1 << 60
                    )
                if len(self.buf) >= total:
                    msg, self.buf = self.buf[:total], self.buf[total:]
                    return msg
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("LDAP server closed the connection")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def ms(v: float | None) -> str:
    return f"{v * 1000:7.1f}" if v is not None else "  >timeout"


def ask_ocsp(http: HttpClient, body: bytes) -> str:
    return ocsp_status(http.post(body)[1])


def ocsp_status(der: bytes) -> str:
    resp = ocsp.load_der_ocsp_response(der)
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return resp.response_status.name.lower()
    return resp.certificate_status.name.lower()  # good | revoked | unknown


class CrlMaker:
    """New full CRLs of the bench CA: the CRL of gen_certs.py plus the serials revoked here."""

    def __init__(self, data: Path) -> None:
        self.data = data
        key = serialization.load_pem_private_key((data / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
        self.key = key
        self.ca = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
        base = x509.load_pem_x509_crl((data / "crl.pem").read_bytes())
        self.entries = list(base)  # RevokedCertificate objects, reused as they are
        self.base_serials = {r.serial_number for r in base}
        self.state_path = data / "propagation.json"
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.number = max(int(state.get("crl_number", 1)), 1)
        self.revoked: dict[int, str] = {int(k): v for k, v in state.get("revoked", {}).items()}
        for serial, when in self.revoked.items():
            self.entries.append(self._entry(serial, datetime.fromisoformat(when)))

    @staticmethod
    def _entry(serial: int, when: datetime) -> x509.RevokedCertificate:
        return (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(when)
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build()
        )

    def is_revoked(self, serial: int) -> bool:
        return serial in self.base_serials or serial in self.revoked

    def revoke(self, serial: int) -> bytes:
        """The DER of the next CRL, with serial added; the state is saved first."""
        now = datetime.now(UTC).replace(microsecond=0)
        self.number += 1
        self.revoked[serial] = now.isoformat()
        self.entries.append(self._entry(serial, now))
        self.state_path.write_text(
            json.dumps(
                {"crl_number": self.number, "revoked": {str(k): v for k, v in self.revoked.items()}}
            )
        )
        builder = x509.CertificateRevocationListBuilder(
            issuer_name=self.ca.subject,
            last_update=now - timedelta(seconds=1),
            next_update=now + timedelta(days=7),
            extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(self.number))],
            revoked_certificates=self.entries,
        )  # one list: add_revoked_certificate copies it
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def importd_config(cp: Certpub, out: Path, log: Path) -> Path:
    """The server's config copy without [[import.openssl]] tables, logging to its own file."""
    lines, skip = [], False
    for line in cp.config.read_text().splitlines():
        if re.match(r"\s*\[", line):
            skip = line.strip() == "[[import.openssl]]"
        if line.strip().startswith("file =") and "certpub.log" in line:
            line = f'file = "{log}"'
        if not skip:
            lines.append(line)
    out.write_text("\n".join(lines) + "\n")
    return out


def set_log_level(config: Path, level: str) -> None:
    text = re.sub(r'(?m)^level = "\w+"', f'level = "{level}"', config.read_text())
    config.write_text(text)


class Poller(threading.Thread):
    """Asks one protocol every interval until the answer is "revoked"."""

    def __init__(self, ask: Callable[[], str], interval: float, deadline: float) -> None:
        super().__init__(daemon=True)
        self.ask = ask
        self.interval = interval
        self.deadline = deadline
        self.t0 = 0.0
        self.started = threading.Event()
        self.go = threading.Event()
        self.took: float | None = None
        self.polls = 0
        self.error: str | None = None

    def run(self) -> None:
        self.go.wait()
        try:
            while time.monotonic() < self.deadline:
                t = time.monotonic()
                answer = self.ask()
                self.polls += 1
                if answer == "revoked":
                    self.took = time.monotonic() - self.t0
                    return
                time.sleep(max(0.0, self.interval - (time.monotonic() - t)))
        except Exception as exc:  # noqa: BLE001 - reported with the run
            self.error = repr(exc)


def importd_commit_times(log: Path) -> dict[str, datetime]:
    """file name → time of the importer's 'file ... outcome=accepted' line."""
    out: dict[str, datetime] = {}
    if not log.exists():
        return out
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(
            r'time=(\S+).*file (?:name=)?"?(propagation-\d+\.crl)"? outcome=accepted', line
        ) or re.search(r'"time": ?"([^"]+)".*(propagation-\d+\.crl)', line)
        if m:
            try:
                out[m.group(2)] = datetime.fromisoformat(m.group(1))
            except ValueError:
                pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--poll-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds per run at most")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between runs")
    ap.add_argument("--workers", type=int, help="certpub serve --workers")
    ap.add_argument("--pythonpath", help="run certpub from this source tree")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    data = args.data.resolve()
    spool = data / "spool"
    spool.mkdir(exist_ok=True)
    with open(data / "index.txt") as index:
        users = sum(1 for _ in index)
    crls = CrlMaker(data)
    rng = random.Random(args.seed)
    extra = [] if args.workers is None else ["--workers", str(args.workers)]
    cp = Certpub(data / "certpub.toml", "info", extra, args.pythonpath)
    set_log_level(cp.config, "info")  # for importd, whose log line times the commit
    imp: subprocess.Popen[bytes] | None = None
    results: list[dict[str, Any]] = []
    try:
        wait_port(cp.http_port, cp.proc)
        ilog = cp.dir / "importd.log"
        icfg = importd_config(cp, cp.dir / "importd.toml", ilog)
        if args.pythonpath:
            icmd = [sys.executable, "-m", "server.cli", "importd", "--config", str(icfg)]
            env = dict(os.environ, PYTHONPATH=args.pythonpath)
        else:
            icmd = [str(Path(sys.executable).parent / "certpub"), "importd", "--config", str(icfg)]
            env = None
        with open(cp.dir / "importd.out", "wb") as out:
            imp = subprocess.Popen(icmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "import daemon ready" not in (
            ilog.read_text(errors="replace") if ilog.exists() else ""
        ):
            if imp.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"importd did not start: {(cp.dir / 'importd.out').read_text()}")
            time.sleep(0.1)
        time.sleep(0.5)
        poll_cpu = poll_wall = 0.0
        wall0s: dict[int, datetime] = {}
        http = HttpClient(cp.http_port)
        ldap = LdapClient(cp.port)
        print(
            f"{users} certificates; certpub serve pid {cp.pid}, importd pid {imp.pid};"
            f" polling every {args.poll_ms:g} ms",
            flush=True,
        )
        for k in range(args.runs):
            while True:
                i = rng.randrange(users)
                serial = 0x1000 + i
                if not crls.is_revoked(serial):
                    break
            dn = f"certpubSerialNumber={serial:X}+certpubCA=bench,cn=User {i},ou=Bench,o=Bench,c=MO"
            body = ocsp_request(crls.ca, serial)
            before = [http.post(body)[1] for _ in range(2)]
            cached = before[0] == before[1]
            pre_ocsp = ocsp_status(before[1])
            pre_ldap = [ldap.status(dn) for _ in range(2)][-1]
            if pre_ocsp != "good" or pre_ldap != "valid":
                print(
                    f"run {k + 1}: serial {serial:X} is {pre_ocsp}/{pre_ldap} before the drop;"
                    " skipped",
                    flush=True,
                )
                continue
            der = crls.revoke(serial)
            name = f"propagation-{crls.number}.crl"
            tmp = spool / f".propagation-{crls.number}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(der)
                fh.flush()
                os.fsync(fh.fileno())
            end = time.monotonic() + args.timeout
            pollers = {
                "ocsp": Poller(partial(ask_ocsp, http, body), args.poll_ms / 1000, end),
                "ldap": Poller(partial(ldap.status, dn), args.poll_ms / 1000, end),
            }
            for p in pollers.values():
                p.start()
            c0 = os.times()
            wall0 = datetime.now(UTC)
            t0 = time.monotonic()
            os.replace(tmp, spool / name)
            for p in pollers.values():
                p.t0 = t0
                p.go.set()
            for p in pollers.values():
                p.join(args.timeout + 5)
            c1 = os.times()
            poll_cpu += c1.user + c1.system - c0.user - c0.system
            poll_wall += c1.elapsed - c0.elapsed
            r: dict[str, Any] = {
                "run": k + 1,
                "serial": f"{serial:X}",
                "crl_number": crls.number,
                "crl_bytes": len(der),
                "crl_entries": len(crls.entries),
                "cached_before": cached,
                "ocsp_s": pollers["ocsp"].took,
                "ldap_s": pollers["ldap"].took,
                "ocsp_polls": pollers["ocsp"].polls,
                "ldap_polls": pollers["ldap"].polls,
                "errors": [p.error for p in pollers.values() if p.error],
                "wall0": wall0.isoformat(),
            }
            wall0s[k + 1] = wall0
            results.append(r)
            print(
                f"run {k + 1:3}: serial {serial:X} CRL #{crls.number} ({len(crls.entries)} entries,"
                f" {len(der)} B) cached before: {cached}  OCSP {ms(r['ocsp_s'])} ms"
                f"  LDAP {ms(r['ldap_s'])} ms  ({r['ocsp_polls']}/{r['ldap_polls']} polls)"
                + (f"  errors {r['errors']}" if r["errors"] else ""),
                flush=True,
            )
            time.sleep(args.pause)
        commits = importd_commit_times(ilog)
        for r in results:
            c = commits.get(f"propagation-{r['crl_number']}.crl")
            r["import_logged_s"] = (c - wall0s[r["run"]]).total_seconds() if c else None
        http.close()
        ldap.close()
    finally:
        if imp is not None:
            imp.terminate()
            try:
                imp.wait(30)
            except subprocess.TimeoutExpired:
                imp.kill()
                imp.wait()
        keep = cp.dir / "importd.log"
        if keep.exists():
            shutil.copy(keep, data / "propagation-importd.log")
        cp.close()
    ok = [r for r in results if r["ocsp_s"] is not None and r["ldap_s"] is not None]
    print(
        f"\n{users} certificates, {len(results)} runs ({len(ok)} complete), poll every"
        f" {args.poll_ms:g} ms; load generator (this process, both pollers) CPU while polling:"
        f" {poll_cpu:.2f} s over {poll_wall:.1f} s = {100 * poll_cpu / max(poll_wall, 1e-9):.0f}"
        f" % of one core"
    )
    for key, label in (
        ("ocsp_s", "OCSP revoked"),
        ("ldap_s", "LDAP certpubStatus=revoked"),
        ("import_logged_s", "importer logged the file (log time, ms resolution)"),
    ):
        vals = [r[key] for r in results if r.get(key) is not None]
        if vals:
            print(
                f"{label:52}: median {1000 * statistics.median(vals):7.1f} ms, p90"
                f" {1000 * pct(vals, 0.9):7.1f} ms, max {1000 * max(vals):7.1f} ms"
                f" (n={len(vals)})"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"certificates": users, "poll_ms": args.poll_ms, "runs": results}, indent=1)
        )


if __name__ == "__main__":
    main()
