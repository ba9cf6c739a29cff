"""Certificates and CRLs into the store's input values (parsing only; trust is the importer's)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from asn1crypto import crl as asn1crl
from asn1crypto import x509 as asn1x509
from cryptography import x509 as cx509
from cryptography.x509.oid import CRLEntryExtensionOID

from store import names
from store.urls import urls_of_certificate
from store.model import (
    CaId,
    CertInput,
    CrlInput,
    RevocationReason,
    RevokedEntry,
    Serial,
    idp_key,
)

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
        urls = urls_of_certificate(cert)
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
        not_before=not_before, not_after=not_after, urls=urls,
    )


def _entries_asn1crypto(tbs: asn1crl.TbsCertList) -> list[RevokedEntry]:
    """The reference reading of revokedCertificates (slow: ~70 µs an entry)."""
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
    return entries


_REASONS_BY_FLAG: dict[cx509.ReasonFlags, RevocationReason] = {
    flag: RevocationReason(flag.name) for flag in cx509.ReasonFlags
}


def _entries_fast(der: bytes) -> list[RevokedEntry] | None:
    """revokedCertificates through ``cryptography`` (~15x faster), or None to use the reference.

    Anything unusual (an encoding or extension ``cryptography`` refuses, reason code 7, a
    duplicated extension) returns None, so such CRLs are read exactly as before; entry
    extensions other than CRLReason are ignored, critical or not, as the reference does.
    """
    try:
        entries = []
        for revoked in cx509.load_der_x509_crl(der):
            reason = None
            for ext in revoked.extensions:  # raises on a duplicated or malformed extension
                if ext.oid == CRLEntryExtensionOID.CRL_REASON:
                    reason = _REASONS_BY_FLAG[ext.value.reason]
            entries.append(RevokedEntry(Serial(revoked.serial_number),
                                        revoked.revocation_date_utc, reason))
    except Exception:  # noqa: BLE001 - any refusal falls back to the reference parser
        return None
    return entries


@dataclass(frozen=True)
class CrlScopeInfo:
    """Which scope a CRL belongs to (RFC 5280 §5.2.4, §5.2.5): its IDP and delta-ness."""

    idp_der: bytes | None  # the IssuingDistributionPoint extension value, DER
    urls: tuple[str, ...]  # URIs of the IDP's distributionPoint fullName, as printed
    only: str  # "" | "user" | "ca" | "attribute"
    indirect: bool
    is_delta: bool
    base_number: int | None

    @property
    def key(self) -> str:
        """The scope's key in the store: "" for no IDP, else the IDP DER's SHA-256 (hex)."""
        return idp_key(self.idp_der)


def _uri_text(raw: bytes) -> str:
    """A URI's IA5String content as printed (latin-1 keeps any stray byte visible, so the
    store's URL checks see and refuse it; asn1crypto's ``native`` would percent-decode)."""
    return raw.decode("latin-1")


def _scope_info(crl: asn1crl.CertificateList) -> CrlScopeInfo:
    base = crl.delta_crl_indicator_value
    idp = crl.issuing_distribution_point_value
    if idp is None:
        return CrlScopeInfo(None, (), "", False, base is not None,
                            None if base is None else int(base.native))
    urls: list[str] = []
    point = idp["distribution_point"]
    if isinstance(point, asn1x509.DistributionPointName) and point.name == "full_name":
        for general_name in point.chosen:
            if general_name.name == "uniform_resource_identifier":
                urls.append(_uri_text(general_name.chosen.contents))
    only = ""
    if idp["only_contains_user_certs"].native:
        only = "user"
    elif idp["only_contains_ca_certs"].native:
        only = "ca"
    elif idp["only_contains_attribute_certs"].native:
        only = "attribute"
    return CrlScopeInfo(idp.dump(), tuple(urls), only, bool(idp["indirect_crl"].native),
                        base is not None, None if base is None else int(base.native))


def scope_of(der: bytes) -> CrlScopeInfo:
    """The scope of a CRL (its IDP and delta indicator), from one strict parse."""
    try:
        return _scope_info(asn1crl.CertificateList.load(der, strict=True))
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ParseError(f"not a CRL: {exc}") from exc


def crl_input(der: bytes, ca_id: CaId) -> CrlInput:
    """A CRL's number, scope, times and entries (RFC 5280 §5), from one strict parse."""
    try:
        crl = asn1crl.CertificateList.load(der, strict=True)
        tbs = crl["tbs_cert_list"]
        number = crl.crl_number_value
        scope = _scope_info(crl)
        this_update = _aware(tbs["this_update"].native)
        nu = tbs["next_update"].native
        next_update = None if nu is None else _aware(nu)
        entries = _entries_fast(der)
        if entries is None:
            entries = _entries_asn1crypto(tbs)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ParseError(f"not a CRL: {exc}") from exc
    except AttributeError as exc:  # an optional field asn1crypto leaves as Void
        raise ParseError(f"not a CRL: {exc}") from exc
    return CrlInput(
        ca_id=ca_id, der=der, number=None if number is None else int(number.native),
        this_update=this_update, next_update=next_update, entries=tuple(entries),
        is_delta=scope.is_delta, base_number=scope.base_number, idp_der=scope.idp_der,
        idp_urls=scope.urls, only=scope.only, indirect=scope.indirect,
    )


def _tlv(d: bytes, p: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at p; definite lengths only."""
    tag, n = d[p], d[p + 1]
    p += 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4 or p + k > len(d):
            raise ValueError("unsupported DER length")
        n = int.from_bytes(d[p:p + k], "big")
        p += k
    if p + n > len(d):
        raise ValueError("DER element overruns its container")
    return tag, p, p + n


def crl_entry_ders(der: bytes) -> list[bytes] | None:
    """The revokedCertificates entries of a CRL as raw DER, in order (RFC 5280 §5.1.2.6).

    None when the layout is not the expected one. Meant for CRLs ``crl_input`` accepted.
    """
    try:
        _, p, _ = _tlv(der, 0)  # CertificateList
        _, p, end = _tlv(der, p)  # TBSCertList
        tag, s, e = _tlv(der, p)
        if tag == 0x02:  # version
            p = e
            tag, s, e = _tlv(der, p)
        for expected in ((0x30,), (0x30,), (0x17, 0x18)):  # signature, issuer, thisUpdate
            if tag not in expected:
                return None
            p = e
            tag, s, e = _tlv(der, p) if p < end else (0, p, p)
        if tag in (0x17, 0x18):  # nextUpdate
            p = e
            tag, s, e = _tlv(der, p) if p < end else (0, p, p)
        if tag != 0x30 or p >= end:
            return []
        out: list[bytes] = []
        q = s
        while q < e:
            etag, _, qe = _tlv(der, q)
            if etag != 0x30 or qe > e:
                return None
            out.append(der[q:qe])
            q = qe
        return out
    except (IndexError, ValueError):
        return None


def entry_serial(entry_der: bytes) -> int:
    """The userCertificate serial of one raw revokedCertificates entry."""
    _, p, _ = _tlv(entry_der, 0)
    tag, s, e = _tlv(entry_der, p)
    if tag != 0x02:
        raise ValueError("entry without a serial")
    return int.from_bytes(entry_der[s:e], "big", signed=True)


def url_extension_values(der: bytes) -> tuple[bytes | None, bytes | None, bytes | None] | None:
    """The raw values of a certificate's CRL distribution points, freshest CRL and AIA
    extensions (``store.urls.URL_OIDS`` order), by a walk over its DER; None when it has
    none of them or the layout is not the expected one (meant for stored certificates)."""
    from store.urls import URL_OIDS

    try:
        _, p, _ = _tlv(der, 0)  # Certificate
        _, p, end = _tlv(der, p)  # TBSCertificate
        while p < end:
            tag, s, e = _tlv(der, p)
            p = e
            if tag != 0xA3:
                continue
            _, q, exts_end = _tlv(der, s)
            raws: list[bytes | None] = [None, None, None]
            while q < exts_end:
                _, r, ext_end = _tlv(der, q)
                q = ext_end
                _, _, oe = _tlv(der, r)
                slot = URL_OIDS.get(der[r:oe])
                if slot is None:
                    continue
                tag, vs, ve = _tlv(der, oe)
                if tag == 0x01:  # critical
                    tag, vs, ve = _tlv(der, ve)
                if tag == 0x04 and raws[slot] is None:
                    raws[slot] = der[vs:ve]
            return (raws[0], raws[1], raws[2]) if raws != [None, None, None] else None
    except (IndexError, ValueError):
        return None
    return None
