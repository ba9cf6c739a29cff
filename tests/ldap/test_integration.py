"""Real clients against a real listener on 127.0.0.1: ldapsearch (OpenLDAP) and ldap3."""

from __future__ import annotations

import base64
import socket
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor, threads

from server.ldap.server import make_ldap_factory
from server.storeaccess import StoreAccess
from store.sqlite import Store
from tests.conftest import require_tool
from tests.ldap.conftest import ldap_config
from tests.ldap.test_directory import java_dn

pytestmark = pytest.mark.realclient


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    """A client as a subprocess in a thread, so the reactor keeps serving meanwhile."""
    import os

    # LDAPNOINIT keeps a system ldap.conf out, but also ignores LDAPTLS_* variables
    full_env = dict(os.environ, **(env or {"LDAPNOINIT": "1"}))
    return threads.deferToThread(subprocess.run, list(args), capture_output=True, timeout=60,
                                 env=full_env)


def ldif(stdout: bytes) -> list[dict[str, list[bytes]]]:
    """Entries of `ldapsearch -LLL -o ldif-wrap=no` output (base64 values decoded)."""
    out: list[dict[str, list[bytes]]] = []
    for block in stdout.decode("utf-8").split("\n\n"):
        entry: dict[str, list[bytes]] = {}
        for line in block.splitlines():
            if not line or line.startswith("#"):
                continue
            if ":: " in line:
                name, value = line.split(":: ", 1)
                data = base64.b64decode(value)
            else:
                name, _, text = line.partition(": ")
                name, data = name.rstrip(":"), text.encode("utf-8")
            entry.setdefault(name.lower(), []).append(data)
        if entry:
            out.append(entry)
    return out


def der(cert: Any) -> bytes:
    return cert.load().public_bytes(Encoding.DER)  # type: ignore[no-any-return]


@pytest.fixture(params=[0, 2, "postgresql"], ids=["inline", "threads2", "postgresql"])
def port(request: pytest.FixtureRequest, ldap_store_path: Path,
         demo_now: datetime) -> Iterator[int]:
    """A listener whose store calls run inline, or in two store threads ([store] threads) on
    SQLite, or in two store threads on PostgreSQL (the demo PKI imported there)."""
    from store import open_store

    if request.param == "postgresql":
        location, threads = request.getfixturevalue("ldap_pg_url"), 2
    else:
        location, threads = str(ldap_store_path), request.param
    serving = open_store(location, create=False, migrate=False)
    access = StoreAccess(location, threads, store=serving)
    access.start()
    factory = make_ldap_factory(ldap_config(size_limit=500), serving, None, None,
                                lambda: demo_now, access=access)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    yield listening.getHost().port
    pytest_twisted.blockon(listening.stopListening())
    access.stop()
    serving.close()


def search_cmd(port: int, *args: str) -> list[str]:
    return [require_tool("ldapsearch"), "-x", "-LLL", "-o", "ldif-wrap=no",
            "-H", f"ldap://127.0.0.1:{port}", *args]


@pytest_twisted.ensureDeferred
async def test_thunderbird_mail_lookup(port: int, demo_pki: Any) -> None:
    good = [c for c in demo_pki.certs if c.state == "good" and c.emails]
    r = await run(*search_cmd(port, "-b", "c=MO", f"(mail={good[0].emails[0]})",
                              "usercertificate;binary"))
    assert r.returncode == 0, r.stderr
    entries = ldif(r.stdout)
    assert len(entries) == 1 and entries[0]["usercertificate;binary"] == [der(good[0])]
    both = f"(|(mail={good[0].emails[0]})(mail={good[1].emails[0]}))"
    r = await run(*search_cmd(port, "-b", "c=MO", both, "usercertificate;binary"))
    certs = {v for e in ldif(r.stdout) for v in e.get("usercertificate;binary", [])}
    assert {der(good[0]), der(good[1])} <= certs
    revoked = next(c for c in demo_pki.certs if c.state == "revoked" and c.emails)
    r = await run(*search_cmd(port, "-b", "c=MO", f"(mail={revoked.emails[0]})",
                              "usercertificate;binary"))
    assert all(der(revoked) not in e.get("usercertificate;binary", []) for e in ldif(r.stdout))


@pytest_twisted.ensureDeferred
async def test_autocomplete_and_outlook_filters(port: int) -> None:
    auto = "(|(cn=*ana*)(mail=*ana*)(givenName=*ana*)(sn=*ana*))"
    r = await run(*search_cmd(port, "-z", "100", "-b", "c=MO", auto, "cn", "mail"))
    assert r.returncode == 0 and ldif(r.stdout), r.stderr
    outlook = "(&(mail=*)(|(mail=ana*)(|(cn=ana*)(|(sn=ana*)(givenName=ana*)))))"
    r = await run(*search_cmd(port, "-b", "c=MO", outlook, "cn", "mail"))
    found = ldif(r.stdout)
    assert r.returncode == 0 and found and all("mail" in e for e in found)


@pytest_twisted.ensureDeferred
async def test_java_base_search_at_subject_dn_with_hex(port: int, demo_pki: Any) -> None:
    good = next(c for c in demo_pki.certs if c.state == "good" and c.emails
                and "1.2.840.113549.1.9.1" in c.subject_rfc4514)
    base = java_dn(good)
    assert "1.2.840.113549.1.9.1=#16" in base
    r = await run(*search_cmd(port, "-s", "base", "-b", base, "(objectClass=*)",
                              "userCertificate;binary", "crossCertificatePair;binary"))
    assert r.returncode == 0, r.stderr
    assert ldif(r.stdout)[0]["usercertificate;binary"] == [der(good)]


@pytest_twisted.ensureDeferred
async def test_ca_entry_certificate_and_crl(port: int, demo_pki: Any) -> None:
    ca = demo_pki.cas["rsa-ca"]
    cert = ca.load_certificate()
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes()).public_bytes(Encoding.DER)
    r = await run(*search_cmd(port, "-s", "base", "-b", cert.subject.rfc4514_string(),
                              "(objectClass=*)", "cACertificate;binary",
                              "certificateRevocationList;binary"))
    assert r.returncode == 0, r.stderr
    entry = ldif(r.stdout)[0]
    assert entry["cacertificate;binary"] == [cert.public_bytes(Encoding.DER)]
    assert entry["certificaterevocationlist;binary"] == [crl]


@pytest_twisted.ensureDeferred
async def test_root_dse_size_limit_paging_and_writes(port: int) -> None:
    r = await run(*search_cmd(port, "-s", "base", "-b", "", "(objectclass=*)", "+"))
    dse = ldif(r.stdout)[0]
    assert dse["namingcontexts"] == [b"c=MO"] and dse["supportedldapversion"] == [b"3"]
    assert b"1.3.6.1.4.1.4203.1.11.3" in dse["supportedextension"]
    r = await run(*search_cmd(port, "-z", "2", "-b", "c=MO", "(objectClass=*)", "1.1"))
    assert r.returncode == 4 and len(ldif(r.stdout)) == 2
    r = await run(*search_cmd(port, "-b", "c=MO", "(objectClass=*)", "1.1"))
    everything = [e["dn"] for e in ldif(r.stdout)]
    r = await run(*search_cmd(port, "-E", "pr=7/noprompt", "-b", "c=MO", "(objectClass=*)", "1.1"))
    assert r.returncode == 0, r.stderr
    assert [e["dn"] for e in ldif(r.stdout) if "dn" in e] == everything
    r = await run(require_tool("ldapdelete"), "-x", "-H", f"ldap://127.0.0.1:{port}", "c=MO")
    assert r.returncode == 53
    r = await run(require_tool("ldapwhoami"), "-x", "-H", f"ldap://127.0.0.1:{port}")
    assert r.returncode == 0 and r.stdout.strip() == b"anonymous"
    r = await run(*search_cmd(port, "-D", "cn=admin,c=MO", "-w", "secret", "-b", "c=MO", "(cn=x)"))
    assert r.returncode == 49


@pytest_twisted.ensureDeferred
async def test_malformed_input_then_normal_search(port: int) -> None:
    def garbage() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"\x30\x84\xff\xff\xff\xff" + b"x" * 100)
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    return b"".join(chunks)
                chunks.append(data)

    notice = await threads.deferToThread(garbage)
    assert b"1.3.6.1.4.1.1466.20036" in notice
    r = await run(*search_cmd(port, "-b", "c=MO", "(cn=nobody)"))
    assert r.returncode == 0


@pytest_twisted.ensureDeferred
async def test_ldap3_binary_naming(port: int, demo_pki: Any) -> None:
    import ldap3

    good = next(c for c in demo_pki.certs if c.state == "good" and c.emails)

    def query() -> list[Any]:
        server = ldap3.Server("127.0.0.1", port=port, get_info=ldap3.NONE)
        conn = ldap3.Connection(server, auto_bind=True)
        out = []
        for attrs in (["userCertificate;binary"], ["2.5.4.36;binary"], ["userCertificate"], ["*"]):
            conn.search("c=MO", f"(mail={good.emails[0]})", attributes=attrs)
            out.append(conn.response[0]["raw_attributes"])
        conn.search("c=MO", "(telephoneNumber=*)", attributes=["*"])
        out.append(conn.response)
        conn.unbind()
        return out

    results = await threads.deferToThread(query)
    for raw in results[:4]:
        assert raw["userCertificate;binary"] == [der(good)]
        assert not {k.lower() for k in raw} & {"telephonenumber", "street", "serialnumber"}
    assert results[4] == []


def _tls_files(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now().astimezone()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "tls.pem", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest_twisted.ensureDeferred
async def test_starttls_and_ldaps(store: Store, demo_now: datetime, tmp_path: Path) -> None:
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from server.app import ReloadableTls
    from server.config import TlsConfig

    cert_path, key_path = _tls_files(tmp_path)
    tls = ReloadableTls(TlsConfig(cert_path, key_path))  # as server/app.py builds it
    factory = make_ldap_factory(ldap_config(), store, None, tls, lambda: demo_now)
    plain = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    wrapped = reactor.listenTCP(0, TLSMemoryBIOFactory(tls, False, factory),  # type: ignore[attr-defined]
                                interface="127.0.0.1")
    env = {"LDAPTLS_REQCERT": "never"}
    try:
        r = await run(*search_cmd(plain.getHost().port, "-ZZ", "-b", "c=MO", "(cn=nobody)"), env=env)
        assert r.returncode == 0, r.stderr
        ldapsearch = require_tool("ldapsearch")
        r = await run(ldapsearch, "-x", "-LLL", "-H", f"ldaps://127.0.0.1:{wrapped.getHost().port}",
                      "-b", "c=MO", "(cn=nobody)", env=env)
        assert r.returncode == 0, r.stderr
        r = await run(ldapsearch, "-x", "-ZZ", "-LLL", "-H",
                      f"ldaps://127.0.0.1:{wrapped.getHost().port}", "-b", "c=MO", "(cn=x)", env=env)
        assert r.returncode != 0  # StartTLS inside TLS: operationsError
    finally:
        await plain.stopListening()
        await wrapped.stopListening()
