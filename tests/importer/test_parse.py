"""The fast certificate reading (cryptography + a Name walk) against the reference (asn1crypto)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from importer.parse import fast_cert_input, fast_cert_row
from store.certparse import cert_input
from store.model import CaId
from store.writer import cert_row

KEY = ec.generate_private_key(ec.SECP256R1())
NOW = datetime(2026, 3, 1, tzinfo=UTC)
A = x509.NameAttribute
EMAIL = NameOID.EMAIL_ADDRESS


def make(subject: x509.Name, emails: list[str] = ()) -> x509.Certificate:  # type: ignore[assignment]
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(x509.Name([A(NameOID.COMMON_NAME, "CA")]))
         .public_key(KEY.public_key()).serial_number(0x1234)
         .not_valid_before(NOW).not_valid_after(NOW + timedelta(days=30)))
    if emails:
        b = b.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(e) for e in emails]),
                            critical=False)
    return b.sign(KEY, hashes.SHA256())


def same(cert: x509.Certificate) -> None:
    der = cert.public_bytes(__import__("cryptography.hazmat.primitives.serialization",
                                       fromlist=["Encoding"]).Encoding.DER)
    assert fast_cert_input(cert, der, CaId(3)) == cert_input(der, CaId(3))
    assert fast_cert_row(cert, der, CaId(3)) == cert_row(cert_input(der, CaId(3)))


NAMES = {
    "plain": x509.Name([A(NameOID.COUNTRY_NAME, "MO"), A(NameOID.ORGANIZATION_NAME, "Org"),
                        A(NameOID.COMMON_NAME, "User 1")]),
    "escapes": x509.Name([A(NameOID.COMMON_NAME, " #a,b+c=\"d\\<e>;f ")]),
    "multi-valued": x509.Name([x509.RelativeDistinguishedName([
        A(NameOID.COMMON_NAME, "Zed"), A(NameOID.SURNAME, "Able")]),
        x509.RelativeDistinguishedName([A(NameOID.ORGANIZATION_NAME, "O")])]),
    "private types": x509.Name([A(NameOID.COUNTRY_NAME, "MO"),
                                A(NameOID.SERIAL_NUMBER, "ID-123"),
                                A(NameOID.COMMON_NAME, "Priv")]),
    "bmp and teletex": x509.Name([A(NameOID.COMMON_NAME, "Ünïcödé 名前", _type=_ASN1Type.BMPString),
                                  A(NameOID.ORGANIZATION_NAME, "Tele",
                                    _type=_ASN1Type.T61String)]),
    "universal": x509.Name([A(NameOID.COMMON_NAME, "𝒰ni", _type=_ASN1Type.UniversalString)]),
    "nfkc and case": x509.Name([A(NameOID.COMMON_NAME, "Ｆｕｌｌ  Width\tName")]),
    "email in dn": x509.Name([A(NameOID.COMMON_NAME, "Mail"), A(EMAIL, "Dn@Example.org")]),
    "empty": x509.Name([]),
    "latin1 printable": x509.Name([A(NameOID.COMMON_NAME, "abc",
                                     _type=_ASN1Type.PrintableString)]),
    "uid and dc": x509.Name([A(NameOID.DOMAIN_COMPONENT, "example"),
                             A(NameOID.USER_ID, "u1")]),
    # the RDNs above the leaf are read once per distinct parent (importer.parse._parent)
    "private leaf": x509.Name([A(NameOID.COUNTRY_NAME, "MO"), A(NameOID.ORGANIZATION_NAME, "O"),
                              A(NameOID.SERIAL_NUMBER, "ID-9")]),
    "private middle": x509.Name([A(NameOID.COUNTRY_NAME, "MO"), A(NameOID.SERIAL_NUMBER, "S"),
                                A(NameOID.COMMON_NAME, "Leaf")]),
    "mail and cn above the leaf": x509.Name([A(NameOID.COMMON_NAME, "Upper"),
                                            A(EMAIL, "Up@Example.org"),
                                            A(NameOID.ORGANIZATIONAL_UNIT_NAME, "Leaf OU")]),
    "only private": x509.Name([A(NameOID.SERIAL_NUMBER, "A"), A(NameOID.SERIAL_NUMBER, "B")]),
}


@pytest.mark.parametrize("label", sorted(NAMES))
def test_names_read_as_the_reference_reads_them(label: str) -> None:
    same(make(NAMES[label]))


@pytest.mark.parametrize("emails", [
    ["a@example.org"], ["A@Example.org", "a@example.org"], ["x@xn--bcher-kva.example"],
    ["no-at-sign"], ["one@a.example", "two@b.example"],
])
def test_san_emails_read_as_the_reference_reads_them(emails: list[str]) -> None:
    same(make(NAMES["email in dn"], emails))


def test_other_extensions_and_a_critical_san_read_as_the_reference_reads_them() -> None:
    b = (x509.CertificateBuilder().subject_name(NAMES["plain"])
         .issuer_name(x509.Name([A(NameOID.COMMON_NAME, "CA")]))
         .public_key(KEY.public_key()).serial_number(0x77)
         .not_valid_before(NOW).not_valid_after(NOW + timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.SubjectAlternativeName([
             x509.DNSName("a.example"), x509.RFC822Name("X@Example.org"),
             x509.UniformResourceIdentifier("https://example.org/"),
             x509.RFC822Name("y@b.example")]), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                      False), critical=False))
    same(b.sign(KEY, hashes.SHA256()))


_TYPES = [_ASN1Type.UTF8String, _ASN1Type.BMPString, _ASN1Type.UniversalString]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME,
                                           NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.SURNAME,
                                           NameOID.TITLE, NameOID.GIVEN_NAME,
                                           NameOID.SERIAL_NUMBER, NameOID.PSEUDONYM]),
                          st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                                  max_size=12),
                          st.sampled_from(_TYPES)), max_size=5))
def test_any_name_reads_as_the_reference_reads_it(
        avas: list[tuple[x509.ObjectIdentifier, str, _ASN1Type]]) -> None:
    same(make(x509.Name([A(oid, value, _type=t) for oid, value, t in avas])))
