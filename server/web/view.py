"""What a page shows of a certificate: its status in words, public holder details, files (pure).

Strategy: ``cert_view`` copies out of a store ``CertRecord`` (and, for the certificate page,
one parse of its DER by ``cryptography``) everything a page or the JSON API shows, as plain
values: the state (``valid``, ``revoked``, ``on_hold``, ``expired``, ``not_yet_valid``,
``unknown``), dates, the RFC 5280 reason, the holder's *public* attributes only (those of
the published DN that the LDAP allowlist names: the same rule as the directory), e-mails
(when ``mail`` is public), fingerprints, the key, and the URLs of its files. ``chain``
builds the path to the root for the ``.p7c`` from the CAs in the store. Nothing here knows
HTTP, languages or the store's SQL; the clock is passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote

from asn1crypto import x509 as asn1x509
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from store import names
from store.model import CaRecord, CertRecord, CertStatus, RevocationReason
from store.sqlbase import serial_text

# The published DN's attribute types by OID, under their LDAP names (lower case): a holder
# attribute is shown only when the allowlist names it.
ATTRIBUTE_NAMES: dict[str, str] = {
    "2.5.4.3": "cn", "2.5.4.4": "sn", "2.5.4.42": "givenname", "2.5.4.10": "o",
    "2.5.4.11": "ou", "2.5.4.6": "c", "2.5.4.7": "l", "2.5.4.8": "st",
    "0.9.2342.19200300.100.1.25": "dc", "0.9.2342.19200300.100.1.3": "mail",
    "1.2.840.113549.1.9.1": "mail",
}
STATES = ("valid", "revoked", "on_hold", "expired", "not_yet_valid", "unknown")
REASONS = tuple(r.value for r in RevocationReason)


def when(moment: datetime | None) -> str:
    """A date and time as every language shows it: ISO 8601 in UTC."""
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02X}" for b in data)


def serial_display(serial: int) -> str:
    """A serial as people compare it: upper-case hex octets with colons."""
    text = format(serial, "X")
    if len(text) % 2:
        text = "0" + text
    return ":".join(text[i:i + 2] for i in range(0, len(text), 2))


def cert_path(ca: str, serial: int) -> str:
    """The certificate page's stable URL: ``/cert/<ca>/<serial in lower-case hex>``."""
    return f"/cert/{quote(ca, safe='')}/{serial_text(serial)}"


def state_of(rec: CertRecord, now: datetime) -> str:
    if rec.status is CertStatus.REVOKED:
        return "on_hold" if rec.reason is RevocationReason.CERTIFICATE_HOLD else "revoked"
    if rec.not_after is not None and rec.not_after < now:
        return "expired"
    if rec.not_before is not None and rec.not_before > now:
        return "not_yet_valid"
    if rec.der is None and rec.not_after is None:
        return "unknown"
    return "valid"


@dataclass(frozen=True)
class Holder:
    """The holder's public details: (LDAP attribute name, value) leaf first, and e-mails."""

    attributes: tuple[tuple[str, str], ...]
    emails: tuple[str, ...]
    name: str  # the public cn, else ""


def holder(rec: CertRecord, allowed: frozenset[str]) -> Holder:
    """The public part of the subject: the published DN's attributes the allowlist names."""
    attrs: list[tuple[str, str]] = []
    try:
        dn = names.parse(rec.directory_dn) if rec.directory_dn else names.DN(())
    except names.DNSyntaxError:
        dn = names.DN(())
    for rdn in dn.rdns:
        for ava in rdn:
            name = ATTRIBUTE_NAMES.get(ava.oid)
            if name is not None and name in allowed and name != "mail":
                attrs.append((name, ava.display))
    emails = rec.emails if "mail" in allowed else ()
    cn = next((v for a, v in attrs if a == "cn"), "")
    return Holder(tuple(attrs), tuple(emails), cn)


@dataclass(frozen=True)
class CertSummary:
    """One line of a result list."""

    ca: str
    serial: int
    serial_hex: str
    url: str
    holder: Holder
    state: str
    not_before: str
    not_after: str
    revoked_at: str
    reason: str  # RevocationReason value, "" when none
    downloads: bool  # the certificate may be downloaded (userCertificate is public)


def name_only(rec: CertRecord, allowed: frozenset[str]) -> Holder:
    """What a result line shows of the holder: the public cn and e-mails, without parsing the
    published DN (the cn the store keeps is the subject's, a public attribute type)."""
    return Holder((), rec.emails if "mail" in allowed else (),
                  rec.cn or "" if "cn" in allowed else "")


def summary(rec: CertRecord, ca_name: str, allowed: frozenset[str], now: datetime, *,
            details: bool = True) -> CertSummary:
    """A result line; ``details=False``: the holder's name and e-mails only (``name_only``)."""
    return CertSummary(
        ca=ca_name, serial=rec.serial, serial_hex=serial_display(rec.serial),
        url=cert_path(ca_name, rec.serial),
        holder=holder(rec, allowed) if details else name_only(rec, allowed),
        state=state_of(rec, now), not_before=when(rec.not_before), not_after=when(rec.not_after),
        revoked_at=when(rec.revoked_at),
        reason=rec.reason.value if rec.reason is not None else "",
        downloads=rec.der is not None and "usercertificate" in allowed,
    )


@dataclass(frozen=True)
class CertView(CertSummary):
    """Everything the certificate page shows."""

    expired_too: bool  # revoked (or on hold) and past notAfter as well
    issuer_dn: str
    key: tuple[str, dict[str, str]]  # catalog key and its placeholders
    sha256: str
    sha1: str
    held: bool  # the certificate itself is in the store (not only its serial from a CRL)
    ocsp_urls: tuple[str, ...]
    crl_url: str  # "" when this listener does not publish the CA's CRL


def key_description(cert: x509.Certificate) -> tuple[str, dict[str, str]]:
    try:
        key = cert.public_key()
    except (ValueError, TypeError):  # unsupported algorithms: say so, do not fail the page
        return "key_other", {}
    if isinstance(key, rsa.RSAPublicKey):
        return "key_rsa", {"bits": str(key.key_size)}
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "key_ec", {"curve": key.curve.name}
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "key_eddsa", {"curve": "Ed25519"}
    if isinstance(key, ed448.Ed448PublicKey):
        return "key_eddsa", {"curve": "Ed448"}
    if isinstance(key, dsa.DSAPublicKey):
        return "key_dsa", {"bits": str(key.key_size)}
    return "key_other", {}


def _ocsp_urls(cert: x509.Certificate) -> list[str]:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [d.access_location.value for d in aia
            if d.access_method == x509.AuthorityInformationAccessOID.OCSP
            and isinstance(d.access_location, x509.UniformResourceIdentifier)]


def cert_view(rec: CertRecord, ca: CaRecord, allowed: frozenset[str], now: datetime, *,
              crl_published: bool, ocsp_paths: Sequence[str]) -> CertView:
    """The certificate page's values."""
    base = summary(rec, ca.name, allowed, now)
    key: tuple[str, dict[str, str]] = ("key_unknown", {})
    sha256 = sha1 = ""
    ocsp: list[str] = []
    if rec.der is not None:
        sha256 = colon_hex(hashlib.sha256(rec.der).digest())
        sha1 = colon_hex(hashlib.sha1(rec.der).digest())  # noqa: S324 - a fingerprint people compare
        try:
            cert = x509.load_der_x509_certificate(rec.der)
            key = key_description(cert)
            ocsp = _ocsp_urls(cert)
        except ValueError:
            key = ("key_other", {})
    if not ocsp:
        ocsp = list(ocsp_paths[-1:])
    return CertView(
        **base.__dict__,
        expired_too=base.state in ("revoked", "on_hold") and rec.not_after is not None
        and rec.not_after < now,
        issuer_dn=ca.subject_dn, key=key,
        sha256=sha256, sha1=sha1, held=rec.der is not None, ocsp_urls=tuple(ocsp),
        crl_url=f"/crl/{quote(ca.name, safe='')}.crl" if crl_published else "",
    )


def _names(der: bytes) -> tuple[str, str]:
    """(issuer key, subject key) of a certificate."""
    cert = asn1x509.Certificate.load(der)
    return names.from_x509(cert.issuer).key, names.from_x509(cert.subject).key


def chain(der: bytes, ca_certs: Iterable[bytes], max_depth: int = 8) -> list[bytes]:
    """The certificate and its CA certificates up to a self-issued root, among ca_certs (the
    store's CAs and the configured ones)."""
    by_subject: dict[str, bytes] = {}
    for ca_der in ca_certs:
        by_subject.setdefault(_names(ca_der)[1], ca_der)
    out = [der]
    issuer, subject = _names(der)
    while issuer != subject and len(out) <= max_depth:
        ca = by_subject.get(issuer)
        if ca is None or ca in out:
            break
        out.append(ca)
        issuer, subject = _names(ca)
    return out


def p7c(ders: Sequence[bytes]) -> bytes:
    """A degenerate PKCS #7 SignedData holding these certificates (RFC 2315; ``.p7c``)."""
    certs = [x509.load_der_x509_certificate(d) for d in ders]
    return pkcs7.serialize_certificates(certs, Encoding.DER)


def pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
