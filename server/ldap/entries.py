"""Directory entries computed from store records: glue, subscriber, CA, certificate, DSE, schema.

Strategy: an ``Entry`` is built on demand from the few store rows that describe it and thrown
away after the operation; nothing here keeps a copy of the directory. Status marking:

- The **subscriber entry** sits at the public subject DN (``store.names.DN.public``) and is an
  ``inetOrgPerson`` + ``pkiUser`` + ``certpubSubscriber``. Its ``userCertificate;binary`` holds
  only the certificates a correspondent can use now: not revoked (a certificateHold counts as
  revoked until released) and not expired. So an e-mail client asking by mail for
  ``userCertificate;binary`` never picks a revoked or expired certificate to encrypt to.
  Its names and ``mail`` come from the public DN and the SAN e-mails of all its certificates,
  so a subscriber whose only certificate was revoked is still found, with no usable one.
- **Every** certificate, valid, revoked or expired, is also published in a child entry
  ``certpubSerialNumber=<hex>+certpubCA=<ca>,<subject DN>`` (object class
  ``certpubCertificate``) with its ``userCertificate;binary`` and its status:
  ``certpubStatus`` (valid | revoked | expired; revoked wins over expired), ``certpubNotAfter``,
  ``certpubRevocationTime``, ``certpubRevocationReason`` (RFC 5280 CRLReason names).
  These entries carry no mail or name attributes, so mail clients' searches never return them;
  relying parties reach them with a one-level search under the subscriber entry, or by
  ``(certpubSerialNumber=<hex>)`` or ``(userCertificate=<certificateExactMatch assertion>)``.
- A **CA entry** sits at the CA's public subject DN with ``cACertificate;binary`` (every stored
  certificate of the CAs with that DN), ``certificateRevocationList;binary`` (their latest
  full CRLs) and, for a self-signed CA, ``authorityRevocationList;binary`` (its CRL is the list
  of revoked CA certificates).
- A **CRL distribution point entry** (``cRLDistributionPoint``, RFC 4523 §3.2) sits at each DN
  an ``ldap://`` URL of the certificates names that is not a CA's own DN, carrying what the
  URLs ask for there (``certificateRevocationList``, ``authorityRevocationList``,
  ``deltaRevocationList``; the store resolves each URL to its CRL scope); a CA entry also
  carries what URLs at its DN ask for, and ``deltaRevocationList`` when its full scope has a
  delta CRL (object class ``deltaCRL``).
- **Glue entries** carry the naming attributes of their own RDN and an object class per naming
  attribute (country, organization, organizationalUnit, locality, domain, else certpubGlue).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

from asn1crypto import x509 as asn1x509

from server.ldap.schema import ATTRIBUTE_ARC, Allowlist, Selection, attribute_type
from store import names
from store.model import CaRecord, CertRecord, DirectoryEntry, RevocationReason

Value = str | bytes

SERIAL_OID = ATTRIBUTE_ARC + ".4"
CA_OID = ATTRIBUTE_ARC + ".6"
SUBSCHEMA_DN = "cn=Subschema"
SUBSCHEMA_KEY = names.parse(SUBSCHEMA_DN).key

REASON_NAMES: dict[RevocationReason, str] = {
    RevocationReason.UNSPECIFIED: "unspecified",
    RevocationReason.KEY_COMPROMISE: "keyCompromise",
    RevocationReason.CA_COMPROMISE: "cACompromise",
    RevocationReason.AFFILIATION_CHANGED: "affiliationChanged",
    RevocationReason.SUPERSEDED: "superseded",
    RevocationReason.CESSATION_OF_OPERATION: "cessationOfOperation",
    RevocationReason.CERTIFICATE_HOLD: "certificateHold",
    RevocationReason.REMOVE_FROM_CRL: "removeFromCRL",
    RevocationReason.PRIVILEGE_WITHDRAWN: "privilegeWithdrawn",
    RevocationReason.AA_COMPROMISE: "aACompromise",
}

# Object class of a glue entry, by the type of its RDN.
GLUE_CLASSES: dict[str, str] = {
    "2.5.4.6": "country", "2.5.4.10": "organization", "2.5.4.11": "organizationalUnit",
    "2.5.4.7": "locality", "2.5.4.8": "locality", "0.9.2342.19200300.100.1.25": "domain",
}
STRUCTURAL_FOR_CA: dict[str, str] = {
    "2.5.4.10": "organization", "2.5.4.11": "organizationalUnit", "2.5.4.3": "applicationProcess",
}


@dataclass(frozen=True)
class Entry:
    """One entry as the protocol shows it: DN, normalised key, attributes by canonical name."""

    dn: str
    key: str
    kind: str  # dse | subschema | glue | subject | ca | crldp | cert
    attributes: dict[str, tuple[Value, ...]]
    parsed: names.DN | None = field(default=None, compare=False)

    @property
    def meta(self) -> bool:
        return self.kind in ("dse", "subschema")

    def values(self, name: str) -> tuple[Value, ...]:
        return self.attributes.get(name, ())

    def dn_avas(self) -> tuple[names.AVA, ...]:
        parsed = self.parsed if self.parsed is not None else parse_dn(self.dn)
        return tuple(a for rdn in parsed.rdns for a in rdn)


_CUSTOM_TYPE = re.compile(r"(?i)(^|(?<!\\)[,;+])(\s*)(certpubSerialNumber|certpubCA)(\s*=)")


def parse_dn(text: str) -> names.DN:
    """RFC 4514 DN, also accepting certpub's own attribute types (raises DNSyntaxError)."""
    if "certpub" in text.lower():
        def oid(m: re.Match[str]) -> str:
            t = attribute_type(m.group(3))
            return m.group(1) + m.group(2) + (t.oid if t else m.group(3)) + m.group(4)

        text = _CUSTOM_TYPE.sub(oid, text)
        return names.parse(text)
    # Hot path: a subscriber's DN is parsed once per entry shown. Its parent (ou=..,o=..,c=..)
    # is shared by many, so parse the leaf RDN alone and take the parent from a small cache.
    # Only plain DNs (no escapes, quotes or ';') are split; anything else, and any error, goes
    # to the full parser, whose result and messages are the reference.
    if (len(text) <= names.MAX_DN_LENGTH and "\\" not in text and '"' not in text
            and ";" not in text and text.count(",") < names.MAX_RDNS):
        comma = text.find(",")
        try:
            if comma < 0:
                return _parse_cached(text)
            leaf = names.parse(text[:comma])
            parent = _parse_cached(text[comma + 1:])
            if leaf.rdns and parent.rdns:
                return names.DN(leaf.rdns + parent.rdns)
        except names.DNSyntaxError:
            pass
    return names.parse(text)


@lru_cache(maxsize=1024)
def _parse_cached(text: str) -> names.DN:
    return names.parse(text)


def escape_value(value: str) -> str:
    """RFC 4514 §2.4 escaping of one attribute value."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def gtime(moment: datetime) -> str:
    """GeneralizedTime string (RFC 4517 §3.3.13) in UTC."""
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%SZ")


def cert_status(cert: CertRecord, now: datetime) -> str:
    if cert.is_revoked():
        return "revoked"
    return "expired" if cert.is_expired(now) else "valid"


def usable(cert: CertRecord, now: datetime) -> bool:
    """What a correspondent may encrypt to or trust now: not revoked, not expired."""
    return cert.der is not None and not cert.is_revoked() and not cert.is_expired(now)


def _add(attrs: dict[str, list[Value]], name: str, value: Value) -> None:
    values = attrs.setdefault(name, [])
    if isinstance(value, str):
        norm = names.prep_value(value)
        if any(isinstance(v, str) and names.prep_value(v) == norm for v in values):
            return
    elif value in values:
        return
    values.append(value)


def _naming(attrs: dict[str, list[Value]], avas: Iterable[names.AVA],
            seen: dict[str, set[str]] | None = None) -> None:
    for a in avas:
        if a.display.startswith("#"):
            continue  # a value that is not a string stays in the DN only
        t = attribute_type(a.oid)
        if a.oid == "1.2.840.113549.1.9.1":
            name = "mail"
        elif t is not None and not t.binary and not t.meta and t.name != "objectClass":
            name = t.name
        else:
            continue
        if seen is None:
            _add(attrs, name, a.display)
        else:  # an AVA's norm is prep_value(display): no need to prepare it again
            norms = seen.setdefault(name, set())
            if a.norm not in norms:
                norms.add(a.norm)
                attrs.setdefault(name, []).append(a.display)


def _freeze(attrs: dict[str, list[Value]]) -> dict[str, tuple[Value, ...]]:
    return {k: tuple(v) for k, v in attrs.items() if v}


def glue_entry(e: DirectoryEntry) -> Entry:
    dn = parse_dn(e.dn)
    leaf = dn.rdns[0] if dn.rdns else ()
    classes = ["top"]
    for a in leaf:
        cls = GLUE_CLASSES.get(a.oid)
        if cls and cls not in classes:
            classes.append(cls)
    if len(classes) == 1:
        classes.append("certpubGlue")
    attrs: dict[str, list[Value]] = {"objectClass": list(classes)}
    _naming(attrs, leaf)
    return Entry(e.dn, e.key, "glue", _freeze(attrs), dn)


def subject_entry(
    e: DirectoryEntry, certs: Sequence[CertRecord], now: datetime, kind: str = "subject"
) -> Entry:
    dn = parse_dn(e.dn)
    attrs: dict[str, list[Value]] = {
        "objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson", "pkiUser",
                        "certpubSubscriber"],
    }
    # as _naming + _add, with each value prepared once (this is the hot path of a search)
    seen: dict[str, set[str]] = {}
    _naming(attrs, (a for rdn in dn.rdns for a in rdn), seen)
    mail_norms = seen.setdefault("mail", set())
    for cert in certs:
        for email in cert.emails:
            norm = names.prep_value(email)
            if norm not in mail_norms:
                mail_norms.add(norm)
                attrs.setdefault("mail", []).append(email)
    attrs["userCertificate"] = [c.der for c in certs if c.der is not None and usable(c, now)]
    return Entry(e.dn, e.key, kind, _freeze(attrs), dn)


@lru_cache(maxsize=64)
def _self_signed(der: bytes) -> bool:
    try:
        return asn1x509.Certificate.load(der).self_signed != "no"
    except (ValueError, TypeError, KeyError):
        return False


def ca_entry(
    e: DirectoryEntry, cas: Sequence[CaRecord], certs: Sequence[CertRecord], now: datetime,
    extra: Sequence[tuple[str, bytes]] = (),
) -> Entry:
    dn = parse_dn(e.dn)
    leaf = dn.rdns[0] if dn.rdns else ()
    structural = next((STRUCTURAL_FOR_CA[a.oid] for a in leaf if a.oid in STRUCTURAL_FOR_CA),
                      "applicationProcess")
    classes: list[Value] = ["top", structural, "pkiCA"]
    attrs: dict[str, list[Value]] = {"objectClass": classes}
    _naming(attrs, (a for rdn in dn.rdns for a in rdn))
    for ca in cas:
        _add(attrs, "cACertificate", ca.cert_der)
        if ca.crl_der is not None:
            _add(attrs, "certificateRevocationList", ca.crl_der)
            if _self_signed(ca.cert_der):
                _add(attrs, "authorityRevocationList", ca.crl_der)
    for name, der in extra:  # what ldap:// URLs at this DN name; the full scope's delta
        _add(attrs, name, der)
    if attrs.get("certificateRevocationList") and attrs.get("authorityRevocationList"):
        classes.append("certificationAuthority")
    if attrs.get("deltaRevocationList"):
        classes.append("deltaCRL")
    if certs:  # the CA's own certificates as issued by its parent (pkiUser, RFC 4523 §3.1)
        classes.append("pkiUser")
        for cert in certs:
            for email in cert.emails:
                _add(attrs, "mail", email)
        attrs["userCertificate"] = [c.der for c in certs if c.der is not None and usable(c, now)]
    return Entry(e.dn, e.key, "ca", _freeze(attrs), dn)


def crldp_entry(e: DirectoryEntry, values: Sequence[tuple[str, bytes]]) -> Entry:
    """The entry an ldap:// CRL distribution point names (RFC 4523 §3.2
    cRLDistributionPoint), with the CRLs its URLs ask for: certificateRevocationList,
    authorityRevocationList, deltaRevocationList (or a CA certificate for caIssuers)."""
    dn = parse_dn(e.dn)
    leaf = dn.rdns[0] if dn.rdns else ()
    classes: list[Value] = ["top", "cRLDistributionPoint"]
    attrs: dict[str, list[Value]] = {"objectClass": classes}
    _naming(attrs, leaf)
    if not attrs.get("cn"):  # cn is the class's MUST: the leaf's value stands for it
        shown = [a.display for a in leaf if not a.display.startswith("#")]
        if shown:
            attrs["cn"] = [shown[0]]
    for name, der in values:
        _add(attrs, name, der)
    if attrs.get("cACertificate"):
        classes.append("pkiCA")
    return Entry(e.dn, e.key, "crldp", _freeze(attrs), dn)


def cert_rdn(serial: int, ca_name: str) -> str:
    return f"certpubSerialNumber={format(serial, 'x')}+certpubCA={escape_value(ca_name)}"


def cert_entry(parent_dn: str, cert: CertRecord, ca_name: str, now: datetime) -> Entry:
    dn_text = cert_rdn(cert.serial, ca_name) + ("," + parent_dn if parent_dn else "")
    dn = parse_dn(dn_text)
    attrs: dict[str, list[Value]] = {
        "objectClass": ["top", "certpubCertificate"],
        "certpubSerialNumber": [format(cert.serial, "x")],
        "certpubCA": [ca_name],
        "certpubStatus": [cert_status(cert, now)],
    }
    if cert.not_after is not None:
        attrs["certpubNotAfter"] = [gtime(cert.not_after)]
    if cert.is_revoked():
        if cert.revoked_at is not None:
            attrs["certpubRevocationTime"] = [gtime(cert.revoked_at)]
        attrs["certpubRevocationReason"] = [
            REASON_NAMES[cert.reason or RevocationReason.UNSPECIFIED]]
    if cert.der is not None:
        attrs["userCertificate"] = [cert.der]
    return Entry(dn_text, dn.key, "cert", _freeze(attrs), dn)


def dse_entry(naming_contexts: Sequence[str], controls: Sequence[str],
              extensions: Sequence[str], version: str) -> Entry:
    """The root DSE (RFC 4512 §5.1)."""
    attrs: dict[str, tuple[Value, ...]] = {
        "objectClass": ("top",),
        "namingContexts": tuple(naming_contexts),
        "subschemaSubentry": (SUBSCHEMA_DN,),
        "supportedLDAPVersion": ("3",),
        "supportedControl": tuple(controls),
        "supportedExtension": tuple(extensions),
        # all operational attributes ("+", RFC 3673)
        "supportedFeatures": ("1.3.6.1.4.1.4203.1.5.1",),
        "vendorName": ("certpub",),
        "vendorVersion": (version,),
    }
    return Entry("", "", "dse", {k: v for k, v in attrs.items() if v}, names.DN(()))


def subschema_entry() -> Entry:
    """The subschema subentry (RFC 4512 §4.2) with everything the directory uses."""
    from server.ldap.schema import subschema_values

    attrs: dict[str, tuple[Value, ...]] = {
        "objectClass": ("top", "subschema"),
        "cn": ("Subschema",),
    }
    attrs.update({k: tuple(v) for k, v in subschema_values().items()})
    return Entry(SUBSCHEMA_DN, SUBSCHEMA_KEY, "subschema", attrs)


def render(entry: Entry, selection: Selection, allow: Allowlist, types_only: bool
           ) -> list[tuple[str, list[bytes]]]:
    """The (wire name, values) an entry shows for a selection: allowlisted types only.

    Binary types are always named ``type;binary`` (RFC 4522 §2), whatever spelling was asked.
    """
    out: list[tuple[str, list[bytes]]] = []
    for name, values in entry.attributes.items():
        t = attribute_type(name)
        if t is None or not allow.allows(t, entry.meta) or not selection.wants(t, entry.meta):
            continue
        out.append((t.wire_name, [] if types_only else
                    [v.encode("utf-8") if isinstance(v, str) else v for v in values]))
    return out
