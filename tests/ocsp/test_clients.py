"""Real clients against a real listener: `openssl ocsp`, GET through urllib, pyhanko-certvalidator.

The demo PKI is built for the listener's actual port, so the AIA OCSP and CRL URLs inside
its certificates point here; the store is filled by the real importer.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from asn1crypto.crl import CRLReason
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as c_ocsp
from twisted.internet import reactor, threads
from twisted.internet.protocol import Factory

from server.config import load_config
from server.feed import ChangeFeed
from server.http.site import make_http_factory
from server.storeaccess import StoreAccess
from store.sqlite import Store
from tests.conftest import require_tool

pytestmark = pytest.mark.realclient


class _Later(Factory):
    """Listens first (to learn the port the demo PKI's URLs need), serves once built."""

    real: Any = None

    def buildProtocol(self, addr: Any) -> Any:
        return self.real.buildProtocol(addr)


@pytest.fixture(scope="module", params=[0, 2], ids=["inline", "threads2"])
def live(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The demo PKI served with store calls inline, or in two store threads (and feed)."""
    from server.demo.pki import build_demo_pki
    from importer.run import import_openssl, import_paths

    proxy = _Later()
    port = reactor.listenTCP(0, proxy, interface="127.0.0.1")  # type: ignore[attr-defined]
    http_port = port.getHost().port
    now = datetime.now(UTC).replace(microsecond=0)
    pki = build_demo_pki(tmp_path_factory.mktemp("ocsp-live"), now=now, http_port=http_port)
    config = load_config(pki.config_path)
    import_openssl(config, now=lambda: datetime.now(UTC), progress=None)
    import_paths(config, [ca.crl_path for ca in pki.cas.values() if ca.crl_path is not None],
                 now=lambda: datetime.now(UTC), progress=None)
    store = Store.open(config.store.path)
    access = StoreAccess(str(config.store.path), request.param, store=store)
    access.start()
    feed = ChangeFeed(access.store, interval=0.2, access=access)
    site = make_http_factory(config, store, feed, lambda: datetime.now(UTC), reactor,
                             access=access)
    site.doStart()
    proxy.real = site
    feed.start()
    yield {"pki": pki, "port": http_port, "config": config, "site": site, "store": store}
    feed.stop()
    site.doStop()
    pytest_twisted.blockon(port.stopListening())
    access.stop()
    store.close()


async def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return await threads.deferToThread(  # the reactor keeps serving meanwhile
        subprocess.run, list(args), capture_output=True, text=True, timeout=60, cwd=cwd)


def pick(pki: Any, state: str, ca: str = "rsa-ca") -> Any:
    return next(c for c in pki.certs if c.state == state and c.ca == ca)


def ocsp_cmd(live: dict[str, Any], ca: str, *args: str, path: str = "/ocsp") -> list[str]:
    pki = live["pki"]
    return [require_tool("openssl"), "ocsp", "-issuer", str(pki.cas[ca].cert_path),
            "-CAfile", str(pki.cas["root"].cert_path),
            "-url", f"http://127.0.0.1:{live['port']}{path}", *args]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("ca", ["rsa-ca", "ec-ca"])
async def test_openssl_good_revoked_unknown_in_one_request(live: dict[str, Any], ca: str) -> None:
    pki = live["pki"]
    good, revoked = pick(pki, "good", ca), pick(pki, "revoked", ca)
    expired = pick(pki, "expired", ca)
    r = await run(*ocsp_cmd(live, ca, "-cert", str(good.path), "-cert", str(revoked.path),
                            "-cert", str(expired.path), "-serial", "0x7fffffffffff",
                            "-resp_text"))
    assert r.returncode == 0, r.stderr
    assert "Response verify OK" in r.stderr, r.stderr
    out = r.stdout
    assert f"{good.path}: good" in out
    assert f"{revoked.path}: revoked" in out
    assert f"{expired.path}: good" in out  # expired keeps its real status
    assert "0x7fffffffffff: unknown" in out
    assert "Archive Cutoff" in out or "OCSP Archive Cutoff" in out
    reason = {"key_compromise": "keyCompromise", "superseded": "superseded",
              "affiliation_changed": "affiliationChanged",
              "cessation_of_operation": "cessationOfOperation"}.get(revoked.reason or "")
    if reason:
        assert f"Reason: {reason}" in out


@pytest_twisted.ensureDeferred
async def test_openssl_with_and_without_nonce_and_vafile(live: dict[str, Any]) -> None:
    pki = live["pki"]
    good = pick(pki, "good")
    signer = str(pki.cas["rsa-ca"].ocsp_cert_path)
    for extra in ([], ["-no_nonce"], ["-VAfile", signer], ["-no_nonce", "-VAfile", signer]):
        r = await run(*ocsp_cmd(live, "rsa-ca", "-cert", str(good.path), *extra, path="/"))
        assert r.returncode == 0 and "Response verify OK" in r.stderr, (extra, r.stderr)
        assert f"{good.path}: good" in r.stdout
        assert "WARNING" not in r.stdout + r.stderr  # e.g. "no nonce in response"


@pytest_twisted.ensureDeferred
async def test_get_with_percent_encoded_base64_verified_by_openssl(
        live: dict[str, Any], tmp_path: Path) -> None:
    pki = live["pki"]
    revoked = pick(pki, "revoked", "ec-ca")
    req = tmp_path / "req.der"
    r = await run(require_tool("openssl"), "ocsp", "-issuer", str(pki.cas["ec-ca"].cert_path),
                  "-cert", str(revoked.path), "-no_nonce", "-reqout", str(req))
    assert req.exists(), r.stderr
    url = (f"http://127.0.0.1:{live['port']}/ocsp/"
           + quote(base64.b64encode(req.read_bytes()).decode(), safe=""))

    def get() -> tuple[int, dict[str, str], bytes]:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()

    status, headers, body = await threads.deferToThread(get)
    assert status == 200 and headers["Content-Type"] == "application/ocsp-response"
    assert "max-age=" in headers["Cache-Control"] and headers["ETag"]
    resp = c_ocsp.load_der_ocsp_response(body)
    assert resp.certificate_status is c_ocsp.OCSPCertStatus.REVOKED
    (tmp_path / "resp.der").write_bytes(body)
    r = await run(require_tool("openssl"), "ocsp", "-respin", str(tmp_path / "resp.der"),
                  "-issuer", str(pki.cas["ec-ca"].cert_path), "-cert", str(revoked.path),
                  "-CAfile", str(pki.cas["root"].cert_path), "-no_nonce")
    assert r.returncode == 0 and "Response verify OK" in r.stderr, r.stderr
    assert f"{revoked.path}: revoked" in r.stdout


@pytest_twisted.ensureDeferred
async def test_revocation_is_visible_within_one_second(live: dict[str, Any]) -> None:
    from importer.run import import_paths

    pki = live["pki"]
    ca = next(iter(pki.crl2_revokes))
    cert = next(c for c in pki.certs if c.ca == ca and c.serial == pki.crl2_revokes[ca])
    cmd = ocsp_cmd(live, ca, "-cert", str(cert.path), "-no_nonce")
    r = await run(*cmd)
    assert f"{cert.path}: good" in r.stdout, r.stdout + r.stderr
    r = await run(*cmd)  # now served from the pre-signed cache
    assert f"{cert.path}: good" in r.stdout
    crl2 = pki.cas[ca].crl2_path
    await threads.deferToThread(import_paths, live["config"], [crl2],
                                now=lambda: datetime.now(UTC), progress=None)
    started = reactor.seconds()  # type: ignore[attr-defined]
    from twisted.internet.task import deferLater

    await deferLater(reactor, 1.0, lambda: None)
    r = await run(*cmd)
    assert f"{cert.path}: revoked" in r.stdout, r.stdout
    assert reactor.seconds() - started < 5  # type: ignore[attr-defined]


def _pyhanko_validate(pki: Any, cert: Any, ca: str, *, crl_only: bool = False
                      ) -> Exception | None:
    """pyhanko-certvalidator in hard-fail mode, fetching what the certificate's URLs say
    (``crl_only``: CRLs from its distribution points, no OCSP); the error, or None."""
    from asn1crypto import x509 as asn1_x509
    from pyhanko_certvalidator import CertificateValidator, ValidationContext
    from pyhanko_certvalidator.fetchers.aiohttp_fetchers import AIOHttpFetcherBackend
    from pyhanko_certvalidator.policy_decl import (
        CertRevTrustPolicy,
        RevocationCheckingPolicy,
        RevocationCheckingRule,
    )

    def load(path: Path) -> asn1_x509.Certificate:
        return asn1_x509.Certificate.load(
            x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER))

    async def go() -> Exception | None:
        backend = AIOHttpFetcherBackend()
        # The responder URL comes from the certificate's AIA (this listener's port).
        rule = RevocationCheckingRule.CRL_REQUIRED
        policy = (CertRevTrustPolicy(RevocationCheckingPolicy(rule, rule)) if crl_only
                  else None)
        vc = ValidationContext(trust_roots=[load(pki.cas["root"].cert_path)],
                               other_certs=[load(pki.cas[ca].cert_path)],
                               allow_fetching=True, revocation_mode="hard-fail",
                               revinfo_policy=policy, fetchers=backend.get_fetchers())
        validator = CertificateValidator(load(cert.path), validation_context=vc)
        try:
            await validator.async_validate_usage(set())
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc
        finally:
            await backend.close()
        return None

    return asyncio.run(go())


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("ca", ["rsa-ca", "ec-ca"])
async def test_pyhanko_certvalidator_hard_fail(live: dict[str, Any], ca: str) -> None:
    pki = live["pki"]
    good = pick(pki, "good", ca)
    assert await threads.deferToThread(_pyhanko_validate, pki, good, ca) is None
    revoked = next(c for c in pki.certs if c.ca == ca and c.state == "revoked"
                   and c.reason not in (None, "unspecified"))
    error = await threads.deferToThread(_pyhanko_validate, pki, revoked, ca)
    assert error is not None and type(error).__name__ == "RevokedError", repr(error)
    assert "OCSP response" in str(error)
    assert CRLReason(revoked.reason).human_friendly in str(error), str(error)
