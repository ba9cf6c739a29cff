"""Typed values the store hands to the servers and takes from the importer."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NewType

Serial = NewType("Serial", int)
CaId = NewType("CaId", int)
Generation = NewType("Generation", int)

HASH_ALGORITHMS: tuple[str, ...] = ("sha1", "sha256", "sha384", "sha512")


class CertStatus(enum.Enum):
    """What the CA says of a certificate (expiry is derived from notAfter, not stored)."""

    GOOD = "good"
    REVOKED = "revoked"


class RevocationReason(enum.Enum):
    """RFC 5280 §5.3.1 CRLReason, named as asn1crypto names them."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key_compromise"
    CA_COMPROMISE = "ca_compromise"
    AFFILIATION_CHANGED = "affiliation_changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation_of_operation"
    CERTIFICATE_HOLD = "certificate_hold"
    REMOVE_FROM_CRL = "remove_from_crl"
    PRIVILEGE_WITHDRAWN = "privilege_withdrawn"
    AA_COMPROMISE = "aa_compromise"

    @property
    def code(self) -> int:
        return _REASON_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> RevocationReason:
        for reason, c in _REASON_CODES.items():
            if c == code:
                return reason
        raise ValueError(f"unknown CRL reason code {code}")


_REASON_CODES = {
    RevocationReason.UNSPECIFIED: 0,
    RevocationReason.KEY_COMPROMISE: 1,
    RevocationReason.CA_COMPROMISE: 2,
    RevocationReason.AFFILIATION_CHANGED: 3,
    RevocationReason.SUPERSEDED: 4,
    RevocationReason.CESSATION_OF_OPERATION: 5,
    RevocationReason.CERTIFICATE_HOLD: 6,
    RevocationReason.REMOVE_FROM_CRL: 8,
    RevocationReason.PRIVILEGE_WITHDRAWN: 9,
    RevocationReason.AA_COMPROMISE: 10,
}


def utc(ts: int | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True)
class IssuerHashes:
    """Issuer name and key hashes for one hash algorithm (RFC 6960 §4.1.1 CertID)."""

    algorithm: str
    name_hash: bytes
    key_hash: bytes


@dataclass(frozen=True)
class CaRecord:
    """A CA this repository serves, with the latest CRL of its full scope (no IDP, not a
    delta; ``SqlStore.crl_scopes`` lists every scope)."""

    id: CaId
    name: str
    subject_dn: str  # RFC 4514, display form
    subject_key: str  # normalised DN key (store.names.DN.key)
    directory_key: str  # normalised key of the public (directory) DN
    cert_der: bytes
    hashes: tuple[IssuerHashes, ...]
    crl_der: bytes | None
    crl_number: int | None
    crl_this_update: datetime | None
    crl_next_update: datetime | None
    synced_at: datetime | None  # when the importer last confirmed this CA's statuses
    updated_at: datetime

    def hash_for(self, algorithm: str) -> IssuerHashes | None:
        for h in self.hashes:
            if h.algorithm == algorithm:
                return h
        return None


@dataclass(frozen=True)
class CertRecord:
    """One certificate (or a serial known only from a CRL, then ``der`` is None)."""

    id: int
    ca_id: CaId
    serial: Serial
    der: bytes | None
    subject_dn: str  # RFC 4514 display form of the full subject
    directory_dn: str  # RFC 4514 display form of the published DN (non-public AVAs removed)
    directory_key: str  # normalised key of directory_dn
    emails: tuple[str, ...]
    cn: str | None
    not_before: datetime | None
    not_after: datetime | None
    status: CertStatus
    revoked_at: datetime | None
    reason: RevocationReason | None
    imported_at: datetime
    source: str
    generation: Generation

    def is_expired(self, now: datetime) -> bool:
        return self.not_after is not None and self.not_after < now

    def is_revoked(self) -> bool:
        return self.status is CertStatus.REVOKED


@dataclass(frozen=True)
class CrlScope:
    """The latest applied CRL of one scope: (CA, IDP, delta?) — RFC 5280 §5.2.5 / §5.2.4."""

    id: int
    ca_id: CaId
    idp_der: bytes | None  # the IssuingDistributionPoint extension value (DER); None: full scope
    delta: bool
    urls: tuple[str, ...]  # URIs in the IDP distributionPoint fullName (http:// and ldap://)
    only: str  # "" | "user" | "ca" | "attribute" (onlyContains… flags)
    der: bytes  # the CRL itself, as imported
    number: int | None
    base_number: int | None  # delta CRLs: BaseCRLNumber (§5.2.4)
    this_update: datetime
    next_update: datetime | None
    updated_at: datetime
    generation: Generation

    @property
    def label(self) -> str:
        """"full", "full (delta)", or the last path segment of the first URL (an http one
        if any), with " (delta)" for deltas: stable, for people and metrics."""
        if self.idp_der is None:
            base = "full"
        else:
            base = scope_label(self.urls, self.only)
        return base + " (delta)" if self.delta else base


def idp_key(idp_der: bytes | None) -> str:
    """A CRL scope's key in the store: "" for no IDP, else the IDP DER's SHA-256 (hex)."""
    return "" if idp_der is None else hashlib.sha256(idp_der).hexdigest()


def scope_label(urls: tuple[str, ...], only: str) -> str:
    """The label of an IDP-scoped CRL: its first URL's last path segment (http first)."""
    pick = next((u for u in urls if u.startswith(("http://", "https://"))), None)
    if pick is None and urls:
        pick = urls[0]
    if pick is None:
        return f"idp ({only or 'no name'})"
    path = pick.split("?", 1)[0].split("://", 1)[-1]
    tail = path.rstrip("/").rsplit("/", 1)[-1] if "/" in path else path
    return tail or path


@dataclass(frozen=True)
class UrlTarget:
    """What a URL printed in the CA's certificates names, resolved to stored bytes."""

    url: str  # normalised: scheme and host lower-case, default port dropped
    kind: str  # "crl" | "delta" | "ca"  (CDP, freshest CRL, AIA caIssuers)
    ca_id: CaId  # the CA whose CRL / certificate it is
    scope_id: int | None  # for "crl" / "delta"
    der: bytes  # the CRL, or the CA certificate
    this_update: datetime | None
    next_update: datetime | None
    generation: Generation


@dataclass(frozen=True)
class LearntUrl:
    """A URL learnt from imported certificates (or a CRL's IDP)."""

    url: str
    scheme: str
    host: str
    path: str  # as printed (percent-encoded), no query
    kind: str  # "crl" | "delta" | "ca"
    ca_id: CaId  # the issuer of the certificates that print it
    conflict: bool  # claimed by certificates of two different CAs → never served


@dataclass(frozen=True)
class DirectoryEntry:
    """A node of the published DN tree: a subject, a CA, or glue above them."""

    key: str
    dn: str
    parent_key: str | None
    kind: str  # "glue" | "crldp" | "subject" | "ca"


class PublishedCert:
    """What a directory entry shows of one published certificate: its DER, its addresses,
    notAfter (POSIX seconds) and whether it is revoked (``Store.entry_with_certs``)."""

    __slots__ = ("der", "emails", "not_after_ts", "revoked")

    def __init__(self, der: bytes, emails: str, not_after: int | None, status: str) -> None:
        self.der = bytes(der)
        self.emails = tuple(e for e in emails.split("\n") if e) if emails else ()
        self.not_after_ts = not_after
        self.revoked = status == "revoked"

    @property
    def not_after(self) -> datetime | None:
        return None if self.not_after_ts is None else datetime.fromtimestamp(self.not_after_ts, UTC)

    def is_revoked(self) -> bool:
        return self.revoked

    def is_expired(self, now: datetime) -> bool:
        return self.not_after_ts is not None and self.not_after_ts < now.timestamp()


@dataclass(frozen=True)
class Change:
    """One row of the change log: what a committed batch touched."""

    generation: Generation
    kind: str  # "cert" | "ca" | "crl"
    ca_id: CaId
    serial: Serial | None
    directory_key: str | None


@dataclass(frozen=True)
class CaStats:
    """Counts per status for ``certpub status``: each certificate in exactly one of good
    (unexpired), revoked (for good: any reason but certificateHold), on_hold, expired (never
    revoked, past notAfter); a revoked certificate stays revoked after it expires."""

    ca: CaRecord
    good: int
    revoked: int
    expired: int
    on_hold: int
    last_import: datetime | None

    @property
    def total(self) -> int:
        return self.good + self.revoked + self.on_hold + self.expired


# --- what the importer writes ------------------------------------------------------------


@dataclass(frozen=True)
class CertInput:
    """A verified certificate, parsed, ready to store."""

    ca_id: CaId
    serial: Serial
    der: bytes
    subject_dn: str
    subject_key: str
    directory_dn: str
    directory_key: str
    directory_ancestors: tuple[tuple[str, str], ...]  # (key, display) of each ancestor
    emails: tuple[str, ...]
    attributes: tuple[tuple[str, str], ...]  # (lower-case attr name, normalised value)
    cn: str | None
    not_before: datetime
    not_after: datetime
    # (kind, URI as printed): CRL distribution points "crl", freshest CRL "delta", AIA
    # caIssuers "ca" (RFC 5280 §4.2.1.13, §4.2.1.15, §4.2.2.1), in certificate order
    urls: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RevokedEntry:
    serial: Serial
    revoked_at: datetime
    reason: RevocationReason | None


@dataclass(frozen=True)
class CrlInput:
    """A verified CRL (full or delta) for one CA."""

    ca_id: CaId
    der: bytes
    number: int | None
    this_update: datetime
    next_update: datetime | None
    entries: tuple[RevokedEntry, ...]
    is_delta: bool = False
    base_number: int | None = None  # delta CRLs: BaseCRLNumber (RFC 5280 §5.2.4)
    idp_der: bytes | None = None  # IssuingDistributionPoint extension value (§5.2.5), as DER
    idp_urls: tuple[str, ...] = ()  # URIs of the IDP's distributionPoint fullName
    only: str = ""  # "" | "user" | "ca" | "attribute": the IDP's onlyContains… flag
    indirect: bool = False  # IDP indirectCRL (refused: §5.3.3 certificateIssuer not read)


@dataclass(frozen=True)
class IndexLine:
    """One line of an OpenSSL CA ``index.txt``."""

    status: str  # "V" | "R" | "E"
    expires: datetime
    revoked_at: datetime | None
    reason: RevocationReason | None
    serial: Serial
    filename: str
    subject: str


@dataclass
class BatchResult:
    """What one committed batch changed."""

    generation: Generation | None = None  # None when nothing changed
    certs_new: int = 0
    certs_updated: int = 0
    certs_unchanged: int = 0
    revoked: int = 0
    released: int = 0
    crls: int = 0
    cas: int = 0
    urls: int = 0  # learnt URLs added or marked conflict
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.certs_new or self.certs_updated or self.revoked or self.released
                    or self.crls or self.cas or self.urls)
