"""What only the PostgreSQL engine has: NOTIFY, reconnection, advisory locks, the schema
rendering, encoding checks, password hygiene, and ``certpub copy-store``.

The engine-neutral behaviour (reads, batches, importer, daemon) runs on PostgreSQL through
the ``store_location`` fixture in the other files of this folder.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509

from store import migrate_store, open_store, redact_location
from store.certparse import cert_input
from importer.run import import_paths
from store.model import CaId, RevocationReason, Serial
from store.postgres import MIGRATE_LOCK, WRITE_LOCK, PostgresStore
from store.schema import SCHEMA_VERSION, migration
from store.sqlite import StoreError, StoreSchemaError
from tests.pg import PgCluster, with_database
from tests.importer.test_importer_helpers import NOW, MiniPki, clock, der, dump, pem, write

REPO = Path(__file__).resolve().parents[2]
R = x509.ReasonFlags
KEY = RevocationReason.KEY_COMPROMISE


@pytest.fixture(scope="module")
def pki(mini_pki: MiniPki) -> MiniPki:
    return mini_pki


@pytest.fixture
def store_location(pg_url: str) -> str:
    """PostgreSQL only here: the shared ``store`` fixture then opens this database."""
    return pg_url


def add_ca(store: Any, pki: MiniPki, name: str = "ca-a") -> CaId:
    with store.batch(NOW) as b:
        return CaId(b.ensure_ca(name, der(pki.cas[name].cert))[0])


def add_cert(store: Any, pki: MiniPki, ca_id: CaId, serial: int) -> int:
    with store.batch(NOW) as b:
        b.add_cert(cert_input(der(pki.cert("ca-a", serial)), ca_id), "t")
        return int(b.generation)


def certpub(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False)


# --- schema -------------------------------------------------------------------------------


def test_schema_is_rendered_for_postgresql(store: PostgresStore) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    rows = store._query(
        "SELECT table_name, column_name, data_type, collation_name, is_identity"
        " FROM information_schema.columns WHERE table_schema = current_schema()"
    )
    columns = {(t, c): (d, coll, ident) for t, c, d, coll, ident in rows}
    assert columns[("certs", "id")] == ("bigint", None, "YES")
    assert columns[("cas", "id")] == ("bigint", None, "YES")
    assert columns[("cert_attrs", "cert_id")][0] == "bigint"
    assert columns[("certs", "der")][0] == "bytea"
    texts = {k: v for k, v in columns.items() if v[0] == "text"}
    assert texts and all(coll == "C" for _, coll, _ in texts.values()), texts
    assert "CREATE INDEX certs_not_after" in migration(2, "postgresql")[0]
    with pytest.raises(ValueError, match="unknown SQL dialect"):
        migration(1, "oracle")


def test_migration_from_v1_and_manual_mode(pki: MiniPki, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for stmt in migration(1, "postgresql"):  # a database written by the first release
            conn.execute(stmt)
        conn.execute("INSERT INTO cas (name, subject_dn, subject_key, directory_key, cert_der,"
                     " updated_at, generation) VALUES ('old', 'cn=Old', 'cn=old', 'cn=old',"
                     " '\\x00'::bytea, 0, 1)")
        conn.execute("INSERT INTO certs (ca_id, serial, status, imported_at, source, generation,"
                     " not_after) VALUES (1, '80', 'good', 0, 'v1', 1, 100)")
    with pytest.raises(StoreSchemaError, match=r"schema version 1, .*needs 4: run `certpub migrate`"):
        open_store(pg_url, migrate=False)
    assert migrate_store(pg_url) == (1, 4)
    assert migrate_store(pg_url) == (4, 4)
    s = open_store(pg_url, migrate=False)
    try:
        rec = s.cert(1, 0x80)
        assert rec is not None and rec.source == "v1"
        assert s.stats(NOW)[0].expired == 1
        indexes = {r[0] for r in s._query("SELECT indexname FROM pg_indexes")}
        assert "certs_not_after" in indexes
    finally:
        s.close()


def test_empty_database_needs_create_or_migrate(pg_url: str) -> None:
    with pytest.raises(StoreSchemaError, match="no certpub tables: run `certpub migrate`"):
        open_store(pg_url, create=False)
    with pytest.raises(StoreSchemaError, match="schema version 0"):
        open_store(pg_url, migrate=False)


def test_newer_schema_is_refused(pg_url: str) -> None:
    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreSchemaError, match="schema version 99.*upgrade certpub"):
        open_store(pg_url)


def test_a_second_migrator_waits_and_then_finds_nothing_to_do(pg_url: str) -> None:
    """Two processes starting together: the one that waited must not migrate again."""
    holder = psycopg.connect(pg_url)
    holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
    outcome: dict[str, Any] = {}

    def second() -> None:
        try:
            s = open_store(pg_url)
            outcome["version"] = s.schema_version()
            s.close()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc

    t = threading.Thread(target=second)
    t.start()
    try:
        t.join(0.5)
        assert t.is_alive() and not outcome  # waiting for the lock the holder has
        for version in range(1, SCHEMA_VERSION + 1):  # the first process migrates meanwhile
            for stmt in migration(version, "postgresql"):
                if isinstance(stmt, str):  # Python steps find nothing to do in a new store
                    holder.execute(stmt)
        holder.execute("INSERT INTO meta (key, value) VALUES ('schema_version', %s)",
                       (str(SCHEMA_VERSION),))
        holder.commit()
    finally:
        holder.close()
        t.join(30)
    assert outcome == {"version": SCHEMA_VERSION}  # no "relation already exists"


def test_non_utf8_database_is_refused(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database(encoding="LATIN1")
    try:
        with pytest.raises(StoreError, match="encoding is LATIN1; certpub needs a UTF8 database"):
            open_store(url)
    finally:
        pg_cluster.drop_database(url)


# --- writes: one writer at a time, NOTIFY at commit ------------------------------------------


def test_a_second_writer_waits_for_the_first(pki: MiniPki, pg_url: str) -> None:
    a, b = open_store(pg_url), open_store(pg_url)
    try:
        ca_id = add_ca(a, pki)
        inside = threading.Event()
        generations: dict[str, int] = {}

        def second() -> None:
            generations["b"] = add_cert(b, pki, ca_id, 2)
            inside.set()

        with a.batch(NOW) as batch:
            batch.add_cert(cert_input(der(pki.cert("ca-a", 1)), ca_id), "t")
            t = threading.Thread(target=second)
            t.start()
            t.join(0.5)
            assert not inside.is_set()  # b waits on the writer lock a holds
            generations["a"] = int(batch.generation)
        t.join(30)
        assert inside.is_set()
        assert generations["b"] == generations["a"] + 1  # serialised, not interleaved
        assert a.generation() == generations["b"]
        assert {c.generation for c in a.changes_since(generations["a"] - 1)} == {
            generations["a"], generations["b"]}
    finally:
        a.close()
        b.close()


def test_an_importer_waits_for_another_writer(pki: MiniPki, pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL counterpart of the SQLite locked-store test: no failure, just a wait."""
    blocker = psycopg.connect(pg_url)
    try:
        open_store(pg_url).close()
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        done: dict[str, Any] = {}
        config = pki.config(store=pg_url, spool=[tmp_path / "spool"])
        write(tmp_path / "in" / "c.pem", pem(pki.cert("ca-a", 7)))

        def run() -> None:
            done["summary"] = import_paths(config, [tmp_path / "in"], now=clock(), progress=None)

        t = threading.Thread(target=run)
        t.start()
        t.join(0.5)
        assert t.is_alive()
        blocker.rollback()
        t.join(60)
        assert done["summary"].accepted == 1 and done["summary"].rejected == []
    finally:
        blocker.close()


def test_notify_reaches_wait_for_change(pki: MiniPki, pg_url: str) -> None:
    writer, listener = open_store(pg_url), open_store(pg_url)
    try:
        assert listener.wait_for_change(0.05) is False  # opens the LISTEN connection
        ca_id = add_ca(writer, pki)
        assert listener.wait_for_change(30) is True
        with writer.batch(NOW) as b:  # changes nothing: no generation, no notification
            b.mark_synced(ca_id)
        with pytest.raises(RuntimeError), writer.batch(NOW) as b:  # rolled back: none either
            b.add_cert(cert_input(der(pki.cert("ca-a", 3)), ca_id), "t")
            raise RuntimeError("crash")
        assert listener.wait_for_change(0.3) is False
        gen = add_cert(writer, pki, ca_id, 4)
        assert listener.wait_for_change(30) is True
        assert listener.generation() == gen
    finally:
        writer.close()
        listener.close()


def test_wait_for_change_is_absent_from_sqlite(tmp_path: Path) -> None:
    s = open_store(tmp_path / "s.sqlite3")
    try:
        assert getattr(s, "wait_for_change", None) is None
    finally:
        s.close()


# --- connection loss ----------------------------------------------------------------------


def test_reads_reconnect_after_a_server_restart(pki: MiniPki, pg_cluster: PgCluster,
                                                pg_url: str) -> None:
    if pg_cluster.folder is None:
        pytest.skip("needs the test's own cluster to restart (CERTPUB_TEST_PG_URL is set)")
    s = open_store(pg_url)
    try:
        ca_id = add_ca(s, pki)
        assert s.wait_for_change(0.05) is False
        gen = s.generation()
        pg_cluster.restart()
        with pytest.raises(StoreError, match="store read failed"):
            s.generation()  # the old connection is gone: an error, not a hang
        assert s.generation() == gen  # the next call connects again by itself
        assert s.ca_by_id(ca_id) is not None
        with pytest.raises(StoreError):
            s.wait_for_change(0.05)
        assert s.wait_for_change(0.05) is True  # may have missed a batch: poll now
        pg_cluster.restart()
        with pytest.raises(StoreError):
            add_cert(s, pki, ca_id, 5)
        assert add_cert(s, pki, ca_id, 5) == gen + 1
    finally:
        s.close()


def test_an_unreachable_server_is_a_store_error(pg_cluster: PgCluster) -> None:
    from tests.pg import free_port

    url = with_database(f"postgresql://nobody@127.0.0.1:{free_port()}/x", "x")
    with pytest.raises(StoreError, match="cannot connect to the store"):
        open_store(url)


# --- passwords ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["s3cret-pw", "p%40ss:w0rd", "hunter2 "])
def test_a_password_never_appears_in_errors(pg_cluster: PgCluster, secret: str,
                                            pki: MiniPki) -> None:
    from urllib.parse import quote, unquote, urlsplit

    host = urlsplit(pg_cluster.admin_url).netloc.split("@")[-1]
    bad = [f"postgresql://postgres:{secret}@{host}/no_such_db",  # server says no
           f"postgresql://postgres:{secret}@{host.split(':')[0]}:notaport/db",  # bad URL
           f"postgresql://postgres@{host}/no_such_db?password={quote(secret)}"]
    for url in bad:
        with pytest.raises(StoreError) as info:
            open_store(url)
        message = str(info.value)
        assert secret not in message and unquote(secret) not in message, message
        assert quote(unquote(secret), safe="") not in message, message
        assert "***" in message and "\n" not in message
        assert secret not in redact_location(url)
    conf = pki.config(store=bad[0]).source
    assert conf is not None
    for command in (["status"], ["migrate"], ["check-config"]):
        result = certpub(*command, "--config", str(conf))
        assert secret not in result.stdout + result.stderr, (command, result)
        assert "Traceback" not in result.stderr


# --- text: byte order, NUL -----------------------------------------------------------------


def test_nul_in_a_value_round_trips_instead_of_failing(pki: MiniPki, store: PostgresStore) -> None:
    ca_id = add_ca(store, pki)
    base = cert_input(der(pki.cert("ca-a", 9)), ca_id)
    import dataclasses

    odd = dataclasses.replace(base, cn="nul\x00name",
                              attributes=tuple(base.attributes) + (("cn", "nul\x00name"),))
    with store.batch(NOW) as b:
        assert b.add_cert(odd, "t") == "new"
    assert [c.serial for c in store.certs_by_attribute("cn", "nul\x00name")] == [9]
    assert [c.serial for c in store.certs_by_attribute_prefix("cn", "nul\x00")] == [9]
    assert store.certs_by_attribute("mail", "x\x00") == []
    assert store.children("\x00") == [] and store.subtree("a\x00", after="a\x00b") == []


# --- certpub copy-store ------------------------------------------------------------------------


def _sqlite_store_with_data(pki: MiniPki, tmp_path: Path) -> Path:
    path = tmp_path / "old" / "store.sqlite3"
    config = pki.config(store=path, spool=[tmp_path / "unused"])
    d = tmp_path / "in"
    for s in range(1, 31):
        write(d / f"c{s:02}.pem", pem(pki.cert("ca-a" if s % 2 else "ca-b", s,
                                               email=f"user{s}@example.mo")))
    write(d / "crl-a.pem", pem(pki.crl("ca-a", 1, [(3, R.key_compromise),
                                                   (5, R.certificate_hold), (0x99, None)])))
    summary = import_paths(config, [d], now=clock(), progress=None)
    assert summary.rejected == [] and summary.accepted == 31
    return path


def test_copy_store_round_trip(pki: MiniPki, pg_url: str, tmp_path: Path) -> None:
    source = _sqlite_store_with_data(pki, tmp_path)
    conf = pki.config(store=pg_url).source
    assert conf is not None
    result = certpub("copy-store", "--from", str(source), "--config", str(conf), "--every", "20")
    assert result.returncode == 0, result.stderr
    certs = len(dump(source)["certs"])  # 30 certificates and a serial known from the CRL
    assert f"certs: 20/{certs} rows" in result.stderr and "cert_attrs: " in result.stderr
    assert result.stdout.startswith("copied ") and f", {certs} certs," in result.stdout
    assert dump(pg_url) == dump(source)
    src, dst = open_store(source), open_store(pg_url)
    try:
        assert dst.generation() == src.generation()
        assert dst.changes_since(0) == src.changes_since(0)
        assert [c.id for c in dst.cas()] == [c.id for c in src.cas()]
        ca = dst.ca_by_name("ca-a")
        assert ca is not None and ca.hashes == src.ca_by_name("ca-a").hashes
        assert [e.key for e in dst.subtree("", limit=5000)] == [
            e.key for e in src.subtree("", limit=5000)]
        # identities continue after the copied ids: the importer can go on writing
        with dst.batch(NOW) as b:
            assert b.add_cert(cert_input(der(pki.cert("ca-a", 0x51)), ca.id), "t") == "new"
            b.revoke(ca.id, Serial(0x51), NOW, KEY, "t", "t")
        rec = dst.cert(ca.id, 0x51)
        assert rec is not None and rec.id > max(r[0] for r in src._query("SELECT id FROM certs"))
    finally:
        src.close()
        dst.close()
    again = certpub("copy-store", "--from", str(source), "--config", str(conf))
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "is not empty" in again.stderr and "--replace" in again.stderr
    replaced = certpub("copy-store", "--from", str(source), "--config", str(conf), "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert dump(pg_url) == dump(source)


def test_copy_store_refusals(pki: MiniPki, pg_url: str, tmp_path: Path) -> None:
    conf = pki.config(store=pg_url).source
    assert conf is not None
    missing = certpub("copy-store", "--from", str(tmp_path / "none.sqlite3"), "--config", str(conf))
    assert missing.returncode == 2 and "not an SQLite store file" in missing.stderr
    lite = pki.config(store=tmp_path / "x.sqlite3").source
    assert lite is not None
    source = tmp_path / "src.sqlite3"
    open_store(source).close()
    to_sqlite = certpub("copy-store", "--from", str(source), "--config", str(lite))
    assert to_sqlite.returncode == 78 and "set [store] url" in to_sqlite.stderr
    for r in (missing, to_sqlite):
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
