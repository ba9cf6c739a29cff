"""The import daemon: drop protocol, done/ and rejected/, pick-up time, errors, sync, SIGTERM."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from twisted.logger import capturedLogs

from importer import spool as spool_mod
from importer.spool import SpoolDaemon, SpoolScanner, is_temporary, run_daemon
from store import open_store
from store import sqlite as sqlite_mod
from store.sqlite import StoreError
from tests.importer.test_importer_helpers import MiniPki, clock, pem, sqlite_only, status, write

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pki(tmp_path: Path, store_location: str) -> MiniPki:
    """Each test runs once per store engine (SQLite, PostgreSQL)."""
    return MiniPki(tmp_path / "pki", store=store_location)


def drop(spool: Path, name: str, data: bytes) -> Path:
    """Write by the drop protocol: temporary name, then rename."""
    spool.mkdir(parents=True, exist_ok=True)
    tmp = spool / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, spool / name)
    return spool / name


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("timed out")
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
def daemon(pki: MiniPki) -> Iterator[Callable[..., Any]]:
    """Start a daemon thread on the MiniPki configuration; stopped at the end."""
    threads: list[tuple[threading.Thread, threading.Event]] = []

    def start(**kw: Any) -> Any:
        config = pki.config(**kw)
        stop = threading.Event()
        t = threading.Thread(target=run_daemon, kwargs={"config": config, "now": clock(),
                                                        "stop": stop})
        t.start()
        threads.append((t, stop))
        def started() -> bool:
            try:
                return any(k[0] == "root" for k in status(config.store.location))
            except (sqlite3.Error, StoreError):
                return False

        wait_for(started)
        return config

    yield start
    for t, stop in threads:
        stop.set()
        t.join(10)
        assert not t.is_alive()


def test_temporary_names() -> None:
    assert is_temporary(".crl.pem") and is_temporary("a.tmp") and is_temporary("a.pem.part")
    assert not is_temporary("a.pem") and not is_temporary("tmp.pem")


def test_scanner_takes_only_settled_files(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    write(spool / "a.pem", b"1")
    write(spool / "sub" / "b.pem", b"2")
    write(spool / "done" / "c.pem", b"3")
    write(spool / "rejected" / "d.pem", b"4")
    write(spool / ".e.pem", b"5")
    write(spool / "f.tmp", b"6")
    scanner = SpoolScanner([spool], settle=0.0)
    assert scanner.scan() == ([], True)  # first look: nothing is known to be complete yet
    with open(spool / "a.pem", "ab") as fh:  # still growing
        fh.write(b"more")
    ready, settling = scanner.scan()
    assert [f.name for f in ready] == ["sub/b.pem"] and settling
    ready, settling = scanner.scan()
    assert [f.name for f in ready] == ["a.pem", "sub/b.pem"] and not settling
    slow = SpoolScanner([spool], settle=0.3)  # unchanged, but not for long enough yet
    assert slow.scan() == ([], True) and slow.scan() == ([], True)
    time.sleep(0.3)
    assert len(slow.scan()[0]) == 2


def test_scanner_takes_renamed_files_at_once(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    renamed = drop(spool, "a.pem", b"1")
    write(spool / "b.pem", b"2")
    scanner = SpoolScanner([spool], settle=10.0)
    ready, settling = scanner.scan({renamed})
    assert [f.name for f in ready] == ["a.pem"] and settling  # b.pem still has to settle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")
def test_inotify_reports_renames_not_files_written_in_place(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    watcher = spool_mod.Inotify()
    try:
        watcher.watch(spool)
        drop(spool, "renamed.pem", b"1")
        write(spool / "written.pem", b"2")
        drop(spool, "rewritten.pem", b"3")
        write(spool / "rewritten.pem", b"3 again")  # written in place after the rename
        (spool / "sub.d").mkdir()
        assert watcher.wait(5.0)
        time.sleep(0.05)
        watcher.wait(0.0)
        assert watcher.take_renamed() == {spool / "renamed.pem"}
        assert watcher.take_renamed() == set()
    finally:
        watcher.close()


def test_picked_up_within_one_second_then_moved(pki: MiniPki, daemon: Any) -> None:
    config = daemon()
    spool = config.import_.spool[0]
    time.sleep(0.3)
    cert = pki.cert("ca-a", 0x1F, email="chan@example.mo")
    took = 0.0
    with capturedLogs() as events:
        drop(spool, "cert.pem", pem(cert))
        took = wait_for(lambda: (spool / "done" / "cert.pem").exists())
        wait_for(lambda: any("file {name}" in str(e.get("log_format")) for e in events))
    assert took < 1.0
    assert status(config.store.location)[("ca-a", 0x1F)] == ("good", None)
    assert not (spool / "cert.pem").exists()
    line = next(e for e in events if str(e.get("log_format")).startswith("file "))
    assert (line["name"], line["outcome"], line["certs"]) == ("cert.pem", "accepted", 1)


def test_rejected_files_get_a_reason_and_names_never_collide(pki: MiniPki, daemon: Any) -> None:
    config = daemon()
    spool = config.import_.spool[0]
    drop(spool, "x.pem", pem(pki.cert(pki.foreign, 0x1F)))
    wait_for(lambda: (spool / "rejected" / "x.pem.reason").exists())
    wait_for(lambda: (spool / "rejected" / "x.pem").exists())
    reason = (spool / "rejected" / "x.pem.reason").read_text()
    assert reason.startswith("certificate CN=User 1f,O=Test Org,C=MO serial 0x1F is not signed"
                             " by any configured CA (root, ca-a, ca-b)\n")
    drop(spool, "x.pem", b"junk")  # same name again
    wait_for(lambda: (spool / "rejected" / "x.1.pem.reason").exists())
    assert "not a certificate" in (spool / "rejected" / "x.1.pem.reason").read_text()
    c = pem(pki.cert("ca-a", 2))
    drop(spool, "c.pem", c)
    wait_for(lambda: (spool / "done" / "c.pem").exists())
    drop(spool, "c.pem", c)  # the same file again: unchanged, moved beside the first
    wait_for(lambda: (spool / "done" / "c.1.pem").exists())
    time.sleep(0.3)
    assert sorted(p.name for p in spool.iterdir()) == ["done", "rejected"]


def test_processed_delete(pki: MiniPki, daemon: Any) -> None:
    config = daemon(processed="delete")
    spool = config.import_.spool[0]
    drop(spool, "c.pem", pem(pki.cert("ca-b", 3)))
    wait_for(lambda: not (spool / "c.pem").exists())
    assert status(config.store.location)[("ca-b", 3)] == ("good", None)
    assert not (spool / "done").exists()


def test_several_spools_and_subfolders(pki: MiniPki, daemon: Any, tmp_path: Path) -> None:
    spools = [tmp_path / "s1", tmp_path / "s2"]
    config = daemon(spool=spools)
    drop(spools[0] / "deep", "a.pem", pem(pki.cert("ca-a", 1)))
    drop(spools[1], "b.pem", pem(pki.cert("ca-b", 2)))
    wait_for(lambda: (spools[0] / "done" / "a.pem").exists() and
             (spools[1] / "done" / "b.pem").exists())
    st = status(config.store.location)
    assert st[("ca-a", 1)] == st[("ca-b", 2)] == ("good", None)


@sqlite_only  # an SQLite file lock; tests/store/test_postgres.py has the PostgreSQL writer lock
def test_survives_a_locked_store_and_retries(pki: MiniPki, daemon: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_mod, "BUSY_TIMEOUT_MS", 200)
    config = daemon()
    spool = config.import_.spool[0]
    blocker = sqlite3.connect(config.store.location, isolation_level=None)
    with capturedLogs() as events:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        drop(spool, "c.pem", pem(pki.cert("ca-a", 7)))
        wait_for(lambda: any("import cycle failed" in str(e.get("log_format")) for e in events))
        assert (spool / "c.pem").exists()  # left in the spool
        blocker.execute("ROLLBACK")
        wait_for(lambda: (spool / "done" / "c.pem").exists(), timeout=20)
    blocker.close()
    assert status(config.store.location)[("ca-a", 7)] == ("good", None)


def test_unreadable_file_stays_and_is_retried_when_it_changes(
        pki: MiniPki, daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from importer import pool as importer_mod

    denied = {"on": True}
    real_read = importer_mod.read_file

    def fake_read(path: Any, *args: Any, **kw: Any) -> Any:
        if denied["on"] and Path(path).name == "c.pem":
            raise PermissionError(13, "Permission denied")
        return real_read(path, *args, **kw)

    monkeypatch.setattr(importer_mod, "read_file", fake_read)
    config = daemon()
    spool = config.import_.spool[0]
    with capturedLogs() as events:
        path = drop(spool, "c.pem", pem(pki.cert("ca-a", 8)))
        time.sleep(1.2)
        assert path.exists()
        skipped = [e for e in events if "skipped" in str(e.get("log_format"))]
        assert len(skipped) == 1  # logged once, not at every poll
        denied["on"] = False
        path.chmod(0o600)  # the operator fixes it: ctime changes
        wait_for(lambda: (spool / "done" / "c.pem").exists())


def test_mark_synced_while_idle_without_new_generation(pki: MiniPki,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "SYNC_INTERVAL", 0.0)
    config = pki.config()
    d = SpoolDaemon(config, clock(), threading.Event())
    try:
        d.cycle()
        assert d.store is not None
        gen = d.store.generation()
        first = [ca.synced_at for ca in d.store.cas()]
        d.cycle()
        assert d.store.generation() == gen
        later = [ca.synced_at for ca in d.store.cas()]
        assert all(a is not None and b is not None and b > a for a, b in zip(first, later))
    finally:
        if d.importer is not None:
            d.importer.close()
        if d.store is not None:
            d.store.close()


def test_index_changes_are_followed(pki: MiniPki, daemon: Any, tmp_path: Path) -> None:
    ca_dir = tmp_path / "openssl"
    newcerts = ca_dir / "newcerts"
    c1, c2 = pki.cert("ca-a", 0x0A), pki.cert("ca-a", 0x0B)
    write(newcerts / "0A.pem", pem(c1))
    write(newcerts / "0B.pem", pem(c2))
    index = ca_dir / "index.txt"
    v = "V\t270301120000Z\t\t{s}\tunknown\t/C=MO/CN=x\n"
    index.write_text(v.format(s="0A"))
    with capturedLogs() as events:
        config = daemon(openssl=[("ca-a", index, newcerts)])
        wait_for(lambda: status(config.store.location).get(("ca-a", 0x0A)) == ("good", None))
        # `openssl ca` rewrites index.txt through a rename: a revocation, a new line, a bad line
        tmp = ca_dir / "index.txt.new"
        tmp.write_text("R\t270301120000Z\t260101000000Z,keyCompromise\t0A\tunknown\t/C=MO/CN=x\n"
                       + "this line is broken\n" + v.format(s="0B"))
        os.replace(tmp, index)
        wait_for(lambda: status(config.store.location).get(("ca-a", 0x0B)) == ("good", None))
        wait_for(lambda: status(config.store.location)[("ca-a", 0x0A)] == ("revoked",
                                                                        "key_compromise"))
    bad = [e for e in events if "malformed" in str(e.get("log_format"))]
    assert len(bad) == 1 and bad[0]["line"] == 2 and "fields" in bad[0]["why"]
    store = open_store(config.store.location)
    try:
        ca = store.ca_by_name("ca-a")
        assert ca is not None
        rec = store.cert(ca.id, 0x0B)
        assert rec is not None and rec.der == c2.public_bytes(
            __import__("cryptography.hazmat.primitives.serialization",
                       fromlist=["Encoding"]).Encoding.DER)
    finally:
        store.close()


def test_sigterm_finishes_and_exits_zero(pki: MiniPki) -> None:
    config = pki.config()
    assert config.source is not None
    spool = config.import_.spool[0]
    for i in range(20):
        write(spool / f"c{i:02}.pem", pem(pki.cert("ca-b", 0x100 + i)))
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "importd", "--config", str(config.source)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (spool / "done").exists() and len(list((spool / "done").iterdir())) == 20,
                 timeout=30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "import daemon stopped" in out


def test_unknown_crl_reason_codes_do_not_stall(pki: MiniPki, daemon: Any) -> None:
    config = daemon()
    spool = config.import_.spool[0]
    drop(spool, "crl.pem", pem(pki.crl("ca-a", 1, [(1, x509.ReasonFlags.aa_compromise)])))
    wait_for(lambda: (spool / "done" / "crl.pem").exists())
    assert status(config.store.location)[("ca-a", 1)] == ("revoked", "aa_compromise")
