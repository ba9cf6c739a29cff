"""Signed OCSP requests (RFC 6960 §4.1.2) under ``[http] request_signatures``.

Requests are signed here with asn1crypto + cryptography (RSA PKCS#1 v1.5 and PSS, ECDSA,
Ed25519), once through the real HTTP listener and once by ``openssl ocsp -signer``.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from asn1crypto import algos, core
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp as c_ocsp
from twisted.internet import reactor, threads
from twisted.logger import capturedLogs

from server.configtools import ConfigError, Section
from server.ocsp.config import parse_http
from server.http.accesslog import lines as access_lines
from server.http.site import make_http_factory
from server.ocsp.service import OcspService
from store.model import CaId, RevocationReason, Serial
from store.sqlite import Store
from tests.conftest import require_tool
from tests.ocsp.helpers import (
    answer,
    DAY,
    T0,
    MiniCa,
    config_for,
    fill_store,
    issue,
    make_ca,
    name,
    new_key,
    request_der,
    write_cert,
    write_key,
)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def requestor(ca: MiniCa, kind: str, serial: int, *, not_after: datetime = T0 + 365 * DAY,
              email: str | None = None, key_usage: bool | None = None,
              ) -> tuple[x509.Certificate, Any]:
    """A requestor certificate (and its key) issued by ca."""
    key = new_key(kind)
    cert = issue(name(f"Requestor {serial}"), key.public_key(), (ca.cert, ca.key), serial=serial,
                 not_before=T0 - 30 * DAY, not_after=not_after, email=email)
    if key_usage is not None:  # re-issue with a keyUsage extension
        b = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
             .public_key(key.public_key()).serial_number(serial)
             .not_valid_before(cert.not_valid_before_utc).not_valid_after(not_after)
             .add_extension(x509.KeyUsage(key_usage, False, not key_usage, False, False, False,
                                          False, False, False), critical=True))
        cert = b.sign(ca.key, hashes.SHA256())
    return cert, key


def _algorithm(key: Any, pss: bool) -> tuple[algos.SignedDigestAlgorithm, Any]:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return algos.SignedDigestAlgorithm({"algorithm": "ed25519"}), key.sign
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return (algos.SignedDigestAlgorithm({"algorithm": "sha384_ecdsa"}),
                lambda data: key.sign(data, ec.ECDSA(hashes.SHA384())))
    assert isinstance(key, rsa.RSAPrivateKey)
    if pss:
        params = algos.RSASSAPSSParams({
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            "salt_length": 32})
        return (algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": params}),
                lambda data: key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                      hashes.SHA256()))
    return (algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa"}),
            lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256()))


def signed(ca: MiniCa, serials: list[int], cert: x509.Certificate | None, key: Any, *,
           pss: bool = False, requestor_name: Any = "subject", nonce: bytes | None = None,
           tamper: bool = False, algorithm: algos.SignedDigestAlgorithm | None = None) -> bytes:
    """A DER OCSPRequest signed by key, carrying cert (None: no certs)."""
    unsigned = asn1_ocsp.OCSPRequest.load(request_der(ca, serials, nonce=nonce))
    tbs_fields: dict[str, Any] = {"request_list": unsigned["tbs_request"]["request_list"]}
    if nonce is not None:
        tbs_fields["request_extensions"] = unsigned["tbs_request"]["request_extensions"]
    if isinstance(requestor_name, str) and requestor_name == "subject":
        assert cert is not None
        tbs_fields["requestor_name"] = asn1_x509.GeneralName(
            name="directory_name", value=asn1_x509.Name.load(cert.subject.public_bytes()))
    elif requestor_name is not None:
        tbs_fields["requestor_name"] = requestor_name
    tbs = asn1_ocsp.TBSRequest(tbs_fields)
    alg, sign = _algorithm(key, pss)
    signature = sign(tbs.dump())
    if tamper:
        signature = signature[:-1] + bytes([signature[-1] ^ 1])
    sig: dict[str, Any] = {"signature_algorithm": algorithm or alg, "signature": signature}
    if cert is not None:
        sig["certs"] = [asn1_x509.Certificate.load(
            cert.public_bytes(serialization.Encoding.DER))]
    return bytes(asn1_ocsp.OCSPRequest({"tbs_request": tbs, "optional_signature": sig}).dump())


def statuses(der: bytes) -> list[c_ocsp.OCSPCertStatus]:
    return [r.certificate_status for r in c_ocsp.load_der_ocsp_response(der).responses]


def with_mode(config: Any, mode: str) -> Any:
    return dataclasses.replace(config, http=dataclasses.replace(config.http,
                                                                request_signatures=mode))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ca = make_ca(tmp_path / "pki", "sig")
    for serial in (1, 2):
        ca.subscriber(serial)
    revoked_cert, revoked_key = requestor(ca, "p256", 0x77)
    ca.certs[0x77] = revoked_cert  # in the store, then revoked there
    store = Store.open(tmp_path / "store.sqlite3")
    ca_id = fill_store(store, ca, T0)
    with store.batch(T0) as b:
        b.revoke(CaId(ca_id), Serial(0x77), T0, RevocationReason.KEY_COMPROMISE, "t", "t")
    clock = Clock(T0 + timedelta(minutes=5))

    def service(mode: str) -> OcspService:
        return OcspService(with_mode(config_for(ca), mode), store, clock)

    yield {"ca": ca, "store": store, "clock": clock, "service": service,
           "revoked": (revoked_cert, revoked_key)}
    store.close()


# --- verify ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "pss"), [("rsa", False), ("rsa", True), ("p256", False),
                                           ("ed25519", False)])
def test_good_signature_is_answered(env: dict[str, Any], kind: str, pss: bool) -> None:
    cert, key = requestor(env["ca"], kind, 0x50)
    out = answer(env["service"]("verify"), signed(env["ca"], [1], cert, key, pss=pss))
    assert out.status == "successful", out.reason
    assert statuses(out.der) == [c_ocsp.OCSPCertStatus.GOOD]


def test_bad_signature_is_unauthorized_even_with_a_cached_response(env: dict[str, Any]) -> None:
    service = env["service"]("verify")
    assert answer(service, request_der(env["ca"], [1])).status == "successful"  # now cached
    cert, key = requestor(env["ca"], "p256", 0x51)
    for _ in range(2):
        out = answer(service, signed(env["ca"], [1], cert, key, tamper=True))
        assert (out.status, out.cache) == ("unauthorized", "-")
        assert out.reason == "request signature does not verify with requestor certificate" \
            " serial 0x51"
    # A signature made for another request does not verify either.
    good = asn1_ocsp.OCSPRequest.load(signed(env["ca"], [1], cert, key))
    other = asn1_ocsp.OCSPRequest.load(signed(env["ca"], [2], cert, key))
    spliced = asn1_ocsp.OCSPRequest({"tbs_request": other["tbs_request"],
                                     "optional_signature": good["optional_signature"]}).dump()
    assert answer(service, spliced).status == "unauthorized"


def test_requestor_certificate_of_an_unconfigured_ca_is_unauthorized(
        env: dict[str, Any], tmp_path: Path) -> None:
    stranger = make_ca(tmp_path / "stranger", "sig")  # same name, another key
    cert, key = requestor(stranger, "p256", 0x52)
    out = answer(env["service"]("verify"), signed(env["ca"], [1], cert, key))
    assert out.status == "unauthorized"
    assert out.reason is not None and "not issued by a configured CA" in out.reason


def test_expired_requestor_certificate_is_unauthorized(env: dict[str, Any]) -> None:
    cert, key = requestor(env["ca"], "p256", 0x53, not_after=T0 - DAY)
    out = answer(env["service"]("verify"), signed(env["ca"], [1], cert, key))
    assert out.status == "unauthorized" and "is not valid now" in (out.reason or "")


def test_missing_requestor_certificate_is_unauthorized(env: dict[str, Any]) -> None:
    _, key = requestor(env["ca"], "p256", 0x54)
    out = answer(env["service"]("verify"), signed(env["ca"], [1], None, key,
                                                  requestor_name=None))
    assert out.status == "unauthorized" and "no requestor certificate" in (out.reason or "")


def test_revoked_requestor_certificate_is_unauthorized(env: dict[str, Any]) -> None:
    cert, key = env["revoked"]
    out = answer(env["service"]("verify"), signed(env["ca"], [1], cert, key))
    assert out.status == "unauthorized" and out.reason is not None
    assert out.reason.endswith("is revoked")


def test_key_usage_without_digital_signature_is_unauthorized(env: dict[str, Any]) -> None:
    service = env["service"]("verify")
    cert, key = requestor(env["ca"], "p256", 0x55, key_usage=False)
    assert answer(service, signed(env["ca"], [1], cert, key)).status == "unauthorized"
    cert, key = requestor(env["ca"], "p256", 0x56, key_usage=True)
    assert answer(service, signed(env["ca"], [1], cert, key)).status == "successful"


def test_requestor_name_must_name_the_certificate(env: dict[str, Any]) -> None:
    service = env["service"]("verify")
    cert, key = requestor(env["ca"], "p256", 0x57, email="req@example.test")
    ca = env["ca"]
    someone = asn1_x509.GeneralName(name="directory_name", value=asn1_x509.Name.build(
        {"country_name": "MO", "common_name": "Someone else"}))
    assert answer(service, signed(ca, [1], cert, key, requestor_name=someone)).status \
        == "unauthorized"
    other_mail = asn1_x509.GeneralName(name="rfc822_name", value="other@example.test")
    assert answer(service, signed(ca, [1], cert, key, requestor_name=other_mail)).status \
        == "unauthorized"
    own_mail = asn1_x509.GeneralName(name="rfc822_name", value="req@example.test")
    for rname in ("subject", own_mail, None):  # the subject, a subjectAltName, or no name
        assert answer(service, signed(ca, [1], cert, key, requestor_name=rname)).status \
            == "successful", rname


def test_weak_or_unknown_algorithms_are_unauthorized(env: dict[str, Any]) -> None:
    service = env["service"]("verify")
    cert, key = requestor(env["ca"], "rsa", 0x58)
    tbs = asn1_ocsp.OCSPRequest.load(signed(env["ca"], [1], cert, key))["tbs_request"]
    sha1 = key.sign(tbs.dump(), padding.PKCS1v15(), hashes.SHA1())
    req = asn1_ocsp.OCSPRequest({"tbs_request": tbs, "optional_signature": {
        "signature_algorithm": {"algorithm": "sha1_rsa"}, "signature": sha1,
        "certs": [asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))]}})
    out = answer(service, req.dump())
    assert out.status == "unauthorized" and "sha1 is not accepted" in (out.reason or "")
    # An ECDSA algorithm with an RSA certificate.
    out = answer(service, signed(env["ca"], [1], cert, key,
                                 algorithm=algos.SignedDigestAlgorithm({"algorithm":
                                                                        "sha256_ecdsa"})))
    assert out.status == "unauthorized"
    # An algorithm asn1crypto does not know.
    odd = algos.SignedDigestAlgorithm({"algorithm": "1.2.3.4.5"})
    out = answer(service, signed(env["ca"], [1], cert, key, algorithm=odd))
    assert out.status == "unauthorized" and "1.2.3.4.5" in (out.reason or "")


def test_malformed_signature_structure_is_malformed_request(env: dict[str, Any]) -> None:
    cert, key = requestor(env["ca"], "rsa", 0x59)
    # rsassa_pss whose parameters are an INTEGER instead of RSASSA-PSS-params.
    good = signed(env["ca"], [1], cert, key, pss=True)
    req = asn1_ocsp.OCSPRequest.load(good)
    body = bytes.fromhex("06092a864886f70d01010a") + core.Integer(7).dump()  # id-RSASSA-PSS
    broken_alg = bytes((0x30, len(body))) + body
    sig = req["optional_signature"]
    rebuilt = asn1_ocsp.OCSPRequest({"tbs_request": req["tbs_request"], "optional_signature": {
        "signature_algorithm": algos.SignedDigestAlgorithm.load(broken_alg),
        "signature": sig["signature"].native, "certs": sig["certs"]}}).dump()
    assert broken_alg in rebuilt
    assert answer(env["service"]("verify"), rebuilt).status == "malformed_request"
    assert answer(env["service"]("ignore"), rebuilt).status == "successful"


def test_cached_signed_bytes_are_checked_again(env: dict[str, Any]) -> None:
    service, clock = env["service"]("verify"), env["clock"]
    cert, key = requestor(env["ca"], "p256", 0x5A, not_after=T0 + timedelta(hours=1))
    der = signed(env["ca"], [1], cert, key)
    first = answer(service, der)
    assert (first.status, first.cache) == ("successful", "miss")
    again = answer(service, der)  # the response is cached by CertIDs, after the check
    assert (again.status, again.cache, again.der) == ("successful", "hit", first.der)
    assert service.ready(der, clock.now) is None  # never under its raw bytes
    clock.now = T0 + timedelta(hours=2)  # the requestor certificate has expired
    late = answer(service, der)
    assert late.status == "unauthorized" and "is not valid now" in (late.reason or "")


def test_require_refuses_unsigned_requests(env: dict[str, Any]) -> None:
    service = env["service"]("require")
    for _ in range(2):
        out = answer(service, request_der(env["ca"], [1]))
        assert (out.status, out.cache) == ("sign_required", "-")
    cert, key = requestor(env["ca"], "ed25519", 0x5B)
    assert answer(service, signed(env["ca"], [1], cert, key)).status == "successful"
    assert answer(service, signed(env["ca"], [1], cert, key, tamper=True)).status \
        == "unauthorized"
    assert answer(service, request_der(env["ca"], [1])).status == "sign_required"


def test_ignore_keeps_accepting_any_signature(env: dict[str, Any]) -> None:
    service = env["service"]("ignore")
    cert, key = requestor(env["ca"], "p256", 0x5C, not_after=T0 - DAY)
    der = signed(env["ca"], [1], cert, key, tamper=True)
    out = answer(service, der)
    assert out.status == "successful" and out.cache == "miss"
    assert answer(service, der).cache == "hit"
    assert service.ready(der, env["clock"].now) is not None  # raw bytes cached, as before
    assert answer(service, request_der(env["ca"], [1])).status == "successful"


def test_config_key() -> None:
    assert parse_http(Section({}, "http")).request_signatures == "ignore"
    assert parse_http(Section({"request_signatures": "require"}, "http")).request_signatures \
        == "require"
    with pytest.raises(ConfigError, match=r"http\.request_signatures"):
        parse_http(Section({"request_signatures": "strict"}, "http"))


# --- through the real listener ------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[dict[str, Any]]:
    now = datetime.now(UTC).replace(microsecond=0)
    ca = make_ca(tmp_path / "pki", "live", at=now)
    ca.subscriber(1)
    store = Store.open(tmp_path / "store.sqlite3")
    fill_store(store, ca, now - timedelta(seconds=30))
    site = make_http_factory(with_mode(config_for(ca), "require"), store, None,
                             lambda: datetime.now(UTC), reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    key = new_key("p256")
    cert = issue(name("Live requestor"), key.public_key(), (ca.cert, ca.key), serial=0x60,
                 not_before=now - DAY, not_after=now + DAY)
    yield {"ca": ca, "port": port.getHost().port, "cert": cert, "key": key,
           "folder": tmp_path, "site": site}
    pytest_twisted.blockon(port.stopListening())
    store.close()


def post(port: int, body: bytes) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/ocsp", body=body,
                     headers={"Content-Type": "application/ocsp-request"})
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read()
    finally:
        conn.close()


def response_status(der: bytes) -> str:
    return str(asn1_ocsp.OCSPResponse.load(der)["response_status"].native)


@pytest_twisted.ensureDeferred
async def test_http_listener_checks_signatures_and_logs_the_reason(live: dict[str, Any]) -> None:
    ca, port = live["ca"], live["port"]
    good = signed(ca, [1], live["cert"], live["key"])
    bad = signed(ca, [1], live["cert"], live["key"], tamper=True)
    with capturedLogs() as events:
        ok = await threads.deferToThread(post, port, good)
        refused = await threads.deferToThread(post, port, bad)
        unsigned = await threads.deferToThread(post, port, request_der(ca, [1]))
        live["site"].access.flush()  # lines are written in batches, FLUSH_DELAY apart
    assert statuses(ok) == [c_ocsp.OCSPCertStatus.GOOD]
    assert response_status(refused) == "unauthorized"
    assert response_status(unsigned) == "sign_required"
    lines = access_lines(events)
    assert [(e["ocsp"], e.get("reason")) for e in lines] == [
        ("successful", None),
        ("unauthorized", ("request signature does not verify with requestor certificate"
                          " serial 0x60")),
        ("sigRequired", "request signatures are required; the request is unsigned")]
    for e in events:  # neither the request body nor key material reaches the log
        assert not any(isinstance(v, bytes) and (good in v or bad in v) for v in e.values())


@pytest_twisted.ensureDeferred
async def test_openssl_ocsp_signer(live: dict[str, Any]) -> None:
    openssl = require_tool("openssl")
    ca, folder = live["ca"], live["folder"]
    signer = write_cert(folder / "requestor.pem", live["cert"])
    signkey = write_key(folder / "requestor.key", live["key"])
    subscriber = write_cert(folder / "sub1.pem", ca.certs[1])
    base = [openssl, "ocsp", "-issuer", str(ca.cert_path), "-cert", str(subscriber),
            "-CAfile", str(ca.cert_path), "-url", f"http://127.0.0.1:{live['port']}/ocsp"]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60,
                              check=False)

    r = await threads.deferToThread(run, "-signer", str(signer), "-signkey", str(signkey))
    assert r.returncode == 0, r.stderr
    assert "Response verify OK" in r.stderr and f"{subscriber}: good" in r.stdout
    r = await threads.deferToThread(run)  # unsigned
    assert "sigrequired" in (r.stdout + r.stderr).lower(), (r.stdout, r.stderr)


def test_hostile_pss_parameters_are_refused_not_internal_errors(env: dict[str, Any]) -> None:
    cert, key = requestor(env["ca"], "rsa", 0x5D)
    for salt in (-1, 10**6):
        params = algos.RSASSAPSSParams({
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            "salt_length": salt})
        alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": params})
        out = answer(env["service"]("verify"), signed(env["ca"], [1], cert, key, pss=True,
                                                      algorithm=alg))
        assert out.status == "unauthorized", (salt, out.reason)
