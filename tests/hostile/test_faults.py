"""Faults: the store unreadable under a running server, the disk full during an import.

What SQLite really does under a running server (it keeps one open connection): chmod 000,
rename or removal of the store file change nothing for it (the open descriptor still reads
the same inode), and bytes overwritten in place are noticed only when the WAL index changes
(an importer commit or checkpoint). The corruption test therefore overwrites the file in place
and then clears the WAL index header, as the next commit would, so every reader must go back
to the file.
"""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest_twisted
from cryptography import x509
from cryptography.x509.oid import NameOID

from server.health import HealthCheck
from server.ldap.errors import ResultCode
from tests.hostile import wire
from tests.hostile.conftest import Live, copy_store, fresh_check, in_thread

REPO = Path(__file__).resolve().parents[2]
UNAVAILABLE = {int(ResultCode.BUSY), int(ResultCode.UNAVAILABLE)}


def _files(store: Path) -> list[Path]:
    return [p for p in (store, Path(f"{store}-wal"), Path(f"{store}-shm")) if p.exists()]


def _serving_from_open_fd(live: Live) -> None:
    store = live.store_path
    modes = {p: p.stat().st_mode for p in _files(store)}
    for p in modes:
        p.chmod(0)
    try:
        fresh_check(live)  # the open connection does not care about permissions
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    away = store.with_name("store.away")
    store.rename(away)
    try:
        fresh_check(live)  # nor about the name
    finally:
        away.rename(store)
    fresh_check(live)


@pytest_twisted.ensureDeferred
async def test_permissions_and_rename_do_not_interrupt_service(live: Live) -> None:
    await in_thread(_serving_from_open_fd, live)


def _ldap_unavailable(live: Live, other: Any) -> None:
    """Searches and a compare of an entry not read before (so not in the entry cache), and
    a search not asked before (so not among the pre-encoded answers, which are served only
    while nothing suggests an import could have committed unseen)."""
    unasked = [c for c in live.pki.certs if c.state == "good" and c.emails][1]
    with wire.LdapClient(live.ldap) as c:
        assert c.bind() == 0
        r = c.search("c=MO", wire.eq("mail", unasked.emails[0]), ["mail"])
        assert r.code in UNAVAILABLE and not r.entries, (r.code, r.text)
        r = c.search("c=MO", wire.present("objectClass"), ["1.1"], scope=1)
        assert r.code in UNAVAILABLE, (r.code, r.text)
        r = c.search("c=MO", wire.eq("mail", other.emails[0]), ["mail"])
        assert r.code in UNAVAILABLE and not r.entries, (r.code, r.text)
        assert c.compare(other.subject_rfc4514, "mail", other.emails[0]) in UNAVAILABLE


def _ocsp_try_later(live: Live, cert: Any) -> None:
    """A certificate not asked about before: a signing process's store connection may
    still hold the pages of those it answered, read before the corruption."""
    issuer = x509.load_pem_x509_certificate(live.pki.cas[cert.ca].cert_path.read_bytes())
    code, body = wire.post_ocsp(live.http, wire.ocsp_request(cert.load(), issuer, True))
    assert code == 200, code
    assert wire.ocsp_status(body).name == "TRY_LATER", wire.ocsp_status(body)
    code, _, _ = wire.http_call(live.http, "GET", "/crl/rsa-ca.crl")
    assert code == 503


def _recovered(live: Live) -> bool:
    try:
        fresh_check(live, budget=2.0)
        return True
    except AssertionError:
        return False


def _corrupt_then_restore(live: Live, health: HealthCheck) -> dict[str, Any]:
    store = live.store_path
    original = store.read_bytes()
    other = [c for c in live.pki.certs if c.state == "good" and c.emails][5]
    with open(store, "r+b") as f:  # same inode: what `cp other store.sqlite3` does
        f.write(os.urandom(len(original)))
    with open(f"{store}-shm", "r+b") as f:
        f.write(b"\0" * 136)  # the WAL index header: what the next commit would change
    _ldap_unavailable(live, other)
    _ocsp_try_later(live, [c for c in live.pki.certs if c.state == "good"][7])
    ok, body = health.check()
    assert not ok and "store unreadable" in body["reasons"], body
    with open(store, "r+b") as f:  # the store comes back, in place
        f.write(original)
    end = time.monotonic() + 5
    # without a restart; the health check's own connection heals on its next read (with
    # signing processes no OCSP request reads through it to heal it first)
    while not (_recovered(live) and health.check()[0]):
        assert time.monotonic() < end, "no recovery within 5 s of the store coming back"
        time.sleep(0.2)
    ok, body = health.check()
    assert ok, body
    return body


@pytest_twisted.ensureDeferred
async def test_corrupted_store_answers_try_later_and_unavailable_then_recovers(
        live: Live) -> None:
    running = live.running
    health = HealthCheck(running.store, running.feed, lambda: datetime.now(UTC), dict)
    await in_thread(fresh_check, live)
    await in_thread(_corrupt_then_restore, live, health)


# --- disk full during an import -------------------------------------------------------------


def _issue(pki: Any, folder: Path, count: int) -> list[Path]:
    from server.demo.pki import issue_certificate, write_pem

    ca = pki.cas["ec-ca"]
    now = datetime.now(UTC)
    out = []
    for i in range(count):
        subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "MO"),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Disk Full Lda"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"Disk Full {i}")])
        cert = issue_certificate(ca, subject, [f"full{i}@full.example.mo"], 0x7E57_0000 + i,
                                 now - timedelta(days=1), now + timedelta(days=30))
        path = folder / f"full-{i:03d}.pem"
        write_pem(path, cert)
        out.append(path)
    return out


def _config(pki: Any, store: Path, spool: Path, folder: Path) -> Path:
    lines = ["[store]", f'path = "{store}"', "[import]", f'spool = ["{spool}"]',
             "poll_interval = 0.2"]
    for ca in pki.cas.values():
        lines += ["[[ca]]", f'name = "{ca.name}"', f'certificate = "{ca.cert_path}"']
    lines += ["[log]", 'format = "logfmt"']
    path = folder / "certpub.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _count(store: Path) -> tuple[int, int, str]:
    conn = sqlite3.connect(store)
    try:
        n = conn.execute("SELECT count(*) FROM certs").fetchone()[0]
        gen = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return int(n), int(gen[0]) if gen else 0, str(check)
    finally:
        conn.close()


class _Lines(threading.Thread):
    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line)

    def wait_for(self, text: str, within: float) -> str:
        end = time.monotonic() + within
        while time.monotonic() < end:
            for line in list(self.lines):
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged; got:\n" + "".join(self.lines[-20:]))


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_disk_full_during_import_loses_nothing_and_resumes(
        demo_pki: Any, hostile_store_path: Path, tmp_path: Path) -> None:
    store = copy_store(hostile_store_path, tmp_path / "store")
    spool = tmp_path / "spool"
    spool.mkdir()
    files = _issue(demo_pki, spool, 150)
    config = _config(demo_pki, store, spool, tmp_path)
    before, generation, check = _count(store)
    assert check == "ok"
    # Every file this process grows may reach 64 KiB: the WAL index (32 KiB) fits, the
    # batch of 150 certificates does not.
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "importd", "--config", str(config), "--once"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_limit_file_size(64 * 1024))  # noqa: PLW1509 - sets only rlimits
    out = _Lines(proc.stdout)
    out.start()
    try:
        line = out.wait_for("import cycle failed, files stay in the spool", 30)
        assert "store write failed" in line and "Traceback" not in line, line
        time.sleep(0.5)  # another failed round, still nothing half-written
        after, gen_after, check = _count(store)
        assert (after, gen_after, check) == (before, generation, "ok")
        assert sorted(spool.glob("*.pem")) == files
        assert not list(spool.glob("done/*")) and not list(spool.glob("rejected/*"))
        # space comes back: the same daemon retries and imports everything
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert proc.wait(60) == 0, "".join(out.lines[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.join(5)
    after, gen_after, check = _count(store)
    assert check == "ok" and after == before + 150 and gen_after > generation
    assert not list(spool.glob("*.pem")) and len(list(spool.glob("done/*.pem"))) == 150
