"""Privacy: subject attributes outside the allowlist never leave the directory, nor their
existence; filter values that look like SQL or LDAP injection are harmless.

The demo PKI gives every seventh subscriber a street, a personal ID in serialNumber and a
telephoneNumber. Each request is made twice where it can be — once with the subscriber's
true private value, once with a false one — and the two answers must be identical, so no
answer tells whether a guess was right. (The certificates themselves carry their full subject:
publishing ``userCertificate`` publishes it; see docs/hostile.md.)

These tests list whole subtrees: they run as an operator would, from a network the lookup
policy exempts (``[privacy] exempt``; the policy itself: tests/ldap/test_privacy_clients.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from cryptography.x509.oid import NameOID, ObjectIdentifier

from tests.hostile import wire
from tests.hostile.conftest import Live, in_thread

EXEMPT = {"exempt": ("127.0.0.0/8",)}


@pytest.fixture
def live(serve: Any) -> Live:
    """The demo listeners, with loopback exempt from the lookup policy."""
    return serve(privacy=EXEMPT)  # type: ignore[no-any-return]

PHONE = ObjectIdentifier("2.5.4.20")
PRIVATE_OIDS = {PHONE: "telephoneNumber", NameOID.STREET_ADDRESS: "street",
                NameOID.SERIAL_NUMBER: "serialNumber"}
PRIVATE_NAMES = {"telephonenumber", "2.5.4.20", "street", "streetaddress", "2.5.4.9",
                 "serialnumber", "2.5.4.5", "postaladdress", "2.5.4.16"}
ALIASES = {"telephoneNumber": ["telephoneNumber", "TELEPHONENUMBER", "2.5.4.20", "OID.2.5.4.20"],
           "street": ["street", "streetAddress", "2.5.4.9"],
           "serialNumber": ["serialNumber", "2.5.4.5", "serialNumber;binary"]}
REQUESTED = ["*", "+", *[a for names in ALIASES.values() for a in names], "postalAddress",
             "2.5.4.16"]
CERT_VALUED = {"usercertificate;binary", "cacertificate;binary", "crosscertificatepair;binary",
               "certificaterevocationlist;binary", "authorityrevocationlist;binary"}


def private_subscribers(live: Live) -> list[tuple[Any, dict[str, str]]]:
    out = []
    for c in live.pki.certs:
        subject = c.load().subject
        values = {name: str(subject.get_attributes_for_oid(oid)[0].value)
                  for oid, name in PRIVATE_OIDS.items() if subject.get_attributes_for_oid(oid)}
        if len(values) == 3 and c.emails:
            out.append((c, values))
    assert len(out) >= 3
    return out


def false_value(name: str, value: str) -> str:
    return value[:-1] + ("7" if value[-1] != "7" else "8") if name != "street" else value + "0"


def assert_nothing_private(result: wire.SearchResult, secrets: list[str]) -> None:
    for dn, attrs in result.entries:
        for secret in secrets:
            assert secret not in dn, (dn, secret)
        for name, values in attrs.items():
            assert name.lower() not in PRIVATE_NAMES, (dn, name)
            assert name.split(";")[0].lower() not in PRIVATE_NAMES, (dn, name)
            if name.lower() in CERT_VALUED:
                continue  # the certificate: its subject is the CA's to publish
            for v in values:
                for secret in secrets:
                    assert secret.encode() not in v, (dn, name, secret)


def shape(r: wire.SearchResult) -> tuple[int, list[tuple[str, list[tuple[str, list[bytes]]]]]]:
    return r.code, sorted((dn, sorted(a.items())) for dn, a in r.entries)


def _by_name_oid_star_plus(live: Live) -> None:
    every_secret = [v for _, vals in private_subscribers(live) for v in vals.values()]
    with wire.LdapClient(live.ldap) as c:
        for cert, _values in private_subscribers(live):
            for scope in (0, 1, 2):  # the entry, its certificate entries, by mail
                base = "c=MO" if scope == 2 else cert.subject_rfc4514
                filt = wire.eq("mail", cert.emails[0]) if scope == 2 else wire.present(
                    "objectClass")
                for attrs in (REQUESTED, ["*"], ["+"], [], ["*", "+"]):
                    for types_only in (False, True):
                        r = c.search(base, filt, attrs, scope=scope, types_only=types_only)
                        assert r.code == 0 and r.entries, (base, r.code, r.text)
                        assert_nothing_private(r, every_secret)
        # whole subtree, everything: nothing private anywhere
        r = c.search("c=MO", wire.present("objectClass"), ["*", "+"])
        assert r.code == 0 and len(r.entries) > 20
        assert_nothing_private(r, every_secret)
        r = c.search("", wire.present("objectClass"), ["*", "+"], scope=0)
        assert_nothing_private(r, every_secret)
        r = c.search("cn=Subschema", wire.present("objectClass"), ["*", "+"], scope=0)
        for _, attrs in r.entries:
            for values in attrs.values():
                for v in values:
                    for name in ("telephoneNumber", "'street'", "streetAddress", "postalAddress",
                                 " 2.5.4.20 ", " 2.5.4.9 ", " 2.5.4.5 "):
                        assert name.encode() not in v, (name, v[:120])


@pytest_twisted.ensureDeferred
async def test_no_request_by_name_oid_star_or_plus_returns_private_attributes(
        live: Live) -> None:
    await in_thread(_by_name_oid_star_plus, live)


def _filter_pairs(name: str, true: str, false: str) -> list[tuple[bytes, bytes]]:
    """(filter with the true value, the same filter with a false value).

    The rule-only extensible filters (no attribute) test the public attributes, so under NOT
    they may match; every other filter names a private attribute and must match nothing.
    """
    pairs = []
    for attr in ALIASES[name]:
        for make in (lambda v, a=attr: wire.eq(a, v),
                     lambda v, a=attr: wire.substr(a, v[:4], (), None),
                     lambda v, a=attr: wire.substr(a, None, [v[2:-2]], None),
                     lambda v, a=attr: wire.substr(a, None, (), v[-3:]),
                     lambda v, a=attr: wire.tlv(0xA5, wire.octets(a) + wire.octets(v)),
                     lambda v, a=attr: wire.tlv(0xA8, wire.octets(a) + wire.octets(v)),
                     lambda v, a=attr: wire.extensible(None, a, v),
                     lambda v, a=attr: wire.extensible("caseIgnoreMatch", a, v, dn=True),
                     lambda v: wire.extensible("caseIgnoreMatch", None, v, dn=True),
                     lambda v: wire.extensible("2.5.13.2", None, v, dn=True)):
            t, f = make(true), make(false)
            pairs += [(t, f), (wire.not_(t), wire.not_(f)),
                      (wire.or_(wire.eq("mail", "nobody@nowhere.example"), t),
                       wire.or_(wire.eq("mail", "nobody@nowhere.example"), f))]
        pairs.append((wire.present(attr), wire.present(attr + "x")))
        pairs.append((wire.not_(wire.present(attr)), wire.not_(wire.present(attr + "x"))))
    return pairs


def _filters_reveal_nothing(live: Live) -> None:
    with wire.LdapClient(live.ldap) as c:
        for cert, values in private_subscribers(live)[:2]:
            for name, true in values.items():
                pairs = _filter_pairs(name, true, false_value(name, true))
                for i, (filt_true, filt_false) in enumerate(pairs):
                    # every pair on the entry itself; a sample on the whole tree (a walk)
                    scoped = [(cert.subject_rfc4514, 0)] + ([("c=MO", 2)] if i % 7 == 0 else [])
                    for base, scope in scoped:
                        a = c.search(base, filt_true, ["*"], scope=scope)
                        b = c.search(base, filt_false, ["*"], scope=scope)
                        assert shape(a) == shape(b), (name, base, filt_true.hex())
                        if name.lower().encode() in filt_true.lower() or b"2.5.4." in filt_true:
                            assert a.code in (0, 11) and not a.entries, (a.code, filt_true)
                        # combined with a true public filter: still no difference
                        mail = wire.eq("mail", cert.emails[0])
                        a = c.search(base, wire.and_(mail, wire.not_(filt_true)), scope=scope)
                        b = c.search(base, wire.and_(mail, wire.not_(filt_false)), scope=scope)
                        assert shape(a) == shape(b), (name, base)


@pytest_twisted.ensureDeferred
async def test_filters_on_private_attributes_reveal_nothing(live: Live) -> None:
    await in_thread(_filters_reveal_nothing, live)


def _dn_variants(cert: Any, values: dict[str, str]) -> tuple[str, list[str]]:
    """The subject DN with its true private values, and DNs with false ones."""
    true = cert.subject_rfc4514
    falses = []
    for name, value in values.items():
        escaped = value.replace("+", "\\+").replace(",", "\\,")
        assert escaped in true or value in true, (true, value)
        falses.append(true.replace(escaped, false_value(name, value).replace("+", "\\+")
                                   .replace(",", "\\,"), 1))
    return true, falses


def _base_and_compare_at_private_dns(live: Live) -> None:
    with wire.LdapClient(live.ldap) as c:
        for cert, values in private_subscribers(live)[:4]:
            true_dn, false_dns = _dn_variants(cert, values)
            t = c.search(true_dn, wire.present("objectClass"), ["*", "+"], scope=0)
            assert t.code == 0 and len(t.entries) == 1
            for false_dn in false_dns:
                f = c.search(false_dn, wire.present("objectClass"), ["*", "+"], scope=0)
                assert shape(t) == shape(f), false_dn
                for scope in (1, 2):
                    a = c.search(true_dn, wire.present("objectClass"), ["1.1"], scope=scope)
                    b = c.search(false_dn, wire.present("objectClass"), ["1.1"], scope=scope)
                    assert shape(a) == shape(b)
            # compare: true and false private values give the same answer, at every DN
            for name, value in values.items():
                for attr in ALIASES[name]:
                    for dn in (true_dn, *false_dns, t.entries[0][0]):
                        codes = {c.compare(dn, attr, value),
                                 c.compare(dn, attr, false_value(name, value))}
                        assert len(codes) == 1 and codes.pop() not in (5, 6), (dn, attr)
            # sanity: compare does work on public attributes
            dn = t.entries[0][0]
            assert c.compare(dn, "mail", cert.emails[0]) == 6
            assert c.compare(dn, "mail", "x" + cert.emails[0]) == 5


@pytest_twisted.ensureDeferred
async def test_base_search_and_compare_at_private_dns_reveal_nothing(live: Live) -> None:
    await in_thread(_base_and_compare_at_private_dns, live)


INJECTIONS = ["' OR 1=1 --", "' OR '1'='1", "%", "_", "\\", "\x00", "*", "%%", "_%",
              "x' UNION SELECT der FROM certs --", "*)(objectClass=*", ")(|(mail=*",
              "'); DROP TABLE certs; --", "\\2a", "a\x00' OR 1=1 --"]


def _injections(live: Live) -> None:
    with wire.LdapClient(live.ldap) as c:
        control = c.search("c=MO", wire.substr("mail", None, ["taiman"], None), ["mail"])
        assert control.code == 0 and control.entries  # the searches below do work
        everything = c.search("c=MO", wire.present("mail"), ["1.1"])
        assert everything.code == 0 and len(everything.entries) > 10
        for value in INJECTIONS:
            for attr in ("mail", "cn", "o", "certpubSerialNumber", "userCertificate"):
                for filt in (wire.eq(attr, value), wire.substr(attr, value, (), None),
                             wire.substr(attr, None, [value], None),
                             wire.substr(attr, None, (), value),
                             wire.substr(attr, value, [value], value),
                             wire.tlv(0xA8, wire.octets(attr) + wire.octets(value)),
                             wire.extensible(None, attr, value)):
                    r = c.search("c=MO", filt, ["mail"])
                    assert r.code == 0 and r.entries == [], (attr, value, r.code, r.text)
            # and inside a value that is otherwise a real one
            mail = control.entries[0][1]["mail"][0].decode()
            r = c.search("c=MO", wire.eq("mail", mail + value), ["mail"])
            assert r.code == 0 and r.entries == [], value
            # as an attribute description, a base DN, a compare
            r = c.search("c=MO", wire.eq(f"mail{value}", "x"), ["mail"])
            assert r.code == 0 and r.entries == [], value
            r = c.search(f"c=MO{value}", wire.present("objectClass"), ["1.1"], scope=0)
            assert r.code in (32, 34), (value, r.code)
            assert c.compare("c=MO", "c", value) in (5, 21), value
        assert c.search("c=MO", wire.present("mail"), ["1.1"]).entries == everything.entries


@pytest_twisted.ensureDeferred
async def test_injection_shaped_filter_values_are_harmless(live: Live) -> None:
    await in_thread(_injections, live)
    # the store is whole afterwards
    import sqlite3

    conn = sqlite3.connect(live.store_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM certs").fetchone()[0] > 40
    finally:
        conn.close()


@pytest.mark.parametrize("value", INJECTIONS)
def test_like_pattern_escapes_wildcards(value: str) -> None:
    from store.sqlite import _like_pattern

    pattern = _like_pattern(value, [value], value)
    unescaped = pattern.replace("\\\\", "").replace("\\%", "").replace("\\_", "")
    assert unescaped.count("%") == 2 and "_" not in unescaped, pattern
