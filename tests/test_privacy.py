"""The lookup policy (server.privacy), pure: what a whole filter can match, the decision per
search shape, the search pages' rule, the budget buckets and the [privacy] table."""

from __future__ import annotations

import pytest

from server.configtools import ConfigError, Section
from server.ldap.config import DEFAULT_ATTRIBUTES
from server.ldap.schema import Allowlist
from server.limits import TokenBuckets, network_of
from server.privacy import (
    NOT_EXACT,
    PAGING,
    TOO_SHORT,
    UNBOUNDED,
    Privacy,
    PrivacyConfig,
    ldap_rule,
    parse_privacy,
    reach,
    web_rule,
)
from server.ldap.filters import And, Filter, Match, Not, Or, Present, Substrings



def parse(text: str) -> Filter:
    """A small RFC 4515 reader for the tests (no escapes, no extensible matches)."""
    f, rest = _parse(text)
    assert not rest, rest
    return f


def _parse(text: str) -> tuple[Filter, str]:
    assert text[0] == "(", text
    if text[1] in "&|":
        items, rest = [], text[2:]
        while rest[0] == "(":
            item, rest = _parse(rest)
            items.append(item)
        return (And if text[1] == "&" else Or)(tuple(items)), rest[1:]
    if text[1] == "!":
        item, rest = _parse(text[2:])
        return Not(item), rest[1:]
    body, rest = text[1:].split(")", 1)
    for op in (">=", "<=", "~="):
        if op in body:
            attr, value = body.split(op, 1)
            return Match(op, attr, value.encode()), rest
    attr, value = body.split("=", 1)
    if value == "*":
        return Present(attr), rest
    if "*" in value:
        pieces = value.split("*")
        return Substrings(attr, pieces[0].encode() or None,
                          tuple(p.encode() for p in pieces[1:-1] if p),
                          pieces[-1].encode() or None), rest
    return Match("=", attr, value.encode()), rest


ALLOW = Allowlist.of(DEFAULT_ATTRIBUTES)
TYPED = PrivacyConfig()
EXACT_ONLY = PrivacyConfig(lookups="exact")
OPEN_CFG = PrivacyConfig(lookups="open")

THUNDERBIRD_LOOKUP = "(mail=ana@example.mo)"
THUNDERBIRD_MANY = "(|(mail=ana@example.mo)(mail=bo@example.mo))"
AUTOCOMPLETE = "(|(cn=*{v}*)(mail=*{v}*)(givenName=*{v}*)(sn=*{v}*))"
OUTLOOK = "(&(mail=*)(|(mail={v}*)(|(cn={v}*)(|(sn={v}*)(givenName={v}*)))))"


def rule(text: str, scope: int = 2, paged: bool | None = None,
         cfg: PrivacyConfig = TYPED):  # type: ignore[no-untyped-def]
    return ldap_rule(parse(text), scope, paged, cfg, ALLOW)


@pytest.mark.parametrize("text", [
    THUNDERBIRD_LOOKUP, THUNDERBIRD_MANY, AUTOCOMPLETE.format(v="ana"),
    OUTLOOK.format(v="ana"), AUTOCOMPLETE.format(v="陳大"), OUTLOOK.format(v="陳大"),
    "(cn=Chan Tai Man)", "(certpubSerialNumber=1234)", "(&(mail=ana@x.mo)(objectClass=*))",
    "(sn=chan)", "(mail=ana@exa*)", "(cn=ana l*)",
])
def test_client_shapes_are_allowed_and_capped(text: str) -> None:
    r = rule(text)
    assert not r.refused and not r.structural and r.cap == 100, (text, r)


@pytest.mark.parametrize("text,reason,at_once", [
    ("(mail=*)", UNBOUNDED, True),
    ("(objectClass=*)", UNBOUNDED, False),  # glue and CA entries stay browsable
    ("(mail=a*)", TOO_SHORT, True),
    ("(cn=ab*)", TOO_SHORT, True),
    (AUTOCOMPLETE.format(v="a"), TOO_SHORT, True),
    (OUTLOOK.format(v="v"), TOO_SHORT, True),
    ("(cn=陳*)", TOO_SHORT, True),
    ("(sn=陳)", TOO_SHORT, True),
    ("(mail=*@example.mo)", UNBOUNDED, True),  # a domain narrows nothing
    ("(o=Macau Government)", UNBOUNDED, True),
    ("(|(mail=ana@x.mo)(mail=*))", UNBOUNDED, True),  # an OR is as broad as its broadest
    ("(!(mail=ana@x.mo))", UNBOUNDED, False),
    ("(&(objectClass=*)(c=MO))", UNBOUNDED, True),
    ("(telephoneNumber=12345678)", UNBOUNDED, False),
])
def test_dumps_are_refused(text: str, reason: str, at_once: bool) -> None:
    r = rule(text)
    assert r.reason == reason, (text, r)
    assert r.refused == at_once and r.structural == (not at_once)
    assert "privacy policy" in r.message


def test_base_reads_are_always_answered() -> None:
    for text in ("(objectClass=*)", "(mail=*)", "(cn=a*)"):
        r = rule(text, scope=0)
        assert not r.refused and not r.structural and r.cap is None


def test_exact_and_open_modes() -> None:
    assert not rule(THUNDERBIRD_LOOKUP, cfg=EXACT_ONLY).refused
    assert not rule("(cn=Chan Tai Man)", cfg=EXACT_ONLY).refused
    assert rule(AUTOCOMPLETE.format(v="ana"), cfg=EXACT_ONLY).reason == NOT_EXACT
    r = rule("(mail=*)", cfg=OPEN_CFG)
    assert not r.refused and r.cap is None and not r.structural


def test_paging() -> None:
    assert rule(THUNDERBIRD_LOOKUP, paged=True).reason == PAGING  # critical: refused
    r = rule(THUNDERBIRD_LOOKUP, paged=False)  # not critical: answered without paging
    assert not r.refused and not r.paging and r.cap == 100
    on = PrivacyConfig(paging=True)
    r = rule(OUTLOOK.format(v="ana"), paged=False, cfg=on)
    assert not r.refused and r.paging and r.cap is None
    assert rule("(mail=*)", paged=False, cfg=on).refused


def test_mail_pinned_filters_cost_nothing() -> None:
    assert rule(THUNDERBIRD_LOOKUP).free and rule(THUNDERBIRD_MANY).free
    assert rule("(&(mail=ana@x.mo)(cn=*))").free
    assert not rule("(|(mail=ana@x.mo)(cn=Ana Lee))").free
    assert not rule(AUTOCOMPLETE.format(v="ana")).free


def test_characters_are_counted_and_cjk_needs_fewer() -> None:
    assert reach(parse("(cn=陳大*)"), TYPED, ALLOW).rank == 2
    assert reach(parse("(cn=ab*)"), TYPED, ALLOW).rank == 1
    assert reach(parse("(cn=abc*)"), TYPED, ALLOW).rank == 2
    assert reach(parse("(cn=a*b*c)"), TYPED, ALLOW).rank == 1  # the longest piece counts
    two = PrivacyConfig(min_chars=2)
    assert reach(parse("(cn=ab*)"), two, ALLOW).rank == 2


def test_web_rule() -> None:
    assert web_rule("ana", None, False, TYPED) == ("", True)
    assert web_rule("an", None, False, TYPED) == (TOO_SHORT, False)
    assert web_rule("陳大", None, False, TYPED) == ("", True)
    assert web_rule("ab", None, True, TYPED) == ("", False)  # the serial part still runs
    assert web_rule(None, "ana@x.mo", False, EXACT_ONLY) == ("", False)
    assert web_rule("ana lee", None, False, EXACT_ONLY) == (NOT_EXACT, False)
    assert web_rule("a", None, False, OPEN_CFG) == ("", True)


def test_token_buckets_overdraw_refill_and_stay_bounded() -> None:
    now = [0.0]
    b = TokenBuckets(10, 2.0, clock=lambda: now[0], max_keys=4)
    assert b.wait("a") == 0
    b.take("a", 15)
    assert b.tokens("a") == -5 and b.wait("a") == pytest.approx(3.0)
    now[0] = 3.0
    assert b.wait("a") == 0
    for k in "bcdefg":
        b.take(k, 1)
    assert len(b._buckets) <= 4


def test_networks() -> None:
    assert network_of("192.0.2.77", 24, 56) == "192.0.2.0/24"
    assert network_of("2001:db8::1", 24, 56) == "2001:db8::/56"
    assert network_of("unix", 24, 56) == "unix"


def test_budget_per_address_and_network() -> None:
    now = [0.0]
    p = Privacy(PrivacyConfig(budget=100, budget_per_minute=60, network_budget=2,
                              exempt=("10.0.0.0/8",)), ALLOW, clock=lambda: now[0])
    assert p.exempt("10.1.2.3") and not p.exempt("192.0.2.1") and not p.exempt("-")
    p.charge("192.0.2.1", 100)
    assert p.over_budget("192.0.2.1", "ldap") > 0
    assert p.over_budget("192.0.2.2", "ldap") == 0  # another address of the network
    p.charge("192.0.2.2", 100)
    assert p.over_budget("192.0.2.3", "ldap") > 0  # the network's budget is spent
    assert p.refusals[("ldap", "budget")] == 2
    now[0] = 200.0
    assert p.over_budget("192.0.2.1", "ldap") == 0


def test_config_table() -> None:
    assert parse_privacy(Section({})) == PrivacyConfig()
    cfg = parse_privacy(Section({"lookups": "exact", "exempt": ["127.0.0.1/32", "::1"]}))
    assert cfg.lookups == "exact" and len(cfg.networks()) == 2
    with pytest.raises(ConfigError, match=r"exempt\[1\]"):
        parse_privacy(Section({"exempt": ["127.0.0.1/32", "localhost"]}))
    with pytest.raises(ConfigError, match="lookups"):
        parse_privacy(Section({"lookups": "closed"}))
    with pytest.raises(ConfigError, match="unknown"):
        parse_privacy(Section({"lookup": "exact"}))
