"""The store itself: concurrency between processes, migrations, serials, generations, status rules.

Every test here runs on both engines (the ``store_location`` fixture) except the migration
tests that build an old SQLite file by hand; tests/store/test_postgres.py has their
PostgreSQL counterparts.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from store import open_store
from store.certparse import cert_input, crl_input
from store.model import CaId, CertStatus, IndexLine, RevocationReason, Serial
from store.schema import MIGRATIONS, SCHEMA_VERSION
from store.sqlite import Store, StoreError, StoreSchemaError, reversed_key, serial_text
from tests.importer.test_importer_helpers import NOW, MiniPki, der

R = x509.ReasonFlags
HOLD = RevocationReason.CERTIFICATE_HOLD
KEY = RevocationReason.KEY_COMPROMISE


@pytest.fixture(scope="module")
def pki(mini_pki: MiniPki) -> MiniPki:
    return mini_pki


def ca(store: Any, pki: MiniPki, name: str = "ca-a") -> CaId:
    with store.batch(NOW) as b:
        return CaId(b.ensure_ca(name, der(pki.cas[name].cert))[0])


# --- processes reading while one writes ---------------------------------------------------


def _writer(path: str, template: bytes, batches: int, per: int, out: Any, ready: Any) -> None:
    try:
        store = open_store(path)
        ready.wait(60)  # every reader is reading before the first write
        base = cert_input(template, CaId(1))
        for i in range(batches):
            with store.batch(NOW + timedelta(seconds=i)) as b:
                for j in range(per):
                    serial = Serial(i * per + j + 1)
                    b.add_cert(dataclasses.replace(base, serial=serial,
                                                   der=template + serial.to_bytes(4, "big")), "w")
                    if j % 7 == 0:
                        b.revoke(CaId(1), serial, NOW, KEY, "test", "w")
        store.close()
        out.put(("writer", None))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(("writer", repr(exc)))


def _reader(path: str, seconds: float, out: Any, ready: Any) -> None:
    # Reads until the writer's last batch is visible (or the deadline), counting the distinct
    # generations seen: more than one means the reads really overlapped the writes.
    errors: list[str] = []
    reads = 0
    seen: set[int] = set()
    store = open_store(path, create=False)
    seen.add(int(store.generation()))
    ready.wait(60)
    end = time.monotonic() + seconds
    while time.monotonic() < end and 61 not in seen:
        try:
            gen = store.generation()
            seen.add(int(gen))
            store.changes_since(max(0, gen - 2))
            store.cert(1, reads % 500 + 1)
            store.certs_by_attribute("cn", "user 1f")
            store.cas()
            reads += 1
        except StoreError as exc:
            errors.append(str(exc))
    store.close()
    out.put(("reader", errors or (reads, len(seen))))


def test_concurrent_reader_and_writer_processes(pki: MiniPki, store_location: str) -> None:
    path = store_location
    store = open_store(path)
    ca(store, pki)
    store.close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    template = der(pki.cert("ca-a", 0x1F))
    ready = ctx.Barrier(4)
    procs = [ctx.Process(target=_reader, args=(str(path), 60.0, out, ready)) for _ in range(3)]
    procs.append(ctx.Process(target=_writer, args=(str(path), template, 60, 50, out, ready)))
    for p in procs:
        p.start()
    results = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(10)
    writer = [r for who, r in results if who == "writer"]
    readers = [r for who, r in results if who == "reader"]
    assert writer == [None]
    for r in readers:
        # no "database is locked", and the reads overlapped the writer's batches
        assert isinstance(r, tuple) and r[1] >= 2, r
    store = open_store(path)
    try:
        assert store.generation() == 61  # one per batch, plus ensure_ca
        assert store.cert(1, 3000) is not None
    finally:
        store.close()


# --- migrations ---------------------------------------------------------------------------


def test_migration_from_v1(pki: MiniPki, tmp_path: Path) -> None:
    # SQLite only: builds the old file by hand (test_postgres.py has the PostgreSQL one).
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in MIGRATIONS[0]:  # a store written by the first release
        conn.execute(stmt)
    conn.execute("INSERT INTO cas (name, subject_dn, subject_key, directory_key, cert_der,"
                 " updated_at, generation) VALUES ('old', 'cn=Old', 'cn=old', 'cn=old', x'00', 0, 1)")
    conn.execute("INSERT INTO certs (ca_id, serial, status, imported_at, source, generation,"
                 " not_after) VALUES (1, '80', 'good', 0, 'v1', 1, 100)")
    conn.close()
    store = Store.open(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 4
        rec = store.cert(1, 0x80)
        assert rec is not None and rec.status is CertStatus.GOOD and rec.source == "v1"
        assert store.stats(NOW)[0].expired == 1
        indexes = {r[0] for r in store._query("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "certs_not_after" in indexes and "certs_sha256" in indexes
    finally:
        store.close()
    Store.open(path).close()  # opening again is a no-op


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    # SQLite only: edits the file by hand (test_postgres.py has the PostgreSQL one).
    path = tmp_path / "new.sqlite3"
    Store.open(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(StoreSchemaError, match="schema version 99"):
        Store.open(path)


# --- serials ------------------------------------------------------------------------------


@pytest.mark.parametrize("serial", [1, 0x80, 0xFF00, 0x7F << 152 | 0x0102, (1 << 159) - 1])
def test_serials_round_trip(pki: MiniPki, store: Any, serial: int) -> None:
    ca_id = ca(store, pki)
    cert = pki.cert("ca-a", serial)
    with store.batch(NOW) as b:
        assert b.add_cert(cert_input(der(cert), ca_id), "t") == "new"
    rec = store.cert(ca_id, serial)
    assert rec is not None and rec.serial == serial and rec.der == der(cert)
    assert store.cert(ca_id, serial + 1) is None and store.cert(ca_id, serial - 1) is None
    assert serial_text(serial) == format(serial, "x")


def test_serials_from_crls_and_index(pki: MiniPki, store: Any) -> None:
    ca_id = ca(store, pki)
    crl = pki.crl("ca-a", 1, [(0x80, R.key_compromise), (0xFF00, None)])
    line = IndexLine("V", NOW, None, None, Serial(0x00FF01), "unknown", "/CN=x")
    with store.batch(NOW) as b:
        b.apply_crl(crl_input(der(crl), ca_id), "crl")
        b.apply_index_line(ca_id, line, "index")
    for serial, st in ((0x80, "revoked"), (0xFF00, "revoked"), (0xFF01, "good")):
        rec = store.cert(ca_id, serial)
        assert rec is not None and rec.status.value == st and rec.der is None


# --- generations and changes ---------------------------------------------------------------


def test_generation_once_per_changing_batch(pki: MiniPki, store: Any) -> None:
    ca_id = ca(store, pki)
    g0 = store.generation()
    certs = [cert_input(der(pki.cert("ca-a", s, email=f"u{s}@example.mo")), ca_id)
             for s in (1, 2, 3)]
    with store.batch(NOW) as b:
        for c in certs:
            b.add_cert(c, "t")
        b.revoke(ca_id, Serial(2), NOW, KEY, "t", "t")
    assert store.generation() == g0 + 1
    changes = store.changes_since(g0)
    assert {(c.kind, c.serial) for c in changes} == {("cert", 1), ("cert", 2), ("cert", 3)}
    assert all(c.generation == g0 + 1 and c.directory_key for c in changes)
    # A batch that changes nothing: no generation, no change rows, but it commits.
    with store.batch(NOW + timedelta(minutes=5)) as b:
        for c in certs:
            assert b.add_cert(c, "t") == "unchanged"
        b.revoke(ca_id, Serial(2), NOW, KEY, "t", "t")
        b.mark_synced(ca_id)
        b.record_file(b"\x01" * 32, "f", "accepted")
    assert store.generation() == g0 + 1 and store.changes_since(g0 + 1) == []
    rec = store.ca_by_id(ca_id)
    assert rec is not None and rec.synced_at == NOW + timedelta(minutes=5)
    assert store.file_seen(b"\x01" * 32)
    with store.batch(NOW) as b:
        b.apply_crl(crl_input(der(pki.crl("ca-a", 1, [])), ca_id), "crl")
    assert [(c.kind, c.generation) for c in store.changes_since(g0 + 1)] == [("crl", g0 + 2)]


def test_a_failed_batch_leaves_nothing(pki: MiniPki, store: Any) -> None:
    ca_id = ca(store, pki)
    g0 = store.generation()
    with pytest.raises(RuntimeError), store.batch(NOW) as b:
        b.add_cert(cert_input(der(pki.cert("ca-a", 9)), ca_id), "t")
        raise RuntimeError("crash")
    assert store.generation() == g0 and store.cert(ca_id, 9) is None


# --- status rules ------------------------------------------------------------------------


def test_revocation_never_goes_backwards(pki: MiniPki, store: Any) -> None:
    ca_id = ca(store, pki)
    s = Serial(5)
    with store.batch(NOW) as b:
        b.add_cert(cert_input(der(pki.cert("ca-a", s)), ca_id), "t")
        assert b.revoke(ca_id, s, NOW, KEY, "t", "t") == "revoked"
    with store.batch(NOW) as b:
        assert b.revoke(ca_id, s, NOW, HOLD, "t", "t") == "unchanged"
        assert b.release(ca_id, s, "t") == "unchanged"
        assert b.apply_index_line(ca_id, IndexLine("V", NOW, None, None, s, "u", "/"), "i") \
            == "unchanged"
        assert b.revoke(ca_id, s, NOW, RevocationReason.REMOVE_FROM_CRL, "t", "t") == "unchanged"
        b.apply_crl(crl_input(der(pki.crl("ca-a", 4, [])), ca_id), "crl")
    rec = store.cert(ca_id, s)
    assert rec is not None and rec.status is CertStatus.REVOKED and rec.reason is KEY


def test_hold_released_by_newer_crl_older_crl_ignored(pki: MiniPki, store: Any) -> None:
    ca_id = ca(store, pki)
    with store.batch(NOW) as b:
        b.apply_crl(crl_input(der(pki.crl("ca-a", 2, [(7, R.certificate_hold)])), ca_id), "c2")
    rec = store.cert(ca_id, 7)
    assert rec is not None and rec.reason is HOLD
    gen = store.generation()
    with store.batch(NOW) as b:
        assert b.apply_crl(crl_input(der(pki.crl("ca-a", 1, [])), ca_id), "c1") == "older"
    assert store.generation() == gen
    with store.batch(NOW) as b:
        assert b.apply_crl(crl_input(der(pki.crl("ca-a", 3, [])), ca_id), "c3") == "applied"
    rec = store.cert(ca_id, 7)
    assert rec is not None and rec.status is CertStatus.GOOD and rec.revoked_at is None
    # hold, then the final revocation: allowed (from certificateHold only)
    with store.batch(NOW) as b:
        b.revoke(ca_id, Serial(7), NOW, HOLD, "t", "t")
        assert b.revoke(ca_id, Serial(7), NOW, KEY, "t", "t") == "revoked"
    rec = store.cert(ca_id, 7)
    assert rec is not None and rec.reason is KEY
    stored = store.ca_by_id(ca_id)
    assert stored is not None and stored.crl_number == 3


# --- text order: byte order on both engines (PostgreSQL columns are COLLATE "C") -------------

NAMES = ["zed", "Émile", "alpha", "Alpha2", "beta", "ärger", "日本", "a b", "zé", "Zoë", "a_c",
         "a%d"]


def test_text_order_is_byte_order(pki: MiniPki, store: Any) -> None:
    ca_id = ca(store, pki)
    with store.batch(NOW) as b:
        for i, n in enumerate(NAMES):
            b.add_cert(cert_input(der(pki.cert("ca-a", 0x100 + i, cn=n)), ca_id), "t")
    first = store.cert(ca_id, 0x100)
    entry = store.entry(first.directory_key)
    assert entry is not None and entry.parent_key
    kids = store.children(entry.parent_key)
    keys = [e.key for e in kids]
    assert len(keys) > len(NAMES) - 1 and keys == sorted(keys, key=lambda k: k.encode())
    paged: list[Any] = []
    while page := store.children(entry.parent_key, limit=3, after=paged[-1].key if paged else ""):
        paged += page
    assert paged == kids
    (root,) = store.roots()
    tree = store.subtree(root.key)
    assert len(tree) > len(kids)
    rkeys = [reversed_key(e.key) for e in tree]
    assert rkeys == sorted(rkeys, key=lambda k: k.encode())
    paged = []
    while page := store.subtree(root.key, limit=4, after=paged[-1].key if paged else ""):
        paged += page
    assert paged == tree
    assert store.subtree(entry.parent_key, after=tree[-1].key) == []
    values = store._query("SELECT cert_id, value FROM cert_attrs WHERE attr = 'cn'")
    for prefix in ("a", "z", "é", "ä", "日", "a_", "a%"):
        want = sorted(i for i, v in values if v.startswith(prefix))
        got = [c.id for c in store.certs_by_attribute_prefix("cn", prefix)]
        assert got == want, prefix
        got = [c.id for c in store.certs_by_attribute_substring("cn", prefix, [], "")]
        assert got == want, prefix
    assert [c.serial for c in store.certs_by_attribute("cn", "a_c")] == [0x10A]


def test_nul_in_a_search_matches_nothing(pki: MiniPki, store: Any) -> None:
    ca(store, pki)
    assert store.certs_by_attribute("cn", "a\x00") == []
    assert store.certs_by_attribute_prefix("cn", "\x00") == []
    assert store.children("\x00", after="\x00") == []
    assert store.entry("cn=x\x00") is None
