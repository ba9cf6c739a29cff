"""DN parsing and comparison: every spelling of one subject yields one key."""

from __future__ import annotations

import pytest
from asn1crypto import x509 as asn1x509

from store import names


def x509_name(pairs: list[tuple[str, str]]) -> asn1x509.Name:
    return asn1x509.Name.build(dict(pairs), use_printable=False)


SUBJECT = x509_name([
    ("country_name", "MO"),
    ("organization_name", "Companhia de Electricidade de Macau"),
    ("common_name", "陳大文"),
    ("email_address", "chan.taiman@example.mo"),
])


@pytest.mark.parametrize(
    "spelling",
    [
        "emailAddress=chan.taiman@example.mo,CN=陳大文,O=Companhia de Electricidade de Macau,C=MO",
        "EMAILADDRESS=CHAN.TAIMAN@EXAMPLE.MO, cn=陳大文, o=companhia  de electricidade de macau, c=mo",
        # Java's X500Principal.getName(RFC2253) spelling of emailAddress
        "1.2.840.113549.1.9.1=#16166368616e2e7461696d616e406578616d706c652e6d6f,"
        "2.5.4.3=陳大文,2.5.4.10=Companhia de Electricidade de Macau,2.5.4.6=MO",
        "OID.1.2.840.113549.1.9.1=chan.taiman@example.mo;CN=\\E9\\99\\B3\\E5\\A4\\A7\\E6\\96\\87;"
        "O=Companhia de Electricidade de Macau;C=MO",
        'email=chan.taiman@example.mo,CN="陳大文",O=Companhia de Electricidade de Macau,C=MO',
    ],
)
def test_spellings_match_certificate_subject(spelling: str) -> None:
    assert names.parse(spelling).key == names.from_x509(SUBJECT).key


def test_multivalued_rdn_order_does_not_matter() -> None:
    a = names.parse("cn=A+sn=B,o=X")
    b = names.parse("sn=b+CN=a,O=x")
    assert a == b and len(a.rdns) == 2 and len(a.rdns[0]) == 2


def test_escapes_round_trip() -> None:
    dn = names.parse(r"cn=Smith\, John \+ Co\=,o=A\;B,c=MO")
    assert dn.rdns[0][0].display == "Smith, John + Co="
    assert names.parse(str(dn)) == dn


def test_escaped_trailing_space_kept_in_display() -> None:
    assert names.parse("cn=a\\ ,c=MO").rdns[0][0].display == "a "


def test_public_removes_hidden_attributes() -> None:
    dn = names.parse("cn=João+serialNumber=ID-1234567(8),telephoneNumber=\\+853 2833 0000,o=X,c=MO")
    pub = dn.public()
    assert str(pub) == "cn=João,o=X,c=MO"
    assert "1234567" not in pub.key and "2833" not in pub.key


def test_within_and_ancestors() -> None:
    dn = names.parse("cn=a,ou=b,o=c,c=MO")
    assert dn.is_within(names.parse("O=C,C=mo"))
    assert not dn.is_within(names.parse("o=d,c=MO"))
    assert dn.is_within(names.parse(""))
    assert [str(a) for a in dn.ancestors()] == ["ou=b,o=c,c=MO", "o=c,c=MO", "c=MO"]


@pytest.mark.parametrize(
    "bad",
    ["cn", "cn=a,", "nosuchattr=x", "cn=#abc", "cn=#zz", "cn=a\\", 'cn="open', "x" * 10000,
     ",".join(["cn=a"] * 100)],
)
def test_bad_dns_raise_syntax_error(bad: str) -> None:
    with pytest.raises(names.DNSyntaxError):
        names.parse(bad)


def test_unknown_oid_value_kept_as_hex() -> None:
    dn = names.parse("1.2.3.4=#0403010203")
    assert dn.rdns[0][0].norm == "#0403010203"
