"""From a filter to indexed store queries: which certificates can possibly match.

Strategy: an equality, approx, prefix, substring or presence test of an indexed attribute
(mail, cn, sn, givenName, o, ou, c, l, st — the store's ``cert_attrs``), a certificateExactMatch
on userCertificate and an equality on certpubSerialNumber are *indexable*; AND takes its
cheapest indexable branch (the rest of the filter is then evaluated on each candidate), OR is
indexable only when every branch is, and is the union; NOT never is. The estimate is a fixed
ranking (exact certificate < equality < prefix < substring < presence), which is what the
indexes make cheap without statistics. A filter without an indexable part is not planned: the
caller evaluates it on the base entry, the base's children or a bounded subtree walk.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.ldap.filters import (
    And,
    CertId,
    Extensible,
    Filter,
    Match,
    Not,
    Or,
    Present,
    Substrings,
    parse_cert_assertion,
    serial_norm,
    substring_parts,
)
from server.ldap.schema import RULE_BY_KEY, Allowlist, describe
from store import names

# canonical attribute name -> the store's cert_attrs name
INDEXED: dict[str, str] = {
    "mail": "mail", "cn": "cn", "sn": "sn", "givenName": "givenname", "o": "o", "ou": "ou",
    "c": "c", "l": "l", "st": "st",
}
COST_CERT, COST_EQ, COST_PREFIX, COST_SUBSTR, COST_PRESENT = 1, 10, 100, 1000, 10_000


@dataclass(frozen=True)
class IndexQuery:
    """One store query: kind is eq | substr | present | cert | serial."""

    kind: str
    attr: str = ""
    value: str = ""
    initial: str = ""
    any: tuple[str, ...] = ()
    final: str = ""
    cert: CertId | None = None
    serial: int | None = None


@dataclass(frozen=True)
class Plan:
    """A union of store queries that returns a superset of the matching certificates."""

    queries: tuple[IndexQuery, ...]
    cost: int


def _indexed(attr: str, allow: Allowlist) -> str | None:
    t, ok = describe(attr)
    if t is None or not ok or not allow.allows(t):
        return None
    return INDEXED.get(t.name)


def plan(f: Filter, allow: Allowlist) -> Plan | None:
    """The cheapest indexed plan for a filter, or None when no index can bound it."""
    if isinstance(f, And):
        best: Plan | None = None
        for item in f.items:
            p = plan(item, allow)
            if p is not None and (best is None or p.cost < best.cost):
                best = p
        return best
    if isinstance(f, Or):
        queries: list[IndexQuery] = []
        cost = 0
        for item in f.items:
            p = plan(item, allow)
            if p is None:
                return None
            queries.extend(q for q in p.queries if q not in queries)
            cost += p.cost
        return Plan(tuple(queries), cost) if queries else None
    if isinstance(f, Not):
        return None
    if isinstance(f, Match) and f.op in ("=", "~="):
        return _equality(f.attr, f.value, allow)
    if isinstance(f, Extensible):
        rule = RULE_BY_KEY.get(f.rule.strip().lower()) if f.rule else None
        if f.attr is None or f.dn_attributes or rule not in (None, "certificateExactMatch"):
            return None
        return _equality(f.attr, f.value, allow)
    if isinstance(f, Substrings):
        attr = _indexed(f.attr, allow)
        parts = substring_parts(f)
        if attr is None or parts is None:
            return None
        initial, any_, final = parts
        q = IndexQuery("substr", attr, initial=initial, any=tuple(any_), final=final)
        return Plan((q,), COST_PREFIX if initial else COST_SUBSTR)
    if isinstance(f, Present):
        attr = _indexed(f.attr, allow)
        return None if attr is None else Plan((IndexQuery("present", attr),), COST_PRESENT)
    return None


def _equality(attr_desc: str, value: bytes, allow: Allowlist) -> Plan | None:
    t, ok = describe(attr_desc)
    if t is None or not ok or not allow.allows(t):
        return None
    if t.name == "userCertificate":
        cert = parse_cert_assertion(value)
        return None if cert is None else Plan((IndexQuery("cert", cert=cert),), COST_CERT)
    if t.name == "certpubSerialNumber":
        try:
            norm = serial_norm(value.decode("utf-8"))
        except UnicodeDecodeError:
            return None
        if norm is None:
            return None
        return Plan((IndexQuery("serial", serial=int(norm, 16)),), COST_CERT)
    attr = INDEXED.get(t.name)
    if attr is None:
        return None
    try:
        text = names.prep_value(value.decode("utf-8"))
    except UnicodeDecodeError:
        return None
    return Plan((IndexQuery("eq", attr, text),), COST_EQ)
