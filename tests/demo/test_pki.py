"""Tests of the demo PKI generator (server.demo.pki)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
import tomllib
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from server.demo.names import TELEPHONE_NUMBER
from server.demo.pki import (
    OPENSSL_REASONS,
    DemoPki,
    build_demo_pki,
    issue_certificate,
    make_crl,
    openssl_oneline,
    partition_of,
    openssl_serial,
    openssl_time,
    subscriber_key,
    write_key,
    write_pem,
)
from tests.conftest import require_tool

ISSUING = ("rsa-ca", "ec-ca")
REVOKED_STATES = {"revoked", "hold", "revoked-expired"}


@pytest.fixture
def pki(demo_pki: DemoPki) -> DemoPki:
    """The session's demo PKI (built by the rootdir conftest), read-only."""
    return demo_pki


def _cert(path: Path) -> x509.Certificate:
    """Load a PEM certificate."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(path: Path) -> x509.CertificateRevocationList:
    """Load a PEM CRL."""
    return x509.load_pem_x509_crl(path.read_bytes())


def _run(*args: str | Path | None) -> str:
    """Run openssl and return its stdout, failing the test on a non-zero exit."""
    assert None not in args
    openssl = require_tool("openssl")
    proc = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def test_build_is_fast(tmp_path: Path) -> None:
    """A full build stays well under the 3 s budget (loose bound for slow CI)."""
    start = time.perf_counter()
    build_demo_pki(tmp_path)
    assert time.perf_counter() - start < 6


def test_layout_and_config(pki: DemoPki) -> None:
    """The files exist and certpub.toml has the agreed structure."""
    root = pki.root
    for rel in ("ca/root.pem", "ca/root.key", "ca/root-crl.pem", "ca/subscriber.key"):
        assert (root / rel).is_file(), rel
    assert pki.spool_dir.is_dir()
    assert (root / "store").is_dir()
    cfg = tomllib.loads(pki.config_path.read_text("utf-8"))
    assert cfg["store"] == {"path": str(root / "store" / "store.sqlite3")}
    assert cfg["import"]["spool"] == [str(root / "spool")]
    assert cfg["import"]["processed"] == "move"
    assert cfg["import"]["poll_interval"] == 1.0
    assert [o["ca"] for o in cfg["import"]["openssl"]] == list(ISSUING)
    for entry in cfg["import"]["openssl"]:
        ca = pki.cas[entry["ca"]]
        assert entry == {"ca": ca.name, "index": str(ca.index_path),
                         "certs_dir": str(ca.newcerts_dir)}
    assert [c["name"] for c in cfg["ca"]] == ["root", *ISSUING]
    assert cfg["ca"][0] == {"name": "root", "certificate": str(root / "ca" / "root.pem")}
    for entry in cfg["ca"][1:]:
        ca = pki.cas[entry["name"]]
        assert entry["certificate"] == str(ca.cert_path)
        assert entry["ocsp"] == {"signer_certificate": str(ca.ocsp_cert_path),
                                 "signer_key": str(ca.ocsp_key_path)}
    assert cfg["ldap"] == {"listen": ["tcp:1389:interface=127.0.0.1"]}
    assert cfg["http"] == {"listen": ["tcp:8080:interface=127.0.0.1"],
                           "public_names": ["127.0.0.1", "localhost"]}
    assert cfg["log"] == {"format": "logfmt"}


def test_refuses_existing_config_unless_overwrite(tmp_path: Path) -> None:
    """A second build into the same folder needs overwrite=True and clears stale files."""
    first = build_demo_pki(tmp_path, subscribers_per_ca=15)
    (first.spool_dir / "dropped.crl").write_bytes(b"x")
    with pytest.raises(ValueError, match="certpub.toml"):
        build_demo_pki(tmp_path)
    second = build_demo_pki(tmp_path, overwrite=True)
    assert len(second.certs) == 50
    assert not any(second.spool_dir.iterdir())
    for ca in ISSUING:
        newcerts = second.cas[ca].newcerts_dir
        assert newcerts is not None and len(list(newcerts.iterdir())) == 25


def test_rejects_too_few_subscribers(tmp_path: Path) -> None:
    """The plan needs a minimum number of slots per CA."""
    with pytest.raises(ValueError, match="subscribers_per_ca"):
        build_demo_pki(tmp_path, subscribers_per_ca=5)


def test_ca_hierarchy(pki: DemoPki) -> None:
    """Root and issuing CAs carry the expected keys, constraints and URLs."""
    root = _cert(pki.cas["root"].cert_path)
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Demo Root CA"
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    assert root.public_key().key_size == 2048  # type: ignore[union-attr]
    for name, cn in (("rsa-ca", "Demo RSA Issuing CA"), ("ec-ca", "Demo EC Issuing CA")):
        cert = _cert(pki.cas[name].cert_path)
        cert.verify_directly_issued_by(root)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert [d.access_location.value for d in aia] == ["http://127.0.0.1:8080/ocsp"]
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    ec_key = _cert(pki.cas["ec-ca"].cert_path).public_key()
    assert isinstance(ec_key, ec.EllipticCurvePublicKey) and ec_key.curve.name == "secp384r1"


def test_chains_verify(pki: DemoPki) -> None:
    """Every subscriber chains to the root under cryptography's RFC 5280 verifier."""
    store = Store([_cert(pki.cas["root"].cert_path)])
    for demo in pki.certs:
        cert = demo.load()
        ca = _cert(pki.cas[demo.ca].cert_path)
        cert.verify_directly_issued_by(ca)
        moment = cert.not_valid_before_utc + timedelta(hours=1)
        verifier = PolicyBuilder().store(store).time(moment).build_client_verifier()
        verified = verifier.verify(cert, [ca])
        assert verified.chain[-1] == _cert(pki.cas["root"].cert_path)


def test_subscriber_contents(pki: DemoPki) -> None:
    """Subscribers carry EKU, SAN e-mails, OCSP/CRL URLs and share one key."""
    shared = subscriber_key().public_key()
    for demo in pki.certs:
        cert = demo.load()
        assert cert.serial_number == demo.serial
        assert cert.subject.rfc4514_string() == demo.subject_rfc4514
        assert cert.public_key() == shared
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH}
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert tuple(san.get_values_for_type(x509.RFC822Name)) == demo.emails
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        if pki.cas[demo.ca].scope_crl_paths:  # the partitioned CA: the CA's own paths
            part = partition_of(demo.serial)
            assert [d.access_location.value for d in aia] == [
                "http://127.0.0.1:8080/ocsp", f"http://127.0.0.1:8080/repository/{demo.ca}.crt",
                f"http://127.0.0.1:8080/repository/{demo.ca}.p7c",
                "ldap://127.0.0.1:1389/CN=Demo%20EC%20Issuing%20CA,O=Autoridade%20de%20Certifica"
                "%C3%A7%C3%A3o%20Demo%20%E6%BC%94%E7%A4%BA,C=MO?cACertificate;binary"]
            names = [n.value for n in dp[0].full_name]
            assert names[0] == f"http://127.0.0.1:8080/repository/{demo.ca}/part{part}.crl"
            assert names[1].startswith(f"ldap://127.0.0.1:1389/CN=Demo%20EC%20Issuing%20CA%20"
                                       f"part%20{part},OU=CRL,O=")
            fresh = cert.extensions.get_extension_for_class(x509.FreshestCRL).value
            assert fresh[0].full_name[0].value == names[0].replace(".crl", "-delta.crl")
        else:
            assert [d.access_location.value for d in aia] == ["http://127.0.0.1:8080/ocsp"]
            assert dp[0].full_name[0].value == f"http://127.0.0.1:8080/crl/{demo.ca}.crl"
        assert demo.not_after == cert.not_valid_after_utc
        expired = cert.not_valid_after_utc < pki.now  # type: ignore[operator]
        assert expired == (demo.state in {"expired", "revoked-expired"})


def test_population(pki: DemoPki) -> None:
    """States, reasons, renewals, private attributes and two-email SANs are all present."""
    assert len(pki.certs) == 50
    for ca in ISSUING:
        states = Counter(c.state for c in pki.certs if c.ca == ca)
        assert set(states) == {"good", "revoked", "hold", "expired", "revoked-expired"}
        assert states["good"] > len([c for c in pki.certs if c.ca == ca]) / 2
        reasons = {c.reason for c in pki.certs if c.ca == ca and c.reason}
        assert {"key_compromise", "superseded", "affiliation_changed",
                "cessation_of_operation", "certificate_hold"} <= reasons
        pairs = Counter((c.subject_rfc4514, c.emails) for c in pki.certs if c.ca == ca)
        assert [n for n in pairs.values() if n > 1] == [2]
    private = [c for c in pki.certs
               if c.load().subject.get_attributes_for_oid(TELEPHONE_NUMBER)]
    assert len(private) >= 3
    for demo in private:
        subject = demo.load().subject
        assert subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        assert subject.get_attributes_for_oid(NameOID.STREET_ADDRESS)
    assert any(len(c.emails) == 2 for c in pki.certs)
    assert any("陳大文" in c.subject_rfc4514 for c in pki.certs)
    assert any("João Conceição" in c.subject_rfc4514 for c in pki.certs)
    for demo in pki.certs:
        assert (demo.revoked_at is None) == (demo.state not in REVOKED_STATES)
        assert (demo.reason is None) == (demo.state not in REVOKED_STATES)


def test_edge_serials(pki: DemoPki) -> None:
    """Edge serials exist in both CAs and files are named as OpenSSL names them."""
    for ca in ISSUING:
        by_serial = {c.serial: c for c in pki.certs if c.ca == ca}
        for serial, filename in ((1, "01.pem"), (0x80, "80.pem"), (0xFF00, "FF00.pem")):
            assert by_serial[serial].path.name == filename
        long = [s for s in by_serial if (s.bit_length() + 7) // 8 == 20]
        assert len(long) == 1 and long[0].bit_length() < 160
        for demo in by_serial.values():
            assert demo.path.name == openssl_serial(demo.serial) + ".pem"
            assert demo.path.parent == pki.cas[ca].newcerts_dir
    assert openssl_serial(0) == "00" and openssl_serial(0xABC) == "0ABC"


def test_index_matches_certificates(pki: DemoPki) -> None:
    """index.txt lines have OpenSSL's six fields and agree with the certificates."""
    status = {"good": "V", "expired": "E", "revoked": "R", "hold": "R", "revoked-expired": "R"}
    for ca in ISSUING:
        index_path = pki.cas[ca].index_path
        assert index_path is not None
        lines = index_path.read_text("utf-8").splitlines()
        certs = [c for c in pki.certs if c.ca == ca]
        assert len(lines) == len(certs)
        for line, demo in zip(lines, certs, strict=True):
            st, expiry, revocation, serial, filename, subject = line.split("\t")
            cert = demo.load()
            assert st == status[demo.state]
            assert expiry == openssl_time(cert.not_valid_after_utc)
            assert len(expiry) == (15 if cert.not_valid_after_utc.year >= 2050 else 13)
            assert serial == openssl_serial(cert.serial_number) and len(serial) % 2 == 0
            assert (demo.path.parent / f"{serial}.pem").is_file()
            assert filename == "unknown"
            assert subject == demo.subject_openssl == openssl_oneline(cert.subject)
            assert subject.isascii() and subject.startswith("/C=MO/")
            if demo.revoked_at is None:
                assert revocation == ""
            else:
                when, _, reason = revocation.partition(",")
                assert when == openssl_time(demo.revoked_at)
                assert demo.reason is not None
                expected = "" if demo.reason == "unspecified" else OPENSSL_REASONS[demo.reason]
                assert reason == expected
    rsa_index = pki.cas["rsa-ca"].index_path
    assert rsa_index is not None
    expiries = [line.split("\t")[1] for line in rsa_index.read_text().splitlines()]
    assert any(e.startswith("20") and len(e) == 15 for e in expiries)  # GeneralizedTime


def test_index_utf8_variant(tmp_path: Path) -> None:
    """index_utf8_subjects=True keeps the subject as raw UTF-8."""
    demo = build_demo_pki(tmp_path, subscribers_per_ca=15, index_utf8_subjects=True)
    text = demo.cas["rsa-ca"].index_path.read_text("utf-8")  # type: ignore[union-attr]
    assert "/CN=陳大文/" in text and "\\x" not in text


@pytest.mark.realclient
def test_index_subject_matches_openssl(pki: DemoPki) -> None:
    """Our oneline subject equals `openssl x509 -subject -nameopt compat`."""
    for demo in pki.certs[:12]:
        out = _run("x509", "-in", demo.path, "-noout", "-subject", "-nameopt", "compat")
        assert out.strip() == f"subject={demo.subject_openssl}"


@pytest.mark.realclient
def test_oneline_escaping_matches_openssl(pki: DemoPki, tmp_path: Path) -> None:
    """Slashes, pluses, controls and multi-valued RDNs render as OpenSSL 3 renders them."""
    now = datetime.now(UTC).replace(microsecond=0)
    names = [
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'a/b+c\\d=e,f"g<h>#i;j ~\x7f'),
                   x509.NameAttribute(NameOID.ORGANIZATION_NAME, "\tT ü 澳")]),
        x509.Name([x509.RelativeDistinguishedName([
            x509.NameAttribute(NameOID.COMMON_NAME, "m"),
            x509.NameAttribute(NameOID.USER_ID, "u")])]),
    ]
    for number, name in enumerate(names, start=1):
        cert = issue_certificate(pki.cas["ec-ca"], name, [], number, now, now + timedelta(days=1))
        write_pem(tmp_path / "c.pem", cert)
        out = _run("x509", "-in", tmp_path / "c.pem", "-noout", "-subject", "-nameopt", "compat")
        assert out.strip() == f"subject={openssl_oneline(cert.subject)}"
    assert openssl_oneline(names[0], utf8=True).endswith("/O=\\x09T ü 澳")


def test_crls(pki: DemoPki) -> None:
    """crl.pem lists every revoked serial with reason; crl-2 revokes one more, releases the hold."""
    root = pki.cas["root"]
    assert root.crl_path is not None
    root_crl = _crl(root.crl_path)
    assert root_crl.is_signature_valid(_cert(root.cert_path).public_key())  # type: ignore[arg-type]
    assert len(root_crl) == 0
    for ca in ISSUING:
        info = pki.cas[ca]
        assert info.crl_path is not None and info.crl2_path is not None
        public = _cert(info.cert_path).public_key()
        certs = [c for c in pki.certs if c.ca == ca]
        crl1, crl2 = _crl(info.crl_path), _crl(info.crl2_path)
        for crl, number in ((crl1, 1), (crl2, 2)):
            assert crl.is_signature_valid(public)  # type: ignore[arg-type]
            assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number
            assert pki.now is not None and crl.next_update_utc is not None
            assert crl.next_update_utc > pki.now
        assert crl2.last_update_utc > crl1.last_update_utc
        expected = {c.serial: c for c in certs if c.state in REVOKED_STATES}
        assert {r.serial_number for r in crl1} == set(expected)
        for entry in crl1:
            demo = expected[entry.serial_number]
            assert entry.revocation_date_utc == demo.revoked_at
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
                assert reason == x509.ReasonFlags[demo.reason or ""]
            except x509.ExtensionNotFound:
                assert demo.reason == "unspecified"
        hold = pki.crl2_releases[ca]
        newly = pki.crl2_revokes[ca]
        assert expected[hold].state == "hold"
        assert next(c for c in certs if c.serial == newly).state == "good"
        assert {r.serial_number for r in crl2} == set(expected) - {hold} | {newly}
        entry2 = crl2.get_revoked_certificate_by_serial_number(newly)
        assert entry2 is not None
        assert entry2.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
            x509.ReasonFlags.key_compromise


def test_ocsp_signers(pki: DemoPki) -> None:
    """Delegated OCSP signers have EKU OCSPSigning, ocsp-nocheck and matching keys."""
    for ca in ISSUING:
        info = pki.cas[ca]
        assert info.ocsp_cert_path is not None and info.ocsp_key_path is not None
        signer = _cert(info.ocsp_cert_path)
        signer.verify_directly_issued_by(_cert(info.cert_path))
        eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
        signer.extensions.get_extension_for_oid(ExtensionOID.OCSP_NO_CHECK)
        assert signer.not_valid_after_utc - signer.not_valid_before_utc == timedelta(days=365)
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(info.ocsp_key_path.read_bytes(), None)
        assert key.public_key() == signer.public_key()
        expected = rsa.RSAPublicKey if ca == "rsa-ca" else ec.EllipticCurvePublicKey
        assert isinstance(signer.public_key(), expected)


def test_key_files_are_private(pki: DemoPki) -> None:
    """Every key file is mode 0600 and no temporary file is left behind."""
    keys = list((pki.root / "ca").glob("*.key"))
    assert len(keys) == 6
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not [p for p in pki.root.rglob(".*.tmp")]


@pytest.mark.realclient
def test_openssl_verify(pki: DemoPki) -> None:
    """`openssl verify` accepts a good subscriber of each issuing CA and the OCSP signers."""
    root = pki.cas["root"].cert_path
    for ca in ISSUING:
        info = pki.cas[ca]
        good = [c for c in pki.certs if c.ca == ca and c.state == "good"]
        paths = [c.path for c in good[:3]] + [info.ocsp_cert_path]
        out = _run("verify", "-CAfile", root, "-untrusted", info.cert_path, *paths)
        assert out.count(": OK") == len(paths)


@pytest.mark.realclient
def test_openssl_reads_crl(pki: DemoPki) -> None:
    """`openssl crl -text` lists the revoked serials of crl.pem."""
    for ca in ISSUING:
        out = _run("crl", "-in", pki.cas[ca].crl_path, "-noout", "-text")
        for demo in pki.certs:
            if demo.ca == ca and demo.state in REVOKED_STATES:
                assert f"Serial Number: {openssl_serial(demo.serial)}" in out
        assert "Certificate Hold" in out and "Key Compromise" in out


@pytest.mark.realclient
def test_openssl_ca_reads_index(pki: DemoPki, tmp_path: Path) -> None:
    """`openssl ca -gencrl` reads our index.txt and revokes the same serials, same reasons."""
    info = pki.cas["rsa-ca"]
    shutil.copy(info.index_path, tmp_path / "index.txt")  # type: ignore[arg-type]
    shutil.copy(pki.root / "ca" / "rsa-ca" / "index.txt.attr", tmp_path / "index.txt.attr")
    cnf = tmp_path / "ca.cnf"
    cnf.write_text(
        "[ca]\ndefault_ca = d\n[d]\n"
        f"database = {tmp_path / 'index.txt'}\ncertificate = {info.cert_path}\n"
        f"private_key = {info.key_path}\ndefault_md = sha256\ndefault_crl_days = 7\n"
    )
    _run("ca", "-config", cnf, "-gencrl", "-out", tmp_path / "x.crl")
    crl = _crl(tmp_path / "x.crl")
    ours = _crl(info.crl_path)  # type: ignore[arg-type]
    assert {r.serial_number for r in crl} == {r.serial_number for r in ours}
    for entry in crl:
        mine = ours.get_revoked_certificate_by_serial_number(entry.serial_number)
        assert mine is not None and mine.revocation_date_utc == entry.revocation_date_utc
        def reason(e: x509.RevokedCertificate) -> x509.ReasonFlags | None:
            """Return an entry's reason code, None when absent."""
            try:
                return e.extensions.get_extension_for_class(x509.CRLReason).value.reason
            except x509.ExtensionNotFound:
                return None
        assert reason(entry) == reason(mine)


def test_helpers(pki: DemoPki, tmp_path: Path) -> None:
    """issue_certificate, make_crl, write_pem and write_key work for tests."""
    ca = pki.cas["ec-ca"]
    now = datetime.now(UTC).replace(microsecond=0)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Teste Ünicode 測試")])
    extra = [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), True)]
    cert = issue_certificate(ca, subject, ["t@example.mo"], 0x1234, now, now + timedelta(days=1),
                             extra_extensions=extra)
    cert.verify_directly_issued_by(_cert(ca.cert_path))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert dp[0].full_name[0].value == "http://127.0.0.1:8080/crl/ec-ca.crl"
    bare = issue_certificate(ca, subject, [], 2, now, now + timedelta(days=1))
    with pytest.raises(x509.ExtensionNotFound):
        bare.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    crl = make_crl(ca, [(0x1234, now, "certificate_hold"), (2, now, None)], 7, now,
                   now + timedelta(days=1))
    assert crl.is_signature_valid(_cert(ca.cert_path).public_key())  # type: ignore[arg-type]
    write_pem(tmp_path / "sub" / "c.pem", cert)
    write_pem(tmp_path / "chain.pem", [cert, _cert(ca.cert_path)])
    write_pem(tmp_path / "c.crl", crl)
    write_key(tmp_path / "k.key", subscriber_key())
    assert _cert(tmp_path / "sub" / "c.pem") == cert
    assert (tmp_path / "chain.pem").read_text().count("BEGIN CERTIFICATE") == 2
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "c.crl", "c.pem", "chain.pem", "k.key"]


def test_fixed_now_and_awkward_folder(tmp_path: Path) -> None:
    """A given `now` drives all dates and TOML escaping survives quotes and backslashes."""
    now = datetime(2031, 2, 3, 4, 5, 6, 789, tzinfo=UTC)
    folder = tmp_path / 'we"ird\\dir ü'
    demo = build_demo_pki(folder, now=now, subscribers_per_ca=15, ldap_port=1390, http_port=8765)
    assert demo.now == now.replace(microsecond=0)
    cfg = tomllib.loads(demo.config_path.read_text("utf-8"))
    assert cfg["store"]["path"] == str(folder / "store" / "store.sqlite3")
    assert cfg["ldap"]["listen"] == ["tcp:1390:interface=127.0.0.1"]
    assert cfg["http"]["listen"] == ["tcp:8765:interface=127.0.0.1"]
    cert = demo.certs[0].load()
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert dp[0].full_name[0].value == "http://127.0.0.1:8765/crl/rsa-ca.crl"
    crl = _crl(demo.cas["rsa-ca"].crl_path)  # type: ignore[arg-type]
    assert crl.last_update_utc == now.replace(microsecond=0) - timedelta(hours=1)
    with pytest.raises(ValueError, match="timezone"):
        build_demo_pki(tmp_path / "naive", now=datetime(2031, 1, 1))


def test_partitions_and_deltas(pki: DemoPki) -> None:
    """ec-ca publishes two CRL partitions (RFC 5280 §5.2.5, both number 1) whose IDPs name
    exactly its subscribers' CDP URLs, and a delta of each (§5.2.4, number 2 over base 1)
    whose IDP is its partition's; together the partitions list every revoked subscriber."""
    ca = pki.cas["ec-ca"]
    key = _cert(ca.cert_path).public_key()
    parts = [_crl(p) for p in ca.scope_crl_paths]
    assert [p.name for p in ca.scope_crl_paths] == ["part0.pem", "part1.pem", "part0-delta.pem",
                                                    "part1-delta.pem"]
    listed: set[int] = set()
    for i, crl in enumerate(parts):
        assert crl.is_signature_valid(key)  # type: ignore[arg-type]
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert idp.critical and idp.value.only_contains_user_certs
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        part = i % 2
        for demo in pki.certs:
            if demo.ca == "ec-ca" and partition_of(demo.serial) == part:
                dp = demo.load().extensions.get_extension_for_class(x509.CRLDistributionPoints)
                assert list(dp.value[0].full_name) == list(idp.value.full_name)
        if i < 2:
            assert number == 1
            listed |= {r.serial_number for r in crl}
            assert all(partition_of(r.serial_number) == part for r in crl)
        else:
            assert number == 2
            base = crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
            assert base.critical and base.value.crl_number == 1
    revoked = {c.serial for c in pki.certs if c.ca == "ec-ca" and c.revoked_at is not None}
    assert listed == revoked
    newly = {r.serial_number for crl in parts[2:] for r in crl}
    assert newly == {pki.crl2_revokes["ec-ca"]}
