"""The soak's parts that run inside its process: the CA, the ground truth, the clients.

Strategy: ``SoakCa`` issues certificates and full CRLs; ``Truth`` holds what was issued and
revoked and when the store had it, and judges each answer (``Truth.verdict``); ``Tally``
counts answers and errors by fault window. The clients (``ocsp_client``, ``ldap_client``,
``revocation_watcher``) and ``store_watcher`` are thread bodies started by ``bench/soak.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GRACE = 1.0  # seconds after a commit by which every answer must reflect it
WINDOW = 5.0  # seconds after a fault during which errors are counted against it
IN_FLIGHT = 1.0  # a request asked this long before a fault and failing in it is the fault's
STORE_POLL = 0.02
CA_NAME = "soak"
SERIAL_BASE = 0x10000


def now_mono() -> float:
    return time.monotonic()


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
    steady_samples: list[str] = field(default_factory=list)
    # errors of requests asked before a fault began and failed after it (in flight at a
    # worker kill): counted against the fault; the old rule (asked time only) called them steady
    in_flight: list[str] = field(default_factory=list)

    def window(self, t: float, until: float | None = None) -> str:
        """The fault an error of a request asked at t and failed at until (default t) is
        counted against: the latest one whose span, from its start to WINDOW seconds after
        its end, overlaps [t, until]; "steady" when none. A request in flight when a worker
        is killed was asked before the kill and fails after it: it is the kill's, when it was
        asked at most IN_FLIGHT seconds before (one that hung longer is not explained)."""
        until = t if until is None else until
        with self.lock:
            for start, end, kind in reversed(self.faults):
                if start <= until and start - IN_FLIGHT <= t <= end + WINDOW:
                    return kind
        return "steady"

    def _nearest(self, t: float) -> str:
        """Where t falls relative to the last fault begun by t (for unexplained errors)."""
        with self.lock:
            before = [(start, kind) for start, _, kind in self.faults if start <= t]
        if not before:
            return "before any fault"
        start, kind = before[-1]
        return f"{t - start:.3f} s after a {kind}"

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

    def error(self, protocol: str, kind: str, t: float, detail: str = "") -> None:
        """An error answer to a request asked at t (monotonic), seen now."""
        failed = now_mono()
        w = self.window(t, failed)
        if w != "steady" and self.window(t) == "steady":
            with self.lock:
                self.in_flight.append(f"{protocol} {kind}: asked {failed - t:.3f} s before it"
                                      f" failed, in flight at a {w}: {detail}")
        with self.lock:
            self.errors[(w, protocol, kind)] += 1
        if w == "steady" and len(self.steady_samples) < 20:  # errors no fault explains
            where = f"asked {self._nearest(t)}, failed {failed - t:.3f} s later"
            with self.lock:
                self.steady_samples.append(f"{protocol} {kind} ({where}): {detail}")

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
        except (OSError, http.client.HTTPException) as exc:
            if conn is not None:
                conn.close()
            conn = None
            tally.error(proto, "refused", asked, f"{type(exc).__name__}: {exc}")
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
        except (LDAPException, OSError) as exc:
            with contextlib.suppress(Exception):
                if conn is not None:
                    conn.unbind()
            conn = None
            tally.error("ldap", "refused", asked, f"{type(exc).__name__}: {exc}")
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
