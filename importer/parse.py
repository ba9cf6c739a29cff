"""Certificates into the store's rows (``CertRow``) and ``CertInput``, without asn1crypto.

Strategy: ``store.certparse.cert_input`` (asn1crypto, strict) is the reference reading and
costs ~300 µs a certificate; this module gets the same values from the already parsed
``cryptography`` certificate plus one walk over the TBSCertificate's DER (subject Name and
the SubjectAltName extension), ~20 µs: the RDNs above the leaf are read once per distinct
parent and cached, since a CA's certificates share them. Only the common string types
(UTF8String, PrintableString, IA5String) are decoded here, with the reference's codecs; any
other value, a repeated extension, or anything unexpected falls back to the reference, so
both readings always agree (tests/importer/test_parse.py compares them).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any, NamedTuple

from asn1crypto import core as asn1core
from cryptography import x509

from store import names
from store.certparse import INDEXED_ATTRIBUTES, cert_input
from store.model import CaId, CertInput, Serial
from store.urls import URL_OIDS, urls_of_extensions
from store.writer import CertRow, cert_row

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
        rdn, p = _rdn_at(name_der, p, True)  # the upper levels of a CA's names repeat
        rdns.append(rdn)
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
            return names.AVA(oid, _prep(text), text)
    return _reference_ava(oid, name_der[oe:ve])


def _prep(value: str) -> str:
    """``names.prep_value``; for ASCII (NFKC and case folding are then ``lower``, and
    ``str.split`` splits on what ``\\s`` matches) without the normalisation and the regex."""
    if value.isascii():
        return " ".join(value.lower().split())
    return names.prep_value(value)


_HOSTS: dict[bytes, str] = {}  # mail host -> its IDNA decoding (a CA's mail hosts repeat)


def _host(raw: bytes) -> str:
    host = _HOSTS.get(raw)
    if host is None:
        host = raw.decode("idna")
        if len(_HOSTS) >= 4096:
            _HOSTS.clear()
        _HOSTS[raw] = host
    return host


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


def tbs_of(der: bytes) -> bytes:
    """The TBSCertificate of a certificate's DER, as the bytes that were signed."""
    _, p, _ = _tlv(der, 0)
    _, _, e = _tlv(der, p)
    return der[p:e]


def tbs_parts(tbs: bytes) -> tuple[int, int, int, int, int, int, int]:
    """Offsets in a TBSCertificate (RFC 5280 §4.1): issuer start/end, subject start/end,
    subjectPublicKeyInfo start/end, and the end of the TBSCertificate's contents."""
    tag, p, end = _tlv(tbs, 0)
    if tag != 0x30 or end != len(tbs):
        raise _Unusual
    tag, _, e = _tlv(tbs, p)
    if tag == 0xA0:  # [0] version
        p = e
    _, _, p = _tlv(tbs, p)  # serialNumber
    _, _, p = _tlv(tbs, p)  # signature
    _, _, e = _tlv(tbs, p)
    issuer = (p, e)
    _, _, p = _tlv(tbs, e)  # validity
    tag, _, e = _tlv(tbs, p)
    if tag != 0x30:
        raise _Unusual
    subject = (p, e)
    _, _, e2 = _tlv(tbs, e)
    return issuer[0], issuer[1], subject[0], subject[1], e, e2, end


_SAN_OID = b"\x06\x03\x55\x1d\x11"  # id-ce-subjectAltName (RFC 5280 §4.2.1.6)


def _san_emails_der(tbs: bytes, p: int, end: int,
                    url_raws: list[bytes | None]) -> list[str]:
    """The rfc822Name values of the SubjectAltName extension, from the fields after the
    subjectPublicKeyInfo; an extension repeated or anything unexpected raises _Unusual.
    The raw values of the URL-bearing extensions (CRL distribution points, freshest CRL,
    AIA: ``store.urls.URL_OIDS``) go into url_raws, by slot."""
    out: list[str] = []
    while p < end:
        tag, q, e = _tlv(tbs, p)
        p = e
        if tag != 0xA3:  # [1] issuerUniqueID, [2] subjectUniqueID
            if tag not in (0x81, 0x82):
                raise _Unusual
            continue
        tag, q, exts_end = _tlv(tbs, q)
        if tag != 0x30 or exts_end != e:
            raise _Unusual
        seen: set[bytes] = set()
        while q < exts_end:
            tag, r, ext_end = _tlv(tbs, q)
            tag2, _, oe = _tlv(tbs, r)
            if tag != 0x30 or tag2 != 0x06:
                raise _Unusual
            oid = tbs[r:oe]
            if oid in seen:
                raise _Unusual  # a repeated extension: the reference decides
            seen.add(oid)
            q = ext_end
            if oid != _SAN_OID:
                slot = URL_OIDS.get(oid)
                if slot is not None:
                    tag, vs, ve = _tlv(tbs, oe)
                    if tag == 0x01:  # critical
                        tag, vs, ve = _tlv(tbs, ve)
                    if tag != 0x04 or ve != ext_end:
                        raise _Unusual
                    url_raws[slot] = tbs[vs:ve]
                continue
            tag, vs, ve = _tlv(tbs, oe)
            if tag == 0x01:  # critical
                tag, vs, ve = _tlv(tbs, ve)
            if tag != 0x04 or ve != ext_end:
                raise _Unusual
            tag, g, gend = _tlv(tbs, vs)
            if tag != 0x30 or gend != ve:
                raise _Unusual
            while g < gend:
                tag, gs, ge = _tlv(tbs, g)
                g = ge
                if tag != 0x81:
                    continue
                raw = tbs[gs:ge]
                if not raw.isascii():
                    raise _Unusual
                if b"@" not in raw:
                    out.append(raw.decode("ascii"))
                else:
                    mailbox, host = raw.rsplit(b"@", 1)
                    out.append(mailbox.decode("ascii") + "@" + _host(host))
    return out


class _Parent(NamedTuple):
    """What a subject's RDNs above the leaf contribute (shared by a CA's certificates)."""

    keys: str  # their part of the subject key ("" for none)
    shown: str  # their part of the subject DN
    chain: tuple[tuple[str, str], ...]  # (key, DN) of each public ancestor, nearest first
    mails: tuple[str, ...]  # display values of their mail attributes
    attrs: frozenset[tuple[str, str]]  # indexed (attr, value) pairs of their public AVAs
    cns: tuple[str, ...]  # display values of their commonNames


_PARENTS: dict[bytes, _Parent] = {}


def _rdn_at(name_der: bytes, p: int, cache: bool) -> tuple[names.RDN, int]:
    """The RDN (a SET of AVAs, sorted) at p, and where it ends."""
    tag, q, set_end = _tlv(name_der, p)
    if tag != 0x31:
        raise _Unusual
    avas = []
    while q < set_end:
        tag, r, ava_end = _tlv(name_der, q)
        tag2, _, oe = _tlv(name_der, r)
        if tag != 0x30 or tag2 != 0x06:
            raise _Unusual
        if cache:
            raw = name_der[q:ava_end]
            ava = _AVAS.get(raw)
            if ava is None:
                ava = _ava(name_der, r, oe, ava_end)
                if len(_AVAS) >= 65536:
                    _AVAS.clear()
                _AVAS[raw] = ava
        else:
            ava = _ava(name_der, r, oe, ava_end)
        avas.append(ava)
        q = ava_end
    if len(avas) > 1:
        avas.sort(key=_ava_key)
    return tuple(avas), set_end


def _parent(name_der: bytes, p: int, last: int) -> _Parent:
    raw = name_der[p:last]
    got = _PARENTS.get(raw)
    if got is not None:
        return got
    rdns = []
    while p < last:
        rdn, p = _rdn_at(name_der, p, True)
        rdns.append(rdn)
    rdns.reverse()
    public = [tuple(a for a in rdn if a.oid in names.PUBLIC_DN_TYPES) for rdn in rdns]
    pk = [_rdn_key(r) for r in public if r]
    ps = [_rdn_str(r) for r in public if r]
    attrs = set()
    for rdn in public:
        for a in rdn:
            attr = INDEXED_ATTRIBUTES.get(a.oid)
            if attr is not None and not a.norm.startswith("#"):
                attrs.add((attr, a.norm))
    got = _Parent(
        keys=",".join(_rdn_key(r) for r in rdns), shown=",".join(_rdn_str(r) for r in rdns),
        chain=tuple((",".join(pk[i:]), ",".join(ps[i:])) for i in range(len(pk))),
        mails=tuple(a.display for rdn in rdns for a in rdn
                    if INDEXED_ATTRIBUTES.get(a.oid) == "mail"),
        attrs=frozenset(attrs),
        cns=tuple(a.display for rdn in rdns for a in rdn if a.oid == "2.5.4.3"),
    )
    if len(_PARENTS) >= 4096:
        _PARENTS.clear()
    _PARENTS[raw] = got
    return got


def _fields(cert: x509.Certificate, tbs: bytes) -> tuple[Any, ...]:
    """(subject_dn, subject_key, directory_dn, directory_key, ancestors, emails, attributes,
    cn, urls) of a certificate: the leaf RDN read here, the RDNs above it from a cache; the
    URLs (``store.urls.urls_of_extensions``) read once per distinct extension value."""
    _, _, s0, s1, _, spki_end, tbs_end = tbs_parts(tbs)
    name = tbs[s0:s1]
    _, p, end = _tlv(name, 0)
    last, q = -1, p
    while q < end:
        last = q
        tag, _, q = _tlv(name, q)
        if tag != 0x31:
            raise _Unusual
    if last < 0:
        raise _Unusual  # an empty subject: the reference decides
    parent = _parent(name, p, last) if last > p else _NO_PARENT
    leaf, _ = _rdn_at(name, last, False)
    leaf_key, leaf_shown = _rdn_key(leaf), _rdn_str(leaf)
    subject_key = leaf_key + "," + parent.keys if parent.keys else leaf_key
    subject_dn = leaf_shown + "," + parent.shown if parent.keys else leaf_shown
    pub = tuple(a for a in leaf if a.oid in names.PUBLIC_DN_TYPES)
    chain = parent.chain
    if pub:
        lk, ls = (leaf_key, leaf_shown) if len(pub) == len(leaf) else (_rdn_key(pub), _rdn_str(pub))
        dkey, ddn = (lk + "," + chain[0][0], ls + "," + chain[0][1]) if chain else (lk, ls)
        ancestors = chain
    elif chain:
        (dkey, ddn), ancestors = chain[0], chain[1:]
    else:
        dkey, ddn, ancestors = "", "", ()
    emails: list[str] = []
    seen: set[str] = set()
    url_raws: list[bytes | None] = [None, None, None]
    for value in (*_san_emails_der(tbs, spki_end, tbs_end, url_raws),
                  *(a.display for a in leaf if INDEXED_ATTRIBUTES.get(a.oid) == "mail"),
                  *parent.mails):
        if value and value.lower() not in seen:
            seen.add(value.lower())
            emails.append(value)
    attrs = set(parent.attrs)
    attrs.update(("mail", _prep(e)) for e in emails)
    for a in pub:
        attr = INDEXED_ATTRIBUTES.get(a.oid)
        if attr is not None and not a.norm.startswith("#"):
            attrs.add((attr, a.norm))
    cns = [a.display for a in leaf if a.oid == "2.5.4.3"] or parent.cns
    urls = urls_of_extensions(*url_raws) if url_raws != _NO_URLS else ()
    return (subject_dn, subject_key, ddn, dkey, ancestors, emails, tuple(sorted(attrs)),
            cns[0] if cns else None, urls)


_NO_URLS: list[bytes | None] = [None, None, None]


_NO_PARENT = _Parent("", "", (), (), frozenset(), ())


def fast_cert_row(cert: x509.Certificate, der: bytes, ca_id: CaId,
                  tbs: bytes | None = None) -> CertRow:
    """``store.writer.cert_row(store.certparse.cert_input(der, ca_id))`` for a certificate
    already parsed (tbs: its TBSCertificate bytes, when at hand)."""
    try:
        if tbs is None:
            tbs = tbs_of(der)
        sdn, skey, ddn, dkey, ancestors, emails, attrs, cn, urls = _fields(cert, tbs)
        row = CertRow(ca_id, cert.serial_number, der, hashlib.sha256(der).digest(), sdn,
                      ddn, dkey, "\n".join(emails), cn,
                      int(cert.not_valid_before_utc.timestamp()),
                      int(cert.not_valid_after_utc.timestamp()), attrs, ancestors, urls)
    except Exception:  # noqa: BLE001 - anything unusual: the reference decides
        return cert_row(cert_input(der, ca_id))
    return row


def fast_cert_input(cert: x509.Certificate, der: bytes, ca_id: CaId) -> CertInput:
    """``store.certparse.cert_input(der, ca_id)`` for a certificate already parsed."""
    try:
        sdn, skey, ddn, dkey, ancestors, emails, attrs, cn, urls = _fields(cert, tbs_of(der))
        serial = Serial(cert.serial_number)
        not_before: datetime = cert.not_valid_before_utc
        not_after: datetime = cert.not_valid_after_utc
    except Exception:  # noqa: BLE001 - anything unusual: the reference decides
        return cert_input(der, ca_id)
    return CertInput(
        ca_id=ca_id, serial=serial, der=der, subject_dn=sdn, subject_key=skey,
        directory_dn=ddn, directory_key=dkey, directory_ancestors=ancestors,
        emails=tuple(emails), attributes=attrs, cn=cn,
        not_before=not_before, not_after=not_after, urls=urls,
    )
