"""URLs printed in certificates and CRLs: read out of the extensions, checked, normalised.

Strategy: a CA's certificates nearly all carry the same CRL distribution points (RFC 5280
§4.2.1.13), freshest CRL (§4.2.1.15) and authority information access (§4.2.2.1)
extensions, byte for byte; ``urls_of_extensions`` reads the URIs out of their raw values
once per distinct value (a small cache), so learning URLs costs a dictionary look-up per
certificate. ``parse_url`` decides what the store keeps: http(s):// and ldap:// URLs only,
ASCII, bounded, without user information, and for http(s) without a query, a fragment, dot
segments or encoded slashes (a server maps such a path to nothing: a lookup in a table, never
a file). An ldap:// URL is read per RFC 4516: the DN percent-decoded and parsed with
``store.names``, the first attribute of the attribute list (";binary" dropped), base scope.
Anything else raises ``UrlRefused`` with the reason, which the importer notes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote

from asn1crypto import x509 as asn1x509

from store import names

MAX_URL = 1024  # characters; longer URLs are refused
KINDS = ("crl", "delta", "ca")
# LDAP attributes an ldap:// URL may ask for (RFC 4523), by lower-case name
LDAP_ATTRIBUTES = {
    "certificaterevocationlist": "certificateRevocationList",
    "authorityrevocationlist": "authorityRevocationList",
    "deltarevocationlist": "deltaRevocationList",
    "cacertificate": "cACertificate",
}
DEFAULT_ATTRIBUTE = {"crl": "certificateRevocationList", "delta": "deltaRevocationList",
                     "ca": "cACertificate"}
DEFAULT_PORTS = {"http": "80", "https": "443", "ldap": "389"}
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?)*"
                   r"\.?|\[[0-9a-f:.]{2,45}\]")
_PRINTABLE = re.compile(r"[\x21-\x7e]*")
_BAD_ESCAPES = re.compile(r"%(?:2f|5c|00)", re.IGNORECASE)


class UrlRefused(ValueError):
    """A URL the store does not keep; the message says why (for the importer's notes)."""


@dataclass(frozen=True)
class ParsedUrl:
    """A URL as the store keeps it."""

    url: str  # normalised: scheme and host lower-case, default port dropped
    scheme: str
    host: str  # lower-case, with ":port" when not the default
    path: str  # http(s): the path as printed; ldap: "/" and the DN part as printed
    dn_key: str | None = None  # ldap: the DN's key (store.names), its display form, and
    dn: str | None = None  # the attribute the URL asks for
    attr: str | None = None


def _short(text: str) -> str:
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


def parse_url(text: str, kind: str = "crl") -> ParsedUrl:
    """The URL text (as printed in a certificate) checked and normalised, or UrlRefused."""
    if len(text) > MAX_URL:
        raise UrlRefused(f"URL longer than {MAX_URL} characters: {_short(text)}")
    if not text.isascii() or not _PRINTABLE.fullmatch(text):
        raise UrlRefused(f"URL with non-ASCII, space or control characters: {text[:80]!a}")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise UrlRefused(f"not an http(s):// or ldap:// URL: {_short(text)}")
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        raise UrlRefused(f"URL with user information: {_short(text)}")
    authority = authority.lower()
    host, port = authority, ""
    if not authority.endswith("]") and ":" in authority:
        host, _, port = authority.rpartition(":")
    elif authority.startswith("[") and "]:" in authority:
        host, _, port = authority.rpartition(":")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise UrlRefused(f"URL with a bad port: {_short(text)}")
    if not _HOST.fullmatch(host):
        if not (scheme == "ldap" and host == ""):
            raise UrlRefused(f"URL with a bad host name: {_short(text)}")
    if port and port.lstrip("0") != DEFAULT_PORTS[scheme]:
        host = f"{host}:{int(port)}"
    tail = slash + tail
    if scheme == "ldap":
        return _ldap(text, host, tail, kind)
    if not tail:
        tail = "/"
    if "?" in tail or "#" in tail:
        raise UrlRefused(f"http URL with a query or fragment: {_short(text)}")
    if "\\" in tail or _BAD_ESCAPES.search(tail):
        raise UrlRefused(f"http URL with an encoded slash, backslash or NUL: {_short(text)}")
    if any(unquote(seg) in (".", "..") for seg in tail.split("/")):
        raise UrlRefused(f"http URL with a dot segment: {_short(text)}")
    return ParsedUrl(f"{scheme}://{host}{tail}", scheme, host, tail)


def _ldap(text: str, host: str, tail: str, kind: str) -> ParsedUrl:
    """RFC 4516: ldap://host/dn?attributes?scope?filter?extensions."""
    dn_part, _, query = tail[1:].partition("?")
    if "#" in tail:
        raise UrlRefused(f"ldap URL with a fragment: {_short(text)}")
    fields = query.split("?") if query else []
    if len(fields) > 4:
        raise UrlRefused(f"ldap URL with too many '?' parts: {_short(text)}")
    fields += [""] * (4 - len(fields))
    attrs, scope, _filter, extensions = fields
    if unquote(scope).lower() not in ("", "base"):
        raise UrlRefused(f"ldap URL with a scope other than base: {_short(text)}")
    if any(e.startswith("!") for e in extensions.split(",") if e):
        raise UrlRefused(f"ldap URL with a critical extension: {_short(text)}")
    try:
        dn_text = unquote(dn_part, errors="strict")
        dn = names.parse(dn_text)
    except (UnicodeDecodeError, names.DNSyntaxError) as exc:
        raise UrlRefused(f"ldap URL whose DN cannot be read ({exc}): {_short(text)}") from None
    if dn.is_root():
        raise UrlRefused(f"ldap URL without a DN: {_short(text)}")
    first = unquote(attrs.split(",")[0]).strip() if attrs else ""
    if first:
        name = first.split(";")[0].lower()
        options = {o.lower() for o in first.split(";")[1:]}
        attr = LDAP_ATTRIBUTES.get(name)
        if attr is None or options - {"binary"}:
            raise UrlRefused(f"ldap URL asking for {first[:40]!a}, not a certificate or CRL"
                             f" attribute: {_short(text)}")
    else:
        attr = DEFAULT_ATTRIBUTE[kind]
    # Normalised: the DN part and the query as printed (a lookup key, not a rewritten URL).
    url = f"ldap://{host}/{dn_part}" + (f"?{query}" if query else "")
    return ParsedUrl(url, "ldap", host, "/" + dn_part, dn.key, str(dn), attr)


def normalise(text: str) -> str | None:
    """The stored form of a URL (for look-ups), or None when the store would refuse it."""
    try:
        return parse_url(text).url
    except UrlRefused:
        return None


# --- reading the URIs out of certificate extensions ------------------------------------

CDP_OID = b"\x06\x03\x55\x1d\x1f"  # id-ce-cRLDistributionPoints
FRESHEST_OID = b"\x06\x03\x55\x1d\x2e"  # id-ce-freshestCRL
AIA_OID = b"\x06\x08\x2b\x06\x01\x05\x05\x07\x01\x01"  # id-pe-authorityInfoAccess
URL_OIDS = {CDP_OID: 0, FRESHEST_OID: 1, AIA_OID: 2}


def _uris(names_: asn1x509.GeneralNames | None) -> list[str]:
    out = []
    for general_name in names_ or ():
        if general_name.name == "uniform_resource_identifier":
            out.append(general_name.chosen.contents.decode("latin-1"))
    return out


def _points(raw: bytes) -> list[str]:
    """URIs of a CRLDistributionPoints value (also the freshest CRL's syntax); points with a
    cRLIssuer name an indirect CRL, which certpub does not read, and are left out."""
    out: list[str] = []
    for point in asn1x509.CRLDistributionPoints.load(raw, strict=True):
        if point["crl_issuer"].native:
            continue
        name = point["distribution_point"]
        if isinstance(name, asn1x509.DistributionPointName) and name.name == "full_name":
            out += _uris(name.chosen)
    return out


@functools.lru_cache(maxsize=4096)
def urls_of_extensions(cdp: bytes | None, freshest: bytes | None,
                       aia: bytes | None) -> tuple[tuple[str, str], ...]:
    """(kind, URI as printed) of the three extensions' raw values, in order: "crl" for the
    distribution points, "delta" for the freshest CRL, "ca" for AIA caIssuers. An extension
    that cannot be read contributes nothing (the certificate is stored all the same)."""
    out: list[tuple[str, str]] = []
    for kind, raw in (("crl", cdp), ("delta", freshest)):
        if raw is not None:
            try:
                out += [(kind, u) for u in _points(raw)]
            except (ValueError, TypeError, KeyError, AttributeError):
                pass
    if aia is not None:
        try:
            for access in asn1x509.AuthorityInfoAccessSyntax.load(aia, strict=True):
                if access["access_method"].native == "ca_issuers":
                    out += [("ca", u) for u in _uris([access["access_location"]])]
        except (ValueError, TypeError, KeyError, AttributeError):
            pass
    seen: set[tuple[str, str]] = set()
    return tuple(p for p in out if not (p in seen or seen.add(p)))  # type: ignore[func-returns-value]


def urls_of_certificate(cert: asn1x509.Certificate) -> tuple[tuple[str, str], ...]:
    """``urls_of_extensions`` of a certificate parsed by asn1crypto (the reference path)."""
    raws: list[bytes | None] = [None, None, None]
    for ext in cert["tbs_certificate"]["extensions"]:
        slot = URL_OIDS.get(ext["extn_id"].dump())
        if slot is not None and raws[slot] is None:
            raws[slot] = ext["extn_value"].contents
    if raws == [None, None, None]:
        return ()
    return urls_of_extensions(*raws)
