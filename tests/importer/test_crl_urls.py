"""URLs learnt from imported certificates and CRLs, resolved to stored bytes (both engines).

CRL distribution points (RFC 5280 §4.2.1.13), freshest CRL (§4.2.1.15) and AIA caIssuers
(§4.2.2.1) of the certificates, through the importer's own path (workers, fast parse).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from importer.run import import_paths
from store import names, open_store
from store.urls import UrlRefused, normalise, parse_url
from tests.importer.test_importer_helpers import DAY, NOW, MiniPki, clock, der, name, pem, write

P0 = "http://crl.example.mo/repository/part0.crl"
P1 = "http://crl.example.mo/repository/part1.crl"
D0 = "http://crl.example.mo/repository/part0-delta.crl"
LDAP_DN = "cn=Issuing CA A part0,ou=CRL,o=Example,c=MO"
L0 = "ldap://dir.example.mo/cn=Issuing%20CA%20A%20part0,ou=CRL,o=Example,c=MO" \
     "?certificateRevocationList;binary"
CA_URL = "http://www.example.mo/repository/ca-a.crt"
Uri = x509.UniformResourceIdentifier


@pytest.fixture
def pki(tmp_path: Path, store_location: str) -> MiniPki:
    return MiniPki(tmp_path / "pki", store=store_location)


def cert(pki: MiniPki, ca: str, serial: int, cdp: list[str], *, freshest: list[str] = (),  # type: ignore[assignment]
         ca_issuers: list[str] = ()) -> x509.Certificate:  # type: ignore[assignment]
    issuer = pki.cas[ca]
    b = (x509.CertificateBuilder().subject_name(name(f"User {serial}"))
         .issuer_name(issuer.cert.subject).public_key(pki.sub_key.public_key())
         .serial_number(serial).not_valid_before(NOW - DAY).not_valid_after(NOW + 300 * DAY))
    if cdp:
        b = b.add_extension(x509.CRLDistributionPoints(
            [x509.DistributionPoint([Uri(u) for u in cdp], None, None, None)]), False)
    if freshest:
        b = b.add_extension(x509.FreshestCRL(
            [x509.DistributionPoint([Uri(u) for u in freshest], None, None, None)]), False)
    if ca_issuers:
        b = b.add_extension(x509.AuthorityInformationAccess(
            [x509.AccessDescription(x509.oid.AuthorityInformationAccessOID.CA_ISSUERS, Uri(u))
             for u in ca_issuers]), False)
    return b.sign(issuer.key, hashes.SHA256())


def crl(pki: MiniPki, ca: str, number: int, entries: list[int], idp: list[str] | None,
        base: int | None = None) -> x509.CertificateRevocationList:
    issuer = pki.cas[ca]
    tu = NOW - timedelta(hours=1) + timedelta(minutes=number)
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject)
         .last_update(tu).next_update(tu + 7 * DAY)
         .add_extension(x509.CRLNumber(number), critical=False))
    if idp is not None:
        b = b.add_extension(x509.IssuingDistributionPoint(
            [Uri(u) for u in idp], None, False, False, None, False, False), critical=True)
    if base is not None:
        b = b.add_extension(x509.DeltaCRLIndicator(base), critical=True)
    for serial in entries:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(NOW - DAY).build())
    return b.sign(issuer.key, hashes.SHA256())


def run(pki: MiniPki, *paths: Path) -> Any:
    return import_paths(pki.config(), list(paths), now=clock(), progress=None)


def test_urls_resolve_to_their_own_scope(pki: MiniPki, tmp_path: Path) -> None:
    d = tmp_path / "in"
    for serial in range(1, 30):  # nearly all the same URLs: learnt once
        part = P0 if serial % 2 else P1
        cdp = [part, L0] if part == P0 else [part]
        write(d / f"c{serial}.pem", pem(cert(pki, "ca-a", serial, cdp, freshest=[D0],
                                             ca_issuers=[CA_URL])))
    summary = run(pki, d)
    assert summary.certs_new == 29
    store = open_store(pki.store_location)
    try:
        learnt = {(u.url, u.kind, u.conflict) for u in store.learnt_urls()}
        ldap_url = normalise(L0)
        assert learnt == {(P0, "crl", False), (P1, "crl", False), (D0, "delta", False),
                          (CA_URL, "ca", False), (ldap_url, "crl", False)}
        assert store.resolve_url(P0) is None  # not imported yet: never another scope's CRL
        ca_a = store.ca_by_name("ca-a")
        assert ca_a is not None
        target = store.resolve_url(CA_URL)
        assert target is not None and target.der == ca_a.cert_der and target.kind == "ca"
        # the DN of the ldap:// URL is in the DN tree, with glue above it
        key = names.parse(LDAP_DN).key
        entry = store.entry(key)
        assert entry is not None and entry.kind == "crldp"
        assert entry.parent_key is not None and store.entry(entry.parent_key) is not None
        assert store.ldap_url_dns() == [(key, LDAP_DN, "certificateRevocationList")]
        assert store.ldap_dn_values(key) == []
    finally:
        store.close()
    part0, part1 = crl(pki, "ca-a", 5, [3], [P0, L0]), crl(pki, "ca-a", 5, [4], [P1])
    delta0 = crl(pki, "ca-a", 6, [5], [P0, L0], base=5)
    write(d / "p0.crl", der(part0))
    write(d / "p1.crl", der(part1))
    write(d / "d0.crl", der(delta0))
    summary = run(pki, d)
    assert summary.revocations == 3
    line = summary.line()
    assert "ca-a part0.crl #5: applied" in line and "ca-a part1.crl #5: applied" in line
    assert "ca-a part0.crl (delta over #5) #6: applied" in line
    store = open_store(pki.store_location)
    try:
        for url, want in ((P0, part0), (P1, part1), (D0, delta0), (L0, part0),
                          ("HTTP://CRL.Example.MO:80/repository/part0.crl", part0)):
            target = store.resolve_url(url)
            assert target is not None and target.der == der(want), url
        assert store.resolve_url("http://crl.example.mo/repository/part2.crl") is None
        assert store.ldap_dn_values(names.parse(LDAP_DN).key) == [
            ("certificateRevocationList", der(part0))]
        scope = store.crl_scope(store.resolve_url(P1).scope_id)  # type: ignore[union-attr]
        assert scope is not None and scope.label == "part1.crl" and scope.urls == (P1,)
    finally:
        store.close()


def test_a_ca_without_partitions_resolves_its_cdp_to_the_full_scope(pki: MiniPki,
                                                                    tmp_path: Path) -> None:
    d = tmp_path / "in"
    write(d / "c.pem", pem(cert(pki, "ca-b", 1, ["http://crl.example.mo/b.crl"],
                                freshest=["http://crl.example.mo/b-delta.crl"])))
    full, delta = crl(pki, "ca-b", 3, [9], None), crl(pki, "ca-b", 4, [8], None, base=3)
    write(d / "full.crl", der(full))
    write(d / "delta.crl", der(delta))
    run(pki, d)
    store = open_store(pki.store_location)
    try:
        assert store.resolve_url("http://crl.example.mo/b.crl").der == der(full)  # type: ignore[union-attr]
        assert store.resolve_url("http://crl.example.mo/b-delta.crl").der == der(delta)  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_url_claimed_by_two_cas_never_resolves(pki: MiniPki, tmp_path: Path) -> None:
    d = tmp_path / "in"
    write(d / "a.pem", pem(cert(pki, "ca-a", 1, [P0])))
    write(d / "a.crl", der(crl(pki, "ca-a", 1, [], [P0])))
    run(pki, d)
    store = open_store(pki.store_location)
    try:
        assert store.resolve_url(P0) is not None
    finally:
        store.close()
    # another CA's CRL whose IDP names ca-a's URL, and a certificate of ca-b printing it
    e = tmp_path / "in2"
    write(e / "b.crl", der(crl(pki, "ca-b", 1, [], [P0])))
    write(e / "b.pem", pem(cert(pki, "ca-b", 2, [P0, P1])))
    run(pki, e)
    store = open_store(pki.store_location)
    try:
        assert store.resolve_url(P0) is None
        assert [u.conflict for u in store.learnt_urls() if u.url == P0] == [True]
        assert store.resolve_url(P1) is None  # ca-b's, but ca-b has an IDP-scoped CRL for P0
    finally:
        store.close()


def test_hostile_urls_are_skipped_with_a_note(pki: MiniPki, tmp_path: Path) -> None:
    hostile = ["http://crl.example.mo/../../etc/passwd", "http://crl.example.mo/a%2fb.crl",
               "http://crl.example.mo/x.crl?y=1", "http://crl.example.mo/%2e%2e/x.crl",
               "http://user:pw@crl.example.mo/x.crl", "http://crl.example.mo/" + "a" * 5000,
               "file:///etc/passwd", "ldap://dir.example.mo/cn=x?userPassword",
               "ldap://dir.example.mo/not a dn", "http://crl.example.mo/ok.crl"]
    d = tmp_path / "in"
    write(d / "c.pem", pem(cert(pki, "ca-a", 1, hostile)))
    summary = run(pki, d)
    assert summary.certs_new == 1 and not summary.rejected
    store = open_store(pki.store_location)
    try:
        assert [u.url for u in store.learnt_urls()] == ["http://crl.example.mo/ok.crl"]
    finally:
        store.close()


def test_the_ca_s_own_dn_is_not_added_as_a_crl_distribution_point(pki: MiniPki,
                                                                   tmp_path: Path) -> None:
    ca_dn = "cn=Test CA A,o=Test Org,c=MO"
    url = "ldap://dir.example.mo/" + ca_dn.replace(" ", "%20") + "?cACertificate"
    d = tmp_path / "in"
    write(d / "c.pem", pem(cert(pki, "ca-a", 1, [], ca_issuers=[url])))
    run(pki, d)
    store = open_store(pki.store_location)
    try:
        ca = store.ca_by_name("ca-a")
        assert ca is not None
        key = names.parse(ca_dn).key
        assert store.entry(key).kind == "ca"  # type: ignore[union-attr]
        assert store.ldap_dn_values(key) == [("cACertificate", ca.cert_der)]
    finally:
        store.close()


@pytest.mark.parametrize("text, why", [
    ("http://h/../x", "dot segment"), ("http://h/a%2Fb", "encoded slash"),
    ("http://h/a?b", "query"), ("http://h/a#b", "fragment"), ("http://h/\u00e9", "non-ASCII"),
    ("http://h/" + "a" * 2000, "longer than"), ("gopher://h/x", "not an http"),
    ("http://h:99999/x", "bad port"), ("http://bad_host!/x", "bad host"),
    ("ldap://h/cn=x?cn", "not a certificate or CRL attribute"),
    ("ldap://h/cn=x??sub", "scope other than base"), ("ldap://h/", "without a DN"),
    ("ldap://h/cn=x????!e", "critical extension"), ("ldap://h/%ff", "cannot be read"),
])
def test_parse_url_refuses(text: str, why: str) -> None:
    with pytest.raises(UrlRefused, match=why):
        parse_url(text)


def test_parse_url_normalises() -> None:
    p = parse_url("HTTP://Crl.Example.MO:80/Part0.crl")
    assert (p.url, p.host, p.path) == ("http://crl.example.mo/Part0.crl", "crl.example.mo",
                                       "/Part0.crl")
    assert parse_url("https://h:8443/x").url == "https://h:8443/x"
    q = parse_url("ldap://Dir:389/CN=A%5c%2cB,o=X?deltaRevocationList;binary", "delta")
    assert q.url == "ldap://dir/CN=A%5c%2cB,o=X?deltaRevocationList;binary"
    assert q.dn == "cn=A\\,B,o=X" and q.attr == "deltaRevocationList"
    assert parse_url("ldap://dir/cn=A", "ca").attr == "cACertificate"


def test_fast_and_reference_readings_agree_on_urls(tmp_path: Path) -> None:
    from importer.parse import fast_cert_row
    from store.certparse import cert_input, url_extension_values
    from store.writer import cert_row

    pki = MiniPki(tmp_path / "pki")
    c = cert(pki, "ca-a", 5, [P0, L0], freshest=[D0], ca_issuers=[CA_URL, "ldap://d/cn=x"])
    want = (("crl", P0), ("crl", L0), ("delta", D0), ("ca", CA_URL), ("ca", "ldap://d/cn=x"))
    fast = fast_cert_row(c, der(c), 1)  # type: ignore[arg-type]
    assert fast.urls == want
    assert cert_row(cert_input(der(c), 1)).urls == want  # type: ignore[arg-type]
    raws = url_extension_values(der(c))  # what migration 4 reads of stored certificates
    assert raws is not None and all(raws)
    plain = pki.cert("ca-a", 6)
    assert fast_cert_row(plain, der(plain), 1).urls == ()  # type: ignore[arg-type]
    assert url_extension_values(der(plain)) is None
