"""Search filters (RFC 4511 §4.5.1.7): the typed tree, its RFC 4515 text, its evaluation.

Strategy: evaluation is three-valued (TRUE, FALSE, Undefined = None) as RFC 4511 §4.5.1.7
demands; a test of an attribute outside the public allowlist, an unknown attribute, a matching
rule the attribute lacks, or an assertion value that does not parse is Undefined — and stays
Undefined under NOT — so hidden data cannot be probed. Matching rules: caseIgnore(IA5)Match and
their substring/ordering rules (RFC 4518 string preparation as in ``store.names.prep_value``),
objectIdentifierMatch, generalizedTime(Ordering)Match, and certificateExactMatch (RFC 4523
§2.5) whose assertion is accepted in GSER (``{ serialNumber 12, issuer rdnSequence:"c=MO" }``,
RFC 4523 §2.1 — parsed by one bounded regular expression, no recursion), as a DER
CertificateExactAssertion, or as a whole certificate. approxMatch is evaluated as equality.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from asn1crypto import core as asn1core
from asn1crypto import x509 as asn1x509

from server.ldap.entries import Entry, Value, parse_dn
from server.ldap.schema import RULE_BY_KEY, Allowlist, AttributeType, describe, object_class_key
from store import names


@dataclass(frozen=True)
class And:
    items: tuple[Filter, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Filter, ...]


@dataclass(frozen=True)
class Not:
    item: Filter


@dataclass(frozen=True)
class Match:
    """equalityMatch, greaterOrEqual, lessOrEqual or approxMatch."""

    op: str  # "=" | ">=" | "<=" | "~="
    attr: str
    value: bytes


@dataclass(frozen=True)
class Substrings:
    attr: str
    initial: bytes | None
    any: tuple[bytes, ...]
    final: bytes | None


@dataclass(frozen=True)
class Present:
    attr: str


@dataclass(frozen=True)
class Extensible:
    rule: str | None
    attr: str | None
    value: bytes
    dn_attributes: bool


Filter = And | Or | Not | Match | Substrings | Present | Extensible
Truth = bool | None


# --- RFC 4515 text, for logs ----------------------------------------------------------------


_SPECIAL = re.compile(r"[*()\\\x00-\x1f]")


def _esc(value: bytes) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\{b:02x}" for b in value)
    return _SPECIAL.sub(lambda m: f"\\{ord(m.group()):02x}", text)


def to_text(f: Filter, limit: int = 2048) -> str:
    """RFC 4515 string of a filter, cut at ``limit`` characters."""
    out: list[str] = []
    size = 0
    stack: list[Filter | str] = [f]
    while stack and size <= limit:
        item = stack.pop()
        if isinstance(item, str):
            piece = item
        elif isinstance(item, (And, Or)):
            piece = "(&" if isinstance(item, And) else "(|"
            stack.append(")")
            stack.extend(reversed(item.items))
        elif isinstance(item, Not):
            piece = "(!"
            stack.append(")")
            stack.append(item.item)
        elif isinstance(item, Match):
            piece = f"({item.attr}{item.op}{_esc(item.value)})"
        elif isinstance(item, Present):
            piece = f"({item.attr}=*)"
        elif isinstance(item, Substrings):
            parts = [_esc(item.initial or b""), *(_esc(a) for a in item.any), _esc(item.final or b"")]
            piece = f"({item.attr}={'*'.join(parts)})"
        else:
            piece = (f"({item.attr or ''}{':dn' if item.dn_attributes else ''}"
                     f"{':' + item.rule if item.rule else ''}:={_esc(item.value)})")
        out.append(piece)
        size += len(piece)
    text = "".join(out)
    return text if size <= limit else text[:limit] + "..."


# --- values -----------------------------------------------------------------------------------


def _text(value: Value) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


_GTIME = re.compile(
    r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})?(\d{2})?(?:[.,](\d{1,9}))?(Z|[+-]\d{2}(?:\d{2})?)$")


def parse_gtime(text: str) -> datetime | None:
    """GeneralizedTime (RFC 4517 §3.3.13) to an aware datetime; None when malformed."""
    m = _GTIME.match(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute or 0),
                          int(second or 0), int((frac or "0")[:6].ljust(6, "0")), tzinfo=UTC)
    except ValueError:
        return None
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5] or 0))
        moment -= sign * offset
    return moment


def serial_norm(text: str) -> str | None:
    cleaned = text.strip().replace(":", "").lower()
    if cleaned.startswith("0x"):
        cleaned = cleaned[2:]
    if not cleaned or len(cleaned) > 128 or any(c not in "0123456789abcdef" for c in cleaned):
        return None
    return format(int(cleaned, 16), "x")


CertId = tuple[int, str]  # (serial, issuer DN key)

_GSER = re.compile(
    r"""^\{\s*serialNumber\s+(-?\d{1,200}|0x[0-9a-fA-F]{1,200}|'[0-9a-fA-F]{1,200}'H)\s*,\s*"""
    r"""issuer\s+rdnSequence\s*:\s*"((?:[^"]|""){0,8192})"\s*\}$""",
    re.S,
)


class _ExactAssertion(asn1core.Sequence):
    _fields = [("serial_number", asn1core.Integer), ("issuer", asn1x509.Name)]


def parse_cert_assertion(value: bytes) -> CertId | None:
    """certificateExactMatch assertion (GSER, DER, or a whole certificate); None if malformed."""
    if len(value) > 16384:
        return None
    if value[:1] == b"\x30":
        return _der_cert_id(value)
    text = _text(value)
    if text is None:
        return None
    m = _GSER.match(text.strip())
    if m is None:
        return None
    serial_text, issuer_text = m.groups()
    if serial_text.endswith("'H"):
        serial = int(serial_text[1:-2], 16)
    elif serial_text.lower().startswith("0x"):
        serial = int(serial_text[2:], 16)
    else:
        serial = int(serial_text)
    try:
        issuer = parse_dn(issuer_text.replace('""', '"'))
    except names.DNSyntaxError:
        return None
    return serial, issuer.key


@lru_cache(maxsize=4096)
def _der_cert_id(der: bytes) -> CertId | None:
    for cls in (asn1x509.Certificate, _ExactAssertion):
        try:
            parsed = cls.load(der, strict=True)
            if isinstance(parsed, asn1x509.Certificate):
                tbs = parsed["tbs_certificate"]
                return int(tbs["serial_number"].native), names.from_x509(tbs["issuer"]).key
            return int(parsed["serial_number"].native), names.from_x509(parsed["issuer"]).key
        except (ValueError, TypeError, KeyError, OverflowError, names.DNSyntaxError):
            continue
    return None


# --- matching rules ---------------------------------------------------------------------------

Normaliser = Callable[[Value], object]


def _norm_for(rule: str, t: AttributeType | None) -> Normaliser:
    if rule == "certificateExactMatch":
        return lambda v: _der_cert_id(v) if isinstance(v, bytes) else None
    if rule in ("generalizedTimeMatch", "generalizedTimeOrderingMatch"):
        return lambda v: (lambda s: parse_gtime(s) if s is not None else None)(_text(v))
    if rule == "objectIdentifierMatch":
        return lambda v: (lambda s: object_class_key(s) if s is not None else None)(_text(v))
    if rule == "caseExactMatch":
        return lambda v: (lambda s: " ".join(s.split()) if s is not None else None)(_text(v))
    if rule == "integerMatch":
        return lambda v: (lambda s: int(s) if s and s.strip().lstrip("-").isdigit() else None)(
            _text(v))
    if t is not None and t.name == "certpubSerialNumber":
        return lambda v: (lambda s: serial_norm(s) if s is not None else None)(_text(v))
    return lambda v: (lambda s: names.prep_value(s) if s is not None else None)(_text(v))


def _assertion(rule: str, t: AttributeType | None, value: bytes) -> object:
    if rule == "certificateExactMatch":
        return parse_cert_assertion(value)
    return _norm_for(rule, t)(value)


def _compare(op: str, rule: str, t: AttributeType | None, values: Iterable[Value],
             value: bytes) -> Truth:
    wanted = _assertion(rule, t, value)
    if wanted is None:
        return None
    norm = _norm_for(rule, t)
    for v in values:
        have = norm(v)
        if have is None:
            continue
        try:
            if op == "=" and have == wanted:
                return True
            if op == ">=" and have >= wanted:  # type: ignore[operator]
                return True
            if op == "<=" and have <= wanted:  # type: ignore[operator]
                return True
            if op == "<" and have < wanted:  # type: ignore[operator]
                return True
        except TypeError:
            continue
    return False


def _resolve(attr: str, entry: Entry, allow: Allowlist) -> AttributeType | None:
    t, ok = describe(attr)
    if t is None or not ok or not allow.allows(t, entry.meta):
        return None
    return t


def evaluate(f: Filter, entry: Entry, allow: Allowlist) -> Truth:
    """TRUE, FALSE or Undefined (None) for one entry (RFC 4511 §4.5.1.7)."""
    if isinstance(f, And):
        result: Truth = True
        for item in f.items:
            r = evaluate(item, entry, allow)
            if r is False:
                return False
            if r is None:
                result = None
        return result
    if isinstance(f, Or):
        result = False
        for item in f.items:
            r = evaluate(item, entry, allow)
            if r is True:
                return True
            if r is None:
                result = None
        return result
    if isinstance(f, Not):
        r = evaluate(f.item, entry, allow)
        return None if r is None else not r
    if isinstance(f, Present):
        t = _resolve(f.attr, entry, allow)
        return None if t is None else bool(entry.values(t.name))
    if isinstance(f, Match):
        t = _resolve(f.attr, entry, allow)
        if t is None:
            return None
        rule = t.ordering if f.op in (">=", "<=") else t.equality
        if rule is None:
            return None
        return _compare("=" if f.op == "~=" else f.op, rule, t, entry.values(t.name), f.value)
    if isinstance(f, Substrings):
        t = _resolve(f.attr, entry, allow)
        if t is None or t.substr is None:
            return None
        return _substrings(f, entry.values(t.name))
    return _extensible(f, entry, allow)


def substring_parts(f: Substrings) -> tuple[str, list[str], str] | None:
    """Prepared (initial, any, final) pieces of a substrings assertion; None if not UTF-8."""
    try:
        initial = names.prep_value(f.initial.decode("utf-8")) if f.initial else ""
        any_ = [names.prep_value(a.decode("utf-8")) for a in f.any]
        final = names.prep_value(f.final.decode("utf-8")) if f.final else ""
    except UnicodeDecodeError:
        return None
    return initial, [a for a in any_ if a], final


def _substrings(f: Substrings, values: Iterable[Value]) -> Truth:
    parts = substring_parts(f)
    if parts is None:
        return None
    initial, any_, final = parts
    for v in values:
        s = _text(v)
        if s is None:
            continue
        s = names.prep_value(s)
        if not s.startswith(initial):
            continue
        pos = len(initial)
        ok = True
        for piece in any_:
            found = s.find(piece, pos)
            if found < 0:
                ok = False
                break
            pos = found + len(piece)
        if ok and len(s) - len(final) >= pos and s.endswith(final):
            return True
    return False


_ORDERING = {"caseIgnoreOrderingMatch", "generalizedTimeOrderingMatch"}
_EXTENSIBLE_RULES = {"caseIgnoreMatch", "caseIgnoreIA5Match", "caseExactMatch",
                     "objectIdentifierMatch", "generalizedTimeMatch", "certificateExactMatch",
                     "integerMatch", *_ORDERING}


def _extensible(f: Extensible, entry: Entry, allow: Allowlist) -> Truth:
    rule: str | None = None
    if f.rule is not None:
        rule = RULE_BY_KEY.get(f.rule.strip().lower())
        if rule is None or rule not in _EXTENSIBLE_RULES:
            return None
    op = "<" if rule in _ORDERING else "="
    candidates: list[tuple[AttributeType, tuple[Value, ...]]] = []
    if f.attr is not None:
        t = _resolve(f.attr, entry, allow)
        if t is None:
            return None
        candidates.append((t, entry.values(t.name)))
    elif rule is None:
        return None
    else:
        for name, values in entry.attributes.items():
            t = _resolve(name, entry, allow)
            if t is not None:
                candidates.append((t, values))
    if f.dn_attributes:
        for a in entry.dn_avas():
            t, _ = describe(a.oid)
            if t is not None and allow.allows(t, entry.meta) and (f.attr is None
                                                                 or t is candidates[0][0]):
                candidates.append((t, (a.display,)))
    result: Truth = False
    for t, values in candidates:
        use = rule or t.equality
        if use is None:
            continue
        r = _compare(op, use, t, values, f.value)
        if r is True:
            return True
        if r is None and f.attr is not None:
            result = None
    return result
