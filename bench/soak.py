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
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509 import ocsp  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

GRACE = 1.0  # seconds after a commit by which every answer must reflect it
WINDOW = 5.0  # seconds after a fault during which errors are counted against it
STORE_POLL = 0.02
CA_NAME = "soak"
SERIAL_BASE = 0x10000


def now_mono() -> float:
    return time.monotonic()


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# --- the CA ---------------------------------------------------------------------------------


def _name(*parts: tuple[Any, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in parts])


@dataclass
class Cert:
    serial: int
    email: str
    der: bytes
    request: bytes  # OCSP request without a nonce (the same bytes each time: cacheable)
    obj: x509.Certificate


class SoakCa:
    """An EC CA with an OCSP signer; issues subscribers and full CRLs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        t = datetime.now(UTC).replace(microsecond=0)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name((NameOID.COUNTRY_NAME, "MO"), (NameOID.ORGANIZATION_NAME, "Soak"),
                          (NameOID.COMMON_NAME, "Soak CA"))
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(1)
                     .not_valid_before(t - timedelta(days=1))
                     .not_valid_after(t + timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(ski, critical=False)
                     .sign(self.key, hashes.SHA256()))
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        signer_key = ec.generate_private_key(ec.SECP256R1())
        signer = (x509.CertificateBuilder()
                  .subject_name(_name((NameOID.COUNTRY_NAME, "MO"),
                                      (NameOID.ORGANIZATION_NAME, "Soak"),
                                      (NameOID.COMMON_NAME, "Soak OCSP")))
                  .issuer_name(self.name).public_key(signer_key.public_key()).serial_number(2)
                  .not_valid_before(t - timedelta(days=1)).not_valid_after(t + timedelta(days=365))
                  .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]),
                                 critical=False)
                  .add_extension(x509.OCSPNoCheck(), critical=False)
                  .sign(self.key, hashes.SHA256()))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ca.pem").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        (folder / "ocsp.pem").write_bytes(signer.public_bytes(serialization.Encoding.PEM))
        fd = os.open(folder / "ocsp.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, signer_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        os.close(fd)
        self.sub_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        self.next_serial = SERIAL_BASE
        self.crl_number = 0
        self.revoked: list[x509.RevokedCertificate] = []

    def issue(self) -> Cert:
        serial = self.next_serial
        self.next_serial += 1
        i = serial - SERIAL_BASE
        t = datetime.now(UTC).replace(microsecond=0)
        email = f"soak{i}@soak.example"
        cert = (x509.CertificateBuilder()
                .subject_name(_name((NameOID.COUNTRY_NAME, "MO"),
                                    (NameOID.ORGANIZATION_NAME, "Soak"),
                                    (NameOID.COMMON_NAME, f"Soak {i}")))
                .issuer_name(self.name).public_key(self.sub_key).serial_number(serial)
                .not_valid_before(t - timedelta(days=1)).not_valid_after(t + timedelta(days=1095))
                .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]),
                               critical=False)
                .add_extension(self.aki, critical=False)
                .sign(self.key, hashes.SHA256()))
        request = (ocsp.OCSPRequestBuilder().add_certificate(cert, self.cert, hashes.SHA1())
                   .build().public_bytes(serialization.Encoding.DER))
        return Cert(serial, email, cert.public_bytes(serialization.Encoding.DER), request, cert)

    def crl(self, revoke: Sequence[int]) -> bytes:
        """The next full CRL (PEM): everything revoked so far plus revoke."""
        t = datetime.now(UTC).replace(microsecond=0)
        for serial in revoke:
            self.revoked.append(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(t)
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
                .build())
        self.crl_number += 1
        crl = x509.CertificateRevocationListBuilder(
            issuer_name=self.name, last_update=t - timedelta(seconds=1),
            next_update=t + timedelta(days=7),
            extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(self.crl_number))],
            revoked_certificates=self.revoked)
        return crl.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def nonce_request(self, cert: Cert) -> tuple[bytes, bytes]:
        nonce = os.urandom(16)
        der = (ocsp.OCSPRequestBuilder().add_certificate(cert.obj, self.cert, hashes.SHA1())
               .add_extension(x509.OCSPNonce(nonce), critical=False).build()
               .public_bytes(serialization.Encoding.DER))
        return der, nonce


# --- ground truth -----------------------------------------------------------------------------


@dataclass
class Truth:
    """What was issued and revoked, and when the store had it (monotonic times)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    certs: dict[int, Cert] = field(default_factory=dict)
    committed: dict[int, float] = field(default_factory=dict)  # serial -> first seen in store
    dropped_revocations: dict[int, float] = field(default_factory=dict)  # serial -> file renamed
    revoked: dict[int, float] = field(default_factory=dict)  # serial -> revocation first seen
    usable: list[int] = field(default_factory=list)  # committed, never revoked nor dropped
    first_answer: dict[tuple[int, str], float] = field(default_factory=dict)

    def pending(self) -> tuple[list[int], list[int]]:
        with self.lock:
            new = [s for s in self.certs if s not in self.committed]
            rev = [s for s in self.dropped_revocations if s not in self.revoked]
        return new, rev

    def pick(self, rng: random.Random, recent: float = 0.3) -> Cert | None:
        """A committed certificate: mostly any, sometimes one revoked in the last 10 s."""
        with self.lock:
            if rng.random() < recent:
                t = now_mono()
                fresh = [s for s, when in self.dropped_revocations.items()
                         if s in self.committed and t - when < 10.0]
                if fresh:
                    return self.certs[rng.choice(fresh)]
            serials = list(self.committed)
            return self.certs[rng.choice(serials)] if serials else None

    def verdict(self, serial: int, asked: float, says_revoked: bool) -> str | None:
        """Why an answer asked at `asked` is wrong, or None (not wrong or not decidable)."""
        with self.lock:
            committed = self.committed.get(serial)
            revoked = self.revoked.get(serial)
            dropped = serial in self.dropped_revocations
        if committed is None or asked < committed + GRACE:
            return None  # not (surely) visible yet
        if says_revoked and not dropped:
            return "revoked, never revoked"
        if not says_revoked and revoked is not None and asked > revoked + GRACE:
            return f"good {asked - revoked:.3f} s after the revocation committed"
        return None

    def saw_revoked(self, serial: int, protocol: str, when: float) -> None:
        with self.lock:
            self.first_answer.setdefault((serial, protocol), when)


@dataclass
class Tally:
    """Counts by protocol, kind and fault window; wrong answers with their details."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    served: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # window, proto, kind
    wrong: list[str] = field(default_factory=list)
    faults: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, kind

    def window(self, t: float) -> str:
        """The fault an error at t is counted against: the latest one begun by t and not
        over for WINDOW seconds; "steady" when none."""
        with self.lock:
            for start, end, kind in reversed(self.faults):
                if start <= t <= end + WINDOW:
                    return kind
        return "steady"

    def fault(self, kind: str, start: float, end: float | None = None) -> int:
        """Record a fault; end None: still going on (see ``fault_over``)."""
        with self.lock:
            self.faults.append((start, float("inf") if end is None else end, kind))
            return len(self.faults) - 1

    def fault_over(self, index: int, end: float) -> None:
        with self.lock:
            start, _, kind = self.faults[index]
            self.faults[index] = (start, end, kind)

    def served_one(self, protocol: str) -> None:
        with self.lock:
            self.served[protocol] += 1

    def error(self, protocol: str, kind: str, t: float) -> None:
        w = self.window(t)
        with self.lock:
            self.errors[(w, protocol, kind)] += 1

    def wrong_answer(self, text: str) -> None:
        with self.lock:
            self.wrong.append(text)
        print(f"WRONG: {text}", file=sys.stderr, flush=True)


# --- clients ----------------------------------------------------------------------------------


class Paced:
    """A loop at a steady rate until stop is set (no catching up after a stall)."""

    def __init__(self, rate: float, stop: threading.Event) -> None:
        self.period, self.stop = 1.0 / rate, stop
        self.next = now_mono()

    def __iter__(self) -> Iterator[None]:
        while not self.stop.is_set():
            t = now_mono()
            if self.next > t:
                self.stop.wait(self.next - t)
                continue
            self.next = max(self.next + self.period, t - self.period)
            yield None


def ocsp_client(port: int, ca: SoakCa, truth: Truth, tally: Tally, rate: float, nonce: bool,
                stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    proto = "ocsp-nonce" if nonce else "ocsp"
    conn: http.client.HTTPConnection | None = None
    for _ in Paced(rate, stop):
        cert = truth.pick(rng)
        if cert is None:
            continue
        body, sent_nonce = ca.nonce_request(cert) if nonce else (cert.request, b"")
        asked = now_mono()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/ocsp", body, {"Content-Type": "application/ocsp-request"})
            resp = conn.getresponse()
            data = resp.read()
            code = resp.status
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
            tally.error(proto, "refused", asked)
            continue
        if code != 200:
            tally.error(proto, f"http {code}", asked)
            continue
        try:
            answer = ocsp.load_der_ocsp_response(data)
        except ValueError:
            tally.wrong_answer(f"{proto} serial {cert.serial:X}: undecodable response")
            continue
        if answer.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            tally.error(proto, _camel(answer.response_status.name), asked)
            continue
        tally.served_one(proto)
        status = answer.certificate_status
        if answer.serial_number != cert.serial:
            tally.wrong_answer(f"{proto}: asked {cert.serial:X}, answered {answer.serial_number:X}")
            continue
        if nonce:
            try:
                echoed = answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            except x509.ExtensionNotFound:
                echoed = b""
            if echoed != sent_nonce:
                tally.wrong_answer(f"{proto} serial {cert.serial:X}: nonce not echoed")
        if status == ocsp.OCSPCertStatus.UNKNOWN:
            if asked > truth.committed[cert.serial] + GRACE:
                tally.wrong_answer(f"{proto} serial {cert.serial:X}: unknown, committed"
                                   f" {asked - truth.committed[cert.serial]:.3f} s before")
            continue
        revoked = status == ocsp.OCSPCertStatus.REVOKED
        if revoked:
            truth.saw_revoked(cert.serial, "ocsp", now_mono())
        why = truth.verdict(cert.serial, asked, says_revoked=revoked)
        if why is not None:
            tally.wrong_answer(f"{proto} serial {cert.serial:X}: {why}")


def _camel(name: str) -> str:
    head, *rest = name.lower().split("_")
    return head + "".join(w.title() for w in rest)


def ldap_client(port: int, truth: Truth, tally: Tally, rate: float, stop: threading.Event,
                seed: int) -> None:
    import ldap3
    from ldap3.core.exceptions import LDAPException

    rng = random.Random(seed)
    conn: Any = None
    for _ in Paced(rate, stop):
        cert = truth.pick(rng)
        if cert is None:
            continue
        asked = now_mono()
        try:
            if conn is None:
                conn = ldap3.Connection(ldap3.Server("127.0.0.1", port=port, get_info=ldap3.NONE,
                                                     connect_timeout=5),
                                        auto_bind=True, receive_timeout=10,
                                        raise_exceptions=False)
            conn.search("c=MO", f"(mail={cert.email})", attributes=["userCertificate;binary"])
            result = conn.result or {}
            code = int(result.get("result", 0))
            entries = list(conn.response or [])
        except (LDAPException, OSError):
            with contextlib.suppress(Exception):
                if conn is not None:
                    conn.unbind()
            conn = None
            tally.error("ldap", "refused", asked)
            continue
        if code != 0:
            tally.error("ldap", str(code), asked)
            if code in (51, 52, 80):
                continue
            with contextlib.suppress(Exception):
                conn.unbind()
            conn = None
            continue
        tally.served_one("ldap")
        values: list[bytes] = []
        for entry in entries:
            if entry.get("type") == "searchResEntry":
                raw = entry.get("raw_attributes", {})
                for name, vals in raw.items():
                    if name.lower().startswith("usercertificate"):
                        values.extend(vals)
        usable = cert.der in values
        if not usable:
            truth.saw_revoked(cert.serial, "ldap", now_mono())
        why = truth.verdict(cert.serial, asked, says_revoked=not usable)
        if why is not None:
            why = why.replace("good", "offered as usable").replace(
                "revoked, never revoked", "not offered, never revoked")
            tally.wrong_answer(f"ldap mail={cert.email} serial {cert.serial:X}: {why}")
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.unbind()


def revocation_watcher(port: int, ldap_port: int, truth: Truth, tally: Tally,
                       stop: threading.Event) -> None:
    """Ask about each fresh revocation every 50 ms until both protocols say so (propagation);
    every answer is also checked."""
    import ldap3

    http_conn: http.client.HTTPConnection | None = None
    ldap_conn: Any = None
    while not stop.wait(0.05):
        with truth.lock:
            todo = [s for s, t in truth.revoked.items()
                    if now_mono() - t < 10.0
                    and ((s, "ocsp") not in truth.first_answer
                         or (s, "ldap") not in truth.first_answer)]
        for serial in todo:
            cert = truth.certs[serial]
            asked = now_mono()
            if (serial, "ocsp") not in truth.first_answer:
                try:
                    if http_conn is None:
                        http_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    http_conn.request("POST", "/ocsp", cert.request,
                                      {"Content-Type": "application/ocsp-request"})
                    resp = http_conn.getresponse()
                    data = resp.read()
                    answer = ocsp.load_der_ocsp_response(data) if resp.status == 200 else None
                except (OSError, http.client.HTTPException, ValueError):
                    if http_conn is not None:
                        http_conn.close()
                    http_conn, answer = None, None
                if (answer is not None
                        and answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL):
                    tally.served_one("ocsp")
                    revoked = answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
                    if revoked:
                        truth.saw_revoked(serial, "ocsp", now_mono())
                    why = truth.verdict(serial, asked, says_revoked=revoked)
                    if why is not None:
                        tally.wrong_answer(f"ocsp (watcher) serial {serial:X}: {why}")
            if (serial, "ldap") not in truth.first_answer:
                try:
                    if ldap_conn is None:
                        ldap_conn = ldap3.Connection(
                            ldap3.Server("127.0.0.1", port=ldap_port, get_info=ldap3.NONE,
                                         connect_timeout=5),
                            auto_bind=True, receive_timeout=5, raise_exceptions=False)
                    ldap_conn.search("c=MO", f"(mail={cert.email})",
                                     attributes=["userCertificate;binary"])
                    ok = int((ldap_conn.result or {}).get("result", 1)) == 0
                    values = [v for e in (ldap_conn.response or [])
                              if e.get("type") == "searchResEntry"
                              for k, vals in e.get("raw_attributes", {}).items()
                              if k.lower().startswith("usercertificate") for v in vals]
                except Exception:  # noqa: BLE001 - a broken connection: open a new one
                    with contextlib.suppress(Exception):
                        if ldap_conn is not None:
                            ldap_conn.unbind()
                    ldap_conn, ok, values = None, False, []
                if ok:
                    tally.served_one("ldap")
                    usable = cert.der in values
                    if not usable:
                        truth.saw_revoked(serial, "ldap", now_mono())
                    why = truth.verdict(serial, asked, says_revoked=not usable)
                    if why is not None:
                        tally.wrong_answer(f"ldap (watcher) serial {serial:X}: {why}")
    if http_conn is not None:
        http_conn.close()
    if ldap_conn is not None:
        with contextlib.suppress(Exception):
            ldap_conn.unbind()


# --- the store, watched from here -------------------------------------------------------------


def store_watcher(location: str, truth: Truth, stop: threading.Event,
                  errors: list[str]) -> None:
    """Poll the store's generation; when it moves, read the rows of pending certificates."""
    from store import open_store

    store: Any = None
    ca_id: int | None = None
    last = -1
    while not stop.wait(STORE_POLL):
        try:
            if store is None:
                store = open_store(location, create=False, migrate=False)
                last = -1
            if ca_id is None:
                ca = store.ca_by_name(CA_NAME)
                if ca is None:
                    continue
                ca_id = ca.id
            generation = int(store.generation())
            if generation == last:
                continue
            seen = now_mono()
            new, rev = truth.pending()
            found_new, found_rev = [], []
            for serial in new:
                if store.cert(ca_id, serial) is not None:
                    found_new.append(serial)
            for serial in rev:
                row = store.cert(ca_id, serial)
                if row is not None and str(row.status.value) == "revoked":
                    found_rev.append(serial)
            with truth.lock:
                for serial in found_new:
                    truth.committed.setdefault(serial, seen)
                    if serial not in truth.dropped_revocations:
                        truth.usable.append(serial)
                for serial in found_rev:
                    truth.revoked.setdefault(serial, seen)
            last = generation
        except Exception as exc:  # noqa: BLE001 - the database may be down: reopen later
            if len(errors) < 20:
                errors.append(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                if store is not None:
                    store.close()
            store = None
            stop.wait(0.2)
    if store is not None:
        store.close()


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

    def start_serve(self) -> None:
        log = open(self.folder / "serve.log", "ab")
        self.serve = subprocess.Popen(
            certpub("serve", "--workers", str(self.args.workers), "--config", str(self.config)),
            stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
            start_new_session=True)
        log.close()
        wait_port(self.ldap_port, self.serve)
        wait_port(self.http_port, self.serve)
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
                 threads: int) -> Path:
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
        location = cluster.create_database()
    else:
        location = str(folder / "store.sqlite3")
    ldap_port, http_port = free_port(), free_port()
    config = write_config(folder, location, ldap_port, http_port, args.threads)
    soak = Soak(args, folder, ca, config, location, ldap_port, http_port, cluster)
    r = subprocess.run(certpub("import", str(bundle), str(crl), "--config", str(config)),
                       env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    if r.returncode != 0:
        raise SystemExit(f"soak: the initial import failed: {r.stderr.strip()}")
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
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    tally.fault("worker kill", at := now_mono(), at)
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
