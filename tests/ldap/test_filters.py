"""DN spellings, filter evaluation (three-valued, allowlist), GSER, schema selection: pure."""

from __future__ import annotations

import pytest

from server.ldap.config import DEFAULT_ATTRIBUTES
from server.ldap.entries import Entry, parse_dn
from server.ldap.filters import (
    And,
    Extensible,
    Match,
    Not,
    Or,
    Present,
    Substrings,
    evaluate,
    parse_cert_assertion,
    parse_gtime,
    to_text,
)
from server.ldap.plan import plan
from server.ldap.schema import Allowlist, describe, select, subschema_values, unknown_attributes
from store import names

ALLOW = Allowlist.of(DEFAULT_ATTRIBUTES)
EMAIL_HEX = "#16" + format(len(b"ana@x.example.mo"), "02x") + b"ana@x.example.mo".hex()


@pytest.mark.parametrize(
    "spelling",
    [
        "mail=ana@x.example.mo,cn=Ana Luísa,o=Banco\\, S.A.,c=MO",
        "MAIL=ANA@X.EXAMPLE.MO, CN=ana luísa, O=banco\\, s.a., C=mo",
        "0.9.2342.19200300.100.1.3=ana@x.example.mo,2.5.4.3=Ana Luísa,2.5.4.10=Banco\\2C S.A.,2.5.4.6=MO",
        "rfc822Mailbox=ana@x.example.mo;commonName=Ana  Luísa;o=\"Banco, S.A.\";countryName=MO",
        "mail=ana@x.example.mo,cn=Ana Lu\\C3\\ADsa,o=Banco\\, S.A.,c=MO",
    ],
)
def test_dn_spellings_share_one_key(spelling: str) -> None:
    assert parse_dn(spelling).key == parse_dn("mail=ana@x.example.mo,cn=Ana Luísa,o=Banco\\, S.A.,c=MO").key


def test_java_hex_email_and_hidden_attributes_find_the_public_dn() -> None:
    java = f"1.2.840.113549.1.9.1={EMAIL_HEX},2.5.4.5=#130749442d31323334,CN=Ana,C=MO"
    public = parse_dn("emailAddress=ana@x.example.mo,cn=Ana,c=MO")
    assert parse_dn(java).public().key == public.key
    assert parse_dn(java).key != public.key  # serialNumber is in the full DN only


def test_multi_valued_rdn_order_does_not_matter() -> None:
    assert parse_dn("cn=A+sn=B,c=MO").key == parse_dn("SN=b+CN=a,c=mo").key
    cert = parse_dn("certpubSerialNumber=1f+certpubCA=rsa-ca,cn=A,c=MO")
    assert cert.key == parse_dn("CERTPUBCA=RSA-CA+certpubserialnumber=1F,cn=a,c=mo").key


@pytest.mark.parametrize("bad", ["cn", "cn=a,", "nosuchtype=x", "cn=#zz", "cn=a\\"])
def test_bad_dns_raise(bad: str) -> None:
    with pytest.raises(names.DNSyntaxError):
        parse_dn(bad)


def person() -> Entry:
    dn = "mail=ana@x.example.mo,cn=Ana Luísa,o=Banco,c=MO"
    return Entry(dn, parse_dn(dn).key, "subject", {
        "objectClass": ("top", "person", "inetOrgPerson", "pkiUser"),
        "cn": ("Ana Luísa",), "mail": ("Ana@X.example.mo",), "o": ("Banco",), "c": ("MO",),
        "userCertificate": (b"\x30\x03\x02\x01\x01",),
    }, parse_dn(dn))


@pytest.mark.parametrize(
    ("f", "expected"),
    [
        (Match("=", "mail", b"ana@x.example.MO"), True),
        (Match("=", "MAIL", b"ana@x.example.mo"), True),
        (Match("=", "0.9.2342.19200300.100.1.3", b"ana@x.example.mo"), True),
        (Match("=", "cn", "ANA  LUÍSA".encode()), True),
        (Match("=", "cn", b"Ana"), False),
        (Substrings("cn", None, (b"lu",), None), True),
        (Substrings("cn", b"ana", (), b"sa"), True),
        (Substrings("cn", b"ana", (b"x",), None), False),
        (Present("objectclass"), True),
        (Match("=", "objectClass", b"2.5.6.21"), True),  # pkiUser by OID
        (Match("=", "objectClass", b"INETORGPERSON"), True),
        (Present("userCertificate;binary"), True),
        (Present("cn;lang-pt"), None),
        (Present("telephoneNumber"), None),
        (Match("=", "telephoneNumber", b"+853"), None),
        (Not(Present("telephoneNumber")), None),
        (Not(Match("=", "serialNumber", b"x")), None),
        (Or((Present("street"), Present("mail"))), True),
        (And((Present("street"), Present("mail"))), None),
        (And((Present("street"), Present("sn"))), False),
        (Match(">=", "cn", b"A"), True),
        (Match("<=", "cn", b"A"), False),
        (Match("~=", "mail", b"ANA@x.example.mo"), True),
        (Match("=", "certificateRevocationList", b"x"), None),  # no equality rule
        (Extensible(None, "cn", b"ana lu\xc3\xadsa", False), True),
        (Extensible("caseExactMatch", "cn", b"ana lu\xc3\xadsa", False), False),
        (Extensible("2.5.13.2", None, b"banco", False), True),
        (Extensible("caseIgnoreMatch", "o", b"mo", True), False),
        (Extensible("caseIgnoreMatch", None, b"mo", True), True),
        (Extensible("1.2.3.4.5", "cn", b"x", False), None),
        (And(()), True),
        (Or(()), False),
    ],
)
def test_evaluate(f, expected) -> None:  # type: ignore[no-untyped-def]
    assert evaluate(f, person(), ALLOW) is expected


def test_non_allowlisted_schema_type_is_undefined() -> None:
    narrow = Allowlist.of(["objectClass", "cn"])
    assert evaluate(Present("mail"), person(), narrow) is None
    assert evaluate(Present("cn"), person(), narrow) is True


def test_gser_certificate_exact_assertion() -> None:
    issuer = parse_dn("cn=CA,o=Autoridade \"Demo\",c=MO").key
    text = b'{ serialNumber 255, issuer rdnSequence:"cn=CA,o=Autoridade ""Demo"",c=MO" }'
    assert parse_cert_assertion(text) == (255, issuer)
    assert parse_cert_assertion(b"{serialNumber 'ff'H,issuer rdnSequence:\"cn=CA,o=Autoridade \"\"Demo\"\",c=MO\"}") == (255, issuer)
    for bad in (b"{ serialNumber x }", b"{" * 5000, b'{ serialNumber 1, issuer rdnSequence:"nosuch=1" }',
                b"\x30\x03\x02\x01", b"", b"\xff" * 20000):
        assert parse_cert_assertion(bad) is None


def test_gtime() -> None:
    assert parse_gtime("20250102030405Z").isoformat() == "2025-01-02T03:04:05+00:00"  # type: ignore[union-attr]
    assert parse_gtime("202501020304+0800").isoformat() == "2025-01-01T19:04:00+00:00"  # type: ignore[union-attr]
    assert parse_gtime("2025") is None and parse_gtime("20251340000000Z") is None


def test_to_text_escapes_and_bounds() -> None:
    f = And((Match("=", "cn", b"a*(b)\\"), Not(Present("mail")), Substrings("cn", b"x", (b"y",), None)))
    assert to_text(f) == "(&(cn=a\\2a\\28b\\29\\5c)(!(mail=*))(cn=x*y*))"
    deep: object = Present("x")
    for _ in range(200):
        deep = Not(deep)  # type: ignore[arg-type]
    assert to_text(deep, 50).endswith("...")  # type: ignore[arg-type]


def test_selection_and_binary_names() -> None:
    for asked in (["userCertificate"], ["usercertificate;binary"], ["2.5.4.36;binary"], ["*"], []):
        t, _ = describe("userCertificate")
        assert select(asked).wants(t, False), asked  # type: ignore[arg-type]
    assert describe("cn;binary")[1] is False
    assert not select(["1.1"]).all_user
    assert not select(["cn;binary"]).names
    assert unknown_attributes(["cn", "telephoneNumber", "street", "namingContexts"]) == [
        "telephoneNumber", "street", "namingContexts"]


def test_subschema_publishes_own_types_under_the_uuid_arc() -> None:
    values = subschema_values()
    assert any("certpubStatus" in v and "2.25." in v for v in values["attributeTypes"])
    assert any("certpubCertificate" in v for v in values["objectClasses"])
    assert any("certificateExactMatch" in v for v in values["matchingRules"])


@pytest.mark.parametrize(
    ("f", "kinds"),
    [
        (Match("=", "mail", b"a@b"), ["eq"]),
        (Or((Match("=", "mail", b"a"), Match("=", "mail", b"b"))), ["eq", "eq"]),
        (Or((Substrings("cn", None, (b"v",), None), Substrings("mail", None, (b"v",), None),
             Substrings("givenName", None, (b"v",), None), Substrings("sn", None, (b"v",), None))),
         ["substr"] * 4),
        (And((Present("mail"), Or((Substrings("mail", b"v", (), None),
                                   Or((Substrings("cn", b"v", (), None),
                                       Or((Substrings("sn", b"v", (), None),
                                           Substrings("givenName", b"v", (), None))))))))),
         ["substr"] * 4),
        (And((Match("=", "objectClass", b"person"), Match("=", "cn", b"x"))), ["eq"]),
        (Match("=", "certpubSerialNumber", b"0A1B"), ["serial"]),
        (Match("=", "userCertificate", b'{ serialNumber 1, issuer rdnSequence:"c=MO" }'), ["cert"]),
        (Extensible("certificateExactMatch", "userCertificate",
                    b'{ serialNumber 1, issuer rdnSequence:"c=MO" }', False), ["cert"]),
    ],
)
def test_plan_uses_indexes(f, kinds) -> None:  # type: ignore[no-untyped-def]
    p = plan(f, ALLOW)
    assert p is not None and [q.kind for q in p.queries] == kinds


@pytest.mark.parametrize("f", [
    Present("objectClass"), Not(Match("=", "mail", b"x")), Match("=", "telephoneNumber", b"1"),
    Or((Match("=", "mail", b"x"), Present("objectClass"))), Match("=", "certpubStatus", b"revoked"),
])
def test_plan_refuses_unindexable(f) -> None:  # type: ignore[no-untyped-def]
    assert plan(f, ALLOW) is None
