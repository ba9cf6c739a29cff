"""Distinguished names: one model for X.509 names and LDAP DN strings.

Strategy: a DN is a tuple of RDNs in LDAP order (leaf first); an RDN is a sorted tuple of
AVAs; an AVA keeps its attribute type as a dotted OID (so ``cn``, ``CN`` and ``2.5.4.3`` are
one type), a *normalised* value used for comparison (RFC 4517 caseIgnoreMatch string prep:
NFKC, case fold, whitespace collapsed) and the original value for display. Both the importer
(from certificates) and the LDAP server (from client strings, RFC 4514, including Java's
``OID=#hex`` spelling) build DNs here, so a lookup key computed on either side is the same.

The *directory* DN of a subject is its DN with every AVA whose type is not public removed
(personal ID numbers, telephone numbers, street addresses): the directory never shows them,
and a client that sends the full subject DN still finds the entry.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from asn1crypto import core as asn1core
from asn1crypto import x509 as asn1x509

# Short names (lower-case) -> dotted OID. RFC 4519, RFC 4514 §3, plus the PKCS#9 emailAddress.
ATTRIBUTE_OIDS: dict[str, str] = {
    "cn": "2.5.4.3",
    "commonname": "2.5.4.3",
    "sn": "2.5.4.4",
    "surname": "2.5.4.4",
    "serialnumber": "2.5.4.5",
    "c": "2.5.4.6",
    "countryname": "2.5.4.6",
    "l": "2.5.4.7",
    "localityname": "2.5.4.7",
    "st": "2.5.4.8",
    "stateorprovincename": "2.5.4.8",
    "street": "2.5.4.9",
    "streetaddress": "2.5.4.9",
    "o": "2.5.4.10",
    "organizationname": "2.5.4.10",
    "ou": "2.5.4.11",
    "organizationalunitname": "2.5.4.11",
    "title": "2.5.4.12",
    "description": "2.5.4.13",
    "postaladdress": "2.5.4.16",
    "postalcode": "2.5.4.17",
    "telephonenumber": "2.5.4.20",
    "name": "2.5.4.41",
    "givenname": "2.5.4.42",
    "gn": "2.5.4.42",
    "initials": "2.5.4.43",
    "generationqualifier": "2.5.4.44",
    "x500uniqueidentifier": "2.5.4.45",
    "dnqualifier": "2.5.4.46",
    "pseudonym": "2.5.4.65",
    "organizationidentifier": "2.5.4.97",
    "dc": "0.9.2342.19200300.100.1.25",
    "domaincomponent": "0.9.2342.19200300.100.1.25",
    "uid": "0.9.2342.19200300.100.1.1",
    "userid": "0.9.2342.19200300.100.1.1",
    "mail": "0.9.2342.19200300.100.1.3",
    "rfc822mailbox": "0.9.2342.19200300.100.1.3",
    "emailaddress": "1.2.840.113549.1.9.1",
    "email": "1.2.840.113549.1.9.1",
}

# Dotted OID -> the name we print (RFC 4514 §3 short names where they exist).
SHORT_NAMES: dict[str, str] = {
    "2.5.4.3": "cn",
    "2.5.4.4": "sn",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "c",
    "2.5.4.7": "l",
    "2.5.4.8": "st",
    "2.5.4.9": "street",
    "2.5.4.10": "o",
    "2.5.4.11": "ou",
    "2.5.4.12": "title",
    "2.5.4.20": "telephoneNumber",
    "2.5.4.42": "givenName",
    "0.9.2342.19200300.100.1.25": "dc",
    "0.9.2342.19200300.100.1.1": "uid",
    "0.9.2342.19200300.100.1.3": "mail",
    "1.2.840.113549.1.9.1": "emailAddress",
}

# AVA types that may appear in a published (directory) DN. Everything else in a subject
# (serialNumber as a personal ID, telephoneNumber, street, postalAddress, ...) is hidden.
PUBLIC_DN_TYPES: frozenset[str] = frozenset(
    {
        "2.5.4.3",  # cn
        "2.5.4.4",  # sn
        "2.5.4.6",  # c
        "2.5.4.7",  # l
        "2.5.4.8",  # st
        "2.5.4.10",  # o
        "2.5.4.11",  # ou
        "2.5.4.42",  # givenName
        "0.9.2342.19200300.100.1.25",  # dc
        "0.9.2342.19200300.100.1.3",  # mail
        "1.2.840.113549.1.9.1",  # emailAddress
    }
)

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")
_WS_RE = re.compile(r"\s+")

# Bounds that keep a hostile DN string cheap to parse.
MAX_DN_LENGTH = 8192
MAX_RDNS = 64


class DNSyntaxError(ValueError):
    """A DN string that is not RFC 4514 (LDAP answers invalidDNSyntax, 34)."""


def attribute_oid(name: str) -> str | None:
    """Dotted OID of an attribute type given by name or OID; None when unknown."""
    low = name.strip().lower()
    if low.startswith("oid."):
        low = low[4:]
    if _OID_RE.match(low):
        return low
    return ATTRIBUTE_OIDS.get(low)


def prep_value(value: str) -> str:
    """RFC 4518 string preparation, simplified: NFKC, case fold, collapse whitespace."""
    return _WS_RE.sub(" ", unicodedata.normalize("NFKC", value).casefold()).strip()


@dataclass(frozen=True, order=True)
class AVA:
    """One attribute type and value: the comparison key is (oid, norm)."""

    oid: str
    norm: str
    display: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AVA) and (self.oid, self.norm) == (other.oid, other.norm)

    def __hash__(self) -> int:
        return hash((self.oid, self.norm))


RDN = tuple[AVA, ...]


@dataclass(frozen=True)
class DN:
    """A distinguished name, RDNs leaf first (LDAP order)."""

    rdns: tuple[RDN, ...]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DN) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> str:
        """Normalised string: equal for DNs that LDAP's distinguishedNameMatch calls equal."""
        return ",".join(
            "+".join(f"{a.oid}={_escape(a.norm)}" for a in sorted(rdn, key=_ava_sort))
            for rdn in self.rdns
        )

    def __str__(self) -> str:
        """RFC 4514 string with short attribute names, original values."""
        return ",".join(
            "+".join(f"{SHORT_NAMES.get(a.oid, a.oid)}={_escape(a.display)}" for a in rdn)
            for rdn in self.rdns
        )

    @property
    def parent(self) -> DN:
        return DN(self.rdns[1:])

    def is_root(self) -> bool:
        return not self.rdns

    def ancestors(self) -> list[DN]:
        """Every proper ancestor, nearest first, excluding the empty root DN."""
        return [DN(self.rdns[i:]) for i in range(1, len(self.rdns))]

    def is_within(self, base: DN) -> bool:
        """True when this DN equals base or lies below it."""
        n = len(base.rdns)
        if n > len(self.rdns):
            return False
        return n == 0 or DN(self.rdns[len(self.rdns) - n :]).key == base.key

    def public(self) -> DN:
        """This DN with every non-public AVA removed (empty RDNs dropped)."""
        out = []
        for rdn in self.rdns:
            kept = tuple(a for a in rdn if a.oid in PUBLIC_DN_TYPES)
            if kept:
                out.append(kept)
        return DN(tuple(out))

    def leaf_values(self, oid: str) -> list[str]:
        """Display values of the given type in the leaf RDN."""
        return [a.display for a in self.rdns[0] if a.oid == oid] if self.rdns else []


def _ava_sort(a: AVA) -> tuple[str, str]:
    return (a.oid, a.norm)


def _escape(value: str) -> str:
    """RFC 4514 §2.4 escaping."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def _value_from_der(oid: str, der: bytes) -> AVA:
    """An AVA from the BER encoding of its value (X.509 or RFC 4514 ``#hex``)."""
    try:
        parsed = asn1core.load(der, strict=True)
        native = parsed.native
    except (ValueError, TypeError, OverflowError) as exc:
        raise DNSyntaxError(f"value of {oid} is not valid BER") from exc
    if isinstance(native, str):
        return AVA(oid, prep_value(native), native)
    hexed = "#" + der.hex()
    return AVA(oid, hexed, hexed)


def from_x509(name: asn1x509.Name) -> DN:
    """DN of an X.509 Name (asn1crypto), leaf first."""
    rdns: list[RDN] = []
    for rdn in name.chosen:
        avas = []
        for atv in rdn:
            oid = atv["type"].dotted
            avas.append(_value_from_der(oid, atv["value"].dump()))
        rdns.append(tuple(sorted(avas, key=_ava_sort)))
    rdns.reverse()
    return DN(tuple(rdns))


def from_der(name_der: bytes) -> DN:
    """DN of a DER-encoded X.509 Name."""
    return from_x509(asn1x509.Name.load(name_der))


def parse(text: str) -> DN:
    """Parse an RFC 4514 DN string (also RFC 2253 quoting and ';' separators)."""
    if len(text) > MAX_DN_LENGTH:
        raise DNSyntaxError("DN too long")
    text = text.strip()
    if not text:
        return DN(())
    rdns: list[RDN] = []
    avas: list[AVA] = []
    i, n = 0, len(text)
    while True:
        # attribute type
        j = text.find("=", i)
        if j < 0:
            raise DNSyntaxError(f"missing '=' after {text[i:i + 20]!r}")
        type_name = text[i:j].strip()
        oid = attribute_oid(type_name)
        if oid is None:
            raise DNSyntaxError(f"unknown attribute type {type_name[:64]!r}")
        i = j + 1
        while i < n and text[i] == " ":
            i += 1
        ava, i = _parse_value(text, i, oid)
        avas.append(ava)
        while i < n and text[i] == " ":
            i += 1
        if i >= n:
            rdns.append(tuple(sorted(avas, key=_ava_sort)))
            break
        sep = text[i]
        i += 1
        if sep == "+":
            continue
        if sep in ",;":
            rdns.append(tuple(sorted(avas, key=_ava_sort)))
            avas = []
            if len(rdns) > MAX_RDNS:
                raise DNSyntaxError("too many RDNs")
            while i < n and text[i] == " ":
                i += 1
            continue
        raise DNSyntaxError(f"unexpected {sep!r} in DN")
    return DN(tuple(rdns))


def _parse_value(text: str, i: int, oid: str) -> tuple[AVA, int]:
    n = len(text)
    if i < n and text[i] == "#":
        j = i + 1
        while j < n and text[j] not in ",;+ ":
            j += 1
        hexpart = text[i + 1 : j]
        if not hexpart or len(hexpart) % 2 or not _HEX_RE.match(hexpart):
            raise DNSyntaxError(f"bad hex value for {oid}")
        return _value_from_der(oid, bytes.fromhex(hexpart)), j
    if i < n and text[i] == '"':
        j = i + 1
        buf = bytearray()
        while j < n and text[j] != '"':
            if text[j] == "\\" and j + 1 < n:
                j += 1
            buf += text[j].encode()
            j += 1
        if j >= n:
            raise DNSyntaxError("unterminated quoted value")
        value = buf.decode("utf-8", "replace")
        return AVA(oid, prep_value(value), value), j + 1
    buf = bytearray()
    trailing_escaped_space = False
    while i < n and text[i] not in ",;+":
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n:
                raise DNSyntaxError("DN ends in a backslash")
            nxt = text[i + 1]
            if i + 2 < n + 1 and _is_hexpair(text[i + 1 : i + 3]):
                buf.append(int(text[i + 1 : i + 3], 16))
                i += 3
            else:
                buf += nxt.encode()
                i += 2
            trailing_escaped_space = nxt == " "
            continue
        buf += ch.encode()
        trailing_escaped_space = False
        i += 1
    try:
        value = buf.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DNSyntaxError(f"value of {oid} is not UTF-8") from exc
    if not trailing_escaped_space:
        value = value.rstrip(" ")
    return AVA(oid, prep_value(value), value), i


def _is_hexpair(s: str) -> bool:
    return len(s) == 2 and all(c in "0123456789abcdefABCDEF" for c in s)
