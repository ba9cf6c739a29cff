"""Responder logic over a real store in tmp_path, with a fixed clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from server.ocsp.codec import TryLater, Unauthorized, decode_request
from server.ocsp.responder import CLOCK_MARGIN, CaPolicy, Policy, answer, status_times
from server.ocsp.signer import load_signer
from store import open_store
from store.model import RevocationReason
from store.sqlite import StoreError
from tests.ocsp.helpers import (
    DAY,
    T0,
    FakeCa,
    MiniCa,
    fill_store,
    make_ca,
    request_der,
    signer_config,
)

NOW = T0 + timedelta(hours=1)


@pytest.fixture
def pki(tmp_path: Path, store_location: str) -> Iterator[dict[str, Any]]:
    ca = make_ca(tmp_path / "one", "one")
    other = make_ca(tmp_path / "two", "two")
    for serial in (1, 2, 3, 4):
        ca.subscriber(serial)
    ca.subscriber(5, not_before=T0 - 900 * DAY, not_after=T0 - 100 * DAY)  # expired
    ca.subscriber(6, not_before=T0 - 900 * DAY, not_after=T0 - 100 * DAY)  # expired, revoked
    other.subscriber(1)
    store = open_store(store_location)  # each test once per engine (SQLite, PostgreSQL)
    fill_store(store, ca, T0, revoked={
        2: (T0 - 2 * DAY, RevocationReason.KEY_COMPROMISE),
        3: (T0 - 3 * DAY, RevocationReason.CERTIFICATE_HOLD),
        4: (T0 - 4 * DAY, None),
        6: (T0 - 200 * DAY, RevocationReason.SUPERSEDED),
    }, crl_only={77: (T0 - DAY, RevocationReason.CESSATION_OF_OPERATION)})
    fill_store(store, other, T0)
    yield {"ca": ca, "other": other, "store": store}
    store.close()


def policy_for(*cas: MiniCa, **kw: Any) -> Policy:
    out = {}
    for ca in cas:
        cfg = signer_config(ca, **kw)
        out[ca.name] = CaPolicy(load_signer(FakeCa(ca.name, ca.cert_path, cfg), T0),  # type: ignore[arg-type]
                                timedelta(seconds=cfg.validity), cfg.unknown_serials,
                                cfg.archive_cutoff)
    return Policy(out)


def ask(pki: dict[str, Any], ca: MiniCa, serials: list[int], policy: Policy | None = None,
        **kw: Any) -> Any:
    req = decode_request(request_der(ca, serials, **kw))
    return answer(req, pki["store"], NOW, policy or policy_for(pki["ca"]))


def statuses(result: Any) -> list[tuple[str, Any, Any]]:
    return [(s.status, s.revoked_at, s.reason) for s in result.singles]


def test_statuses(pki: dict[str, Any]) -> None:
    result = ask(pki, pki["ca"], [1, 2, 3, 4, 5, 6, 77, 999])
    assert statuses(result) == [
        ("good", None, None),
        ("revoked", T0 - 2 * DAY, "key_compromise"),
        ("revoked", T0 - 3 * DAY, "certificate_hold"),
        ("revoked", T0 - 4 * DAY, None),
        ("good", None, None),  # expired keeps its real status
        ("revoked", T0 - 200 * DAY, "superseded"),
        ("revoked", T0 - DAY, "cessation_of_operation"),  # known from a CRL only: issued
        ("unknown", None, None),  # never issued: never good
    ]
    assert result.ca.name == "one" and not result.extended_revoke
    assert all(s.archive_cutoff == pki["ca"].cert.not_valid_before_utc for s in result.singles)
    assert result.serials == frozenset((result.ca.id, s) for s in [1, 2, 3, 4, 5, 6, 77, 999])


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_every_certid_hash_algorithm_finds_the_issuer(pki: dict[str, Any], algorithm: str) -> None:
    result = ask(pki, pki["ca"], [2], algorithm=algorithm)
    assert statuses(result)[0][0] == "revoked"
    assert result.singles[0].cert_id.hash_algorithm == algorithm


def test_extended_revoke_mode(pki: dict[str, Any]) -> None:
    policy = policy_for(pki["ca"], unknown_serials="revoked")
    result = ask(pki, pki["ca"], [1, 999], policy)
    assert statuses(result)[1] == ("revoked", datetime(1970, 1, 1, tzinfo=NOW.tzinfo),
                                   "certificate_hold")
    assert statuses(result)[0][0] == "good"
    assert result.extended_revoke


def test_archive_cutoff_can_be_off(pki: dict[str, Any]) -> None:
    result = ask(pki, pki["ca"], [1], policy_for(pki["ca"], archive_cutoff=False))
    assert result.singles[0].archive_cutoff is None


def test_unserved_issuer_is_unauthorized(pki: dict[str, Any]) -> None:
    with pytest.raises(Unauthorized):
        ask(pki, pki["other"], [1])  # in the store, but without a signer
    stranger = make_ca(Path(pki["ca"].folder).parent / "x", "x")
    with pytest.raises(Unauthorized):
        ask(pki, stranger, [1])  # not in the store at all


def test_mixed_issuers_answer_the_first_served_and_unknown_for_the_rest(pki: dict[str, Any]) -> None:
    one, two = pki["ca"], pki["other"]
    der_two = request_der(two, [1])
    der_one = request_der(one, [2])
    from asn1crypto import ocsp

    reqs = [ocsp.OCSPRequest.load(d)["tbs_request"]["request_list"][0] for d in (der_two, der_one)]
    mixed = decode_request(ocsp.OCSPRequest({"tbs_request": {"request_list": reqs}}).dump())
    result = answer(mixed, pki["store"], NOW, policy_for(one))
    assert result.ca.name == "one"
    assert [s.status for s in result.singles] == ["unknown", "revoked"]
    both = answer(mixed, pki["store"], NOW, policy_for(one, two))
    assert both.ca.name == "two" and [s.status for s in both.singles] == ["good", "unknown"]


def test_policy_for_a_replaced_ca_certificate_does_not_sign(pki: dict[str, Any]) -> None:
    imposter = make_ca(Path(pki["ca"].folder).parent / "imp", "one")  # same name, other cert
    with pytest.raises(Unauthorized):
        ask(pki, pki["ca"], [1], policy_for(imposter))


def test_times_follow_the_sync_time(pki: dict[str, Any]) -> None:
    result = ask(pki, pki["ca"], [1])
    assert result.this_update == T0  # synced at T0, an hour before NOW
    assert result.next_update == T0 + DAY
    assert result.produced_at == NOW


def test_status_times_rules() -> None:
    v = timedelta(hours=8)
    assert status_times(None, NOW, v) == (NOW - CLOCK_MARGIN, NOW - CLOCK_MARGIN + v)
    assert status_times(NOW + timedelta(seconds=5), NOW, v)[0] == NOW - CLOCK_MARGIN  # future
    assert status_times(NOW - timedelta(seconds=10), NOW, v)[0] == NOW - CLOCK_MARGIN
    assert status_times(NOW - timedelta(hours=2), NOW, v)[0] == NOW - timedelta(hours=2)
    odd = NOW - timedelta(hours=2, microseconds=5)
    assert status_times(odd, NOW, v)[0].microsecond == 0
    with pytest.raises(TryLater):
        status_times(NOW - timedelta(hours=9), NOW, v)  # stale: would be expired on arrival


def test_store_error_is_try_later(pki: dict[str, Any]) -> None:
    class Broken:
        def ca_by_issuer_hash(self, *a: Any) -> None:
            raise StoreError("disk gone")

        def cert(self, *a: Any) -> None:
            raise StoreError("disk gone")

    req = decode_request(request_der(pki["ca"], [1]))
    with pytest.raises(TryLater, match="disk gone"):
        answer(req, Broken(), NOW, policy_for(pki["ca"]))  # type: ignore[arg-type]


def test_nonce_is_carried(pki: dict[str, Any]) -> None:
    assert ask(pki, pki["ca"], [1], nonce=b"z" * 32).nonce == b"z" * 32
