"""OCSP signing keys in a PKCS#11 token: SoftHSM2 tokens made per test, real `openssl ocsp`.

Each test creates its own token in its own folder (``SOFTHSM2_CONF``) and imports the demo
PKI's OCSP signer keys into it (RSA-2048 for rsa-ca, P-256 for ec-ca) with softhsm2-util; the
server then signs through the token. Skipped only when SoftHSM2 is missing (failed instead
under CERTPUB_REQUIRE_CLIENTS=1).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.x509 import ocsp as c_ocsp
from twisted.internet import reactor, threads
from twisted.logger import capturedLogs, formatEvent

from server import app
from server.config import Config, load_config
from server.demo.hsm import SoftHsmToken, create_token, move_signer_keys, softhsm_module
from tests.conftest import require_tool, skip_or_fail
from tests.ocsp.helpers import ocsp_fetch

pytestmark = pytest.mark.realclient

PIN = "pin-8d41c7e2b5"  # distinctive: searched for in every log and message


def require_softhsm() -> Path:
    require_tool("softhsm2-util")
    module = softhsm_module()
    if module is None:
        skip_or_fail("SoftHSM2's libsofthsm2.so is not installed")
    return module


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The demo PKI, imported once; its key files stay (each test imports them anew)."""
    from server.demo.pki import build_demo_pki
    from importer.run import import_openssl, import_paths

    require_softhsm()
    pki = build_demo_pki(tmp_path_factory.mktemp("hsm-pki"), now=datetime.now(UTC))
    config = load_config(pki.config_path)
    now = lambda: datetime.now(UTC)
    import_openssl(config, now=now, progress=None)
    import_paths(config, [ca.crl_path for ca in pki.cas.values() if ca.crl_path], now=now,
                 progress=None)
    return pki


@dataclasses.dataclass
class Hsm:
    token: SoftHsmToken
    conf: Path


@pytest.fixture
def hsm(pki: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hsm]:
    """A fresh token holding both OCSP keys, and a configuration naming them by URI."""
    require_softhsm()
    token = create_token(tmp_path / "hsm", pin=PIN)
    monkeypatch.setenv("SOFTHSM2_CONF", str(token.conf))
    conf = tmp_path / "certpub.toml"
    move_signer_keys(pki.config_path, token, delete=False, out=conf)
    conf.write_text(re.sub(r'listen = \["tcp:\d+:interface=127.0.0.1"\]',
                           'listen = ["tcp:0:interface=127.0.0.1"]', conf.read_text())
                    .replace("[pkcs11]\n", "[pkcs11]\nretry_interval = \"200ms\"\n"))
    yield Hsm(token, conf)


def certpub(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    return await threads.deferToThread(  # the reactor keeps serving meanwhile
        subprocess.run, list(args), capture_output=True, text=True, timeout=60)


def serving(conf: Path, store_threads: int = 0, signing_processes: int = 1) -> Config:
    config = load_config(conf)
    return dataclasses.replace(config, ldap=dataclasses.replace(config.ldap, listen=()),
                               store=dataclasses.replace(config.store, threads=store_threads),
                               http=dataclasses.replace(config.http,
                                                        signing_processes=signing_processes),
                               # /metrics on the public port for this host (opt-in)
                               ops=dataclasses.replace(config.ops, public_networks=(
                                   ipaddress.ip_network("127.0.0.0/8"),)))


def ocsp_cmd(pki: Any, port: int, ca: str, cert: Path, *args: str) -> list[str]:
    return [require_tool("openssl"), "ocsp", "-issuer", str(pki.cas[ca].cert_path),
            "-CAfile", str(pki.cas["root"].cert_path), "-cert", str(cert),
            "-url", f"http://127.0.0.1:{port}/ocsp", *args]


def good_cert(pki: Any, ca: str) -> Path:
    return Path(next(c for c in pki.certs if c.state == "good" and c.ca == ca).path)


def request_der(pki: Any, ca: str, nonce: bool) -> bytes:
    cert = x509.load_pem_x509_certificate(good_cert(pki, ca).read_bytes())
    issuer = x509.load_pem_x509_certificate(pki.cas[ca].cert_path.read_bytes())
    from cryptography.hazmat.primitives import hashes, serialization

    b = c_ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    if nonce:
        b = b.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def logged(events: list[dict[str, Any]]) -> str:
    return "\n".join(str(formatEvent(e)) + repr(e) for e in events)


# --- real responses from the token ------------------------------------------------------------


@pytest.mark.parametrize("store_threads", [0, 2], ids=["inline", "threads2"])
@pytest_twisted.ensureDeferred
async def test_openssl_verifies_token_signed_answers(pki: Any, hsm: Hsm,
                                                     store_threads: int) -> None:
    """RSA and P-256 signers in the token: nonce answers, cached and pre-signed answers."""
    with capturedLogs() as events:
        running = await app.start(serving(hsm.conf, store_threads), reactor)
    try:
        _, port = running.address("http")
        service = running.services["http"].service
        assert all(type(s._sign.__self__).__name__ == "TokenKey"
                   for s in service.signers.values())
        for ca in ("rsa-ca", "ec-ca"):
            cert = good_cert(pki, ca)
            r = await run(*ocsp_cmd(pki, port, ca, cert, "-resp_text"))  # with a nonce
            assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
            assert f"{cert}: good" in r.stdout
            assert "OCSP Nonce" in r.stdout
            alg = "sha256WithRSAEncryption" if ca == "rsa-ca" else "ecdsa-with-SHA256"
            assert f"Signature Algorithm: {alg}" in r.stdout
            for _ in range(2):  # a miss signed by the token, then the cached answer
                r = await run(*ocsp_cmd(pki, port, ca, cert, "-no_nonce"))
                assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
                assert f"{cert}: good" in r.stdout
        # Pre-signing (as at half-life, or after a status change) goes through the token too.
        before = service.presigned
        entries = list(service.cache._entries.values())
        assert entries
        await service.presign(entries)
        assert service.presigned > before
        for ca in ("rsa-ca", "ec-ca"):
            cert = good_cert(pki, ca)
            r = await run(*ocsp_cmd(pki, port, ca, cert, "-no_nonce"))
            assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
    finally:
        await running.stop()
    assert PIN not in logged(events)


# --- start-up checks --------------------------------------------------------------------------


def test_check_config_names_the_token_key(hsm: Hsm) -> None:
    r = certpub("check-config", "--config", str(hsm.conf), env=hsm.token.env())
    assert r.returncode == 0, r.stderr
    assert "OCSP signer of rsa-ca: delegated in token pkcs11:token=certpub;object=rsa-ca-ocsp," \
           " sha256_rsa" in r.stdout
    assert "in token pkcs11:token=certpub;object=ec-ca-ocsp, sha256_ecdsa" in r.stdout
    assert PIN not in r.stdout + r.stderr


def _refused(hsm: Hsm, expected: str) -> None:
    """check-config and serve both refuse, exit 78, one line naming the URI; no PIN."""
    for command in (["check-config"], ["serve", "--workers", "1"]):
        r = certpub(*command, "--config", str(hsm.conf), env=hsm.token.env())
        assert r.returncode == 78, (command, r.stdout, r.stderr)
        assert expected in r.stdout + r.stderr, (command, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert PIN not in r.stdout + r.stderr


def test_wrong_pin_is_a_clear_error_at_start(hsm: Hsm) -> None:
    hsm.token.pin_file.write_text("not-the-pin\n")
    _refused(hsm, "pkcs11:token=certpub;object=rsa-ca-ocsp: the token refused the PIN"
                  " (CKR_PIN_INCORRECT)")


def test_wrong_object_is_a_clear_error(hsm: Hsm) -> None:
    hsm.conf.write_text(hsm.conf.read_text().replace("object=ec-ca-ocsp", "object=nope"))
    _refused(hsm, "ca[2].ocsp.signer_key: pkcs11:token=certpub;object=nope: no private key"
                  " object labelled 'nope' in token 'certpub'")


def test_wrong_token_is_a_clear_error(hsm: Hsm) -> None:
    hsm.conf.write_text(hsm.conf.read_text().replace("token=certpub;object=ec",
                                                     "token=other;object=ec"))
    _refused(hsm, "pkcs11:token=other;object=ec-ca-ocsp: no token matches (tokens present:"
                  " certpub)")


def test_key_of_another_type_is_refused(hsm: Hsm) -> None:
    hsm.conf.write_text(hsm.conf.read_text().replace("object=ec-ca-ocsp", "object=rsa-ca-ocsp"))
    _refused(hsm, "object=rsa-ca-ocsp: the token holds an RSA key but the certificate")


def test_key_not_matching_the_certificate_is_refused(pki: Any, hsm: Hsm,
                                                     tmp_path: Path) -> None:
    from tests.ocsp.helpers import new_key, write_key

    other = write_key(tmp_path / "other.pem", new_key("p256"))
    hsm.token.import_key(other, "other-p256", b"\x42")
    hsm.conf.write_text(hsm.conf.read_text().replace("object=ec-ca-ocsp", "object=other-p256"))
    _refused(hsm, "object=other-p256: the key does not match the certificate")


def test_pin_from_the_environment(hsm: Hsm) -> None:
    text = hsm.conf.read_text()
    hsm.conf.write_text(re.sub(r"pin_file = .*\n", 'pin_env = "CERTPUB_TEST_PIN"\n', text))
    r = certpub("check-config", "--config", str(hsm.conf), env=hsm.token.env())
    assert r.returncode == 78 and "environment variable CERTPUB_TEST_PIN is not set" in r.stderr
    r = certpub("check-config", "--config", str(hsm.conf),
                env={**hsm.token.env(), "CERTPUB_TEST_PIN": PIN})
    assert r.returncode == 0, r.stderr


def test_pin_file_readable_by_others_is_refused(hsm: Hsm) -> None:
    hsm.token.pin_file.chmod(0o644)
    r = certpub("check-config", "--config", str(hsm.conf), env=hsm.token.env())
    assert r.returncode == 78 and "pkcs11.pin_file" in r.stderr and "mode 0644" in r.stderr
    assert PIN not in r.stderr


# --- a token that goes away and comes back ----------------------------------------------------


def _status(der: bytes) -> c_ocsp.OCSPResponseStatus:
    return c_ocsp.load_der_ocsp_response(der).response_status


async def _answer(port: int, der: bytes) -> c_ocsp.OCSPResponseStatus:
    code, body = await threads.deferToThread(ocsp_fetch, port, "POST", "/ocsp", der)
    assert code == 200
    return _status(body)


async def _until_successful(port: int, der: bytes) -> None:
    from twisted.internet.task import deferLater

    for _ in range(50):
        if await _answer(port, der) == c_ocsp.OCSPResponseStatus.SUCCESSFUL:
            return
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("signing did not resume")


@pytest.mark.parametrize(("store_threads", "signing"), [(0, 0), (2, 0), (0, 1)],
                         ids=["inline", "threads2", "signing-process"])
@pytest_twisted.ensureDeferred
async def test_token_removed_during_traffic_try_later_then_recovery(
        pki: Any, hsm: Hsm, store_threads: int, signing: int) -> None:
    nonce_ec = lambda: request_der(pki, "ec-ca", nonce=True)
    nonce_rsa = lambda: request_der(pki, "rsa-ca", nonce=True)
    with capturedLogs() as events:
        running = await app.start(serving(hsm.conf, store_threads, signing), reactor)
        try:
            _, port = running.address("http")
            cached = request_der(pki, "ec-ca", nonce=False)
            assert await _answer(port, cached) == c_ocsp.OCSPResponseStatus.SUCCESSFUL
            assert await _answer(port, nonce_ec()) == c_ocsp.OCSPResponseStatus.SUCCESSFUL
            # The token's folder disappears (a removed device): tryLater, never unsigned.
            away = hsm.token.tokens_dir.with_name("tokens.away")
            hsm.token.tokens_dir.rename(away)
            for make in (nonce_ec, nonce_rsa, nonce_ec):
                assert await _answer(port, make()) == c_ocsp.OCSPResponseStatus.TRY_LATER
            # An answer signed before stays good to serve until its refresh time.
            assert await _answer(port, cached) == c_ocsp.OCSPResponseStatus.SUCCESSFUL
            code, metrics = await threads.deferToThread(ocsp_fetch, port, "GET", "/metrics")
            found = re.search(rb'certpub_ocsp_signer_unavailable_total\{ca="ec-ca"\} (\d+)',
                              metrics)
            assert code == 200 and found and int(found.group(1)) >= 2, metrics[-2000:]
            # It comes back: signing resumes by itself.
            away.rename(hsm.token.tokens_dir)
            await _until_successful(port, nonce_ec())
            await _until_successful(port, nonce_rsa())
            r = await run(*ocsp_cmd(pki, port, "ec-ca", good_cert(pki, "ec-ca")))
            assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr

            if signing:  # a signing process keeps the environment it was started with
                return
            # SOFTHSM2_CONF pointed elsewhere and SIGHUP: the reload is refused (no such
            # token), the running signers find their token gone: tryLater.
            empty = create_token(hsm.token.folder.with_name("other"), label="other", pin=PIN)
            os.environ["SOFTHSM2_CONF"] = str(empty.conf)
            http = running.services["http"]
            with pytest.raises(Exception, match="no token matches"):
                http.reload(load_config(hsm.conf))
            assert await _answer(port, nonce_ec()) == c_ocsp.OCSPResponseStatus.TRY_LATER
            # Back, and SIGHUP again: re-opened.
            os.environ["SOFTHSM2_CONF"] = str(hsm.token.conf)
            http.reload(load_config(hsm.conf))
            await _until_successful(port, nonce_ec())
            await _until_successful(port, nonce_rsa())
        finally:
            await running.stop()
    text = logged(events)
    assert "does not sign" in text and "answers again" in text
    assert PIN not in text


def test_softhsm_missing_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The helper says what to install instead of failing obscurely."""
    from server.demo import hsm as demo_hsm

    monkeypatch.setattr(demo_hsm, "SOFTHSM_MODULES", ())
    with pytest.raises(demo_hsm.SoftHsmMissing, match="apt-get install softhsm2"):
        create_token(tmp_path / "t")


# --- certpub demo --hsm -----------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_hsm_serves_with_its_keys_in_a_token(tmp_path: Path) -> None:
    import json
    import signal
    import time

    require_softhsm()
    openssl = require_tool("openssl")
    ldap_port, http_port = _free_port(), _free_port()
    folder = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "demo", "--hsm", "--dir", str(folder),
         "--ldap-port", str(ldap_port), "--http-port", str(http_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                code, _ = ocsp_fetch(http_port, "GET", "/", timeout=2)
                if code in (200, 503):
                    break
            except OSError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        m = json.loads((folder / "demo.json").read_text())
        assert not list((folder / "ca").glob("*-ocsp.key"))  # the keys left the files
        assert "pkcs11:token=certpub-demo;object=rsa-ca-ocsp" in (folder / "certpub.toml").read_text()
        good = m["good"]
        r = subprocess.run(
            [openssl, "ocsp", "-issuer", m["cas"][good["ca"]], "-cert", good["path"],
             "-CAfile", m["root"], "-url", f"http://127.0.0.1:{http_port}/ocsp"],
            capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
        assert f"{good['path']}: good" in r.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    pin = (folder / "softhsm" / "user.pin").read_text().strip()
    assert pin not in out
    assert "SOFTHSM2_CONF=" in out


# --- the README's set-up, step by step --------------------------------------------------------


def test_readme_steps_with_pkcs11_tool(tmp_path: Path) -> None:
    """A key generated in the token by pkcs11-tool, certified by `openssl x509 -force_pubkey`,
    its certificate written beside it, checked by `certpub check-config` (README, steps 1-5)."""
    require_softhsm()
    tool, openssl = require_tool("pkcs11-tool"), require_tool("openssl")
    token = create_token(tmp_path / "hsm", pin=PIN)
    env = token.env()
    module = str(token.module)

    def sh(*args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=60,
                           cwd=tmp_path, check=False)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    sh(tool, "--module", module, "--token-label", "certpub", "--login", "--pin", PIN,
       "--keypairgen", "--key-type", "EC:prime256v1", "--label", "issuing-ca-ocsp", "--id", "01")
    sh(tool, "--module", module, "--token-label", "certpub", "--read-object", "--type", "pubkey",
       "--label", "issuing-ca-ocsp", "-o", "ocsp-pub.der")
    sh(openssl, "pkey", "-pubin", "-inform", "DER", "-in", "ocsp-pub.der", "-out", "ocsp-pub.pem")
    sh(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", "issuing-ca.key", "-out", "issuing-ca.pem", "-subj", "/C=MO/CN=Issuing CA",
       "-days", "3650")
    (tmp_path / "ocsp.ext").write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,"
                                       "digitalSignature\nextendedKeyUsage=OCSPSigning\n"
                                       "noCheck=ignored\n")
    sh(openssl, "x509", "-new", "-subj", "/C=MO/CN=Issuing CA OCSP Signer", "-force_pubkey",
       "ocsp-pub.pem", "-CA", "issuing-ca.pem", "-CAkey", "issuing-ca.key", "-days", "365",
       "-extfile", "ocsp.ext", "-out", "issuing-ca-ocsp.pem")
    sh(openssl, "x509", "-in", "issuing-ca-ocsp.pem", "-outform", "DER", "-out",
       "issuing-ca-ocsp.der")
    sh(tool, "--module", module, "--token-label", "certpub", "--login", "--pin", PIN,
       "--write-object", "issuing-ca-ocsp.der", "--type", "cert", "--label", "issuing-ca-ocsp",
       "--id", "01")
    conf = tmp_path / "certpub.toml"
    conf.write_text(f'[store]\npath = "{tmp_path / "store.sqlite3"}"\n[[ca]]\nname = "issuing-ca"\n'
                    f'certificate = "{tmp_path / "issuing-ca.pem"}"\n[ca.ocsp]\n'
                    f'signer_certificate = "{tmp_path / "issuing-ca-ocsp.pem"}"\n'
                    'signer_key = "pkcs11:token=certpub;object=issuing-ca-ocsp"\n'
                    f'[pkcs11]\nmodule = "{module}"\npin_file = "{token.pin_file}"\n')
    r = certpub("check-config", "--config", str(conf), env=env)
    assert r.returncode == 0, r.stderr
    assert ("OCSP signer of issuing-ca: delegated in token"
            " pkcs11:token=certpub;object=issuing-ca-ocsp, sha256_ecdsa") in r.stdout
    # By id as well; and a certificate of another key is refused by the public key compare.
    conf.write_text(conf.read_text().replace("object=issuing-ca-ocsp", "id=%01"))
    assert certpub("check-config", "--config", str(conf), env=env).returncode == 0
    conf.write_text(conf.read_text().replace(str(tmp_path / "issuing-ca-ocsp.pem"),
                                             str(tmp_path / "issuing-ca.pem")))
    r = certpub("check-config", "--config", str(conf), env=env)
    assert r.returncode == 78 and "does not match the certificate" in r.stderr, r.stderr
