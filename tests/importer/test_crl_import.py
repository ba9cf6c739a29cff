"""The importer's side of CRL scopes: indirect CRLs refused with a reason file, and a summary
that names each CRL's scope and what became of it (both engines)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from importer.run import import_paths
from importer.spool import run_daemon
from store import open_store
from tests.importer.test_importer_helpers import DAY, NOW, MiniPki, clock, der, write

R = x509.ReasonFlags


@pytest.fixture
def pki(tmp_path: Path, store_location: str) -> MiniPki:
    return MiniPki(tmp_path / "pki", store=store_location)


def crl(pki: MiniPki, number: int, serials: list[int], *, base: int | None = None,
        indirect: bool = False) -> bytes:
    issuer = pki.cas["ca-a"]
    tu = NOW - timedelta(hours=1) + timedelta(minutes=number)
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject)
         .last_update(tu).next_update(tu + 7 * DAY)
         .add_extension(x509.CRLNumber(number), critical=False))
    if indirect:
        b = b.add_extension(x509.IssuingDistributionPoint(
            [x509.UniformResourceIdentifier("http://crl.example.mo/i.crl")], None, False, False,
            None, True, False), critical=True)
    if base is not None:
        b = b.add_extension(x509.DeltaCRLIndicator(base), critical=True)
    for serial in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(NOW - DAY).build())
    return der(b.sign(issuer.key, hashes.SHA256()))


def test_an_indirect_crl_is_rejected_with_a_reason(pki: MiniPki) -> None:
    config = pki.config()
    spool = config.import_.spool[0]
    write(spool / "indirect.crl", crl(pki, 3, [5], indirect=True))
    run_daemon(config, now=clock(), stop=threading.Event(), once=True)
    reason = (spool / "rejected" / "indirect.crl.reason").read_text()
    assert reason.startswith("an indirect CRL of ca-a (its issuing distribution point says"
                             " indirectCRL)")
    assert "RFC 5280 §5.3.3" in reason
    assert (spool / "rejected" / "indirect.crl").exists()
    store = open_store(pki.store_location)
    try:
        assert store.crl_scopes() == []
    finally:
        store.close()


def test_the_summary_names_each_crl_s_scope_and_outcome(pki: MiniPki, tmp_path: Path) -> None:
    config = pki.config()
    one = write(tmp_path / "a" / "full10.crl", crl(pki, 10, [2]))
    two = write(tmp_path / "a" / "delta12.crl", crl(pki, 12, [3], base=11))
    summary = import_paths(config, [one.parent], now=clock(), progress=None)
    line = summary.line()
    assert "revocations 1," in line
    assert "CRL ca-a full #10: applied, ca-a full (delta over #11) #12: pending delta" in line
    older = write(tmp_path / "b" / "full9.crl", crl(pki, 9, [4]))
    summary = import_paths(config, [older], now=clock(), progress=None)
    assert "revocations 0," in summary.line()
    assert "CRL ca-a full #9: older, changes nothing" in summary.line()
    base = write(tmp_path / "c" / "full11.crl", crl(pki, 11, [2]))
    summary = import_paths(config, [base], now=clock(), progress=None)
    assert "revocations 1," in summary.line()  # serial 3, from the delta kept meanwhile
    assert "CRL ca-a full #11: applied" in summary.line()
    assert two.exists()
