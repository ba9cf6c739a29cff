"""Certificates into the store's ``CertInput``, read with ``cryptography``'s Rust parser.

Strategy: ``store.certparse.cert_input`` (asn1crypto, strict) is the reference reading and
costs ~300 µs a certificate; this module gets the same values from the already parsed
``cryptography`` certificate plus a small walk over the DER of the subject Name (~30 µs).
Only the common string types (UTF8String, PrintableString, IA5String) are decoded here, with
the reference's codecs; any other value, an extension ``cryptography`` refuses, or anything
unexpected falls back to the reference, so both readings always agree (tests/importer/
test_parse.py compares them).
"""

from __future__ import annotations

import re
from datetime import datetime

from asn1crypto import core as asn1core
from cryptography import x509

from store import names
from store.certparse import INDEXED_ATTRIBUTES, cert_input
from store.model import CaId, CertInput, Serial

_STRINGS = {0x0C: "utf-8", 0x13: "latin1", 0x16: "ascii"}  # asn1crypto's codecs for these
_OIDS: dict[bytes, str] = {}
_AVAS: dict[bytes, names.AVA] = {}  # DER of an AttributeTypeAndValue -> its AVA


class _Unusual(Exception):
    """Something the fast reading leaves to the reference."""


def _tlv(d: bytes, p: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at p; definite lengths only."""
    tag, n = d[p], d[p + 1]
    p += 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4:
            raise _Unusual
        n = int.from_bytes(d[p:p + k], "big")
        p += k
    if p + n > len(d):
        raise _Unusual
    return tag, p, p + n


def _oid(raw: bytes) -> str:
    dotted = _OIDS.get(raw)
    if dotted is None:
        dotted = asn1core.ObjectIdentifier.load(raw, strict=True).dotted
        if len(_OIDS) < 4096:
            _OIDS[raw] = dotted
    return dotted


def subject_der(tbs: bytes) -> bytes:
    """The subject Name of a TBSCertificate, as DER (RFC 5280 §4.1)."""
    _, p, end = _tlv(tbs, 0)
    tag, _, e = _tlv(tbs, p)
    if tag == 0xA0:  # [0] version
        p = e
    for _ in range(4):  # serialNumber, signature, issuer, validity
        _, _, p = _tlv(tbs, p)
    tag, _, e = _tlv(tbs, p)
    if tag != 0x30 or e > end:
        raise _Unusual
    return tbs[p:e]


def dn_of(name_der: bytes) -> names.DN:
    """``names.from_der`` of a Name, without asn1crypto for the common string types."""
    tag, p, end = _tlv(name_der, 0)
    if tag != 0x30:
        raise _Unusual
    rdns: list[names.RDN] = []
    while p < end:
        tag, q, set_end = _tlv(name_der, p)
        if tag != 0x31:
            raise _Unusual
        avas = []
        while q < set_end:
            tag, r, ava_end = _tlv(name_der, q)
            tag2, _, oe = _tlv(name_der, r)
            if tag != 0x30 or tag2 != 0x06:
                raise _Unusual
            raw = name_der[q:ava_end]
            ava = _AVAS.get(raw)  # the upper levels of a CA's names repeat: decode them once
            if ava is None:
                ava = _ava(name_der, r, oe, ava_end)
                if len(_AVAS) >= 65536:
                    _AVAS.clear()
                _AVAS[raw] = ava
            avas.append(ava)
            q = ava_end
        rdns.append(tuple(sorted(avas, key=_ava_key)))
        p = set_end
    rdns.reverse()
    return names.DN(tuple(rdns))


def _ava(name_der: bytes, r: int, oe: int, ava_end: int) -> names.AVA:
    """One AttributeTypeAndValue: the OID at r, the value from oe to ava_end."""
    oid = _oid(name_der[r:oe])
    vtag, vs, ve = _tlv(name_der, oe)
    if ve != ava_end:
        raise _Unusual
    codec = _STRINGS.get(vtag)
    if codec is not None:
        try:
            text = name_der[vs:ve].decode(codec)
        except UnicodeDecodeError:
            pass
        else:
            return names.AVA(oid, names.prep_value(text), text)
    return _reference_ava(oid, name_der[oe:ve])


def _ava_key(a: names.AVA) -> tuple[str, str]:
    return (a.oid, a.norm)


_SPECIAL = re.compile(r'[,+"\\<>;=\x00]|^[ #]| $')


def _escape(value: str) -> str:
    """``names``' RFC 4514 §2.4 escaping, skipped for the (usual) values that need none."""
    return names._escape(value) if _SPECIAL.search(value) else value


def _rdn_key(rdn: names.RDN) -> str:
    """This RDN's part of ``names.DN.key`` (its AVAs are already sorted)."""
    return "+".join(f"{a.oid}={_escape(a.norm)}" for a in rdn)


def _rdn_str(rdn: names.RDN) -> str:
    """This RDN's part of ``str(names.DN)``."""
    return "+".join(f"{names.SHORT_NAMES.get(a.oid, a.oid)}={_escape(a.display)}" for a in rdn)


def _reference_ava(oid: str, value_der: bytes) -> names.AVA:
    try:
        parsed = asn1core.load(value_der, strict=True)
        native = parsed.native
    except (ValueError, TypeError, OverflowError) as exc:
        raise _Unusual from exc
    if isinstance(native, str):
        return names.AVA(oid, names.prep_value(native), native)
    hexed = "#" + value_der.hex()
    return names.AVA(oid, hexed, hexed)


def _san_emails(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for value in san.get_values_for_type(x509.RFC822Name):
        raw = value.encode("ascii")
        if b"@" not in raw:
            out.append(raw.decode("cp1252"))
        else:
            mailbox, host = raw.rsplit(b"@", 1)
            out.append(mailbox.decode("cp1252") + "@" + host.decode("idna"))
    return out


def fast_cert_input(cert: x509.Certificate, der: bytes, ca_id: CaId) -> CertInput:
    """``store.certparse.cert_input(der, ca_id)`` for a certificate already parsed."""
    try:
        dn = dn_of(subject_der(cert.tbs_certificate_bytes))
        serial = Serial(cert.serial_number)
        not_before: datetime = cert.not_valid_before_utc
        not_after: datetime = cert.not_valid_after_utc
        san_emails = _san_emails(cert)
    except Exception:  # noqa: BLE001 - anything unusual: the reference decides
        return cert_input(der, ca_id)
    keys = [_rdn_key(rdn) for rdn in dn.rdns]
    shown = [_rdn_str(rdn) for rdn in dn.rdns]
    public_rdns = [tuple(a for a in rdn if a.oid in names.PUBLIC_DN_TYPES) for rdn in dn.rdns]
    pk = [_rdn_key(r) for r in public_rdns if r]
    ps = [_rdn_str(r) for r in public_rdns if r]
    ancestors = tuple((",".join(pk[i:]), ",".join(ps[i:])) for i in range(1, len(pk)))
    emails: list[str] = []
    seen: set[str] = set()
    for value in san_emails + [a.display for rdn in dn.rdns for a in rdn
                               if INDEXED_ATTRIBUTES.get(a.oid) == "mail"]:
        if value and value.lower() not in seen:
            seen.add(value.lower())
            emails.append(value)
    attrs = {("mail", names.prep_value(e)) for e in emails}
    for rdn in public_rdns:
        for a in rdn:
            attr = INDEXED_ATTRIBUTES.get(a.oid)
            if attr is not None and not a.norm.startswith("#"):
                attrs.add((attr, a.norm))
    cns = dn.leaf_values("2.5.4.3") or [a.display for r in dn.rdns for a in r
                                        if a.oid == "2.5.4.3"]
    return CertInput(
        ca_id=ca_id, serial=serial, der=der, subject_dn=",".join(shown),
        subject_key=",".join(keys), directory_dn=",".join(ps), directory_key=",".join(pk),
        directory_ancestors=ancestors,
        emails=tuple(emails), attributes=tuple(sorted(attrs)), cn=cns[0] if cns else None,
        not_before=not_before, not_after=not_after,
    )
