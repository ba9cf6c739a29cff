"""Certificates and CRLs into the store's input values (parsing only; trust is the importer's)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from asn1crypto import crl as asn1crl
from asn1crypto import x509 as asn1x509

from store import names
from store.model import CaId, CertInput, CrlInput, RevocationReason, RevokedEntry, Serial

# Public DN attribute OIDs -> the LDAP attribute their values are indexed under.
INDEXED_ATTRIBUTES: dict[str, str] = {
    "2.5.4.3": "cn",
    "2.5.4.4": "sn",
    "2.5.4.42": "givenname",
    "2.5.4.10": "o",
    "2.5.4.11": "ou",
    "2.5.4.6": "c",
    "2.5.4.7": "l",
    "2.5.4.8": "st",
    "0.9.2342.19200300.100.1.3": "mail",
    "1.2.840.113549.1.9.1": "mail",
}


class ParseError(ValueError):
    """Input that is not a well-formed certificate or CRL."""


@dataclass(frozen=True)
class CaInfo:
    subject_dn: str
    subject_key: str
    directory_dn: str
    directory_key: str
    directory_ancestors: tuple[tuple[str, str], ...]
    name_der: bytes
    key_bits: bytes


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _directory(dn: names.DN) -> tuple[names.DN, tuple[tuple[str, str], ...]]:
    public = dn.public()
    return public, tuple((a.key, str(a)) for a in public.ancestors())


def ca_info(der: bytes) -> CaInfo:
    """Names and CertID hash inputs of a CA certificate."""
    try:
        cert = asn1x509.Certificate.load(der, strict=True)
        subject = cert.subject
        dn = names.from_x509(subject)
        key_bits = cert["tbs_certificate"]["subject_public_key_info"]["public_key"].contents[1:]
        name_der = subject.dump()
    except (ValueError, TypeError, KeyError) as exc:
        raise ParseError(f"not a certificate: {exc}") from exc
    public, ancestors = _directory(dn)
    return CaInfo(str(dn), dn.key, str(public), public.key, ancestors, name_der, bytes(key_bits))


def cert_input(der: bytes, ca_id: CaId) -> CertInput:
    """Everything the store keeps of a certificate, copied out of one strict parse."""
    try:
        cert = asn1x509.Certificate.load(der, strict=True)
        tbs = cert["tbs_certificate"]
        serial = Serial(int(tbs["serial_number"].native))
        dn = names.from_x509(cert.subject)
        validity = tbs["validity"]
        not_before = _aware(validity["not_before"].native)
        not_after = _aware(validity["not_after"].native)
        san_emails = []
        san = cert.subject_alt_name_value
        if san is not None:
            for general_name in san:
                if general_name.name == "rfc822_name":
                    san_emails.append(str(general_name.native))
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ParseError(f"not a certificate: {exc}") from exc
    public, ancestors = _directory(dn)
    emails: list[str] = []
    for value in san_emails + [
        a.display for rdn in dn.rdns for a in rdn
        if INDEXED_ATTRIBUTES.get(a.oid) == "mail"
    ]:
        if value and value.lower() not in (e.lower() for e in emails):
            emails.append(value)
    attrs = {("mail", names.prep_value(e)) for e in emails}
    for rdn in public.rdns:
        for a in rdn:
            attr = INDEXED_ATTRIBUTES.get(a.oid)
            if attr is not None and not a.norm.startswith("#"):
                attrs.add((attr, a.norm))
    cns = dn.leaf_values("2.5.4.3") or [a.display for r in dn.rdns for a in r if a.oid == "2.5.4.3"]
    return CertInput(
        ca_id=ca_id, serial=serial, der=der, subject_dn=str(dn), subject_key=dn.key,
        directory_dn=str(public), directory_key=public.key, directory_ancestors=ancestors,
        emails=tuple(emails), attributes=tuple(sorted(attrs)), cn=cns[0] if cns else None,
        not_before=not_before, not_after=not_after,
    )


def crl_input(der: bytes, ca_id: CaId) -> CrlInput:
    """A CRL's number, times and entries (RFC 5280 §5), copied out of one strict parse."""
    try:
        crl = asn1crl.CertificateList.load(der, strict=True)
        tbs = crl["tbs_cert_list"]
        number = crl.crl_number_value
        is_delta = crl.delta_crl_indicator_value is not None
        this_update = _aware(tbs["this_update"].native)
        nu = tbs["next_update"].native
        next_update = None if nu is None else _aware(nu)
        entries = []
        for revoked in tbs["revoked_certificates"]:
            reason_value = revoked.crl_reason_value
            reason = None if reason_value is None else RevocationReason(reason_value.native)
            entries.append(
                RevokedEntry(
                    Serial(int(revoked["user_certificate"].native)),
                    _aware(revoked["revocation_date"].native),
                    reason,
                )
            )
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ParseError(f"not a CRL: {exc}") from exc
    return CrlInput(
        ca_id=ca_id, der=der, number=None if number is None else int(number.native),
        this_update=this_update, next_update=next_update, entries=tuple(entries),
        is_delta=is_delta,
    )
