"""Nonce requests answered from a cached answer's pre-encoded parts (issue 12t).

A nonce request whose CertIDs have a live cached answer is signed from that answer's
responses SEQUENCE with a new producedAt and its own nonce: one signature, no store read.
Checked here on both store engines: the answer is the cached one's SingleResponses, signed by
the delegated signer, with the request's nonce and second; a revocation through the change
feed voids the parts (never a stale "good"); through a real listener with a real signing
process, concurrent nonce requests, a revocation, and ``openssl ocsp`` (nonce checked).
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from asn1crypto import ocsp as asn1_ocsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as c_ocsp
from twisted.internet import defer, reactor, threads

from server.feed import ChangeFeed
from server.http.site import make_http_factory
from server.ocsp.service import OcspService
from server.ocsp.signing import ProcessSigners
from server.ocsp.signworker import frame, split_frames
from server.storeaccess import StoreAccess
from store import open_store
from store.model import CaId, RevocationReason, Serial
from tests.conftest import require_tool
from tests.ocsp.helpers import (
    answer,
    T0,
    WallClock,
    config_for,
    fill_store,
    make_ca,
    request_der,
)
from tests.ocsp.test_overload import HeldSigners, exchange, read_reply, send


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _drain() -> None:
    """Run the global cooperator's pending work (the pre-signing) now: no reactor here."""
    from twisted.internet import task

    coop = task._theCooperator  # noqa: SLF001
    while coop._tasks:  # noqa: SLF001
        coop._tick()  # noqa: SLF001


def make_env(tmp_path: Path, location: str, **signer_kw: Any) -> dict[str, Any]:
    ca = make_ca(tmp_path / "parts", "parts")
    for serial in (1, 2, 3):
        ca.subscriber(serial)
    store = open_store(location)
    ca_id = fill_store(store, ca, T0)
    clock = Clock(T0 + timedelta(minutes=5))
    service = OcspService(config_for(ca, **signer_kw), store, clock)
    feed = ChangeFeed(store)
    feed.prime()
    feed.subscribe(service.on_changes)
    return {"ca": ca, "store": store, "clock": clock, "service": service, "ca_id": ca_id,
            "feed": feed}


@pytest.fixture
def env(tmp_path: Path, store_location: str) -> Iterator[dict[str, Any]]:
    e = make_env(tmp_path, store_location)
    yield e
    e["store"].close()


@pytest.fixture
def env_extended(tmp_path: Path, store_location: str) -> Iterator[dict[str, Any]]:
    e = make_env(tmp_path, store_location, unknown_serials="revoked")
    yield e
    e["store"].close()


def loaded(der: bytes) -> c_ocsp.OCSPResponse:
    resp = c_ocsp.load_der_ocsp_response(der)
    assert resp.response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL
    return resp


def nonce_of(resp: c_ocsp.OCSPResponse) -> bytes | None:
    try:
        return resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


def tbs(der: bytes) -> Any:
    """asn1crypto's tbsResponseData of a successful response."""
    parsed = asn1_ocsp.OCSPResponse.load(der, strict=True)
    return parsed["response_bytes"]["response"].parsed["tbs_response_data"]


def extension_ids(der: bytes) -> list[str]:
    exts = tbs(der)["response_extensions"]
    return [e["extn_id"].native for e in exts] if exts.native else []


def verified(der: bytes, ca: Any) -> c_ocsp.OCSPResponse:
    """The response, after checking its signature with the delegated signer's key."""
    resp = loaded(der)
    ca.signer_cert.public_key().verify(resp.signature, resp.tbs_response_bytes,
                                       ec.ECDSA(hashes.SHA256()))
    assert resp.certificates[0] == ca.signer_cert
    return resp


def revoke(e: dict[str, Any], serial: int) -> None:
    with e["store"].batch(T0) as b:
        b.revoke(CaId(e["ca_id"]), Serial(serial), T0, RevocationReason.KEY_COMPROMISE,
                 "t", "t")


# --- service level, both engines --------------------------------------------------------------


@pytest.mark.parametrize("presigned", [False, True], ids=["voided", "presigned"])
def test_nonce_after_a_revocation_through_the_feed_is_revoked(env: dict[str, Any],
                                                              presigned: bool) -> None:
    """The parts a nonce answer is signed from are voided by the change feed: the next
    nonce answer says revoked (computed again, or from the re-signed answer's parts once
    the pre-signing ran), with its own nonce; never the stale good."""
    service, ca = env["service"], env["ca"]
    first = answer(service, request_der(ca, [2], nonce=b"one" * 8))
    parts = answer(service, request_der(ca, [2], nonce=b"two" * 8))
    assert parts.cache == "nonce" and loaded(parts.der).certificate_status == (
        c_ocsp.OCSPCertStatus.GOOD)
    assert first.statuses == ("good",)
    revoke(env, 2)
    env["feed"].poll()
    if presigned:
        _drain()
        assert service.presigned >= 1
    for nonce in (b"three" * 4, b"four" * 5):
        out = answer(service, request_der(ca, [2], nonce=nonce))
        assert out.status == "successful" and out.statuses == ("revoked",)
        resp = verified(out.der, ca)
        assert resp.certificate_status == c_ocsp.OCSPCertStatus.REVOKED
        assert resp.revocation_reason is x509.ReasonFlags.key_compromise
        assert nonce_of(resp) == nonce
    # the others' parts stay: serial 1 is still answered good from its parts
    answer(service, request_der(ca, [1], nonce=b"a" * 16))
    again = answer(service, request_der(ca, [1], nonce=b"b" * 16))
    assert again.statuses == ("good",) and nonce_of(loaded(again.der)) == b"b" * 16


def check_from_parts(e: dict[str, Any], serials: list[int], extended: bool) -> None:
    service, ca, clock = e["service"], e["ca"], e["clock"]
    answer(service, request_der(ca, serials, nonce=b"first-nonce-0001"))
    plain = answer(service, request_der(ca, serials))  # the answer kept without the nonce
    assert plain.cache == "hit" and nonce_of(loaded(plain.der)) is None
    env_store = e["store"]
    env_store.close()  # from here on a store read would fail: these come from the parts
    for i, nonce in enumerate((b"\x00", b"n" * 32, bytes(range(128)))):
        clock.now = T0 + timedelta(minutes=7, seconds=i, microseconds=654321)
        out = answer(service, request_der(ca, serials, nonce=nonce))
        assert out.status == "successful" and out.cache == "nonce" and out.nonce
        assert out.serials == tuple(serials)
        resp = verified(out.der, ca)
        assert nonce_of(resp) == nonce
        assert resp.produced_at_utc == clock.now.replace(microsecond=0)
        # the SingleResponses are the cached plain answer's, byte for byte
        assert tbs(out.der)["responses"].dump() == tbs(plain.der)["responses"].dump()
        assert tbs(out.der)["responder_id"].dump() == tbs(plain.der)["responder_id"].dump()
        wanted = ["nonce", "extended_revoke"] if extended else ["nonce"]
        assert extension_ids(out.der) == wanted
        assert extension_ids(plain.der) == wanted[1:]


@pytest.mark.parametrize("serials", [[1], [1, 2, 3]])
def test_nonce_answer_from_parts_is_the_cached_answer_signed_anew(
        env: dict[str, Any], serials: list[int]) -> None:
    check_from_parts(env, serials, extended=False)


def test_nonce_answer_from_parts_keeps_extended_revoke(env_extended: dict[str, Any]) -> None:
    """unknown_serials = "revoked": every answer carries the extended-revoke extension
    (RFC 6960 §4.4.8), those signed from parts too."""
    check_from_parts(env_extended, [1, 3], extended=True)


def test_nonce_answer_from_parts_of_a_revoked_certificate(env: dict[str, Any]) -> None:
    service, ca = env["service"], env["ca"]
    revoke(env, 3)
    env["feed"].poll()
    answer(service, request_der(ca, [3], nonce=b"x" * 20))
    out = answer(service, request_der(ca, [3], nonce=b"y" * 20))
    assert out.cache == "nonce"
    resp = verified(out.der, ca)
    assert resp.certificate_status == c_ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_time_utc == T0
    assert resp.revocation_reason is x509.ReasonFlags.key_compromise
    assert nonce_of(resp) == b"y" * 20


def test_split_frames_keeps_a_partial_frame() -> None:
    messages = [("nonce", 1, b"\x00" * 300), ("signed", 2, "x"), None, {"k": [1, 2]},
                ("nonce", 3, b"")]
    data = b"".join(frame(m) for m in messages)
    buf = bytearray()
    got: list[Any] = []
    ends = set()
    offset = 0
    for m in messages:
        offset += len(frame(m))
        ends.add(offset)
    for i in range(len(data)):
        buf += data[i:i + 1]
        out = split_frames(buf)
        if i + 1 in ends:
            assert len(out) == 1 and not buf  # a whole frame: returned, nothing left
        else:
            assert out == [] and len(buf) > 0  # a partial frame: kept
        got += out
    assert got == messages
    # several whole frames and a partial one at once: the whole ones, in order
    buf = bytearray(data + frame(("tail", 9))[:5])
    assert split_frames(buf) == messages and bytes(buf) == frame(("tail", 9))[:5]


# --- a real listener with a real signing process -----------------------------------------------


async def _serve(tmp_path: Path, location: str, processes: int = 1,
                 **signer_kw: Any) -> dict[str, Any]:
    pg = location.startswith("postgresql")
    clock = WallClock()
    ca = make_ca(tmp_path / "pki", "web", at=clock.now)
    for serial in (1, 2, 3):
        ca.subscriber(serial)
    store = open_store(location)
    ca_id = fill_store(store, ca, clock.now - timedelta(seconds=30))
    # threaded store reads for PostgreSQL as in production; inline when signing in-process
    # (HeldSigners computes on the reactor thread)
    access = StoreAccess(location, 2 if pg and processes else 0, store=store)
    access.start()
    feed = ChangeFeed(access.store, access=access)
    feed.generation = store.generation()  # prime (access.store answers in its threads only)
    config = config_for(ca, **signer_kw)
    config = dataclasses.replace(config, http=dataclasses.replace(
        config.http, signing_processes=processes))
    site = make_http_factory(config, store, feed, clock, reactor, access=access)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    queue = site.service.signing
    assert isinstance(queue.executor, ProcessSigners) == (processes > 0)
    # count what the signing process signs from parts (the real call, passed through)
    from_parts: list[bytes] = []
    real = queue.executor.sign_nonce

    def sign_nonce(entry: Any, nonce: bytes, now: Any) -> Any:
        from_parts.append(nonce)
        return real(entry, nonce, now)

    queue.executor.sign_nonce = sign_nonce  # type: ignore[method-assign]
    return {"ca": ca, "port": port.getHost().port, "site": site, "store": store,
            "access": access, "listening": port, "queue": queue, "feed": feed,
            "ca_id": ca_id, "from_parts": from_parts, "clock": clock}


async def _stop(e: dict[str, Any]) -> None:
    await e["listening"].stopListening()
    await defer.maybeDeferred(e["queue"].stop)  # the signing process has ended
    e["access"].stop()
    e["store"].close()
    children = getattr(e["queue"].executor, "children", ())  # none when signing in-process
    assert all(c is None or c.ended for c in children)  # no signing process outlives


async def poll(e: dict[str, Any]) -> None:
    d = e["feed"].poll()
    if d is not None:
        await d


def ask(e: dict[str, Any], serial: int, nonce: bytes) -> c_ocsp.OCSPResponse:
    return verified(exchange(e["port"], request_der(e["ca"], [serial], nonce=nonce)), e["ca"])


@pytest_twisted.ensureDeferred
async def test_concurrent_nonce_requests_then_a_revocation(tmp_path: Path,
                                                           store_location: str) -> None:
    e = await _serve(tmp_path, store_location)
    try:
        first = await threads.deferToThread(ask, e, 1, b"prime-the-parts!")
        assert first.certificate_status == c_ocsp.OCSPCertStatus.GOOD
        plain = await threads.deferToThread(exchange, e["port"], request_der(e["ca"], [1]))
        responses = tbs(plain)["responses"].dump()
        nonces = [b"%04d" % i + bytes([i]) * (4 + i % 20) for i in range(50)]

        def one(nonce: bytes) -> tuple[bytes, bytes | None, bytes, Any]:
            der = exchange(e["port"], request_der(e["ca"], [1], nonce=nonce))
            resp = verified(der, e["ca"])
            return nonce, nonce_of(resp), tbs(der)["responses"].dump(), resp.certificate_status

        def burst() -> list[Any]:
            with ThreadPoolExecutor(50) as pool:
                return list(pool.map(one, nonces))

        for sent, got, singles, status in await threads.deferToThread(burst):
            assert got == sent and singles == responses
            assert status == c_ocsp.OCSPCertStatus.GOOD
        assert sorted(e["from_parts"]) == sorted(nonces)  # each one signed from the parts
        assert e["queue"].held == 0

        revoke(e, 1)
        await poll(e)
        for nonce in (b"after-revocation-1", b"after-revocation-2"):
            resp = await threads.deferToThread(ask, e, 1, nonce)
            assert resp.certificate_status == c_ocsp.OCSPCertStatus.REVOKED
            assert resp.revocation_reason is x509.ReasonFlags.key_compromise
            assert nonce_of(resp) == nonce
        assert e["queue"].executor.started == 1  # the signing process never died
    finally:
        await _stop(e)


@pytest_twisted.ensureDeferred
async def test_openssl_ocsp_nonce_twice_second_from_parts(tmp_path: Path,
                                                          store_location: str) -> None:
    openssl = require_tool("openssl")
    e = await _serve(tmp_path, store_location, unknown_serials="revoked")
    try:
        ca = e["ca"]
        cert = ca.folder / "s2.pem"
        cert.write_bytes(ca.certs[2].public_bytes(serialization.Encoding.PEM))
        cmd = [openssl, "ocsp", "-issuer", str(ca.cert_path), "-cert", str(cert),
               "-url", f"http://127.0.0.1:{e['port']}/ocsp", "-CAfile", str(ca.cert_path),
               "-resp_text"]
        for run in range(2):
            answer = tmp_path / f"resp{run}.der"
            r = await threads.deferToThread(subprocess.run, [*cmd, "-respout", str(answer)],
                                            capture_output=True, text=True, timeout=30)
            out = r.stdout + r.stderr
            assert r.returncode == 0, out
            assert "Response verify OK" in out and ": good" in out, out
            assert "WARNING" not in out, out  # e.g. no nonce in response / nonce verify error
            assert "OCSP Nonce" in out, out
            assert len(e["from_parts"]) == run  # the first computed, the second from parts
            der = answer.read_bytes()
            assert extension_ids(der) == ["nonce", "extended_revoke"]
            assert verified(der, ca).certificate_status == c_ocsp.OCSPCertStatus.GOOD
    finally:
        await _stop(e)


@pytest_twisted.ensureDeferred
async def test_nonce_jobs_waiting_when_a_revocation_comes_are_answered_revoked(
        tmp_path: Path, store_location: str) -> None:
    """Nonce jobs queued with the parts of a good answer; the certificate is revoked while
    they wait: the one already signing may say good (signed before the change), those
    handed over after it say revoked (the parts are looked up again at dispatch)."""
    from twisted.internet.task import deferLater

    e = await _serve(tmp_path, store_location, processes=0)
    queue = e["queue"]
    held = HeldSigners(queue.executor, slots=1)
    held.on_free = queue._dispatch  # noqa: SLF001 - as test_overload's env does
    queue.executor = held
    e["held"] = held

    async def settle() -> None:
        await deferLater(reactor, 0.2, lambda: None)

    try:
        ca, port = e["ca"], e["port"]
        first = threads.deferToThread(exchange, port, request_der(ca, [3], nonce=b"p" * 16))
        await settle()
        held.release()
        assert loaded(await first).certificate_status == c_ocsp.OCSPCertStatus.GOOD
        nonces = [b"wait-%02d-nonce" % i for i in range(4)]
        socks = []
        for nonce in nonces:
            socks.append(await threads.deferToThread(
                send, port, request_der(ca, [3], nonce=nonce)))
            await settle()
        assert queue.held == 4 and len(held.held) == 1  # one signing, three waiting
        # the prime computed in full, the first waiting one signed from its parts
        assert e["from_parts"] == nonces[:1] and held.order == [3, 3]
        revoke(e, 3)
        await poll(e)
        held.release()
        answers = [verified(await threads.deferToThread(read_reply, s), ca) for s in socks]
        assert [nonce_of(a) for a in answers] == nonces
        statuses = [a.certificate_status for a in answers]
        assert statuses[1:] == [c_ocsp.OCSPCertStatus.REVOKED] * 3, statuses
        assert queue.held == 0
    finally:
        held.release()
        await _stop(e)
