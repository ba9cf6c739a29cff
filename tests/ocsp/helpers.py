"""A small PKI for the OCSP tests: CAs, delegated signers, subscribers, a filled store."""

from __future__ import annotations

import http.client
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asn1crypto import ocsp as asn1_ocsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.ocsp.config import HttpConfig, OcspSignerConfig

T0 = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def new_key(kind: str) -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(65537, 2048)
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def _hash(key: Any) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "MO"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certpub tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(subject: x509.Name, public_key: Any, issuer: tuple[x509.Certificate, Any] | None,
          self_key: Any = None, *, serial: int = 1, not_before: datetime = T0 - 365 * DAY,
          not_after: datetime = T0 + 365 * DAY, ca: bool = False, eku: list[Any] | None = None,
          email: str | None = None, ocsp_url: str | None = None) -> x509.Certificate:
    issuer_name = subject if issuer is None else issuer[0].subject
    key = self_key if issuer is None else issuer[1]
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
         .public_key(public_key).serial_number(serial).not_valid_before(not_before)
         .not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if email:
        b = b.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    if ocsp_url:
        b = b.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
            x509.oid.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]),
            critical=False)
    return b.sign(key, _hash(key))


def write_key(path: Path, key: Any, mode: int = 0o600) -> Path:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass
class MiniCa:
    name: str
    cert: x509.Certificate
    key: Any
    signer_cert: x509.Certificate
    signer_key: Any
    folder: Path
    at: datetime = T0
    certs: dict[int, x509.Certificate] = field(default_factory=dict)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def cert_path(self) -> Path:
        return self.folder / f"{self.name}.pem"

    @property
    def signer_cert_path(self) -> Path:
        return self.folder / f"{self.name}-ocsp.pem"

    @property
    def signer_key_path(self) -> Path:
        return self.folder / f"{self.name}-ocsp.key"

    def subscriber(self, serial: int, **kw: Any) -> x509.Certificate:
        kw.setdefault("not_before", self.at - 30 * DAY)
        kw.setdefault("not_after", self.at + 365 * DAY)
        cert = issue(name(f"Subscriber {serial}"), new_key("p256").public_key(),
                     (self.cert, self.key), serial=serial, email=f"s{serial}@example.test", **kw)
        self.certs[serial] = cert
        return cert


def make_ca(folder: Path, ca_name: str, kind: str = "p256", signer_kind: str | None = None,
            *, signer_eku: bool = True, signer_not_after: datetime | None = None,
            at: datetime = T0, ocsp_url: str | None = None) -> MiniCa:
    folder.mkdir(parents=True, exist_ok=True)
    key = new_key(kind)
    cert = issue(name(f"{ca_name} CA"), key.public_key(), None, key, ca=True,
                 not_before=at - 3 * 365 * DAY, not_after=at + 5 * 365 * DAY)
    skey = new_key(signer_kind or kind)
    scert = issue(name(f"{ca_name} OCSP"), skey.public_key(), (cert, key), serial=99,
                  not_before=at - 10 * DAY, not_after=signer_not_after or at + 365 * DAY,
                  eku=[ExtendedKeyUsageOID.OCSP_SIGNING] if signer_eku else None)
    ca = MiniCa(ca_name, cert, key, scert, skey, folder, at)
    write_cert(ca.cert_path, cert)
    write_cert(ca.signer_cert_path, scert)
    write_key(ca.signer_key_path, skey)
    return ca


def signer_config(ca: MiniCa, **kw: Any) -> OcspSignerConfig:
    values: dict[str, Any] = {"signer_certificate": ca.signer_cert_path,
                                  "signer_key": ca.signer_key_path, "responder_id": "by_key",
                                  "rsa_padding": "pkcs1v15", "validity": 86400.0,
                                  "unknown_serials": "unknown", "archive_cutoff": True}
    values.update(kw)
    return OcspSignerConfig(**values)


@dataclass(frozen=True)
class FakeCa:
    name: str
    certificate: Path
    ocsp: OcspSignerConfig | None


@dataclass(frozen=True)
class FakeConfig:
    """The parts of server.config.Config the OCSP package reads."""

    cas: tuple[FakeCa, ...]
    http: HttpConfig


def http_config(**kw: Any) -> HttpConfig:
    values: dict[str, Any] = {"listen": ("tcp:0:interface=127.0.0.1",), "ocsp_paths": ("/", "/ocsp"),
                                  "max_request_bytes": 65536, "max_certids": 100, "cache_entries": 1000,
                              # these tests sign in-process (InlineSigning, LocalSigners);
                              # the tests that fork say signing_processes= themselves
                              "signing_processes": 0}
    values.update(kw)
    return HttpConfig(**values)


def config_for(*cas: MiniCa, unserved: tuple[MiniCa, ...] = (), **signer_kw: Any) -> FakeConfig:
    entries = [FakeCa(c.name, c.cert_path, signer_config(c, **signer_kw)) for c in cas]
    entries += [FakeCa(c.name, c.cert_path, None) for c in unserved]
    return FakeConfig(tuple(entries), http_config())


def fill_store(store: Any, ca: MiniCa, now: datetime = T0, *,
               revoked: dict[int, tuple[datetime, Any]] | None = None,
               crl_only: dict[int, tuple[datetime, Any]] | None = None, synced: bool = True) -> int:
    """Import ca and its subscribers; revoke some; returns the CA id."""
    from store.certparse import cert_input

    with store.batch(now) as b:
        ca_id, _ = b.ensure_ca(ca.name, ca.der)
        for cert in ca.certs.values():
            b.add_cert(cert_input(cert.public_bytes(serialization.Encoding.DER), ca_id), "test")
        for serial, (when, reason) in (revoked or {}).items():
            b.revoke(ca_id, serial, when, reason, "test", "test")
        for serial, (when, reason) in (crl_only or {}).items():
            b.revoke(ca_id, serial, when, reason, "crl", "test")
        if synced:
            b.mark_synced(ca_id)
    return int(ca_id)


def request_der(ca: MiniCa, serials: list[int], *, algorithm: str = "sha1",
                nonce: bytes | None = None) -> bytes:
    """A DER OCSPRequest built with cryptography's builder (single) or by hand (several)."""
    import hashlib

    from asn1crypto import core
    from asn1crypto import x509 as asn1_x509

    c = asn1_x509.Certificate.load(ca.der)
    name_hash = hashlib.new(algorithm, c.subject.dump()).digest()
    key_hash = hashlib.new(algorithm, c.public_key["public_key"].contents[1:]).digest()
    reqs = [{"req_cert": {"hash_algorithm": {"algorithm": algorithm},
                          "issuer_name_hash": name_hash, "issuer_key_hash": key_hash,
                          "serial_number": s}} for s in serials]
    tbs: dict[str, Any] = {"request_list": reqs}
    if nonce is not None:
        tbs["request_extensions"] = [{"extn_id": "nonce", "critical": False,
                                      "extn_value": core.OctetString(nonce)}]
    return bytes(asn1_ocsp.OCSPRequest({"tbs_request": tbs}).dump())


def parse_response(der: bytes) -> asn1_ocsp.OCSPResponse:
    return asn1_ocsp.OCSPResponse.load(der, strict=True)


def ocsp_fetch(port: int, method: str, path: str, body: bytes | None = None, *,
               timeout: float = 10) -> tuple[int, bytes]:
    """One HTTP exchange with a listener on 127.0.0.1 (an OCSP request body when given):
    status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/ocsp-request"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class WallClock:
    """Now (whole seconds) when made; tests move ``now`` by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


def answer(service: Any, der: bytes) -> Any:
    """``OcspService.answer`` — the call the HTTP adapter makes — at the service's own time
    (a service built in code signs inline: ``InlineSigning``)."""
    return service.answer(der, service.now())
