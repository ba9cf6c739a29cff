"""OpenSSL databases into the store: certificate files, statuses, restarts, missing files."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from twisted.logger import capturedLogs

from importer.batch import Importer
from importer.openssl_index import IndexTracker, sync_database
from importer.run import import_openssl, import_paths
from store import open_store
from tests.importer.test_importer_helpers import MiniPki, clock, pem, status, write

R = x509.ReasonFlags


def v(serial: str, fn: str = "unknown") -> str:
    return f"V\t270301120000Z\t\t{serial}\t{fn}\t/C=MO/CN=x\n"


def r(serial: str, rev: str) -> str:
    return f"R\t270301120000Z\t{rev}\t{serial}\tunknown\t/C=MO/CN=x\n"


@pytest.fixture
def pki(tmp_path: Path, store_location: str) -> MiniPki:
    """Each test runs once per store engine (SQLite, PostgreSQL)."""
    return MiniPki(tmp_path / "pki", store=store_location)


@pytest.fixture
def db(tmp_path: Path) -> tuple[Path, Path]:
    ca_dir = tmp_path / "openssl"
    (ca_dir / "newcerts").mkdir(parents=True)
    return ca_dir / "index.txt", ca_dir / "newcerts"


def test_index_with_certificate_files(pki: MiniPki, db: tuple[Path, Path]) -> None:
    index, newcerts = db
    write(newcerts / "01.pem", pem(pki.cert("ca-a", 1)))
    write(newcerts / "80.pem", pem(pki.cert("ca-a", 0x80)))
    write(newcerts.parent / "by-name.pem", pem(pki.cert("ca-a", 0xFF00)))
    write(newcerts / "0100.pem", pem(pki.cert("ca-b", 0x100)))  # from the wrong CA
    index.write_text(v("01") + r("80", "260101000000Z,certificateHold") + "broken\n"
                     + v("FF00", "by-name.pem") + v("0100") + v("0200"))
    config = pki.config(openssl=[("ca-a", index, newcerts)])
    with capturedLogs() as events:
        summary = import_openssl(config, now=clock(), progress=None)
    assert summary.malformed_lines == 1 and summary.index_lines == 5
    st = status(config.store.location)
    assert st[("ca-a", 1)] == ("good", None)
    assert st[("ca-a", 0x80)] == ("revoked", "certificate_hold")
    assert st[("ca-a", 0xFF00)] == ("good", None)
    assert st[("ca-a", 0x100)] == ("good", None) and ("ca-b", 0x100) not in st
    logged = {(e.get("line"), str(e.get("log_format"))) for e in events if e.get("line")}
    assert any(line == 3 and "malformed" in fmt for line, fmt in logged)
    assert any(line == 5 and "certificate not imported" in fmt for line, fmt in logged)
    store = open_store(config.store.location)
    try:
        ca = store.ca_by_name("ca-a")
        assert ca is not None and ca.synced_at is not None
        for serial, has_der in ((1, True), (0x80, True), (0xFF00, True), (0x100, False),
                                (0x200, False)):
            rec = store.cert(ca.id, serial)
            assert rec is not None and (rec.der is not None) == has_der
    finally:
        store.close()


def test_restart_does_not_reapply_an_unchanged_index(pki: MiniPki, db: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    index, newcerts = db
    write(newcerts / "07.pem", pem(pki.cert("ca-a", 7)))
    index.write_text(r("07", "260101000000Z,certificateHold"))
    config = pki.config(openssl=[("ca-a", index, newcerts)])
    import_openssl(config, now=clock(), progress=None)
    write(tmp_path / "crl2.pem", pem(pki.crl("ca-a", 2, [])))  # a newer CRL lifts the hold
    import_paths(config, [tmp_path / "crl2.pem"], now=clock(), progress=None)
    assert status(config.store.location)[("ca-a", 7)] == ("good", None)
    again = import_openssl(config, now=clock(), progress=None)  # e.g. the daemon restarting
    assert again.index_lines == 0 and again.revocations == 0
    assert status(config.store.location)[("ca-a", 7)] == ("good", None)


def test_missing_certificate_files_are_looked_for_again(pki: MiniPki,
                                                        db: tuple[Path, Path]) -> None:
    index, newcerts = db
    index.write_text(v("0A"))
    config = pki.config(openssl=[("ca-a", index, newcerts)])
    store = open_store(config.store.location)
    imp = Importer(config, store, clock())
    try:
        imp.start()
        tracker = IndexTracker(index)
        assert sync_database(imp, config.import_.openssl[0], tracker)
        assert set(tracker.missing) == {0x0A}
        ca = store.ca_by_name("ca-a")
        assert ca is not None
        rec = store.cert(ca.id, 0x0A)
        assert rec is not None and rec.der is None
        assert not sync_database(imp, config.import_.openssl[0], tracker, retry_missing=True)
        write(newcerts / "0A.pem", pem(pki.cert("ca-a", 0x0A)))
        sync_database(imp, config.import_.openssl[0], tracker, retry_missing=True)
        rec = store.cert(ca.id, 0x0A)
        assert rec is not None and rec.der is not None and not tracker.missing
    finally:
        imp.close()
        store.close()


def test_large_index_in_several_batches(pki: MiniPki, db: tuple[Path, Path]) -> None:
    index, newcerts = db
    lines = []
    for s in range(1, 36):
        write(newcerts / f"{s:02X}.pem", pem(pki.cert("ca-b", s)))
        lines.append(r(f"{s:02X}", "260101000000Z,superseded") if s % 5 == 0 else v(f"{s:02X}"))
    index.write_text("".join(lines))
    config = pki.config(openssl=[("ca-b", index, newcerts)], batch_size=10)
    summary = import_openssl(config, now=clock(), progress=None)
    assert summary.index_lines == 35 and summary.certs_new == 35 and summary.revocations == 7
    assert summary.generation == 1 + 4  # the CAs, then one generation per batch of 10 lines
    st = status(config.store.location)
    assert sum(1 for k, s in st.items() if k[0] == "ca-b" and s[0] == "revoked") == 7
