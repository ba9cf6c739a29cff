"""The service and its cache: hits, misses, invalidation by the change feed, re-signing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as c_ocsp

from server.feed import ChangeFeed
from server.ocsp.cache import CachedResponse, ResponseCache
from server.http.site import cooperate_slices
from server.ocsp.service import OcspService
from store import open_store
from store.model import CaId, Change, Generation, RevocationReason, Serial
from store.sqlite import Store
from tests.ocsp.helpers import answer, DAY, T0, config_for, fill_store, make_ca, request_der


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def env(tmp_path: Path, store_location: str) -> Iterator[dict[str, Any]]:
    ca = make_ca(tmp_path / "svc", "svc")
    for serial in (1, 2, 3):
        ca.subscriber(serial)
    store = open_store(store_location)  # each test once per engine (SQLite, PostgreSQL)
    ca_id = fill_store(store, ca, T0)
    clock = Clock(T0 + timedelta(minutes=5))
    # re-signing a slice at a time on Twisted's cooperator, as the server runs it
    service = OcspService(config_for(ca), store, clock, schedule=cooperate_slices)
    yield {"ca": ca, "store": store, "clock": clock, "service": service, "ca_id": ca_id}
    store.close()


def status_of(der: bytes) -> list[c_ocsp.OCSPCertStatus]:
    resp = c_ocsp.load_der_ocsp_response(der)
    return [r.certificate_status for r in resp.responses]


def verify_response(resp: c_ocsp.OCSPResponse, ca: Any) -> None:
    ca.signer_cert.public_key().verify(resp.signature, resp.tbs_response_bytes,
                                       ec.ECDSA(hashes.SHA256()))


def test_response_is_signed_by_the_delegated_signer(env: dict[str, Any]) -> None:
    out = answer(env["service"], request_der(env["ca"], [1]))
    resp = c_ocsp.load_der_ocsp_response(out.der)
    verify_response(resp, env["ca"])
    assert resp.certificates[0] == env["ca"].signer_cert
    assert out.status == "successful" and out.statuses == ("good",) and out.serials == (1,)
    assert out.cache == "miss" and out.etag and out.this_update == T0


def test_second_request_is_a_hit_with_identical_bytes(env: dict[str, Any]) -> None:
    service, der = env["service"], request_der(env["ca"], [1])
    first = answer(service, der)
    env["clock"].now += timedelta(hours=1)
    second = answer(service, der)
    assert second.cache == "hit" and second.der == first.der
    assert service.cache.hits == 1


def test_same_certids_spelled_differently_share_the_entry(env: dict[str, Any]) -> None:
    from asn1crypto import ocsp

    service, der = env["service"], request_der(env["ca"], [1])
    first = answer(service, der)
    req = ocsp.OCSPRequest.load(der)
    other = ocsp.OCSPRequest({"tbs_request": {
        "requestor_name": {"rfc822_name": "someone@example.test"},
        "request_list": req["tbs_request"]["request_list"]}}).dump()
    again = answer(service, other)
    assert again.cache == "hit" and again.der == first.der


def test_nonce_requests_are_signed_each_time(env: dict[str, Any]) -> None:
    service = env["service"]
    a = answer(service, request_der(env["ca"], [1], nonce=b"a" * 32))
    b = answer(service, request_der(env["ca"], [1], nonce=b"b" * 32))
    assert a.cache == b.cache == "nonce" and a.nonce and a.etag is None
    assert c_ocsp.load_der_ocsp_response(a.der).extensions.get_extension_for_class(
        x509.OCSPNonce).value.nonce == b"a" * 32
    # the first one also kept the answer without the nonce, under the CertIDs and under
    # the plain request for them: a request without a nonce is a hit ...
    assert len(service.cache) == 2
    plain = answer(service, request_der(env["ca"], [1]))
    assert plain.cache == "hit" and not plain.nonce
    with pytest.raises(x509.ExtensionNotFound):
        c_ocsp.load_der_ocsp_response(plain.der).extensions.get_extension_for_class(
            x509.OCSPNonce)
    # ... and the second nonce answer was signed from its parts: the same SingleResponse,
    # its own nonce, a valid signature, nothing read from the store
    for outcome, nonce in ((a, b"a" * 32), (b, b"b" * 32)):
        resp = c_ocsp.load_der_ocsp_response(outcome.der)
        assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
        assert resp.certificate_status == c_ocsp.OCSPCertStatus.GOOD
        assert resp.serial_number == 1
        verify_response(resp, env["ca"])


def test_nonce_answers_from_parts_need_no_store(env: dict[str, Any]) -> None:
    service, ca = env["service"], env["ca"]
    answer(service, request_der(ca, [2], nonce=b"first"))
    env["store"].close()  # from here on, any store read would fail
    again = answer(service, request_der(ca, [2], nonce=b"second"))
    assert again.cache == "nonce" and again.status == "successful"
    resp = c_ocsp.load_der_ocsp_response(again.der)
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"second"
    verify_response(resp, ca)


def test_revocation_voids_the_cached_response_through_the_feed(env: dict[str, Any]) -> None:
    service, store, der = env["service"], env["store"], request_der(env["ca"], [2])
    unrelated = request_der(env["ca"], [1])
    feed = ChangeFeed(store)
    feed.prime()
    feed.subscribe(service.on_changes)
    assert status_of(answer(service, der).der) == [c_ocsp.OCSPCertStatus.GOOD]
    answer(service, unrelated)
    with store.batch(T0) as b:
        b.revoke(CaId(env["ca_id"]), Serial(2), T0, RevocationReason.KEY_COMPROMISE, "t", "t")
    feed.poll()
    out = answer(service, der)
    assert out.cache == "miss" and status_of(out.der) == [c_ocsp.OCSPCertStatus.REVOKED]
    assert answer(service, unrelated).cache == "hit"


def test_responses_are_resigned_at_half_validity(env: dict[str, Any]) -> None:
    service, der = env["service"], request_der(env["ca"], [1])
    first = answer(service, der)
    env["clock"].now += timedelta(hours=11, minutes=59)
    assert answer(service, der).cache == "hit"
    env["clock"].now += timedelta(minutes=2)
    # Synced long ago: stale but valid, re-signed with a new producedAt.
    again = answer(service, der)
    assert again.cache == "miss" and again.der != first.der


def test_errors(env: dict[str, Any]) -> None:
    service = env["service"]
    assert answer(service, b"\x30\x03\x02\x01\x00").status == "malformed_request"
    stranger = make_ca(Path(env["ca"].folder).parent / "x", "x")
    out = answer(service, request_der(stranger, [1]))
    assert out.status == "unauthorized" and out.etag is None and len(out.der) == 5
    env["clock"].now = T0 + 2 * DAY  # the import daemon stopped confirming a day ago
    assert answer(service, request_der(env["ca"], [3])).status == "try_later"


def test_internal_error_is_logged_with_traceback(env: dict[str, Any]) -> None:
    from twisted.logger import capturedLogs

    service = env["service"]
    service.sign_der = lambda *parts: 1 / 0  # a bug
    with capturedLogs() as events:
        out = answer(service, request_der(env["ca"], [1]))
    assert out.status == "internal_error"
    assert any(e.get("log_failure") is not None for e in events)


def test_reload_keeps_old_signers_when_new_ones_are_bad(env: dict[str, Any]) -> None:
    import os

    from server.ocsp.signer import SignerError

    service = env["service"]
    answer(service, request_der(env["ca"], [1]))
    os.chmod(env["ca"].signer_key_path, 0o644)
    with pytest.raises(SignerError):
        service.reload(config_for(env["ca"]))
    assert answer(service, request_der(env["ca"], [1])).cache == "hit"
    os.chmod(env["ca"].signer_key_path, 0o600)
    service.reload(config_for(env["ca"]))
    assert len(service.cache) == 0 and service.signer_expiries() == {
        "svc": env["ca"].signer_cert.not_valid_after_utc}


def entry(ca_id: int, serials: list[int], refresh: datetime = T0 + DAY) -> CachedResponse:
    return CachedResponse(b"x", '"e"', CaId(ca_id), "c", T0, T0, T0 + DAY, refresh,
                          frozenset((CaId(ca_id), s) for s in serials), ())


def test_cache_lru_bound_and_indexes() -> None:
    cache = ResponseCache(max_entries=3)
    for i in range(5):
        cache.put([b"k%d" % i], entry(1, [i]))
    assert len(cache) == 3 and cache.evictions == 2
    assert cache.get(b"k0", T0) is None and cache.get(b"k4", T0) is not None
    cache.get(b"k2", T0)  # now most recent
    cache.put([b"k5"], entry(1, [5]))
    assert cache.get(b"k3", T0) is None and cache.get(b"k2", T0) is not None
    assert not any(k for k in cache._by_serial if k[1] in (0, 1, 3))


def test_cache_invalidation_kinds() -> None:
    cache = ResponseCache(10)
    cache.put([b"a", b"A"], entry(1, [1]))
    cache.put([b"b"], entry(1, [2]))
    cache.put([b"c"], entry(2, [1]))
    assert cache.invalidate([Change(Generation(1), "cert", CaId(1), Serial(1), None)]) == 2
    assert cache.get(b"b", T0) and cache.get(b"c", T0)
    assert cache.invalidate([Change(Generation(2), "crl", CaId(1), None, None)]) == 1
    assert cache.get(b"c", T0)
    assert cache.invalidate([Change(Generation(3), "ca", CaId(7), None, None)]) == 1
    assert len(cache) == 0


def test_cache_drops_entries_at_refresh_time() -> None:
    cache = ResponseCache(10)
    cache.put([b"a"], entry(1, [1], refresh=T0 + timedelta(hours=1)))
    assert cache.get(b"a", T0 + timedelta(minutes=59)) is not None
    assert cache.get(b"a", T0 + timedelta(hours=1)) is None and len(cache) == 0


def test_signer_expiring_within_30_days_is_logged(tmp_path: Path) -> None:
    from twisted.logger import LogLevel, capturedLogs

    ca = make_ca(tmp_path / "soon", "soon", signer_not_after=T0 + 20 * DAY)
    store = Store.open(tmp_path / "s.sqlite3")
    try:
        service = OcspService(config_for(ca), store, Clock(T0))
        with capturedLogs() as events:
            assert len(service.warn_expiring()) == 1
        assert [e["log_level"] for e in events] == [LogLevel.warn]
        assert "soon" in events[0]["warning"] and "20.0 days" in events[0]["warning"]
    finally:
        store.close()


def test_revocation_is_re_signed_before_anyone_asks(env: dict[str, Any]) -> None:
    """A certificate's status change replaces its cached response at once (pre-signed)."""
    service, store, der = env["service"], env["store"], request_der(env["ca"], [2])
    feed = ChangeFeed(store)
    feed.prime()
    feed.subscribe(service.on_changes)
    assert answer(service, der).cache == "miss"
    with store.batch(T0) as b:
        b.revoke(CaId(env["ca_id"]), Serial(2), T0, RevocationReason.KEY_COMPROMISE, "t", "t")
    feed.poll()  # inline: the re-signing runs on the cooperator; drive it to the end
    _drain()
    assert service.presigned == 1
    out = answer(service, der)
    assert out.cache == "hit" and status_of(out.der) == [c_ocsp.OCSPCertStatus.REVOKED]


def test_responses_near_refresh_are_re_signed_ahead_of_time(env: dict[str, Any]) -> None:
    service, der = env["service"], request_der(env["ca"], [1])
    first = answer(service, der)
    assert service.refresh_due() is None  # nothing due yet
    env["clock"].now += timedelta(hours=11, minutes=59)  # refresh at 12 h (half of 24 h)
    service.refresh_due()
    _drain()
    assert service.presigned == 1
    env["clock"].now += timedelta(minutes=2)  # past the first response's refresh time
    again = answer(service, der)
    assert again.cache == "hit" and again.der != first.der  # signed ahead, not on request
    resp = c_ocsp.load_der_ocsp_response(again.der)
    assert resp.produced_at_utc == T0 + timedelta(minutes=5, hours=11, seconds=59 * 60)


def _drain() -> None:
    """Run the global cooperator's pending work now (no reactor in these tests)."""
    from twisted.internet import task

    coop = task._theCooperator
    while coop._tasks:
        coop._tick()


def test_presign_backlog_counts_queued_responses_until_signed(env: dict[str, Any]) -> None:
    """/metrics' pre-signing backlog: up when responses are queued, back to 0 once signed."""
    service, store = env["service"], env["store"]
    feed = ChangeFeed(store)
    feed.prime()
    feed.subscribe(service.on_changes)
    for serial in (1, 2):
        assert answer(service, request_der(env["ca"], [serial])).cache == "miss"
    assert service.presign_backlog == 0
    with store.batch(T0) as b:
        for serial in (1, 2):
            b.revoke(CaId(env["ca_id"]), Serial(serial), T0, RevocationReason.KEY_COMPROMISE,
                     "t", "t")
    feed.poll()
    assert service.presign_backlog == 2  # queued on the cooperator, not signed yet
    _drain()
    assert service.presign_backlog == 0 and service.presigned == 2
