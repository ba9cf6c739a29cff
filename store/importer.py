"""The importer: certificates, CRLs and OpenSSL databases into the store, verified, in batches.

Strategy: a batch of files is read and classified by content (PEM blocks, or DER sniffed from
its first tags: certificate, CRL or PKCS#7), every object is verified against the configured
CAs — the trust anchors — by a ``Verifier`` (in spawned worker processes when the batch is
large: parsing and signature checks are the cost; the next batch is verified while the current
one is written), and only then is the store written, in one transaction per batch: CA
updates, certificates, then CRLs in CRL-number order. A file is taken whole or not at all: one object that fails
(unparsable, not signed by a configured CA, a serial that clashes with a stored certificate)
rejects the file with a reason in plain words. Each accepted file's SHA-256 is recorded in the
same transaction, so a file seen again is recognised and changes nothing; moving files away
is the caller's job, after the commit (``store.spool``).

``import_paths`` (``certpub import PATH...``) never moves the user's files and reports
rejected ones by name and reason. ``import_openssl`` reads the configured OpenSSL databases;
``certpub import`` runs it when no PATH is given, or with ``--openssl``.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TextIO

from asn1crypto import cms
from asn1crypto import core as asn1core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from twisted.logger import Logger

from server.config import Config
from server.configtools import ConfigError
from store import open_store
from store.certparse import ParseError, cert_input, crl_input
from store.model import BatchResult, CaId, CertInput, CrlInput
from store.openssl_index import IndexTracker, parse_index, sync_database
from store.sqlbase import SqlStore

log = Logger()

MAX_FILE_BYTES = 256 * 1024 * 1024
CHUNK = 64  # objects per worker task: large enough to amortise pickling, small for balance
POOL_THRESHOLD = 256  # below this many objects a batch is verified in-process


# --- reading files: what is in them, decided by content ---------------------------------


class FileRejected(ValueError):
    """A file, or one object in it, that is not imported; str() says why in plain words."""


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 #]+)-----(.*?)-----END \1-----", re.DOTALL)
_PEM_KINDS = {
    b"CERTIFICATE": "cert", b"X509 CERTIFICATE": "cert", b"TRUSTED CERTIFICATE": "cert",
    b"X509 CRL": "crl", b"CRL": "crl",
    b"PKCS7": "p7", b"PKCS #7 SIGNED DATA": "p7", b"CMS": "p7",
}
_NOT_RECOGNISED = "not a certificate, CRL or PKCS#7 bundle (PEM or DER)"


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the BER element at pos."""
    if pos + 2 > len(data):
        raise FileRejected(_NOT_RECOGNISED)
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        end = pos + first
    elif first == 0x80:
        return tag, pos, len(data)  # BER indefinite length (PKCS#7 from some tools)
    else:
        n = first & 0x7F
        if n > 4 or pos + n > len(data):
            raise FileRejected(_NOT_RECOGNISED)
        end = pos + n + int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if end > len(data):
        raise FileRejected("truncated: a DER length runs past the end of the data")
    return tag, pos, end


def _sniff(der: bytes) -> str:
    """"cert", "crl" or "p7" from the first tags (RFC 5280 §4.1, §5.1; RFC 5652 §3)."""
    tag, start, _ = _tlv(der, 0)
    if tag != 0x30:
        raise FileRejected(_NOT_RECOGNISED)
    tag, pos, inner_end = _tlv(der, start)
    if tag == 0x06:
        return "p7"  # ContentInfo starts with its contentType OID
    if tag != 0x30:
        raise FileRejected(_NOT_RECOGNISED)
    tags: list[int] = []
    while pos < inner_end and len(tags) < 4:
        t, _, pos = _tlv(der, pos)
        tags.append(t)
    if tags[:1] == [0xA0]:
        return "cert"  # [0] version: only a TBSCertificate has it
    # An optional INTEGER (serial or CRL version), signature AlgorithmIdentifier, issuer
    # Name; then Validity (SEQUENCE) in a certificate, thisUpdate (a Time) in a CRL.
    i = 3 if tags[:1] == [0x02] else 2
    if len(tags) > i and tags[i] in (0x17, 0x18):
        return "crl"
    if len(tags) > i and tags[i] == 0x30:
        return "cert"
    raise FileRejected(_NOT_RECOGNISED)


def _pkcs7(der: bytes, where: str) -> list[tuple[str, bytes]]:
    """Certificates and CRLs of a PKCS#7/CMS SignedData bundle (RFC 5652 §5.1)."""
    out: list[tuple[str, bytes]] = []
    try:
        info = cms.ContentInfo.load(der)
        ctype = info["content_type"].native
        if ctype != "signed_data":
            raise FileRejected(f"{where} is a PKCS#7 {ctype} message, not a certificate bundle")
        signed = info["content"]
        for choice in [] if isinstance(signed["certificates"], asn1core.Void) \
                else signed["certificates"]:
            if choice.name != "certificate":
                raise FileRejected(f"{where} holds a {choice.name}, not an X.509 certificate")
            out.append(("cert", choice.chosen.dump()))
        for choice in [] if isinstance(signed["crls"], asn1core.Void) else signed["crls"]:
            if choice.name != "crl":
                raise FileRejected(f"{where} holds revocation information other than a CRL")
            out.append(("crl", choice.chosen.dump()))
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        if isinstance(exc, FileRejected):
            raise
        raise FileRejected(f"{where} is not a valid PKCS#7 bundle ({exc})") from exc
    if not out:
        raise FileRejected(f"{where} is a PKCS#7 bundle without certificates or CRLs")
    return out


def _der_objects(data: bytes, kind: str | None, where: str) -> list[tuple[str, bytes]]:
    """The DER objects one after another in data (``cat a.der b.der`` works too)."""
    out: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 16 and not data[pos:].strip():
            break  # a trailing newline after DER
        if data[pos] != 0x30:  # every object we take is a SEQUENCE
            raise FileRejected(_NOT_RECOGNISED)
        _, _, end = _tlv(data, pos)
        obj = data[pos:end]
        k = kind or _sniff(obj)
        if k == "p7":
            out += _pkcs7(obj, where)
        else:
            out.append((k, obj))
        pos = end
    return out


def extract(data: bytes) -> list[tuple[str, bytes]]:
    """("cert" | "crl", DER) of every object in a file, recognised by content, not name."""
    if not data.strip():
        raise FileRejected("the file is empty")
    if b"-----BEGIN " not in data:
        return _der_objects(data, None, "the file")
    out: list[tuple[str, bytes]] = []
    blocks = 0
    for blocks, m in enumerate(_PEM_BLOCK.finditer(data), start=1):
        label = m.group(1)
        kind = _PEM_KINDS.get(label)
        where = f"PEM block {blocks}"
        if kind is None:
            raise FileRejected(f"{where} is a {label.decode()}, which certpub does not import")
        try:
            der = base64.b64decode(m.group(2))
        except binascii.Error as exc:
            raise FileRejected(f"{where} ({label.decode()}) is not valid base64") from exc
        try:
            # "TRUSTED CERTIFICATE" carries OpenSSL trust settings after the certificate.
            out += _der_objects(der[:_tlv(der, 0)[2]] if kind == "cert" else der,
                                None if kind == "p7" else kind, where)
        except FileRejected as exc:
            raise FileRejected(f"{where} ({label.decode()}): {exc}") from exc
    if blocks < data.count(b"-----BEGIN "):
        raise FileRejected(f"PEM block {blocks + 1} has no END line (the file is truncated?)")
    return out


# --- trust: every object must be signed by a configured CA -------------------------------


@dataclass(frozen=True)
class Anchor:
    """A configured CA: the importer's trust anchor."""

    name: str
    ca_id: CaId
    der: bytes


@dataclass(frozen=True)
class Verified:
    """One object after verification: what to write, or why not (``error``)."""

    kind: str  # cert | ca | crl | bad
    cert: CertInput | None = None  # for "ca": the CA certificate as its issuer's certificate
    crl: CrlInput | None = None
    ca_name: str | None = None
    ca_der: bytes | None = None
    error: str | None = None


def _describe(cert: x509.Certificate) -> str:
    try:
        subject = cert.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        subject = "(unreadable subject)"
    return f"certificate {subject} serial 0x{cert.serial_number:X}"


class Verifier:
    """Checks certificates and CRLs against the anchors (pure: runs in worker processes)."""

    def __init__(self, anchors: Sequence[Anchor]) -> None:
        self.anchors = list(anchors)
        self._certs = [x509.load_der_x509_certificate(a.der) for a in self.anchors]
        self._keys = [c.public_key() for c in self._certs]
        self._names = ", ".join(a.name for a in self.anchors)

    def issuer_of(self, cert: x509.Certificate) -> Anchor | None:
        """The configured CA whose key verifies cert's signature (issuer name must match)."""
        for anchor, ca in zip(self.anchors, self._certs, strict=True):
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return anchor
        return None

    def check(self, kind: str, der: bytes) -> Verified:
        """Verify one object; never raises (a poison file must not stall the spool)."""
        try:
            return self._cert(der) if kind == "cert" else self._crl(der)
        except Exception as exc:  # noqa: BLE001 - reported as the file's rejection reason
            return Verified("bad", error=f"an object that could not be verified ({exc!r})")

    def _cert(self, der: bytes) -> Verified:
        try:
            cert = x509.load_der_x509_certificate(der)
            key = cert.public_key()
        except ValueError as exc:
            return Verified("bad", error=f"a certificate that cannot be parsed ({exc})")
        except Exception as exc:  # noqa: BLE001 - an unsupported key type: this file's problem
            return Verified("bad", error=f"a certificate with an unusable key ({exc})")
        issuer = self.issuer_of(cert)
        for anchor, ca, ca_key in zip(self.anchors, self._certs, self._keys, strict=True):
            if key == ca_key and cert.subject == ca.subject:
                # The configured CA itself, perhaps re-issued: it updates that CA's record.
                if issuer is None and not _self_signed(cert):
                    return Verified("bad", error=f"{_describe(cert)} matches CA {anchor.name} but"
                                    f" is signed neither by itself nor by a configured CA"
                                    f" ({self._names})")
                as_issued: CertInput | None = None
                if issuer is not None and issuer.name != anchor.name:
                    inp = self._input(der, issuer)
                    if isinstance(inp, Verified):
                        return inp
                    as_issued = inp
                return Verified("ca", cert=as_issued, ca_name=anchor.name, ca_der=der)
        if issuer is None:
            return Verified("bad", error=f"{_describe(cert)} is not signed by any configured CA"
                            f" ({self._names})")
        inp = self._input(der, issuer)
        return inp if isinstance(inp, Verified) else Verified("cert", cert=inp)

    @staticmethod
    def _input(der: bytes, issuer: Anchor) -> CertInput | Verified:
        try:
            return cert_input(der, issuer.ca_id)
        except ParseError as exc:
            return Verified("bad", error=f"a certificate of {issuer.name} that cannot be read"
                            f" ({exc})")

    def _crl(self, der: bytes) -> Verified:
        try:
            crl = x509.load_der_x509_crl(der)
            issuer = crl.issuer
        except ValueError as exc:
            return Verified("bad", error=f"a CRL that cannot be parsed ({exc})")
        for anchor, ca, ca_key in zip(self.anchors, self._certs, self._keys, strict=True):
            try:
                valid = issuer == ca.subject and crl.is_signature_valid(ca_key)
            except (ValueError, TypeError):
                valid = False
            if valid:
                try:
                    return Verified("crl", crl=crl_input(der, anchor.ca_id))
                except ParseError as exc:
                    return Verified("bad", error=f"a CRL of {anchor.name} that cannot be read"
                                    f" ({exc})")
        try:
            who = issuer.rfc4514_string()
        except ValueError:
            who = "(unreadable issuer)"
        return Verified("bad", error=f"CRL issued by {who or '(empty name)'} is not signed by any"
                        f" configured CA ({self._names})")


def _self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


_WORKER: Verifier | None = None


def init_worker(anchors: list[Anchor], parent: int) -> None:
    """Worker process set-up: the anchors, and die with the importer (even on kill -9)."""
    global _WORKER
    _WORKER = Verifier(anchors)
    # systemd and terminals signal the whole group; the importer decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)  # the importer died before prctl took effect


def verify_chunk(items: Sequence[tuple[str, bytes]]) -> list[Verified]:
    """Worker entry point: verify a slice of objects."""
    assert _WORKER is not None
    return [_WORKER.check(kind, der) for kind, der in items]


@dataclass
class FileOutcome:
    """What became of one input file."""

    path: Path
    name: str
    outcome: str = "accepted"  # accepted | unchanged | rejected | skipped (could not read)
    reason: str = ""
    sha256: bytes = b""
    certs: int = 0
    crls: int = 0
    crl_cas: set[str] = field(default_factory=set)  # CAs whose current full CRL this file holds
    objects: list[Verified] = field(default_factory=list, repr=False)


@dataclass
class ImportSummary:
    """Totals of one import run; ``line()`` is the summary printed at the end."""

    files: int = 0
    accepted: int = 0
    unchanged: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    certs_new: int = 0
    certs_updated: int = 0
    certs_unchanged: int = 0
    revocations: int = 0
    releases: int = 0
    crls: int = 0
    cas: int = 0
    index_lines: int = 0
    malformed_lines: int = 0
    generation: int = 0
    elapsed: float = 0.0

    @property
    def certs(self) -> int:
        return self.certs_new + self.certs_updated + self.certs_unchanged

    @property
    def rate(self) -> float:
        return self.certs / self.elapsed if self.elapsed > 0 else 0.0

    def add(self, result: BatchResult) -> None:
        """Count what a committed batch changed."""
        self.certs_new += result.certs_new
        self.certs_updated += result.certs_updated
        self.certs_unchanged += result.certs_unchanged
        self.revocations += result.revoked
        self.releases += result.released
        self.crls += result.crls
        self.cas += result.cas
        if result.generation is not None:
            self.generation = int(result.generation)

    def line(self) -> str:
        """One line: files, certificates, revocations, CRLs, generation, time and rate."""
        parts = [
            (f"files {self.files} (accepted {self.accepted}, rejected {len(self.rejected)},"
             f" unchanged {self.unchanged})"),
            (f"certificates {self.certs_new} new, {self.certs_updated} updated,"
             f" {self.certs_unchanged} unchanged"),
            (f"revocations {self.revocations}, releases {self.releases}, CRLs {self.crls},"
             f" CA updates {self.cas}"),
        ]
        if self.index_lines or self.malformed_lines:
            parts.append(f"index lines {self.index_lines} ({self.malformed_lines} malformed)")
        parts.append(f"generation {self.generation}")
        parts.append(f"{self.elapsed:.1f} s, {self.rate:.0f} certificates/s")
        return "import: " + "; ".join(parts)


class Progress:
    """Progress on a terminal (one rewritten line) or every few seconds in a log-like stream."""

    def __init__(self, stream: TextIO, total: int, unit: str = "files") -> None:
        self.stream = stream
        self.total = total
        self.unit = unit
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = 0.25 if self.tty else 10.0
        self.start = self._last = time.monotonic()
        self.done = 0
        self.certs = 0

    def tick(self, done: int = 0, certs: int = 0, *, force: bool = False) -> None:
        """Count progress; print when due."""
        self.done += done
        self.certs += certs
        t = time.monotonic()
        if not force and t - self._last < self.interval:
            return
        self._last = t
        rate = self.certs / (t - self.start) if t > self.start else 0.0
        text = (f"{self.done}/{self.total} {self.unit}, {self.certs} certificates,"
                f" {rate:.0f} certificates/s")
        try:
            self.stream.write(("\r" + text + "\x1b[K") if self.tty else text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not stop an import

    def finish(self) -> None:
        self.tick(force=True)
        if self.tty:
            try:
                self.stream.write("\n")
            except (OSError, ValueError):
                pass


def read_ca_certificate(path: Path) -> bytes:
    """DER of the first certificate in a configured CA file (PEM or DER)."""
    objs = extract(path.read_bytes())
    for kind, der in objs:
        if kind == "cert":
            return der
    raise FileRejected(f"{path} holds no certificate")


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass
class _Verification:
    """Objects being verified: futures of worker results, or nothing yet (in-process)."""

    sizes: list[int]
    flat: list[tuple[str, bytes]]
    futures: list[Future[list[Verified]]] = field(default_factory=list)


@dataclass
class _Prepared:
    """A batch read and classified, its verification under way."""

    outcomes: list[FileOutcome]
    first: dict[bytes, FileOutcome]  # sha256 -> the first file with that content
    work: list[FileOutcome]  # files whose objects are being verified
    job: _Verification


def _keep_stored(stored_der: bytes | None, new_der: bytes) -> bool:
    """True when the stored CA certificate is a later re-issue of the same subject and key."""
    if stored_der is None or stored_der == new_der:
        return stored_der is not None
    old, new = x509.load_der_x509_certificate(stored_der), x509.load_der_x509_certificate(new_der)
    if old.subject != new.subject or old.public_key() != new.public_key():
        return False
    return bool(old.not_valid_before_utc > new.not_valid_before_utc)


class Importer:
    """Verifies and writes batches for one store; shared by ``import`` and the daemon."""

    def __init__(self, config: Config, store: SqlStore, now: Callable[[], datetime], *,
                 progress: Progress | None = None, workers: int | None = None) -> None:
        self.config = config
        self.store = store
        self.now = now
        self.progress = progress
        self.workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
        self.summary = ImportSummary()
        self.ca_ids: dict[str, CaId] = {}
        self._verifier: Verifier | None = None
        self._anchors: list[Anchor] = []
        self._pool: ProcessPoolExecutor | None = None
        self._started = time.monotonic()

    # --- set-up -------------------------------------------------------------------------

    def start(self) -> None:
        """Record every configured CA (the trust anchors) in the store."""
        ders: dict[str, bytes] = {}
        for i, ca in enumerate(self.config.cas):
            try:
                ders[ca.name] = read_ca_certificate(ca.certificate)
                x509.load_der_x509_certificate(ders[ca.name]).public_key()
            except (OSError, ValueError) as exc:  # FileRejected is a ValueError
                raise ConfigError(f"ca[{i}].certificate",
                                  f"{ca.certificate} is not a usable certificate: {exc}") from exc
        with self.store.batch(self.now()) as batch:
            for name, der in ders.items():
                stored = self.store.ca_by_name(name)
                if _keep_stored(None if stored is None else stored.cert_der, der):
                    assert stored is not None
                    self.ca_ids[name] = stored.id
                else:
                    self.ca_ids[name] = batch.ensure_ca(name, der)[0]
            self._anchors = [Anchor(n, self.ca_ids[n], d) for n, d in ders.items()]
            self._verifier = Verifier(self._anchors)
            # A CA certificate issued by another configured CA is one of that CA's certificates.
            for name, der in ders.items():
                issuer = self._verifier.issuer_of(x509.load_der_x509_certificate(der))
                if issuer is not None and issuer.name != name:
                    batch.add_cert(cert_input(der, issuer.ca_id), f"config:{name}")
        self.summary.cas += batch.result.cas

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    @property
    def verifier(self) -> Verifier:
        if self._verifier is None:
            raise RuntimeError("Importer.start() was not called")
        return self._verifier

    # --- verification -------------------------------------------------------------------

    def verify(self, groups: Sequence[Sequence[tuple[str, bytes]]]) -> list[list[Verified]]:
        """Verify every object of every group; the result mirrors the groups."""
        return self._collect(self._submit(groups))

    def _submit(self, groups: Sequence[Sequence[tuple[str, bytes]]]) -> _Verification:
        """Start verifying (in the workers when it pays off); ``_collect`` gets the results."""
        flat = [item for g in groups for item in g]
        job = _Verification([len(g) for g in groups], flat)
        if len(flat) >= POOL_THRESHOLD and self.workers > 1:
            try:
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(
                        self.workers, mp_context=get_context("spawn"),
                        initializer=init_worker, initargs=(self._anchors, os.getpid()),
                    )
                job.futures = [self._pool.submit(verify_chunk, c) for c in _chunks(flat, CHUNK)]
            except (BrokenProcessPool, RuntimeError, OSError):
                self._pool_failed()
        return job

    def _pool_failed(self) -> None:
        # A worker died (out of memory, killed) or cannot start: carry on in this process.
        log.warn("worker processes failed; verifying in the importer process")
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def _collect(self, job: _Verification) -> list[list[Verified]]:
        results: list[Verified] = []
        try:
            for future in job.futures:
                chunk = future.result()
                results.extend(chunk)
                self.tick(0, sum(1 for v in chunk if v.kind != "crl"))
        except BrokenProcessPool:
            self._pool_failed()
            results = []
        if len(results) != len(job.flat):
            results = []
            for kind, der in job.flat:
                results.append(self.verifier.check(kind, der))
                self.tick(0, kind == "cert")
        out: list[list[Verified]] = []
        pos = 0
        for n in job.sizes:
            out.append(results[pos:pos + n])
            pos += n
        return out

    def tick(self, files: int, certs: int) -> None:
        if self.progress is not None:
            self.progress.tick(files, certs)

    # --- files --------------------------------------------------------------------------

    def import_files(self, files: Sequence[tuple[Path, str]]) -> list[FileOutcome]:
        """Import one batch of (path, name) files in one transaction; the caller moves them."""
        return self.complete(self.prepare(files))

    def import_batches(self, batches: Iterable[Sequence[tuple[Path, str]]]
                       ) -> Iterator[list[FileOutcome]]:
        """Batch after batch, reading and verifying the next while the current one is written."""
        pending: _Prepared | None = None
        for files in batches:
            ahead = self.prepare(files)
            if pending is not None:
                yield self.complete(pending)
            pending = ahead
        if pending is not None:
            yield self.complete(pending)

    def prepare(self, files: Sequence[tuple[Path, str]]) -> _Prepared:
        """Read, classify and start verifying one batch of files (nothing is written)."""
        outcomes = [FileOutcome(path, name) for path, name in files]
        first: dict[bytes, FileOutcome] = {}
        work: list[tuple[FileOutcome, list[tuple[str, bytes]]]] = []
        for o in outcomes:
            try:
                with open(o.path, "rb") as fh:
                    data = fh.read(MAX_FILE_BYTES + 1)
            except OSError as exc:
                o.outcome, o.reason = "skipped", f"cannot read: {exc.strerror or exc}"
                continue
            o.sha256 = hashlib.sha256(data).digest()
            if o.sha256 in first:
                continue  # a copy of a file earlier in this batch: decided with it
            first[o.sha256] = o
            if len(data) > MAX_FILE_BYTES:
                o.outcome, o.reason = "rejected", f"larger than {MAX_FILE_BYTES >> 20} MiB"
            elif self.store.file_seen(o.sha256):
                o.outcome = "unchanged"
            else:
                try:
                    work.append((o, extract(data)))
                except FileRejected as exc:
                    o.outcome, o.reason = "rejected", str(exc)
                except Exception as exc:  # noqa: BLE001 - malformed input must not stall
                    o.outcome, o.reason = "rejected", f"cannot be read ({exc!r})"
        job = self._submit([objs for _, objs in work])
        return _Prepared(outcomes, first, [o for o, _ in work], job)

    def complete(self, prepared: _Prepared) -> list[FileOutcome]:
        """Finish verifying a prepared batch and write it in one transaction."""
        work = prepared.work
        for o, verified in zip(work, self._collect(prepared.job), strict=True):
            errors = [v.error for v in verified if v.error]
            if errors:
                more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
                o.outcome, o.reason = "rejected", "; ".join(errors[:3]) + more
            else:
                o.objects = verified
        accepted = [o for o in work if o.outcome == "accepted"]
        if accepted:
            with self.store.batch(self.now()) as batch:
                self._apply(batch, accepted)
            result = batch.result
            self.summary.add(result)
            log.info("batch files={files} accepted={accepted} generation={generation}"
                     " new={new} revoked={revoked} released={released} crls={crls}",
                     files=len(prepared.outcomes), accepted=len(accepted),
                     generation=result.generation or int(self.store.generation()),
                     new=result.certs_new, revoked=result.revoked, released=result.released,
                     crls=result.crls)
        first = prepared.first
        for o in prepared.outcomes:
            if o.outcome != "skipped" and o.sha256 in first and first[o.sha256] is not o:
                src = first[o.sha256]
                o.outcome = "unchanged" if src.outcome == "accepted" else src.outcome
                o.reason = src.reason
            o.objects = []
            self._count(o)
        self.tick(len(prepared.outcomes), 0)
        return prepared.outcomes

    def _count(self, o: FileOutcome) -> None:
        if o.outcome == "skipped":
            log.warn("file {name} skipped: {reason}", name=o.name, reason=o.reason)
            return
        self.summary.files += 1
        if o.outcome == "rejected":
            self.summary.rejected.append((o.name, o.reason))
            log.warn("file {name} rejected: {reason}", name=o.name, reason=o.reason)
            return
        if o.outcome == "accepted":
            self.summary.accepted += 1
        else:
            self.summary.unchanged += 1
        log.info("file {name} outcome={outcome} certs={certs} crls={crls}",
                 name=o.name, outcome=o.outcome, certs=o.certs, crls=o.crls)

    def _reject_clashes(self, files: list[FileOutcome]) -> list[FileOutcome]:
        """Files whose certificates reuse no serial of another certificate; others rejected."""
        claimed: dict[tuple[int, int], bytes] = {}
        kept = []
        for o in files:
            why = []
            for v in o.objects:
                if v.cert is None:
                    continue
                key = (v.cert.ca_id, v.cert.serial)
                known = claimed.get(key)
                if known is None:
                    rec = self.store.cert(*key)
                    known = None if rec is None else rec.der
                if known is not None and known != v.cert.der:
                    why.append(f"certificate serial 0x{v.cert.serial:X} differs from the"
                               f" certificate {self._ca_name(v.cert.ca_id)} already issued with"
                               f" that serial")
            if why:
                # Not recorded as imported: once the clash is resolved it can be dropped again.
                o.outcome, o.reason = "rejected", "; ".join(why[:3])
                continue
            claimed.update(((v.cert.ca_id, v.cert.serial), v.cert.der)
                           for v in o.objects if v.cert is not None)
            kept.append(o)
        return kept

    def _apply(self, batch: Any, files: list[FileOutcome]) -> None:
        """Write verified objects: CA updates, certificates, then CRLs in number order."""
        files = self._reject_clashes(files)
        for o in files:
            for v in o.objects:
                if v.kind == "ca" and v.ca_name is not None and v.ca_der is not None:
                    stored = self.store.ca_by_name(v.ca_name)
                    if not _keep_stored(None if stored is None else stored.cert_der, v.ca_der):
                        batch.ensure_ca(v.ca_name, v.ca_der)
        for o in files:
            for v in o.objects:
                if v.cert is not None:
                    o.certs += 1
                    batch.add_cert(v.cert, o.name)
        crls = [(v.crl, o) for o in files for v in o.objects if v.crl is not None]
        crls.sort(key=lambda c: (c[0].ca_id, c[0].is_delta,
                                 -1 if c[0].number is None else c[0].number,
                                 c[0].this_update))
        for crl, o in crls:
            o.crls += 1
            outcome = batch.apply_crl(crl, o.name)
            if outcome != "older" and not crl.is_delta:
                o.crl_cas.add(self._ca_name(crl.ca_id))
            if outcome == "older":
                log.info("file {name}: CRL number {number} of {ca} is older than the stored"
                         " one; it changes nothing", name=o.name, number=crl.number,
                         ca=self._ca_name(crl.ca_id))
        for o in files:
            batch.record_file(o.sha256, o.name, "accepted")

    def _ca_name(self, ca_id: int) -> str:
        return next((n for n, i in self.ca_ids.items() if i == ca_id), f"CA {ca_id}")

    def mark_synced(self, names: Iterable[str] | None = None) -> None:
        """Record that the statuses of these CAs (default all) are confirmed as of now."""
        ids = [self.ca_ids[n] for n in (self.ca_ids if names is None else names)]
        if ids:
            with self.store.batch(self.now()) as batch:
                for ca_id in ids:
                    batch.mark_synced(ca_id)

    def finish(self) -> ImportSummary:
        """The summary, with the final generation and elapsed time."""
        if self.progress is not None:
            self.progress.finish()
        self.summary.generation = int(self.store.generation())
        self.summary.elapsed = time.monotonic() - self._started
        return self.summary


# --- the two one-shot entry points the CLI calls ----------------------------------------


def _skip_in_walk(name: str) -> bool:
    return name.startswith(".") or name.endswith((".tmp", ".part", ".reason"))


def collect_files(paths: Sequence[Path]) -> list[str]:
    """Files named, and files in folders named (recursively), in a stable order (the order
    of their ``Path``s). Kept as ``str``: a million ``Path`` objects took ~400 MiB."""
    out: list[str] = []
    for p in paths:
        if p.is_dir():
            # Sorted component-wise, as Path sorts: with NUL (below every character a file
            # name can hold) as the separator while sorting, then back, one string at a time.
            found: list[str] = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                base = root.replace(os.sep, "\0") + "\0"
                found += [base + f for f in files if not _skip_in_walk(f)]
            found.sort()
            for i, f in enumerate(found):
                found[i] = f.replace("\0", os.sep)
            out += found
        else:
            out.append(str(p))
    return out


def import_paths(config: Config, paths: list[Path], *, now: Callable[[], datetime],
                 progress: TextIO | None) -> ImportSummary:
    """``certpub import PATH...``: import files and folders once; the files stay where they are."""
    files = collect_files(paths)
    store = open_store(config.store.location, migrate=config.store.migrate == "auto")
    importer = Importer(config, store, now,
                        progress=Progress(progress, len(files)) if progress else None)
    try:
        importer.start()
        crl_cas: set[str] = set()
        batches = ([(Path(p), p) for p in chunk]
                   for chunk in _chunks(files, config.import_.batch_size))
        for outcomes in importer.import_batches(batches):
            for o in outcomes:
                if o.outcome in ("rejected", "skipped"):
                    if o.outcome == "skipped":  # one-shot: unreadable counts as rejected
                        importer.summary.files += 1
                        importer.summary.rejected.append((o.name, o.reason))
                    if progress is not None:
                        print(f"\rrejected {o.name}: {o.reason}\x1b[K" if importer.progress
                              and importer.progress.tty else f"rejected {o.name}: {o.reason}",
                              file=progress)
                else:
                    crl_cas.update(o.crl_cas)
        # A CRL is a complete statement of its CA's revocations as of its thisUpdate.
        importer.mark_synced(sorted(crl_cas))
        return importer.finish()
    finally:
        importer.close()
        store.close()


def import_openssl(config: Config, *, now: Callable[[], datetime],
                   progress: TextIO | None = None) -> ImportSummary:
    """Import every configured OpenSSL CA database (index.txt and its certificate files)."""
    store = open_store(config.store.location, migrate=config.store.migrate == "auto")
    importer = Importer(config, store, now)
    try:
        importer.start()
        for db in config.import_.openssl:
            if not db.index.is_file():
                importer.summary.rejected.append((str(db.index), "index file does not exist"))
                if progress is not None:
                    print(f"rejected {db.index}: index file does not exist", file=progress)
                continue
            lines = len(parse_index(db.index.read_bytes()).lines)
            importer.progress = Progress(progress, lines, "index lines") if progress else None
            sync_database(importer, db, IndexTracker(db.index))
            if importer.progress is not None:
                importer.progress.finish()
            importer.mark_synced([db.ca])
        importer.progress = None
        return importer.finish()
    finally:
        importer.close()
        store.close()


