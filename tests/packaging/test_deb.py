"""The Debian package, installed into a clean bookworm root (debootstrap minbase) as an
operator would: apt-get install ./certpub_….deb, a configuration for a demo PKI, import, serve
answering openssl ocsp and ldapsearch from outside the chroot (it shares the network), the
packaged paths' errors, purge; and an upgrade from a package built from an older commit
(schema 2) that keeps the configuration and the store and migrates it to today's schema.

Slow (a package build, a chroot, apt): see docs/operations.md for the timings. The Debian root
and the apt downloads are cached under /var/cache/certpub-ci (CERTPUB_CI_CACHE).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.schema import SCHEMA_VERSION
from tests.conftest import require_tool
from tests.packaging.debroot import (CACHE, ROOT, Chroot, build_deb, debian_chroot, free_port,
                                     require_root_tools, run)

pytestmark = [pytest.mark.realclient, pytest.mark.packaging]

# The last commit before store migration 3 (the search pages' fingerprint index): a package of
# it writes a schema-2 store that the current package must migrate.
PREVIOUS_COMMIT = "dad029c^"
CA_DIR = "/srv/ca"  # where the demo CA's files go inside the root


@pytest.fixture(scope="module")
def tools() -> None:
    require_root_tools("debootstrap", "chroot", "dpkg-deb", "git")
    require_tool("openssl")
    require_tool("ldapsearch")


@pytest.fixture(scope="module")
def previous_deb(tools: None) -> Path:
    """The package of PREVIOUS_COMMIT, kept in the cache (keyed on the commit and the lock)."""
    commit = run(["git", "-C", ROOT, "rev-parse", PREVIOUS_COMMIT]).stdout.strip()
    lock = hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()[:12]
    out = CACHE / "previous-debs" / f"{commit[:12]}-{lock}"
    found = sorted(out.glob("certpub_*.deb"))
    return found[0] if found else build_deb(out, "--commit", commit)


@pytest.fixture(scope="module")
def pki(deb_pki):  # type: ignore[no-untyped-def]
    return deb_pki


# Keys of the demo's configuration that the previous release (PREVIOUS_COMMIT) does not know.
NEWER_KEYS = ("public_names",)


def install_demo(root: Chroot, pki, ldap_port: int, http_port: int,  # type: ignore[no-untyped-def]
                 previous: bool = False) -> str:
    """Copy the demo CA's files into the root and write /etc/certpub/certpub.toml for them,
    with the packaged store and spool (``previous``: without the keys the previous release
    does not know); returns the configuration's text."""
    target = root / CA_DIR
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(pki.root, target, ignore=shutil.ignore_patterns("store", "spool", "*.toml"))
    text = pki.config_path.read_text().replace(str(pki.root), CA_DIR)
    text = re.sub(r'(?m)^path = .*$', 'path = "/var/lib/certpub/store.sqlite3"', text)
    text = re.sub(r'(?m)^spool = .*$', 'spool = ["/var/spool/certpub"]', text)
    text = re.sub(r'(\[ldap\]\nlisten = \["tcp:)\d+', rf"\g<1>{ldap_port}", text)
    text = re.sub(r'(\[http\]\nlisten = \["tcp:)\d+', rf"\g<1>{http_port}", text)
    if previous:
        for key in NEWER_KEYS:
            text = re.sub(rf"(?m)^{key} = .*\n", "", text)
    (root / "etc/certpub/certpub.toml").write_text(text)
    # The keys are the service user's alone, as the package's notes say.
    root.run("chown", "-R", "certpub:certpub", CA_DIR)
    return text


def import_demo(root: Chroot, pki) -> None:  # type: ignore[no-untyped-def]
    """The OpenSSL databases, then the CRLs, as the certpub user."""
    crls = [str(ca.crl_path).replace(str(pki.root), CA_DIR)
            for ca in pki.cas.values() if ca.crl_path is not None]
    root.run("certpub", "import", "--openssl", *crls, user="certpub")


def pick(pki, state: str):  # type: ignore[no-untyped-def]
    return next(c for c in pki.certs if c.state == state and c.emails)


class Served:
    """certpub serve running in the root as the certpub user, until stopped."""

    def __init__(self, root: Chroot, http_port: int) -> None:
        # The log goes to a file: a pipe nobody reads while the test runs could fill up.
        self.out = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(root.command("certpub", "serve", user="certpub"),
                                     env=root.env(), stdout=self.out, stderr=subprocess.STDOUT)
        end = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"certpub serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > end:
                    self.stop()
                    raise AssertionError("certpub serve did not listen within 120 s") from None
                time.sleep(0.3)

    def log(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.log()


def ocsp_status(pki, cert, http_port: int) -> str:  # type: ignore[no-untyped-def]
    issuer = pki.cas[cert.ca].cert_path
    result = run(["openssl", "ocsp", "-issuer", issuer, "-cert", cert.path,
                  "-CAfile", pki.cas["root"].cert_path, "-url", f"http://127.0.0.1:{http_port}/ocsp"],
                 timeout=60)
    assert "Response verify OK" in result.stdout + result.stderr, result.stdout + result.stderr
    return result.stdout


def ldap_entries(cert, ldap_port: int) -> int:  # type: ignore[no-untyped-def]
    result = run(["ldapsearch", "-x", "-LLL", "-H", f"ldap://127.0.0.1:{ldap_port}", "-b", "c=MO",
                  f"(mail={cert.emails[0]})", "userCertificate;binary"], timeout=60)
    return result.stdout.count("userCertificate;binary::")


def check_answers(pki, ldap_port: int, http_port: int) -> None:  # type: ignore[no-untyped-def]
    good, revoked = pick(pki, "good"), pick(pki, "revoked")
    assert f"{good.path}: good" in ocsp_status(pki, good, http_port)
    assert f"{revoked.path}: revoked" in ocsp_status(pki, revoked, http_port)
    assert ldap_entries(good, ldap_port) >= 1


@pytest.fixture
def root(tools: None, request: pytest.FixtureRequest) -> Iterator[Chroot]:
    with debian_chroot(request.node.name[:40]) as r:
        yield r


def test_install_serve_and_purge(root: Chroot, deb: Path, pki) -> None:  # type: ignore[no-untyped-def]
    shutil.copy(deb, root / "tmp/certpub.deb")
    installed = root.apt_install("/tmp/certpub.deb")
    assert "nothing is served until /etc/certpub/certpub.toml is edited" in installed.stdout

    # The layout: the user, certpub on PATH, the folders, the units installed but not enabled.
    assert root.run("id", "-nG", "certpub").stdout.split() == ["certpub"]
    assert root.run("certpub", "--help").returncode == 0
    owners = root.run("stat", "-c", "%U:%G %a %n", "/var/lib/certpub", "/var/spool/certpub",
                      "/etc/certpub", "/etc/certpub/certpub.toml").stdout.splitlines()
    assert owners == ["certpub:certpub 750 /var/lib/certpub", "certpub:certpub 770 /var/spool/certpub",
                      "root:certpub 750 /etc/certpub", "root:certpub 640 /etc/certpub/certpub.toml"]
    assert (root / "lib/systemd/system/certpub.service").is_file()
    assert not list((root / "etc/systemd/system").glob("*/certpub*.service"))
    assert "/etc/certpub/certpub.toml" in root.run("dpkg-query", "-W", "-f=${Conffiles}", "certpub").stdout

    # The packaged configuration serves nothing and says what to configure.
    refused = root.run("certpub", "serve", user="certpub", check=False)
    assert refused.returncode == 78
    assert "/etc/certpub/certpub.toml has no settings" in refused.stderr
    assert "at least one [[ca]]" in refused.stderr

    ldap_port, http_port = free_port(), free_port()
    install_demo(root, pki, ldap_port, http_port)
    checked = root.run("certpub", "check-config", user="certpub")
    assert "/etc/certpub/certpub.toml: OK (3 CAs" in checked.stdout
    import_demo(root, pki)
    served = Served(root, http_port)
    try:
        check_answers(pki, ldap_port, http_port)
    finally:
        log = served.stop()
    assert served.proc.returncode == 0, log

    # A key file the service user cannot read: named, with why, exit 78 (as the unit sees it).
    key = pki.cas["rsa-ca"].ocsp_key_path.name
    key_path = next(p for p in (root / CA_DIR).rglob(key))
    inner = "/" + str(key_path.relative_to(root.path))
    root.run("chown", "root:root", inner)
    for command in ("serve", "check-config"):
        refused = root.run("certpub", command, user="certpub", check=False)
        assert refused.returncode == 78, refused.stdout + refused.stderr
        assert f"cannot read {inner}: Permission denied" in refused.stderr
        assert "Traceback" not in refused.stderr
    root.run("chown", "certpub:certpub", inner)

    # logrotate understands the packaged file.
    root.apt_install("logrotate")
    root.run("logrotate", "--debug", "/etc/logrotate.d/certpub")

    # Purge: the configuration goes, the store and the CA's own files stay.
    purged = root.run("apt-get", "purge", "-y", "-q", "certpub")
    assert not (root / "etc/certpub/certpub.toml").exists()
    assert not (root / "opt/certpub").exists()
    assert (root / "var/lib/certpub/store.sqlite3").is_file()
    assert "kept /var/lib/certpub" in purged.stderr + purged.stdout


def store_query(root: Chroot, sql: str) -> int:
    return int(root.run("/usr/bin/python3", "-c", "import sqlite3, sys; print(sqlite3.connect("
                        "'/var/lib/certpub/store.sqlite3').execute(sys.argv[1]).fetchone()[0])",
                        sql).stdout)


def schema_version(root: Chroot) -> int:
    return store_query(root, "SELECT value FROM meta WHERE key = 'schema_version'")


def test_upgrade_keeps_config_and_store_and_migrates(root: Chroot, deb: Path, previous_deb: Path,
                                                     pki) -> None:  # type: ignore[no-untyped-def]
    assert run(["dpkg", "--compare-versions", previous_deb.name.split("_")[1], "lt",
                deb.name.split("_")[1]], check=False).returncode == 0
    shutil.copy(previous_deb, root / "tmp/previous.deb")
    root.apt_install("/tmp/previous.deb")
    ldap_port, http_port = free_port(), free_port()
    config = install_demo(root, pki, ldap_port, http_port, previous=True)
    import_demo(root, pki)
    assert schema_version(root) == 2
    certs = store_query(root, "SELECT count(*) FROM certs")
    assert certs > 50
    served = Served(root, http_port)
    try:
        check_answers(pki, ldap_port, http_port)
    finally:
        served.stop()

    # The operator adds the new version's [ops] listener with a slip (a key neither version
    # knows): the upgrade completes, says which key and what was meant, and restarts nothing.
    ops_port = free_port()
    ops = f'\n[ops]\nlisten = ["tcp:{ops_port}:interface=127.0.0.1"]\n'
    typo = config + ops.replace("listen", "lisen")
    (root / "etc/certpub/certpub.toml").write_text(typo)
    shutil.copy(deb, root / "tmp/certpub.deb")
    upgraded = root.apt_install("/tmp/certpub.deb")
    said = upgraded.stdout + upgraded.stderr
    assert "ops.lisen: unknown key (did you mean listen?)" in said
    assert "the running services were NOT restarted" in said
    assert root.run("dpkg-query", "-W", "-f=${Status} ${Version}", "certpub").stdout == \
        f"install ok installed {deb.name.split('_')[1]}"
    assert (root / "etc/certpub/certpub.toml").read_text() == typo  # the operator's file kept

    (root / "etc/certpub/certpub.toml").write_text(config + ops)
    root.run("certpub", "check-config", user="certpub")
    served = Served(root, http_port)  # [store] migrate = "auto": migrated as it opens
    try:
        check_answers(pki, ldap_port, http_port)
        # The health check the container uses, against the ops listener.
        health = root.run("/usr/share/certpub/healthcheck", user="certpub")
        assert health.stdout.startswith(f"healthy: 127.0.0.1:{ops_port}/healthz 200")
    finally:
        served.stop()
    assert schema_version(root) == SCHEMA_VERSION  # every migration since ran (2 -> today's)
    assert store_query(root, "SELECT count(*) FROM certs") == certs
