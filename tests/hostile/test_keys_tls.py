"""Key files readable by group or others are refused at start; TLS below 1.2 is refused."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.config import TlsConfig
from tests.conftest import require_tool
from tests.hostile.conftest import Live, in_thread

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, check=False)


def self_signed(folder: Path, key_mode: int = 0o600) -> TlsConfig:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "tls.pem", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(key_mode)
    return TlsConfig(certificate=cert_path, key=key_path)


def demo_config(pki: Any, tmp: Path, *, signer_key_mode: int = 0o600,
                tls: TlsConfig | None = None) -> tuple[Path, Path]:
    """The demo configuration with rsa-ca's signer key copied (mode given), ports 0."""
    text = pki.config_path.read_text()
    key = pki.cas["rsa-ca"].ocsp_key_path
    copy = tmp / "rsa-ca-ocsp.key"
    copy.write_bytes(key.read_bytes())
    copy.chmod(signer_key_mode)
    text = text.replace(f'"{key}"', f'"{copy}"')
    text = text.replace(f'"{pki.root / "store" / "store.sqlite3"}"', f'"{tmp / "store.sqlite3"}"')
    for port, host in (("1389", "127.0.0.1"), ("8080", "127.0.0.2")):
        text = text.replace(f'"tcp:{port}:interface=127.0.0.1"', f'"tcp:0:interface={host}"')
    if tls is not None:
        text += f'\n[tls]\ncertificate = "{tls.certificate}"\nkey = "{tls.key}"\n'
    path = tmp / "certpub.toml"
    path.write_text(text)
    return path, copy


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_check_config_refuses_a_signer_key_readable_by_others(
        demo_pki: Any, tmp_path: Path, mode: int) -> None:
    config, key = demo_config(demo_pki, tmp_path, signer_key_mode=mode)
    r = cli("check-config", "--config", str(config))
    assert r.returncode == 78, (r.returncode, r.stdout, r.stderr)
    assert str(key) in r.stderr and f"{mode:04o}" in r.stderr and "chmod 600" in r.stderr
    assert "signer_key" in r.stderr and "Traceback" not in r.stderr
    key.chmod(0o600)
    r = cli("check-config", "--config", str(config))
    assert r.returncode == 0, r.stderr


def test_serve_refuses_to_start_with_a_signer_key_readable_by_others(
        demo_pki: Any, tmp_path: Path) -> None:
    config, key = demo_config(demo_pki, tmp_path, signer_key_mode=0o640)
    r = cli("serve", "--config", str(config), timeout=60)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "cannot start" in out and str(key) in out and "chmod 600" in out, out[-2000:]


@pytest.mark.parametrize("mode", [0o640, 0o644])
def test_check_config_refuses_a_tls_key_readable_by_others(
        demo_pki: Any, tmp_path: Path, mode: int) -> None:
    tls = self_signed(tmp_path / "tls", key_mode=mode)
    config, _ = demo_config(demo_pki, tmp_path, tls=tls)
    r = cli("check-config", "--config", str(config))
    assert r.returncode == 78, (r.returncode, r.stdout, r.stderr)
    assert str(tls.key) in r.stderr and "tls.key" in r.stderr and "chmod 600" in r.stderr
    tls.key.chmod(0o600)
    assert cli("check-config", "--config", str(config)).returncode == 0


# --- TLS versions -----------------------------------------------------------------------------


@pytest.fixture
def tls_live(serve: Callable[..., Live], tmp_path: Path) -> Live:
    return serve(tls=self_signed(tmp_path / "tls"), listen="tls:0:interface=127.0.0.1")


def s_client(addr: tuple[str, int], *flags: str) -> subprocess.CompletedProcess[str]:
    # SECLEVEL=0 so that the client itself is willing to speak TLS 1.0/1.1: any refusal
    # then comes from the server.
    return subprocess.run(
        [require_tool("openssl"), "s_client", "-connect", f"{addr[0]}:{addr[1]}",
         "-cipher", "DEFAULT@SECLEVEL=0", *flags], input="", text=True, capture_output=True,
        timeout=30, check=False)


def python_handshake(addr: tuple[str, int], low: ssl.TLSVersion, high: ssl.TLSVersion) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    ctx.minimum_version, ctx.maximum_version = low, high
    import socket

    with socket.create_connection(addr, timeout=5) as raw, ctx.wrap_socket(raw) as s:
        return str(s.version())


def _versions(live: Live) -> None:
    for addr in (live.ldap, live.http):
        for old in ("-tls1_1", "-tls1"):
            r = s_client(addr, old)
            out = r.stdout + r.stderr
            assert r.returncode != 0, out[-1500:]
            assert "no protocols available" not in out, "the client refused, not the server"
            assert "alert protocol version" in out or "unsupported protocol" in out, out[-1500:]
        for new, name in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
            r = s_client(addr, new)
            assert r.returncode == 0 and f"New, {name}, Cipher" in r.stdout, (
                r.stdout + r.stderr)[-1500:]
        with pytest.raises(ssl.SSLError):
            python_handshake(addr, ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
        assert python_handshake(addr, ssl.TLSVersion.TLSv1_2,
                                ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


@pytest.mark.realclient
@pytest_twisted.ensureDeferred
async def test_tls_below_1_2_is_refused_on_ldaps_and_https(tls_live: Live) -> None:
    await in_thread(_versions, tls_live)
    # and the service behind TLS works (LDAP over TLS, OCSP over HTTPS)
    await in_thread(_served_over_tls, tls_live)


def _served_over_tls(live: Live) -> None:
    import http.client

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(*live.http, timeout=5, context=ctx)
    try:
        conn.request("POST", "/ocsp", body=live.ocsp_der(),
                     headers={"Content-Type": "application/ocsp-request"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
    finally:
        conn.close()
