"""Generator of the demo PKI of certpub: CAs, OCSP signers, subscribers, OpenSSL databases, CRLs."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from server.demo.names import OPENSSL_REASONS, OPENSSL_SHORT_NAMES, ca_name, subscriber_identity

__all__ = [
    "OPENSSL_REASONS", "DemoCa", "DemoCert", "DemoPki", "build_demo_pki", "issue_certificate",
    "load_ca", "make_crl", "openssl_oneline", "openssl_serial", "openssl_time", "subscriber_key",
    "write_key", "write_pem",
]

DAY = timedelta(days=1)
MIN_SUBSCRIBERS = 15
IssuerKey = CertificateIssuerPrivateKeyTypes
Extensions = Iterable[tuple[x509.ExtensionType, bool]]
Revocation = tuple[int, datetime, str | None]


@dataclass(frozen=True)
class DemoCert:
    """One subscriber certificate of the demo PKI."""

    ca: str
    serial: int
    subject_rfc4514: str  # x509.Name.rfc4514_string(): RFC 4514 order, unknown types as OIDs
    emails: tuple[str, ...]
    state: str  # good | revoked | hold | expired | revoked-expired
    reason: str | None  # asn1crypto CRL reason name; "unspecified" = no reason code
    revoked_at: datetime | None
    path: Path
    not_before: datetime | None = None
    not_after: datetime | None = None
    subject_openssl: str = ""  # the subject field exactly as written in index.txt

    def load(self) -> x509.Certificate:
        """Read the certificate from its PEM file."""
        return x509.load_pem_x509_certificate(self.path.read_bytes())


@dataclass(frozen=True)
class DemoCa:
    """One CA of the demo PKI (the root or an issuing CA)."""

    name: str
    cert_path: Path
    key_path: Path
    ocsp_cert_path: Path | None
    ocsp_key_path: Path | None
    index_path: Path | None
    newcerts_dir: Path | None
    crl_path: Path | None
    crl2_path: Path | None = None
    ocsp_url: str | None = None  # URLs put into the certificates this CA issues
    crl_url: str | None = None
    # CRLs of its other scopes (RFC 5280 §5.2.5 partitions, §5.2.4 deltas), to import after
    # crl_path: the partitioned CA's part0.pem, part1.pem, part0-delta.pem, part1-delta.pem
    scope_crl_paths: tuple[Path, ...] = ()

    def load_certificate(self) -> x509.Certificate:
        """Read the CA certificate from its PEM file."""
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())


@dataclass(frozen=True)
class DemoPki:
    """Everything build_demo_pki created."""

    root: Path
    cas: dict[str, DemoCa]
    certs: list[DemoCert]
    config_path: Path
    spool_dir: Path
    crl2_revokes: dict[str, int] = field(default_factory=dict)  # CA -> serial revoked by crl-2
    crl2_releases: dict[str, int] = field(default_factory=dict)  # CA -> hold released by crl-2
    subscriber_key_path: Path | None = None
    now: datetime | None = None


CaLike = DemoCa | tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]


# ---------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_pem(
    path: Path,
    obj: x509.Certificate | x509.CertificateRevocationList | Sequence[x509.Certificate],
) -> None:
    """Write a certificate, a CRL or a list of certificates as PEM (mode 0644, atomically)."""
    if isinstance(obj, (x509.Certificate, x509.CertificateRevocationList)):
        data = obj.public_bytes(serialization.Encoding.PEM)
    else:
        data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in obj)
    _atomic_write(path, data, 0o644)


def write_key(path: Path, key: PrivateKeyTypes) -> None:
    """Write an unencrypted PKCS#8 PEM private key (mode 0600, atomically)."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _atomic_write(path, data, 0o600)


# ---------------------------------------------------------------- certificates and CRLs


@functools.cache
def subscriber_key() -> ec.EllipticCurvePrivateKey:
    """Return the P-256 key shared by every demo subscriber (one per process)."""
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: IssuerKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None:
    """Pick the signature hash fitting an issuer key (None for EdDSA)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = key.curve.key_size
        return hashes.SHA512() if size > 384 else hashes.SHA384() if size > 256 else hashes.SHA256()
    return hashes.SHA256() if isinstance(key, rsa.RSAPrivateKey) else None


def load_ca(ca: CaLike) -> tuple[x509.Certificate, IssuerKey]:
    """Return the (certificate, private key) of a CA given as DemoCa or as a pair."""
    if isinstance(ca, tuple):
        return ca
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise TypeError(f"unsupported CA key type in {ca.key_path}")
    return ca.load_certificate(), key


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Build the AKI extension pointing at the issuer's SKI."""
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _urls(ocsp_url: str | None, crl_url: str | None) -> list[tuple[x509.ExtensionType, bool]]:
    """Build the AIA (OCSP) and CRL distribution point extensions."""
    exts: list[tuple[x509.ExtensionType, bool]] = []
    if ocsp_url:
        desc = x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
        )
        exts.append((x509.AuthorityInformationAccess([desc]), False))
    if crl_url:
        point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
        exts.append((x509.CRLDistributionPoints([point]), False))
    return exts


def _key_usage(signature: bool, encipher: bool = False, agree: bool = False,
               ca: bool = False) -> x509.KeyUsage:
    """Build a KeyUsage extension from a few flags."""
    return x509.KeyUsage(
        digital_signature=signature, content_commitment=False, key_encipherment=encipher,
        data_encipherment=False, key_agreement=agree, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def _sign(
    subject: x509.Name,
    issuer: tuple[x509.Certificate, IssuerKey] | None,
    public: CertificatePublicKeyTypes,
    serial: int,
    validity: tuple[datetime, datetime],
    extensions: Extensions,
    self_key: IssuerKey | None = None,
) -> x509.Certificate:
    """Build and sign a certificate; later extensions replace earlier ones with the same OID."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    chosen: dict[x509.ObjectIdentifier, tuple[x509.ExtensionType, bool]] = {}
    if issuer is not None:
        chosen[x509.AuthorityKeyIdentifier.oid] = (_aki(issuer[0]), False)
    for ext, critical in extensions:
        chosen[ext.oid] = (ext, critical)
    for ext, critical in chosen.values():
        builder = builder.add_extension(ext, critical=critical)
    signing_key = issuer[1] if issuer is not None else self_key
    assert signing_key is not None, "a self-signed certificate needs self_key"
    return builder.sign(signing_key, _hash_for(signing_key))


def issue_certificate(
    ca: CaLike,
    subject: x509.Name,
    emails: Iterable[str],
    serial: int,
    not_before: datetime,
    not_after: datetime,
    key: IssuerKey | CertificatePublicKeyTypes | None = None,
    extra_extensions: Extensions = (),
    *,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
) -> x509.Certificate:
    """Issue an S/MIME + client-auth end-entity certificate; extra_extensions override by OID."""
    pair = load_ca(ca)
    if isinstance(ca, DemoCa):
        ocsp_url, crl_url = ocsp_url or ca.ocsp_url, crl_url or ca.crl_url
    key = subscriber_key() if key is None else key
    public = cast(CertificatePublicKeyTypes,
                  key.public_key() if hasattr(key, "public_key") else key)
    is_ec = isinstance(public, ec.EllipticCurvePublicKey)
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(True, encipher=isinstance(public, rsa.RSAPublicKey), agree=is_ec), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION,
                                ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ]
    names = [x509.RFC822Name(e) for e in emails]
    if names:
        extensions.append((x509.SubjectAlternativeName(names), False))
    extensions += _urls(ocsp_url, crl_url)
    extensions += list(extra_extensions)
    return _sign(subject, pair, public, serial, (not_before, not_after), extensions)


def make_crl(
    ca: CaLike,
    revoked: Iterable[Revocation],
    crl_number: int,
    this_update: datetime,
    next_update: datetime,
    extensions: Extensions = (),
) -> x509.CertificateRevocationList:
    """Sign a CRL of (serial, revoked_at, asn1crypto reason name or None) entries;
    extensions: e.g. an IssuingDistributionPoint (a partition) or a DeltaCRLIndicator."""
    issuer_cert, issuer_key = load_ca(ca)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    for serial, revoked_at, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at)
        if reason not in (None, "unspecified"):  # RFC 5280: omit reasonCode unspecified
            entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags[reason]), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(issuer_key, _hash_for(issuer_key))


# ---------------------------------------------------------------- OpenSSL database


def openssl_serial(serial: int) -> str:
    """Format a serial as OpenSSL does (uppercase hex, even length): 1 -> '01'."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


def openssl_time(moment: datetime) -> str:
    """Format a time as OpenSSL stores it: UTCTime before 2050, GeneralizedTime after."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%y%m%d%H%M%SZ" if moment.year < 2050 else "%Y%m%d%H%M%SZ")


def _oneline_char(char: str, utf8: bool) -> str:
    """Escape one character like OpenSSL 3's X509_NAME_oneline."""
    if char in "/+":
        return "\\" + char
    if " " <= char <= "~" or (utf8 and ord(char) > 0x7F):
        return char
    return "".join(f"\\x{b:02X}" for b in char.encode("utf-8"))


def openssl_oneline(name: x509.Name, *, utf8: bool = False) -> str:
    """Render a name like OpenSSL 3's X509_NAME_oneline: `/C=MO/CN=a\\/b`, bytes as \\xHH."""
    rdns: list[str] = []
    for rdn in name.rdns:
        parts = []
        for attr in rdn:
            label = OPENSSL_SHORT_NAMES.get(attr.oid, attr.oid.dotted_string)
            if isinstance(attr.value, bytes):
                text = "".join(_oneline_char(chr(b), False) if b < 0x80 else f"\\x{b:02X}"
                               for b in attr.value)
            else:
                text = "".join(_oneline_char(c, utf8) for c in attr.value)
            parts.append(f"{label}={text}")
        rdns.append("+".join(parts))
    return "/" + "/".join(rdns)


def _index_line(cert: DemoCert) -> str:
    """Render the index.txt line of a subscriber certificate."""
    assert cert.not_after is not None
    status = {"good": "V", "expired": "E"}.get(cert.state, "R")
    revocation = ""
    if cert.revoked_at is not None:
        revocation = openssl_time(cert.revoked_at)
        if cert.reason not in (None, "unspecified"):  # like `openssl ca -revoke` without reason
            revocation += "," + OPENSSL_REASONS[cert.reason]
    fields = (status, openssl_time(cert.not_after), revocation, openssl_serial(cert.serial),
              "unknown", cert.subject_openssl)
    return "\t".join(fields) + "\n"


# ---------------------------------------------------------------- the demo

PARTITIONS = 2  # CRL partitions of the partitioned demo CA (ec-ca)


def partition_of(serial: int) -> int:
    """The CRL partition a subscriber of the partitioned CA belongs to."""
    return serial % PARTITIONS


def ca_name_cn(subject: x509.Name) -> str:
    return str(subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def _rdn_escape(value: str) -> str:
    return "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)


def _ldap_dn(dn: str) -> str:
    """A DN as the dn part of an LDAP URL (RFC 4516 §2: UTF-8, percent-encoded)."""
    return quote(dn, safe="=,+-._~")


def _random_serial(ca: str, slot: int, octets: int) -> int:
    """Derive a random-looking serial of exactly `octets` bytes (top bit clear when 20)."""
    digest = hashlib.sha256(f"certpub-demo:{ca}:{slot}".encode()).digest()
    value = int.from_bytes(digest[:octets], "big") | (1 << (8 * octets - 8))
    return value & ((1 << 159) - 1) if octets == 20 else value


# slot -> (state, reason, fixed serial); other slots are good with random serials
_PLAN: dict[int, tuple[str, str | None, int | None]] = {
    0: ("good", None, 1),
    1: ("revoked", "key_compromise", 0x80),
    2: ("good", None, 0xFF00),
    3: ("good", None, None),  # 20-octet serial, top bit clear
    4: ("revoked", "superseded", None),
    5: ("revoked", "affiliation_changed", None),
    6: ("revoked", "cessation_of_operation", None),
    7: ("hold", "certificate_hold", None),
    8: ("expired", None, None),
    9: ("revoked-expired", "key_compromise", None),
    10: ("revoked", "unspecified", None),  # no reason code in the CRL nor in index.txt
    11: ("good", None, None),  # notAfter in 2050: GeneralizedTime in index.txt
}
_RENEWED_SLOT = {"rsa-ca": 12, "ec-ca": 4}  # the last slot renews it (rsa-ca: both stay good)
_CRL2_SLOT = 13


def _dates(slot: int, state: str, now: datetime) -> tuple[datetime, datetime, datetime | None]:
    """Return (not_before, not_after, revoked_at) of a planned slot."""
    if state == "expired":
        return now - 800 * DAY, now - 70 * DAY, None
    if state == "revoked-expired":
        return now - 900 * DAY, now - 170 * DAY, now - 400 * DAY
    if slot == 11:
        return now - 10 * DAY, datetime(max(2050, now.year + 1), 6, 30, 12, tzinfo=UTC), None
    if slot == 12:
        return now - 600 * DAY, now + 130 * DAY, None
    not_before = now - (30 + (slot * 11) % 300) * DAY
    revoked_at = {"revoked": now - (slot * 3 + 1) * DAY, "hold": now - 2 * DAY}.get(state)
    return not_before, not_before + 730 * DAY, revoked_at


def _toml(value: object) -> str:
    """Quote a value's str() as a TOML basic string."""
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
               "\r": "\\r"}
    return '"' + "".join(
        escapes.get(c, f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
        for c in str(value)
    ) + '"'


def _config(folder: Path, cas: dict[str, DemoCa], ldap_port: int, http_port: int) -> str:
    """Render certpub.toml for the demo."""
    issuing = [ca for ca in cas.values() if ca.index_path is not None]
    lines = [
        "# certpub demo configuration, written by build_demo_pki",
        "[store]", f"path = {_toml(folder / 'store' / 'store.sqlite3')}", "",
        "[import]", f"spool = [{_toml(folder / 'spool')}]",
        'processed = "move"          # move to spool/done, or "delete"', "poll_interval = 1.0", "",
    ]
    for ca in issuing:
        lines += ["[[import.openssl]]", f"ca = {_toml(ca.name)}", f"index = {_toml(ca.index_path)}",
                  f"certs_dir = {_toml(ca.newcerts_dir)}", ""]
    for ca in cas.values():
        lines += ["[[ca]]", f"name = {_toml(ca.name)}", f"certificate = {_toml(ca.cert_path)}"]
        if ca.ocsp_cert_path is not None:
            lines += ["[ca.ocsp]", f"signer_certificate = {_toml(ca.ocsp_cert_path)}",
                      f"signer_key = {_toml(ca.ocsp_key_path)}"]
        lines.append("")
    for section, port in (("ldap", ldap_port), ("http", http_port)):
        lines += [f"[{section}]", f"listen = [{_toml(f'tcp:{port}:interface=127.0.0.1')}]"]
        if section == "http":  # the host of the URLs printed in the certificates
            lines.append('public_names = ["127.0.0.1", "localhost"]')
        lines.append("")
    lines += ["[log]", 'format = "logfmt"', ""]
    return "\n".join(lines)


def _prepare(folder: Path, overwrite: bool) -> None:
    """Check the target folder and clear a previous demo when overwriting."""
    if (folder / "certpub.toml").exists():
        if not overwrite:
            raise ValueError(f"{folder} already contains a certpub.toml; refusing to overwrite it "
                             "(pass overwrite=True to regenerate the demo PKI)")
        shutil.rmtree(folder / "ca", ignore_errors=True)
        shutil.rmtree(folder / "spool", ignore_errors=True)
        for stale in (folder / "store").glob("store.sqlite3*"):
            stale.unlink()
    for sub in ("ca", "spool", "store"):
        (folder / sub).mkdir(parents=True, exist_ok=True)


class _Builder:
    """State shared while building one demo PKI."""

    def __init__(self, folder: Path, now: datetime, http_port: int, utf8: bool,
                 ldap_port: int = 1389) -> None:
        """Remember the build parameters."""
        self.ca_dir, self.now, self.utf8 = folder / "ca", now, utf8
        self.base = f"http://127.0.0.1:{http_port}"
        self.ldap_base = f"ldap://127.0.0.1:{ldap_port}"
        self.person = 0
        self.certs: list[DemoCert] = []
        self.crl2_revokes: dict[str, int] = {}
        self.crl2_releases: dict[str, int] = {}

    def root(self) -> tuple[DemoCa, tuple[x509.Certificate, IssuerKey]]:
        """Create the self-signed root CA and its empty CRL."""
        key = rsa.generate_private_key(65537, 2048)
        nb = self.now - 1100 * DAY
        exts = [(x509.BasicConstraints(ca=True, path_length=None), True),
                (_key_usage(False, ca=True), True)]
        cert = _sign(ca_name("Demo Root CA"), None, key.public_key(), 1, (nb, nb + 3652 * DAY),
                     exts, self_key=key)
        d = self.ca_dir
        write_key(d / "root.key", key)
        write_pem(d / "root.pem", cert)
        crl = make_crl((cert, key), [], 1, self.now - timedelta(hours=1), self.now + 7 * DAY)
        write_pem(d / "root-crl.pem", crl)
        ca = DemoCa("root", d / "root.pem", d / "root.key", None, None, None, None,
                    d / "root-crl.pem", crl_url=f"{self.base}/crl/root.crl")
        return ca, (cert, key)

    def issuing(self, name: str, cn: str, key: IssuerKey, ocsp_key: IssuerKey, number: int,
                root: tuple[x509.Certificate, IssuerKey], count: int,
                partitioned: bool = False) -> DemoCa:
        """Create an issuing CA, its OCSP signer, subscribers, index.txt and CRLs."""
        d, own, now = self.ca_dir, self.ca_dir / name, self.now
        exts = [(x509.BasicConstraints(ca=True, path_length=0), True),
                (_key_usage(False, ca=True), True),
                *_urls(f"{self.base}/ocsp", f"{self.base}/crl/root.crl")]
        cert = _sign(ca_name(cn), root, key.public_key(), number,
                     (now - 1095 * DAY, root[0].not_valid_after_utc - DAY), exts)
        signer_exts = [(x509.BasicConstraints(ca=False, path_length=None), True),
                       (_key_usage(True), True),
                       (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False),
                       (x509.OCSPNoCheck(), False)]
        signer = _sign(ca_name(f"{cn} OCSP Signer"), (cert, key), ocsp_key.public_key(),
                       _random_serial(name, -1, 16), (now - DAY, now + 364 * DAY), signer_exts)
        for suffix, obj in (("", cert), ("-ocsp", signer)):
            write_pem(d / f"{name}{suffix}.pem", obj)
        write_key(d / f"{name}.key", key)
        write_key(d / f"{name}-ocsp.key", ocsp_key)
        scopes = tuple(own / f"part{p}{d}.pem" for d in ("", "-delta") for p in range(PARTITIONS)
                       ) if partitioned else ()
        ca = DemoCa(name, d / f"{name}.pem", d / f"{name}.key", d / f"{name}-ocsp.pem",
                    d / f"{name}-ocsp.key", own / "index.txt", own / "newcerts", own / "crl.pem",
                    own / "crl-2.pem", f"{self.base}/ocsp", f"{self.base}/crl/{name}.crl",
                    scopes)
        issued = self.subscribers(ca, (cert, key), count)
        _atomic_write(own / "index.txt", "".join(map(_index_line, issued)).encode(), 0o644)
        _atomic_write(own / "index.txt.attr", b"unique_subject = no\n", 0o644)
        revoked = [(c.serial, c.revoked_at, c.reason) for c in issued if c.revoked_at is not None]
        crl = make_crl((cert, key), revoked, 1, now - timedelta(hours=1), now + 7 * DAY)
        write_pem(own / "crl.pem", crl)
        released = next(c.serial for c in issued if c.state == "hold")
        newly = issued[_CRL2_SLOT].serial
        revoked2 = [r for r in revoked if r[0] != released]
        revoked2.append((newly, now - timedelta(minutes=10), "key_compromise"))
        write_pem(own / "crl-2.pem", make_crl((cert, key), revoked2, 2, now, now + 7 * DAY))
        self.crl2_revokes[name], self.crl2_releases[name] = newly, released
        if partitioned:
            self.partitions(ca, (cert, key), issued)
        return ca

    def partition_urls(self, ca: str, subject: x509.Name, part: int) -> dict[str, list[str]]:
        """The URLs of one CRL partition of a CA, as its certificates print them: ``crl``
        (CDP and the partition's IDP), ``delta`` (freshest CRL) and ``ca`` (caIssuers)."""
        ca_dn = subject.rfc4514_string()
        dp_dn = f"CN={_rdn_escape(ca_name_cn(subject))} part {part},OU=CRL," + ca_dn.split(",", 1)[1]
        ldap = f"{self.ldap_base}/{_ldap_dn(dp_dn)}"
        repo = f"{self.base}/repository/{ca}"
        return {
            "crl": [f"{repo}/part{part}.crl", f"{ldap}?certificateRevocationList;binary"],
            "delta": [f"{repo}/part{part}-delta.crl", f"{ldap}?deltaRevocationList;binary"],
            "ca": [f"{self.base}/repository/{ca}.crt", f"{self.base}/repository/{ca}.p7c",
                   f"{self.ldap_base}/{_ldap_dn(ca_dn)}?cACertificate;binary"],
        }

    def partitions(self, ca: DemoCa, pair: tuple[x509.Certificate, IssuerKey],
                   issued: list[DemoCert]) -> None:
        """Two CRL partitions (RFC 5280 §5.2.5; both number 1, each listing the revoked
        certificates whose CDP names it) and a delta CRL of each (§5.2.4: number 2, base 1;
        the delta of the partition holding the crl-2 slot revokes that certificate)."""
        own, now = ca.cert_path.parent / ca.name, self.now
        newly = self.crl2_revokes[ca.name]
        for part in range(PARTITIONS):
            urls = self.partition_urls(ca.name, pair[0].subject, part)
            idp = x509.IssuingDistributionPoint(
                full_name=[x509.UniformResourceIdentifier(u) for u in urls["crl"]],
                relative_name=None, only_contains_user_certs=True,
                only_contains_ca_certs=False, only_some_reasons=None, indirect_crl=False,
                only_contains_attribute_certs=False)
            mine = [c for c in issued if partition_of(c.serial) == part]
            revoked = [(c.serial, c.revoked_at, c.reason) for c in mine if c.revoked_at is not None]
            write_pem(own / f"part{part}.pem", make_crl(
                pair, revoked, 1, now - timedelta(hours=1), now + 7 * DAY, [(idp, True)]))
            delta = [(c.serial, now - timedelta(minutes=20), "key_compromise") for c in mine
                     if c.serial == newly]
            write_pem(own / f"part{part}-delta.pem", make_crl(
                pair, delta, 2, now - timedelta(minutes=30), now + DAY,
                [(idp, True), (x509.DeltaCRLIndicator(1), True)]))

    def subscribers(self, ca: DemoCa, pair: tuple[x509.Certificate, IssuerKey],
                    count: int) -> list[DemoCert]:
        """Issue and write the planned subscriber certificates of one CA."""
        assert ca.newcerts_dir is not None
        issued: list[DemoCert] = []
        for slot in range(count):
            state, reason, serial = _PLAN.get(slot, ("good", None, None))
            if slot == count - 1:  # the renewal of an earlier subscriber: same subject, e-mail
                renewed = issued[_RENEWED_SLOT[ca.name]]
                subject, emails = renewed.load().subject, renewed.emails
                not_before, not_after, revoked_at = self.now - 5 * DAY, self.now + 725 * DAY, None
            else:
                subject, emails = subscriber_identity(self.person)
                self.person += 1
                not_before, not_after, revoked_at = _dates(slot, state, self.now)
            if serial is None:
                serial = _random_serial(ca.name, slot, 20 if slot == 3 else 16)
            extra: list[tuple[x509.ExtensionType, bool]] = []
            if ca.scope_crl_paths:  # partitioned: its CDP, freshest CRL and caIssuers URLs
                extra = self.partition_extensions(ca, pair[0].subject, partition_of(serial))
            cert = issue_certificate(pair, subject, emails, serial, not_before, not_after,
                                     ocsp_url=ca.ocsp_url, crl_url=ca.crl_url,
                                     extra_extensions=extra)
            path = ca.newcerts_dir / f"{openssl_serial(serial)}.pem"
            write_pem(path, cert)
            issued.append(DemoCert(ca.name, serial, subject.rfc4514_string(), emails, state,
                                   reason, revoked_at, path, not_before, not_after,
                                   openssl_oneline(subject, utf8=self.utf8)))
        self.certs += issued
        return issued

    def partition_extensions(self, ca: DemoCa, subject: x509.Name,
                             part: int) -> list[tuple[x509.ExtensionType, bool]]:
        """CDP (the partition's http and ldap URLs), freshest CRL, and AIA with OCSP and
        caIssuers (DER, PKCS#7, LDAP) of a subscriber of a partitioned CA."""
        urls = self.partition_urls(ca.name, subject, part)

        def point(names: list[str]) -> x509.DistributionPoint:
            return x509.DistributionPoint([x509.UniformResourceIdentifier(u) for u in names],
                                          None, None, None)

        access = [x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                         x509.UniformResourceIdentifier(ca.ocsp_url or ""))]
        access += [x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                                          x509.UniformResourceIdentifier(u)) for u in urls["ca"]]
        return [(x509.CRLDistributionPoints([point(urls["crl"])]), False),
                (x509.FreshestCRL([point(urls["delta"])]), False),
                (x509.AuthorityInformationAccess(access), False)]


def build_demo_pki(
    folder: Path,
    *,
    now: datetime | None = None,
    subscribers_per_ca: int = 25,
    ldap_port: int = 1389,
    http_port: int = 8080,
    overwrite: bool = False,
    index_utf8_subjects: bool = False,
) -> DemoPki:
    """Create the demo PKI, its OpenSSL databases, CRLs and certpub.toml under `folder`."""
    if subscribers_per_ca < MIN_SUBSCRIBERS:
        raise ValueError(f"subscribers_per_ca must be at least {MIN_SUBSCRIBERS}")
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC).replace(microsecond=0)
    folder = Path(folder).absolute()
    _prepare(folder, overwrite)
    builder = _Builder(folder, now, http_port, index_utf8_subjects, ldap_port)
    root_ca, root = builder.root()
    write_key(folder / "ca" / "subscriber.key", subscriber_key())
    cas = {"root": root_ca}
    cas["rsa-ca"] = builder.issuing(
        "rsa-ca", "Demo RSA Issuing CA", rsa.generate_private_key(65537, 2048),
        rsa.generate_private_key(65537, 2048), 2, root, subscribers_per_ca)
    cas["ec-ca"] = builder.issuing(
        "ec-ca", "Demo EC Issuing CA", ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP256R1()), 3, root, subscribers_per_ca, partitioned=True)
    config_path = folder / "certpub.toml"
    _atomic_write(config_path, _config(folder, cas, ldap_port, http_port).encode(), 0o644)
    return DemoPki(folder, cas, builder.certs, config_path, folder / "spool",
                   builder.crl2_revokes, builder.crl2_releases, folder / "ca" / "subscriber.key",
                   now)
