"""SIGHUP on a real ``certpub serve``: new OCSP signer and TLS certificate, connections kept;
a broken new configuration is refused with a log line and the running one keeps serving."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.config import load_config
from importer.run import import_openssl, import_paths

REPO = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed(folder: Path, cn: str) -> tuple[Path, Path, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "tls.pem", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path, cert


def new_ocsp_signer(pki: Any, ca_name: str) -> x509.Certificate:
    """Replace the CA's delegated OCSP signer files with a freshly issued signer."""
    from server.demo.pki import issue_certificate, write_key, write_pem

    ca = pki.cas[ca_name]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = issue_certificate(
        ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{ca_name} OCSP signer 2")]), [],
        x509.random_serial_number(), now - timedelta(hours=1), now + timedelta(days=200), key,
        [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False),
         (x509.OCSPNoCheck(), False)],
    )
    write_key(ca.ocsp_key_path, key)
    write_pem(ca.ocsp_cert_path, cert)
    return cert


class Server:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self.out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--workers", "1", "--config", str(config)],
            cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT)

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def wait_for(self, predicate: Callable[[str], bool], after: int = 0, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines()[after:]:
                if predicate(line):
                    return line
            assert self.proc.poll() is None, "\n".join(self.lines()[-20:])
            time.sleep(0.05)
        raise AssertionError("not logged in time:\n" + "\n".join(self.lines()[-20:]))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.out.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    from server.demo.pki import build_demo_pki

    ldap_port, http_port, https_port = free_port(), free_port(), free_port()
    pki = build_demo_pki(tmp_path / "pki", ldap_port=ldap_port, http_port=http_port)
    tls_cert, tls_key, _ = self_signed(tmp_path, "certpub one")
    text = pki.config_path.read_text()
    text = text.replace(f'listen = ["tcp:{http_port}:interface=127.0.0.1"]',
                        f'listen = ["tcp:{http_port}:interface=127.0.0.1", '
                        f'"tls:{https_port}:interface=127.0.0.1"]')
    text += f'\n[tls]\ncertificate = "{tls_cert}"\nkey = "{tls_key}"\n'
    # /healthz on the public port, allowed for this host's clients (an operator's opt-in)
    text += '\n[ops]\npublic_networks = ["127.0.0.0/8"]\n'
    pki.config_path.write_text(text)
    config = load_config(pki.config_path)
    now = lambda: datetime.now(UTC)  # noqa: E731
    import_openssl(config, now=now, progress=None)
    import_paths(config, [ca.crl_path for ca in pki.cas.values() if ca.crl_path], now=now,
                 progress=None)
    server = Server(pki.config_path, tmp_path / "serve.log")
    try:
        server.wait_for(lambda line: "serving listeners=" in line)
        yield {"pki": pki, "server": server, "ldap": ldap_port, "http": http_port,
               "https": https_port, "tmp": tmp_path}
    finally:
        if server.proc.poll() is None:
            server.stop()


def ocsp_signer_key_hash(pki: Any, http_port: int) -> bytes:
    cert = next(c for c in pki.certs if c.ca == "rsa-ca" and c.state == "good").load()
    issuer = pki.cas["rsa-ca"].load_certificate()
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    body = req.public_bytes(serialization.Encoding.DER)
    http_req = urllib.request.Request(f"http://127.0.0.1:{http_port}/ocsp", data=body,
                                      headers={"Content-Type": "application/ocsp-request"})
    with urllib.request.urlopen(http_req, timeout=10) as resp:
        answer = ocsp.load_der_ocsp_response(resp.read())
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert answer.responder_key_hash is not None
    return answer.responder_key_hash


def key_hash(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def tls_peer(port: int) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_sighup_reloads_signers_and_tls_keeping_connections(setup: dict[str, Any]) -> None:
    import ldap3

    pki, server = setup["pki"], setup["server"]
    before = ocsp_signer_key_hash(pki, setup["http"])
    assert tls_peer(setup["https"]).subject.rfc4514_string() == "CN=certpub one"

    # connections opened before the reload, used after it
    conn = ldap3.Connection(ldap3.Server(f"ldap://127.0.0.1:{setup['ldap']}"), auto_bind=True)
    assert conn.search("c=MO", "(mail=*)", attributes=["mail"], size_limit=3)
    keepalive = http.client.HTTPConnection("127.0.0.1", setup["http"], timeout=10)
    keepalive.request("GET", "/ca/rsa-ca.pem")
    assert keepalive.getresponse().read().startswith(b"-----BEGIN CERTIFICATE")

    signer = new_ocsp_signer(pki, "rsa-ca")
    self_signed(setup["tmp"], "certpub two")
    mark = len(server.lines())
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(lambda line: "configuration reloaded" in line, after=mark)

    after = ocsp_signer_key_hash(pki, setup["http"])
    assert after != before and after == key_hash(signer)
    assert tls_peer(setup["https"]).subject.rfc4514_string() == "CN=certpub two"
    assert conn.search("c=MO", "(mail=*)", attributes=["mail"], size_limit=3)  # same connection
    keepalive.request("GET", "/ca/rsa-ca.pem")
    assert keepalive.getresponse().read().startswith(b"-----BEGIN CERTIFICATE")

    # a broken new configuration: the signer key readable by others
    os.chmod(pki.cas["rsa-ca"].ocsp_key_path, 0o644)
    mark = len(server.lines())
    server.proc.send_signal(signal.SIGHUP)
    line = server.wait_for(lambda line: "refused" in line, after=mark)
    assert "signer_key" in line or "rsa-ca-ocsp.key" in line, line
    assert ocsp_signer_key_hash(pki, setup["http"]) == after  # the running signer stays
    assert conn.search("c=MO", "(mail=*)", attributes=["mail"], size_limit=3)
    conn.unbind()
    keepalive.close()
    assert server.stop() == 0
    assert not any("Traceback" in line for line in server.lines())


def test_sighup_with_unparsable_config_keeps_serving(setup: dict[str, Any]) -> None:
    pki, server = setup["pki"], setup["server"]
    pki.config_path.write_text(pki.config_path.read_text() + "\n[nonsense]\nx = 1\n")
    mark = len(server.lines())
    server.proc.send_signal(signal.SIGHUP)
    line = server.wait_for(lambda line: "reload refused" in line, after=mark)
    assert "nonsense" in line
    ocsp_signer_key_hash(pki, setup["http"])
    with urllib.request.urlopen(f"http://127.0.0.1:{setup['http']}/healthz", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    assert server.stop() == 0
