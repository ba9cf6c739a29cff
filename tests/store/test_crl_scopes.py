"""CRL scopes (RFC 5280 §5.2.4, §5.2.5): partitions, holds, deltas, on both engines.

Every revocation a partition lists must be revoked in the store, in the OCSP responder's
answer and in the LDAP entry's status, whatever the partitions' numbers and order.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as c_ocsp

from server.ldap.entries import cert_status
from server.ocsp.service import OcspService
from store import open_store
from store.certparse import crl_input
from store.model import CaId, CertStatus, RevocationReason
from tests.ocsp.helpers import DAY, T0, MiniCa, config_for, fill_store, make_ca, request_der

R = x509.ReasonFlags
HOLD = RevocationReason.CERTIFICATE_HOLD
P0 = "http://crl.example.mo/part0.crl"
P1 = "http://crl.example.mo/part1.crl"
SERIALS = tuple(range(1, 11))


def make_crl(ca: MiniCa, number: int | None, entries: list[tuple[int, R | None]], *,
             idp: list[str] | None = None, base: int | None = None, indirect: bool = False,
             this_update: datetime | None = None) -> bytes:
    """A CRL of ca: a partition when idp names URLs, a delta when base is given."""
    tu = this_update or T0 - timedelta(hours=2) + timedelta(minutes=number or 0)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
         .last_update(tu).next_update(tu + 7 * DAY))
    if number is not None:
        b = b.add_extension(x509.CRLNumber(number), critical=False)
    if idp is not None or indirect:
        b = b.add_extension(x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier(u) for u in idp] if idp else None,
            relative_name=None, only_contains_user_certs=False, only_contains_ca_certs=False,
            only_some_reasons=None, indirect_crl=indirect, only_contains_attribute_certs=False),
            critical=True)
    if base is not None:
        b = b.add_extension(x509.DeltaCRLIndicator(base), critical=True)
    for serial, reason in entries:
        e = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(T0 - DAY)
        if reason is not None:
            e = e.add_extension(x509.CRLReason(reason), critical=False)
        b = b.add_revoked_certificate(e.build())
    return b.sign(ca.key, hashes.SHA256()).public_bytes(Encoding.DER)


class Env:
    """A CA with ten certificates in a store; CRLs applied one batch each."""

    def __init__(self, ca: MiniCa, location: str) -> None:
        self.ca, self.location = ca, location
        self.store = open_store(location)
        self.ca_id = CaId(fill_store(self.store, ca, T0))

    def apply(self, der: bytes) -> str:
        with self.store.batch(T0) as b:
            return str(b.apply_crl(crl_input(der, self.ca_id), "test"))

    def reopen(self) -> None:
        """As after a restart: pending deltas must come from the store."""
        self.store.close()
        self.store = open_store(self.location)

    def statuses(self) -> dict[int, str]:
        """serial -> "revoked", "hold" or "good", checked in the store, in the OCSP answer
        and in the LDAP entry status, which must agree."""
        service = OcspService(config_for(self.ca), self.store, lambda: T0 + timedelta(minutes=5))
        answer = service.answer(request_der(self.ca, list(SERIALS)), service.now())
        resp = c_ocsp.load_der_ocsp_response(answer.der)
        ocsp = {r.serial_number: r.certificate_status for r in resp.responses}
        out = {}
        for serial in SERIALS:
            rec = self.store.cert(self.ca_id, serial)
            assert rec is not None
            ldap = cert_status(rec, T0)
            if rec.status is CertStatus.REVOKED:
                assert ocsp[serial] is c_ocsp.OCSPCertStatus.REVOKED, serial
                assert ldap == "revoked", serial
                out[serial] = "hold" if rec.reason is HOLD else "revoked"
            else:
                assert ocsp[serial] is c_ocsp.OCSPCertStatus.GOOD, serial
                assert ldap == "valid", serial
                out[serial] = "good"
        return out

    def revoked(self) -> set[int]:
        return {s for s, st in self.statuses().items() if st != "good"}

    def close(self) -> None:
        self.store.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> MiniCa:
    ca = make_ca(tmp_path_factory.mktemp("scopes"), "scopes")
    for serial in SERIALS:
        ca.subscriber(serial)
    return ca


@pytest.fixture
def env(ca: MiniCa, store_location: str) -> Iterator[Env]:
    e = Env(ca, store_location)
    yield e
    e.close()


# --- partitions ---------------------------------------------------------------------------


def test_partitions_with_equal_numbers_both_apply(env: Env) -> None:
    assert env.apply(make_crl(env.ca, 5, [(2, R.key_compromise)], idp=[P0])) == "applied"
    assert env.apply(make_crl(env.ca, 5, [(7, R.key_compromise)], idp=[P1])) == "applied"
    assert env.revoked() == {2, 7}
    scopes = env.store.crl_scopes(env.ca_id)
    assert sorted(s.label for s in scopes) == ["part0.crl", "part1.crl"]
    assert all(s.number == 5 and not s.delta for s in scopes)
    # A partition is not the CA's full CRL: CaRecord.crl_* stays empty.
    rec = env.store.ca_by_id(env.ca_id)
    assert rec is not None and rec.crl_der is None
    # Offered again: the same CRL, and the same number in the same scope, change nothing.
    assert env.apply(make_crl(env.ca, 5, [(7, R.key_compromise)], idp=[P1])) == "unchanged"


def test_partitions_with_unequal_numbers_both_apply(env: Env) -> None:
    assert env.apply(make_crl(env.ca, 9, [(2, None)], idp=[P0])) == "applied"
    assert env.apply(make_crl(env.ca, 4, [(7, None)], idp=[P1])) == "applied"
    assert env.revoked() == {2, 7}


def test_partitions_out_of_order(env: Env) -> None:
    assert env.apply(make_crl(env.ca, 6, [(2, None), (3, None)], idp=[P0])) == "applied"
    assert env.apply(make_crl(env.ca, 5, [(2, None)], idp=[P0])) == "older"
    assert env.apply(make_crl(env.ca, 3, [(7, None)], idp=[P1])) == "applied"
    assert env.apply(make_crl(env.ca, 2, [(8, None)], idp=[P1])) == "older"  # changes nothing
    assert env.revoked() == {2, 3, 7}
    # revocation never goes backwards: a newer partition without an entry keeps it revoked
    assert env.apply(make_crl(env.ca, 7, [], idp=[P0])) == "applied"
    assert env.revoked() == {2, 3, 7}


def test_full_crl_and_partitions_are_separate_scopes(env: Env) -> None:
    assert env.apply(make_crl(env.ca, 20, [(1, None)])) == "applied"
    assert env.apply(make_crl(env.ca, 5, [(7, None)], idp=[P1])) == "applied"  # lower number
    rec = env.store.ca_by_id(env.ca_id)
    assert rec is not None and rec.crl_number == 20
    assert [s.label for s in env.store.crl_scopes(env.ca_id)] == ["full", "part1.crl"]
    assert env.revoked() == {1, 7}


# --- holds --------------------------------------------------------------------------------


def test_hold_of_one_partition_survives_the_other_and_is_released_by_its_own(env: Env) -> None:
    env.apply(make_crl(env.ca, 1, [(7, R.certificate_hold)], idp=[P1]))
    env.apply(make_crl(env.ca, 1, [(2, R.key_compromise)], idp=[P0]))
    assert env.statuses()[7] == "hold"
    env.apply(make_crl(env.ca, 2, [(2, R.key_compromise)], idp=[P0]))  # newer partition 0
    assert env.statuses()[7] == "hold"
    with env.store.batch(T0) as b:
        assert b.apply_crl(crl_input(make_crl(env.ca, 2, [], idp=[P1]), env.ca_id), "t") \
            == "applied"
        assert b.result.released == 1
    assert env.statuses() == {**{s: "good" for s in SERIALS}, 2: "revoked"}


def test_hold_listed_by_two_scopes_needs_both_to_drop_it(env: Env) -> None:
    env.apply(make_crl(env.ca, 1, [(4, R.certificate_hold)], idp=[P0]))
    env.apply(make_crl(env.ca, 1, [(4, R.certificate_hold)], idp=[P1]))
    env.apply(make_crl(env.ca, 2, [], idp=[P0]))
    assert env.statuses()[4] == "hold"
    env.apply(make_crl(env.ca, 2, [], idp=[P1]))
    assert env.statuses()[4] == "good"


def test_hold_made_final_is_never_released(env: Env) -> None:
    env.apply(make_crl(env.ca, 1, [(4, R.certificate_hold)], idp=[P0]))
    env.apply(make_crl(env.ca, 2, [(4, R.key_compromise)], idp=[P0]))
    env.apply(make_crl(env.ca, 3, [], idp=[P0]))
    assert env.statuses()[4] == "revoked"


# --- deltas -------------------------------------------------------------------------------


def test_delta_before_its_base_is_kept_and_applied_when_the_base_arrives(env: Env) -> None:
    assert env.apply(make_crl(env.ca, 11, [(3, None)], base=10)) == "pending"
    assert env.revoked() == set()
    assert env.store.pending_deltas(env.ca_id) == [(env.ca_id, 11, 10)]
    assert env.store.crl_scopes(env.ca_id) == []
    env.reopen()  # a restart: the delta waits in the store
    with env.store.batch(T0) as b:
        assert b.apply_crl(crl_input(make_crl(env.ca, 10, [(2, None)]), env.ca_id), "t") \
            == "applied"
        assert any("pending delta CRL 11" in n and "applied" in n for n in b.result.notes)
    assert env.revoked() == {2, 3}
    assert env.store.pending_deltas(env.ca_id) == []
    labels = [(s.label, s.number, s.base_number) for s in env.store.crl_scopes(env.ca_id)]
    assert labels == [("full", 10, None), ("full (delta)", 11, 10)]


def test_pending_deltas_are_bounded(env: Env) -> None:
    from store.writer import MAX_PENDING

    for n in range(MAX_PENDING + 3):
        assert env.apply(make_crl(env.ca, 100 + n, [(3, None)], base=99)) == "pending"
    kept = env.store.pending_deltas(env.ca_id)
    assert [k[1] for k in kept] == list(range(103, 100 + MAX_PENDING + 3))


def test_delta_over_a_stale_base_waits_for_a_new_enough_one(env: Env) -> None:
    env.apply(make_crl(env.ca, 10, [(2, None)]))
    assert env.apply(make_crl(env.ca, 13, [(5, None)], base=12)) == "pending"
    env.apply(make_crl(env.ca, 11, [(2, None)]))  # still older than BaseCRLNumber 12
    assert env.revoked() == {2}
    assert env.store.pending_deltas(env.ca_id) == [(env.ca_id, 13, 12)]
    env.apply(make_crl(env.ca, 12, [(2, None)]))
    assert env.revoked() == {2, 5}
    assert env.store.pending_deltas(env.ca_id) == []


def test_delta_the_base_already_covers_changes_nothing(env: Env) -> None:
    env.apply(make_crl(env.ca, 12, [(2, None)]))
    assert env.apply(make_crl(env.ca, 11, [(6, None)], base=10)) == "older"
    assert env.revoked() == {2}
    # a pending delta that a newer base makes obsolete is dropped, not applied
    assert env.apply(make_crl(env.ca, 14, [(6, None)], base=13)) == "pending"
    env.apply(make_crl(env.ca, 15, [(2, None)]))
    assert env.store.pending_deltas(env.ca_id) == [] and env.revoked() == {2}


def test_delta_remove_from_crl_releases_a_hold(env: Env) -> None:
    env.apply(make_crl(env.ca, 10, [(5, R.certificate_hold), (2, None)]))
    assert env.statuses()[5] == "hold"
    assert env.apply(make_crl(env.ca, 11, [(5, R.remove_from_crl), (6, R.certificate_hold)],
                              base=10)) == "applied"
    st = env.statuses()
    assert st[5] == "good" and st[6] == "hold" and st[2] == "revoked"
    # a newer delta of the same scope: older deltas of that scope change nothing
    assert env.apply(make_crl(env.ca, 11, [(7, None)], base=10)) == "unchanged"
    # the next base lists 6's hold itself; the delta over it no longer does: still held
    env.apply(make_crl(env.ca, 12, [(6, R.certificate_hold), (2, None)]))
    env.apply(make_crl(env.ca, 13, [], base=12))
    assert env.statuses()[6] == "hold"


def test_partitioned_deltas_pair_with_their_own_partition(env: Env) -> None:
    env.apply(make_crl(env.ca, 5, [(2, None)], idp=[P0]))
    assert env.apply(make_crl(env.ca, 6, [(3, None)], idp=[P1], base=5)) == "pending"
    assert env.apply(make_crl(env.ca, 6, [(4, None)], idp=[P0], base=5)) == "applied"
    assert env.revoked() == {2, 4}
    env.apply(make_crl(env.ca, 5, [(7, None)], idp=[P1]))
    assert env.revoked() == {2, 3, 4, 7}


def test_indirect_crl_is_refused(env: Env) -> None:
    assert env.apply(make_crl(env.ca, 5, [(2, None)], indirect=True)) == "refused"
    assert env.revoked() == set() and env.store.crl_scopes() == []


def test_crl_without_number_uses_this_update(env: Env) -> None:
    assert env.apply(make_crl(env.ca, None, [(2, None)], idp=[P0], this_update=T0)) == "applied"
    assert env.apply(make_crl(env.ca, None, [(3, None)], idp=[P0],
                              this_update=T0 - DAY)) == "older"
    assert env.apply(make_crl(env.ca, None, [(4, None)], idp=[P1],
                              this_update=T0 - DAY)) == "applied"
    assert env.revoked() == {2, 4}


def test_changes_of_kind_crl_are_written(env: Env) -> None:
    before = int(env.store.generation())
    env.apply(make_crl(env.ca, 5, [], idp=[P0]))
    kinds = {(c.kind, c.ca_id) for c in env.store.changes_since(before)}
    assert ("crl", env.ca_id) in kinds


def test_scope_without_a_name_is_labelled_by_its_flag(tmp_path: Path, ca: MiniCa) -> None:
    e = Env(ca, str(tmp_path / "s.sqlite3"))
    try:
        b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
             .last_update(T0 - DAY).next_update(T0 + DAY)
             .add_extension(x509.CRLNumber(1), critical=False)
             .add_extension(x509.IssuingDistributionPoint(None, None, True, False, None, False,
                                                          False), critical=True))
        der = b.sign(ca.key, hashes.SHA256()).public_bytes(Encoding.DER)
        assert e.apply(der) == "applied"
        (scope,) = e.store.crl_scopes()
        assert scope.only == "user" and scope.label == "idp (user)" and scope.urls == ()
    finally:
        e.close()
