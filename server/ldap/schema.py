"""The directory's schema: attribute types, object classes, the allowlist, attribute selection.

Strategy: one table of every attribute type the directory knows (RFC 4519, RFC 4523, RFC 4524,
RFC 2798 and certpub's own types), keyed by lower-case name, alias and OID, so that ``CN``,
``commonName`` and ``2.5.4.3`` are one type. The same table renders the subschema entry
(RFC 4512 §4.1), so what the server publishes is what it uses. Types not in this table do not
exist here: the subject attributes the CA keeps private (serialNumber, telephoneNumber, street,
...) are absent on purpose, so no configuration can expose them.

certpub's own types live under ``ARC``, a UUID-based arc (ITU-T X.667, ``2.25.<uuid>``) that
needs no registration; a CA with a Private Enterprise Number may keep it (the OIDs only have to
be unique, not registered to the CA).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

# 2.25 + UUID 85f78d59-c652-41e5-ab78-071b767892ab as an integer.
ARC = "2.25.178072687695889967227825329996928946859"
ATTRIBUTE_ARC = ARC + ".1"
CLASS_ARC = ARC + ".2"

# Syntaxes (RFC 4517 §3.3, RFC 4523 §2).
DIRECTORY_STRING = "1.3.6.1.4.1.1466.115.121.1.15"
IA5_STRING = "1.3.6.1.4.1.1466.115.121.1.26"
OID_SYNTAX = "1.3.6.1.4.1.1466.115.121.1.38"
COUNTRY_STRING = "1.3.6.1.4.1.1466.115.121.1.11"
GENERALIZED_TIME = "1.3.6.1.4.1.1466.115.121.1.24"
INTEGER = "1.3.6.1.4.1.1466.115.121.1.27"
CERTIFICATE = "1.3.6.1.4.1.1466.115.121.1.8"
CERTIFICATE_LIST = "1.3.6.1.4.1.1466.115.121.1.9"
CERTIFICATE_PAIR = "1.3.6.1.4.1.1466.115.121.1.10"
DN_SYNTAX = "1.3.6.1.4.1.1466.115.121.1.12"
SYNTAXES: dict[str, str] = {
    DIRECTORY_STRING: "Directory String", IA5_STRING: "IA5 String", OID_SYNTAX: "OID",
    COUNTRY_STRING: "Country String", GENERALIZED_TIME: "Generalized Time", INTEGER: "INTEGER",
    CERTIFICATE: "X.509 Certificate", CERTIFICATE_LIST: "X.509 Certificate List",
    CERTIFICATE_PAIR: "X.509 Certificate Pair", DN_SYNTAX: "DN",
    "1.3.6.1.1.15.1": "X.509 Certificate Exact Assertion",
}

# Matching rules the filter evaluator implements (name -> (OID, assertion syntax)).
MATCHING_RULES: dict[str, tuple[str, str]] = {
    "objectIdentifierMatch": ("2.5.13.0", OID_SYNTAX),
    "caseIgnoreMatch": ("2.5.13.2", DIRECTORY_STRING),
    "caseIgnoreOrderingMatch": ("2.5.13.3", DIRECTORY_STRING),
    "caseIgnoreSubstringsMatch": ("2.5.13.4", "1.3.6.1.4.1.1466.115.121.1.58"),
    "caseExactMatch": ("2.5.13.5", DIRECTORY_STRING),
    "integerMatch": ("2.5.13.14", INTEGER),
    "generalizedTimeMatch": ("2.5.13.27", GENERALIZED_TIME),
    "generalizedTimeOrderingMatch": ("2.5.13.28", GENERALIZED_TIME),
    "certificateExactMatch": ("2.5.13.34", "1.3.6.1.1.15.1"),
    "caseIgnoreIA5Match": ("1.3.6.1.4.1.1466.109.114.2", IA5_STRING),
    "caseIgnoreIA5SubstringsMatch": ("1.3.6.1.4.1.1466.109.114.3",
                                     "1.3.6.1.4.1.1466.115.121.1.58"),
}
RULE_BY_KEY: dict[str, str] = {}
for _name, (_oid, _syntax) in MATCHING_RULES.items():
    RULE_BY_KEY[_name.lower()] = _name
    RULE_BY_KEY[_oid] = _name


@dataclass(frozen=True)
class AttributeType:
    """One attribute type (RFC 4512 §4.1.2), as far as the directory uses it."""

    name: str
    oid: str
    syntax: str
    equality: str | None = None
    ordering: str | None = None
    substr: str | None = None
    binary: bool = False  # transferred as ``name;binary`` (RFC 4522)
    single: bool = False
    aliases: tuple[str, ...] = ()
    meta: bool = False  # a root DSE or subschema attribute, not subscriber data
    desc: str = ""

    @property
    def wire_name(self) -> str:
        return self.name + ";binary" if self.binary else self.name

    def definition(self) -> str:
        names = (self.name, *self.aliases)
        quoted = f"'{names[0]}'" if len(names) == 1 else "( " + " ".join(f"'{n}'" for n in names) + " )"
        parts = [f"( {self.oid} NAME {quoted}"]
        if self.desc:
            parts.append(f"DESC '{self.desc}'")
        for keyword, rule in (("EQUALITY", self.equality), ("ORDERING", self.ordering),
                              ("SUBSTR", self.substr)):
            if rule:
                parts.append(f"{keyword} {rule}")
        parts.append(f"SYNTAX {self.syntax}")
        if self.single:
            parts.append("SINGLE-VALUE")
        if self.meta:
            parts.append("NO-USER-MODIFICATION USAGE dSAOperation")
        return " ".join(parts) + " )"


def _string(name: str, oid: str, *aliases: str, ia5: bool = False) -> AttributeType:
    if ia5:
        return AttributeType(name, oid, IA5_STRING, "caseIgnoreIA5Match", None,
                             "caseIgnoreIA5SubstringsMatch", aliases=aliases)
    return AttributeType(name, oid, DIRECTORY_STRING, "caseIgnoreMatch", "caseIgnoreOrderingMatch",
                         "caseIgnoreSubstringsMatch", aliases=aliases)


def _meta(name: str, oid: str, syntax: str = DIRECTORY_STRING) -> AttributeType:
    return AttributeType(name, oid, syntax, meta=True)


def _cert(name: str, oid: str, syntax: str, equality: str | None) -> AttributeType:
    return AttributeType(name, oid, syntax, equality, binary=True)


ATTRIBUTE_TYPES: tuple[AttributeType, ...] = (
    AttributeType("objectClass", "2.5.4.0", OID_SYNTAX, "objectIdentifierMatch"),
    _string("cn", "2.5.4.3", "commonName"),
    _string("sn", "2.5.4.4", "surname"),
    AttributeType("c", "2.5.4.6", COUNTRY_STRING, "caseIgnoreMatch", None,
                  "caseIgnoreSubstringsMatch", single=True, aliases=("countryName",)),
    _string("l", "2.5.4.7", "localityName"),
    _string("st", "2.5.4.8", "stateOrProvinceName"),
    _string("o", "2.5.4.10", "organizationName"),
    _string("ou", "2.5.4.11", "organizationalUnitName"),
    _string("givenName", "2.5.4.42", "gn"),
    _string("mail", "0.9.2342.19200300.100.1.3", "rfc822Mailbox", ia5=True),
    _string("dc", "0.9.2342.19200300.100.1.25", "domainComponent", ia5=True),
    _cert("userCertificate", "2.5.4.36", CERTIFICATE, "certificateExactMatch"),
    _cert("cACertificate", "2.5.4.37", CERTIFICATE, "certificateExactMatch"),
    _cert("authorityRevocationList", "2.5.4.38", CERTIFICATE_LIST, None),
    _cert("certificateRevocationList", "2.5.4.39", CERTIFICATE_LIST, None),
    _cert("crossCertificatePair", "2.5.4.40", CERTIFICATE_PAIR, None),
    _cert("deltaRevocationList", "2.5.4.53", CERTIFICATE_LIST, None),  # RFC 4523 §2.6
    AttributeType("certpubStatus", ATTRIBUTE_ARC + ".1", DIRECTORY_STRING, "caseIgnoreMatch",
                  None, "caseIgnoreSubstringsMatch", single=True,
                  desc="status of the certificate: valid, revoked or expired"),
    AttributeType("certpubRevocationTime", ATTRIBUTE_ARC + ".2", GENERALIZED_TIME,
                  "generalizedTimeMatch", "generalizedTimeOrderingMatch", single=True,
                  desc="when the CA revoked the certificate"),
    AttributeType("certpubRevocationReason", ATTRIBUTE_ARC + ".3", DIRECTORY_STRING,
                  "caseIgnoreMatch", None, "caseIgnoreSubstringsMatch", single=True,
                  desc="RFC 5280 CRLReason name, e.g. keyCompromise or certificateHold"),
    AttributeType("certpubSerialNumber", ATTRIBUTE_ARC + ".4", DIRECTORY_STRING,
                  "caseIgnoreMatch", None, None, single=True,
                  desc="certificate serial number, hexadecimal"),
    AttributeType("certpubNotAfter", ATTRIBUTE_ARC + ".5", GENERALIZED_TIME,
                  "generalizedTimeMatch", "generalizedTimeOrderingMatch", single=True,
                  desc="end of the certificate validity period"),
    AttributeType("certpubCA", ATTRIBUTE_ARC + ".6", DIRECTORY_STRING, "caseIgnoreMatch",
                  None, "caseIgnoreSubstringsMatch", single=True,
                  desc="name of the issuing CA in this repository"),
    _meta("namingContexts", "1.3.6.1.4.1.1466.101.120.5", DN_SYNTAX),
    _meta("subschemaSubentry", "2.5.18.10", DN_SYNTAX),
    _meta("supportedLDAPVersion", "1.3.6.1.4.1.1466.101.120.15", INTEGER),
    _meta("supportedControl", "1.3.6.1.4.1.1466.101.120.13", OID_SYNTAX),
    _meta("supportedExtension", "1.3.6.1.4.1.1466.101.120.7", OID_SYNTAX),
    _meta("supportedFeatures", "1.3.6.1.4.1.4203.1.3.5", OID_SYNTAX),
    _meta("vendorName", "1.3.6.1.1.4"),
    _meta("vendorVersion", "1.3.6.1.1.5"),
    _meta("attributeTypes", "2.5.21.5"),
    _meta("objectClasses", "2.5.21.6"),
    _meta("matchingRules", "2.5.21.4"),
    _meta("ldapSyntaxes", "1.3.6.1.4.1.1466.101.120.16"),
)

_BY_KEY: dict[str, AttributeType] = {}
for _t in ATTRIBUTE_TYPES:
    for _k in (_t.name, _t.oid, *_t.aliases):
        _BY_KEY[_k.lower()] = _t


@lru_cache(maxsize=1024)  # pure; names come from requests and entries (a bounded cache)
def attribute_type(name: str) -> AttributeType | None:
    """The attribute type a name, alias or OID denotes (case-insensitive); None if unknown."""
    key = name.strip().lower()
    if key.startswith("oid."):
        key = key[4:]
    return _BY_KEY.get(key)


@lru_cache(maxsize=1024)
def describe(description: str) -> tuple[AttributeType | None, bool]:
    """Resolve an attribute description ``type;options``: (type or None, options acceptable).

    Only ``;binary`` on a binary type is acceptable (RFC 4522); any other option names a
    subtype this directory never holds.
    """
    base, _, rest = description.partition(";")
    found = attribute_type(base)
    if found is None:
        return None, False
    options = {o.strip().lower() for o in rest.split(";")} if rest else set()
    options.discard("")
    return found, options <= ({"binary"} if found.binary else set())


def unknown_attributes(names: Iterable[str]) -> list[str]:
    """Names in an allowlist that denote no attribute type of this schema."""
    return [n for n in names if attribute_type(n) is None or attribute_type(n).meta]  # type: ignore[union-attr]


@dataclass(frozen=True)
class ObjectClass:
    """One object class (RFC 4512 §4.1.1)."""

    name: str
    oid: str
    kind: str  # STRUCTURAL | AUXILIARY | ABSTRACT
    sup: str | None = None
    must: tuple[str, ...] = ()
    may: tuple[str, ...] = ()
    desc: str = ""

    def definition(self) -> str:
        parts = [f"( {self.oid} NAME '{self.name}'"]
        if self.desc:
            parts.append(f"DESC '{self.desc}'")
        if self.sup:
            parts.append(f"SUP {self.sup}")
        parts.append(self.kind)
        for keyword, names in (("MUST", self.must), ("MAY", self.may)):
            if len(names) == 1:
                parts.append(f"{keyword} {names[0]}")
            elif names:
                parts.append(f"{keyword} ( {' $ '.join(names)} )")
        return " ".join(parts) + " )"


_CA_ATTRS = ("cACertificate", "certificateRevocationList", "authorityRevocationList",
             "crossCertificatePair")
OBJECT_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("top", "2.5.6.0", "ABSTRACT", must=("objectClass",)),
    ObjectClass("country", "2.5.6.2", "STRUCTURAL", "top", ("c",)),
    ObjectClass("locality", "2.5.6.3", "STRUCTURAL", "top", (), ("st", "l")),
    ObjectClass("organization", "2.5.6.4", "STRUCTURAL", "top", ("o",), ("l", "st")),
    ObjectClass("organizationalUnit", "2.5.6.5", "STRUCTURAL", "top", ("ou",), ("l", "st")),
    ObjectClass("person", "2.5.6.6", "STRUCTURAL", "top", ("sn", "cn")),
    ObjectClass("organizationalPerson", "2.5.6.7", "STRUCTURAL", "person", (),
                ("ou", "l", "st")),
    ObjectClass("applicationProcess", "2.5.6.11", "STRUCTURAL", "top", ("cn",), ("ou", "l")),
    ObjectClass("certificationAuthority", "2.5.6.16", "AUXILIARY", "top",
                ("authorityRevocationList", "certificateRevocationList", "cACertificate"),
                ("crossCertificatePair",)),
    ObjectClass("pkiUser", "2.5.6.21", "AUXILIARY", "top", (), ("userCertificate",)),
    ObjectClass("pkiCA", "2.5.6.22", "AUXILIARY", "top", (), _CA_ATTRS),
    # RFC 4523 §3.2, §3.4: where a CRL distribution point's ldap:// URL points
    ObjectClass("cRLDistributionPoint", "2.5.6.19", "STRUCTURAL", "top", ("cn",),
                ("certificateRevocationList", "authorityRevocationList", "deltaRevocationList")),
    ObjectClass("deltaCRL", "2.5.6.23", "AUXILIARY", "top", (), ("deltaRevocationList",)),
    ObjectClass("inetOrgPerson", "2.16.840.1.113730.3.2.2", "STRUCTURAL", "organizationalPerson",
                (), ("givenName", "mail", "o", "userCertificate")),
    ObjectClass("domain", "0.9.2342.19200300.100.4.13", "STRUCTURAL", "top", ("dc",), ("o", "l")),
    ObjectClass("subschema", "2.5.20.1", "AUXILIARY", "top", (),
                ("attributeTypes", "objectClasses", "matchingRules", "ldapSyntaxes")),
    ObjectClass("certpubCertificate", CLASS_ARC + ".1", "STRUCTURAL", "top",
                ("certpubSerialNumber", "certpubCA", "certpubStatus"),
                ("userCertificate", "certpubNotAfter", "certpubRevocationTime",
                 "certpubRevocationReason"),
                desc="one certificate of a subscriber, valid, revoked or expired"),
    ObjectClass("certpubSubscriber", CLASS_ARC + ".2", "AUXILIARY", "top", (), (),
                desc="userCertificate holds the usable certificates; all are in the children"),
    ObjectClass("certpubGlue", CLASS_ARC + ".3", "STRUCTURAL", "top", (),
                ("cn", "sn", "givenName", "mail", "o", "ou", "c", "l", "st", "dc"),
                desc="an entry that exists because entries are named below it"),
)
_CLASS_BY_KEY: dict[str, ObjectClass] = {}
for _c in OBJECT_CLASSES:
    _CLASS_BY_KEY[_c.name.lower()] = _c
    _CLASS_BY_KEY[_c.oid] = _c


def object_class_key(value: str) -> str:
    """objectIdentifierMatch normal form: the lower-case name of a known class, else the text."""
    found = _CLASS_BY_KEY.get(value.strip().lower())
    return found.name.lower() if found else value.strip().lower()


def subschema_values() -> dict[str, list[str]]:
    """attributeTypes, objectClasses, matchingRules and ldapSyntaxes (RFC 4512 §4.2)."""
    return {
        "attributeTypes": [t.definition() for t in ATTRIBUTE_TYPES],
        "objectClasses": [c.definition() for c in OBJECT_CLASSES],
        "matchingRules": [f"( {oid} NAME '{name}' SYNTAX {syntax} )"
                          for name, (oid, syntax) in MATCHING_RULES.items()],
        "ldapSyntaxes": [f"( {oid} DESC '{desc}' )" for oid, desc in SYNTAXES.items()],
    }


@dataclass(frozen=True)
class Allowlist:
    """The public attribute types: nothing else is ever returned or matched."""

    types: frozenset[str]  # canonical names

    @classmethod
    def of(cls, names: Iterable[str]) -> Allowlist:
        found = (attribute_type(n) for n in names)
        return cls(frozenset(t.name for t in found if t is not None and not t.meta))

    def allows(self, t: AttributeType, entry_is_meta: bool = False) -> bool:
        return t.name in self.types or (t.meta and entry_is_meta)


@dataclass(frozen=True)
class Selection:
    """Which attributes a search asked for (RFC 4511 §4.5.1.8)."""

    all_user: bool
    all_operational: bool
    names: frozenset[str]  # canonical names asked for explicitly

    def wants(self, t: AttributeType, entry_is_meta: bool) -> bool:
        if t.name in self.names:
            return True
        # The root DSE and the subschema entry are small and read to be seen: "*" shows all.
        if entry_is_meta and (self.all_user or self.all_operational):
            return True
        return self.all_user and not t.meta


def select(requested: Sequence[str]) -> Selection:
    """Selection of an attribute list; unknown names and unacceptable options select nothing."""
    return _select(tuple(requested))


@lru_cache(maxsize=256)  # clients ask for the same few attribute lists over and over
def _select(requested: tuple[str, ...]) -> Selection:
    """Selection of an attribute list; unknown names and unacceptable options select nothing."""
    names: set[str] = set()
    all_user = not requested
    all_operational = False
    for raw in requested:
        text = raw.strip()
        if text == "*":
            all_user = True
        elif text == "+":
            all_operational = True
        elif text == "1.1":
            continue
        else:
            found, ok = describe(text)
            if found is not None and ok:
                names.add(found.name)
    if requested and all(r.strip() == "1.1" for r in requested):
        all_user = False
    return Selection(all_user, all_operational, frozenset(names))
