"""The importer: input formats by content, trust, rejections, idempotency, CRL order, hold."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from twisted.logger import capturedLogs

from importer import pool as pool_mod
from importer.batch import Importer
from importer.formats import FileRejected, extract, read_ca_certificate
from importer.progress import ImportSummary
from importer.run import import_openssl, import_paths
from importer.settings import SetupError
from server.config import load_config
from server.demo.pki import DemoPki
from store import is_postgres_url, open_store
from tests.importer.test_importer_helpers import MiniPki, clock, der, dump, pem, status, write

R = x509.ReasonFlags


@pytest.fixture
def pki(tmp_path: Path, store_location: str) -> MiniPki:
    """Every importer test runs once per store engine (SQLite, PostgreSQL)."""
    return MiniPki(tmp_path / "pki", store=store_location)


def run(pki: MiniPki, *paths: Path, **kw: object) -> ImportSummary:
    config = pki.config(**kw)  # type: ignore[arg-type]
    return import_paths(config, list(paths), now=clock(), progress=None)


def store_path(pki: MiniPki) -> str:
    return pki.store_location


def p7(certs: list[x509.Certificate], encoding: Encoding) -> bytes:
    return bytes(pkcs7.serialize_certificates(certs, encoding))


def test_every_format_is_recognised_by_content_not_name(pki: MiniPki, tmp_path: Path) -> None:
    c = [pki.cert("ca-a", s) for s in range(0x10, 0x20)]
    crl_a = pki.crl("ca-a", 1, [(0x10, R.key_compromise)])
    crl_b = pki.crl("ca-b", 1, [(0x99, None)])
    d = tmp_path / "in"
    write(d / "one.der", pem(c[0]))  # PEM in a file named .der
    write(d / "many.crt", b"".join(pem(x) for x in c[1:4]))
    write(d / "plain.pem", der(c[4]))  # DER in a file named .pem
    write(d / "bundle.txt", p7(c[5:7], Encoding.DER))
    write(d / "bundle.p7c", p7(c[7:9], Encoding.PEM))
    write(d / "crl.bin", pem(crl_a))
    write(d / "crl.pem", der(crl_b))
    write(d / "concat.cer", der(c[9]) + der(c[10]) + b"\n")
    write(d / "text.pem", b"Certificate:\n  Data: ...\n" + pem(c[11]) + b"trailing words\n")
    trusted = pem(c[12]).replace(b"BEGIN CERTIFICATE", b"BEGIN TRUSTED CERTIFICATE") \
        .replace(b"END CERTIFICATE", b"END TRUSTED CERTIFICATE")
    write(d / "trusted", trusted)
    write(d / "mixed", pem(c[13]) + pem(crl_a) + pem(c[14]))
    write(d / "crlf.pem", pem(c[15]).replace(b"\n", b"\r\n"))
    summary = run(pki, d)
    assert summary.rejected == []
    assert summary.accepted == 12
    st = status(store_path(pki))
    for s in range(0x10, 0x20):
        assert st[("ca-a", s)] == (("revoked", "key_compromise") if s == 0x10 else ("good", None))
    assert st[("ca-b", 0x99)] == ("revoked", None)  # known from the CRL only
    assert summary.certs_new == 16 and summary.crls == 2


def test_pkcs7_with_crls_and_ber_indefinite_length(pki: MiniPki, tmp_path: Path) -> None:
    cert, crl = pki.cert("ca-b", 0x42), pki.crl("ca-b", 3, [(0x42, R.superseded)])
    signed = cms.SignedData({
        "version": "v1", "digest_algorithms": [], "encap_content_info": {"content_type": "data"},
        "certificates": [cms.CertificateChoices.load(der(cert))],
        "crls": [cms.RevocationInfoChoice.load(der(crl))], "signer_infos": [],
    })
    info = cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()
    # The same bundle with the outer SEQUENCE in BER indefinite-length form.
    ber = b"\x30\x80" + info[2 + (info[1] & 0x7F if info[1] & 0x80 else 0):] + b"\x00\x00"
    assert extract(ber)[0][0] == "cert"
    write(tmp_path / "in" / "b.p7b", info)
    assert run(pki, tmp_path / "in").rejected == []
    assert status(store_path(pki))[("ca-b", 0x42)] == ("revoked", "superseded")


@pytest.mark.parametrize("content, words", [
    (b"", "empty"),
    (b"hello world\n", "not a certificate, CRL or PKCS#7"),
    (b"\x30\x82\x10\x00\x30", "truncated"),
    (b"-----BEGIN CERTIFICATE-----\nMIIB\n", "no END line"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PRIVATE KEY"),
    (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
     "PEM block 1 (CERTIFICATE): not a certificate"),
    (b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
     "a certificate that cannot be parsed"),
])
def test_unreadable_files_are_rejected_with_a_reason(pki: MiniPki, tmp_path: Path,
                                                     content: bytes, words: str) -> None:
    write(tmp_path / "in" / "bad", content)
    summary = run(pki, tmp_path / "in")
    assert len(summary.rejected) == 1
    assert words in summary.rejected[0][1]


def test_untrusted_objects_are_rejected_and_nothing_of_the_file_is_kept(
        pki: MiniPki, tmp_path: Path) -> None:
    good = pki.cert("ca-a", 0x1F)
    foreign = pki.cert(pki.foreign, 0x1F)  # issuer name of ca-a, wrong key
    tampered = bytearray(der(pki.cert("ca-a", 0x20)))
    tampered[-5] ^= 0x55  # inside the signature
    d = tmp_path / "in"
    write(d / "a-mixed.pem", pem(good) + pem(foreign))
    write(d / "b-tampered.der", bytes(tampered))
    write(d / "c-crl.pem", pem(pki.crl(pki.foreign, 7, [(0x1F, None)])))
    summary = run(pki, d)
    reasons = dict(summary.rejected)
    assert reasons[str(d / "a-mixed.pem")] == (
        "certificate CN=User 1f,O=Test Org,C=MO serial 0x1F is not signed by any configured CA"
        " (root, ca-a, ca-b)")
    assert "is not signed by any configured CA" in reasons[str(d / "b-tampered.der")]
    assert reasons[str(d / "c-crl.pem")].startswith("CRL issued by CN=Test CA A,O=Test Org,C=MO"
                                                     " is not signed by any configured CA")
    assert ("ca-a", 0x1F) not in status(store_path(pki))  # the file is taken whole or not at all
    assert summary.accepted == 0


def test_the_same_file_twice_changes_nothing(pki: MiniPki, tmp_path: Path) -> None:
    d = tmp_path / "in"
    c1, c2 = pki.cert("ca-a", 1), pki.cert("ca-a", 2)  # ECDSA: signing again gives other bytes
    write(d / "a.pem", pem(c1) + pem(c2))
    write(d / "crl.pem", pem(pki.crl("ca-a", 1, [(2, R.key_compromise)])))
    first = run(pki, d)
    before = dump(store_path(pki))
    gen = first.generation
    write(d / "copy-of-a.pem", (d / "a.pem").read_bytes())  # same content, other name
    second = run(pki, d)
    assert (second.accepted, second.unchanged, second.generation) == (0, 3, gen)
    assert dump(store_path(pki)) == before
    # Objects already stored, in a file never seen: accepted, still no new generation.
    write(d / "again.pem", pem(c2) + pem(c1))
    third = run(pki, d / "again.pem")
    assert third.accepted == 1 and third.certs_unchanged == 2 and third.generation == gen


def test_copies_within_one_batch(pki: MiniPki, tmp_path: Path) -> None:
    d = tmp_path / "in"
    write(d / "a.pem", pem(pki.cert("ca-a", 1)))
    write(d / "b.pem", (d / "a.pem").read_bytes())
    write(d / "x.pem", b"junk")
    write(d / "y.pem", b"junk")
    summary = run(pki, d)
    assert (summary.accepted, summary.unchanged, len(summary.rejected)) == (1, 1, 2)


def test_crls_in_one_batch_apply_after_certificates_in_number_order(
        pki: MiniPki, tmp_path: Path) -> None:
    d = tmp_path / "in"
    # Names sort newest CRL first; the certificates come after the CRLs by name.
    write(d / "a-crl-3.pem", pem(pki.crl("ca-a", 3, [(5, R.key_compromise)])))
    write(d / "b-crl-2.pem", pem(pki.crl("ca-a", 2, [(5, R.key_compromise), (6, R.certificate_hold)])))
    write(d / "c-crl-1.pem", pem(pki.crl("ca-a", 1, [(7, R.certificate_hold)])))
    write(d / "d-certs.pem", b"".join(pem(pki.cert("ca-a", s)) for s in (5, 6, 7)))
    run(pki, d)
    st = status(store_path(pki))
    # crl 1 puts 7 on hold, crl 2 releases 7 and holds 6, crl 3 releases 6
    assert st[("ca-a", 5)] == ("revoked", "key_compromise")
    assert st[("ca-a", 6)] == ("good", None)
    assert st[("ca-a", 7)] == ("good", None)
    store = open_store(store_path(pki))
    try:
        ca = store.ca_by_name("ca-a")
        assert ca is not None and ca.crl_number == 3
        rec = store.cert(ca.id, 5)
        assert rec is not None and rec.der is not None  # certificate kept beside its status
    finally:
        store.close()


def test_hold_release_and_older_crl(pki: MiniPki, tmp_path: Path) -> None:
    d = tmp_path / "in"
    write(d / "certs.pem", b"".join(pem(pki.cert("ca-b", s)) for s in (1, 2)))
    write(d / "crl1.pem", pem(pki.crl("ca-b", 1, [(1, R.certificate_hold), (2, R.superseded)])))
    run(pki, d)
    assert status(store_path(pki))[("ca-b", 1)] == ("revoked", "certificate_hold")
    write(tmp_path / "crl2.pem", pem(pki.crl("ca-b", 2, [(2, R.superseded)])))
    s2 = run(pki, tmp_path / "crl2.pem")
    assert s2.releases == 1
    assert status(store_path(pki))[("ca-b", 1)] == ("good", None)
    # An older CRL still listing the hold changes nothing (and no new generation).
    write(tmp_path / "crl1-again.pem", pem(pki.crl("ca-b", 1, [(1, R.certificate_hold)])))
    s3 = run(pki, tmp_path / "crl1-again.pem")
    assert s3.accepted == 1 and s3.generation == s2.generation
    assert status(store_path(pki))[("ca-b", 1)] == ("good", None)
    # Revocation never goes backwards: a newer CRL without serial 2 does not un-revoke it.
    write(tmp_path / "crl3.pem", pem(pki.crl("ca-b", 3, [])))
    run(pki, tmp_path / "crl3.pem")
    assert status(store_path(pki))[("ca-b", 2)] == ("revoked", "superseded")


def stored_ca_der(pki: MiniPki, name: str) -> bytes | None:
    """The certificate the store holds for CA name (None: no such CA)."""
    store = open_store(store_path(pki))
    try:
        ca = store.ca_by_name(name)
        return None if ca is None else ca.cert_der
    finally:
        store.close()


def test_ca_certificates(pki: MiniPki, tmp_path: Path) -> None:
    run(pki)
    st = status(store_path(pki))
    assert st[("root", 2)] == ("good", None) and st[("root", 3)] == ("good", None)
    assert ("root", 1) not in st  # a self-signed root is not its own subscriber
    newer, older = pki.reissue("ca-a", 30), pki.reissue("ca-a", -30)
    write(tmp_path / "in" / "newer.pem", pem(newer))
    write(tmp_path / "in" / "older.pem", pem(older))
    summary = run(pki, tmp_path / "in")
    assert summary.rejected == [] and summary.cas == 1
    assert stored_ca_der(pki, "ca-a") == der(newer)
    run(pki)  # a restart does not put the configured (older) certificate back
    assert stored_ca_der(pki, "ca-a") == der(newer)
    # A CA certificate with a configured name but another key is just untrusted.
    write(tmp_path / "fake.pem", pem(pki.foreign.cert))
    assert "is not signed by any configured CA" in run(pki, tmp_path / "fake.pem").rejected[0][1]


def test_serial_clash_rejects_the_file(pki: MiniPki, tmp_path: Path) -> None:
    write(tmp_path / "a.pem", pem(pki.cert("ca-a", 0x55, "First")))
    write(tmp_path / "b.pem", pem(pki.cert("ca-a", 0x55, "Second")))
    run(pki, tmp_path / "a.pem")
    summary = run(pki, tmp_path / "b.pem")
    assert summary.rejected[0][1] == ("certificate serial 0x55 differs from the certificate ca-a"
                                      " already issued with that serial")


def test_import_paths_reports_progress_and_leaves_files(pki: MiniPki, tmp_path: Path) -> None:
    d = tmp_path / "in"
    write(d / "a.pem", pem(pki.cert("ca-a", 1)))
    write(d / "sub" / "b.pem", pem(pki.cert("ca-a", 2)))
    write(d / ".hidden.pem", b"not read")
    write(d / "c.pem.part", b"not read")
    write(d / "bad.pem", b"nonsense")
    out = io.StringIO()
    config = pki.config()
    with capturedLogs() as events:
        summary = import_paths(config, [d], now=clock(), progress=out)
    text = out.getvalue()
    assert f"rejected {d / 'bad.pem'}: not a certificate, CRL or PKCS#7" in text
    assert "3/3 files, 2 certificates" in text
    assert sorted(p.name for p in d.rglob("*")) == sorted(
        [".hidden.pem", "a.pem", "bad.pem", "b.pem", "c.pem.part", "sub"])
    line = summary.line()
    assert line.startswith("import: files 3 (accepted 2, rejected 1, unchanged 0);")
    assert "certificates 2 new" in line and f"generation {summary.generation}" in line
    assert "certificates/s" in line
    files = [e for e in events if str(e.get("log_format", "")).startswith("file ")]
    assert len(files) == 3 and {e["name"] for e in files} >= {str(d / "a.pem")}
    batches = [e for e in events if str(e.get("log_format", "")).startswith("batch ")]
    assert len(batches) == 1 and batches[0]["generation"] == summary.generation
    assert not any("nonsense" in str(e) for e in events)  # contents are never logged


def test_worker_processes_give_the_same_result(pki: MiniPki, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    certs = b"".join(pem(pki.cert("ca-a" if s % 2 else "ca-b", s)) for s in range(1, 41))
    write(tmp_path / "in" / "bulk.pem", certs + pem(pki.cert(pki.foreign, 99)))
    write(tmp_path / "in" / "good.pem", certs)
    # Work goes out by file: two files, one a task, both in the workers.
    monkeypatch.setattr(pool_mod, "POOL_THRESHOLD", 2)
    monkeypatch.setattr(pool_mod, "CHUNK", 1)
    config = pki.config()
    store = open_store(config.store.location)
    imp = Importer(config, store, clock(), workers=2)
    try:
        imp.start()
        outcomes = imp.import_files([(tmp_path / "in" / n, n) for n in ("bulk.pem", "good.pem")])
        assert imp.pool._pool is not None  # the workers did it
    finally:
        imp.close()
        store.close()
    assert [o.outcome for o in outcomes] == ["rejected", "accepted"]
    assert "serial 0x63 is not signed" in outcomes[0].reason
    assert len([k for k in status(config.store.location) if k[0] != "root"]) == 40


def test_demo_pki(demo_pki: DemoPki, tmp_path: Path, store_location: str) -> None:
    root = tmp_path / "demo"
    shutil.copytree(demo_pki.root, root, symlinks=True)
    text = (root / "certpub.toml").read_text().replace(str(demo_pki.root), str(root))
    if is_postgres_url(store_location):
        text, n = re.subn(r"\[store\]\npath = [^\n]*", f'[store]\nurl = "{store_location}"', text)
        assert n == 1
    (root / "certpub.toml").write_text(text)
    config = load_config(root / "certpub.toml")
    s1 = import_openssl(config, now=clock(), progress=None)
    assert s1.rejected == [] and s1.malformed_lines == 0 and s1.certs_new == len(demo_pki.certs)
    crls = [Path(str(ca.crl_path).replace(str(demo_pki.root), str(root)))
            for ca in demo_pki.cas.values() if ca.crl_path is not None]
    s2 = import_paths(config, crls, now=clock(), progress=None)
    assert s2.rejected == [] and s2.crls == len(crls)
    st = status(config.store.location)
    for c in demo_pki.certs:
        revoked = c.state in ("revoked", "hold", "revoked-expired")
        reason = None if c.reason in (None, "unspecified") else c.reason
        assert st[(c.ca, c.serial)] == (("revoked", reason) if revoked else ("good", None)), c
    crl2 = [Path(str(ca.crl2_path).replace(str(demo_pki.root), str(root)))
            for ca in demo_pki.cas.values() if ca.crl2_path is not None]
    import_paths(config, crl2, now=clock(), progress=None)
    st = status(config.store.location)
    for ca, serial in demo_pki.crl2_revokes.items():
        assert st[(ca, serial)] == ("revoked", "key_compromise")
    for ca, serial in demo_pki.crl2_releases.items():
        assert st[(ca, serial)] == ("good", None)


def test_ca_file_without_a_certificate(pki: MiniPki, tmp_path: Path) -> None:
    with pytest.raises(FileRejected):
        read_ca_certificate(write(tmp_path / "x.pem", b"-----BEGIN X509 CRL-----\n"
                                               + b"-----END X509 CRL-----\n"))
    config = pki.config()
    (pki.folder / "ca-b.pem").write_bytes(b"garbage")
    with pytest.raises(SetupError, match=r"^ca\[2\]\.certificate: .*ca-b.pem is not a usable"):
        import_paths(config, [], now=clock(), progress=None)


def test_collect_files_orders_as_paths_sort(tmp_path: Path) -> None:
    """Kept as strings (memory at a million files) but in Path order, folders interleaved."""
    import os

    from importer.run import collect_files

    for name in ("a.pem", "z.pem", "m/x.pem", "m/a-b.pem", "m.pem", "m-1/q.pem", "a b.pem",
                 "A.pem", "m/sub/c.pem", ".hidden/x.pem"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    expected = sorted(Path(root) / f for root, dirs, files in os.walk(tmp_path)
                      if ".hidden" not in root for f in files)
    single = tmp_path / "a.pem"
    assert collect_files([tmp_path, single]) == [str(p) for p in expected] + [str(single)]
