"""apply_crl skips entries settled by the previous full CRL: same results, both engines."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509

from store import writer
from store.certparse import crl_input
from store.model import CaId, CertStatus, CrlInput, IndexLine, RevocationReason, Serial
from tests.importer.test_importer_helpers import NOW, MiniPki, der

R = x509.ReasonFlags
HOLD = RevocationReason.CERTIFICATE_HOLD


@pytest.fixture(scope="module")
def pki(mini_pki: MiniPki) -> MiniPki:
    return mini_pki


def ca(store: Any, pki: MiniPki, name: str) -> CaId:
    with store.batch(NOW) as b:
        return CaId(b.ensure_ca(name, der(pki.cas[name].cert))[0])


def crl(pki: MiniPki, ca_id: CaId, label: str, number: int,
        entries: list[tuple[int, R | None]]) -> CrlInput:
    return crl_input(der(pki.crl(label, number, entries)), ca_id)


def index(status: str, serial: int, reason: RevocationReason | None = None) -> IndexLine:
    return IndexLine(status, NOW + timedelta(days=300), NOW if status == "R" else None, reason,
                     Serial(serial), "unknown", "/CN=x")


def state(store: Any, ca_id: CaId, serials: range) -> list[Any]:
    out = []
    for s in serials:
        rec = store.cert(ca_id, s)
        out.append(None if rec is None else (rec.status, rec.reason, rec.revoked_at))
    return out


def test_only_settled_entries_are_skipped(pki: MiniPki, store: Any) -> None:
    ca_id = ca(store, pki, "ca-a")
    first = crl(pki, ca_id, "ca-a", 1, [(5, R.key_compromise), (6, None), (7, R.certificate_hold),
                                        (8, R.remove_from_crl)])
    assert writer._settled_entries(first, None) == set()
    with store.batch(NOW) as b:
        b.apply_crl(first, "c1")
    second = crl(pki, ca_id, "ca-a", 2, [(5, R.key_compromise), (6, None), (7, R.certificate_hold),
                                         (8, R.remove_from_crl), (9, R.superseded),
                                         (5 + 1000, R.key_compromise)])
    # 5 and 6: same bytes, final reasons; 7 (hold), 8 (removeFromCRL), 9, 1005 (new) are applied.
    assert writer._settled_entries(second, first.der) == {0, 1}
    changed = crl(pki, ca_id, "ca-a", 3, [(5, R.superseded), (6, None)])  # 5's entry differs
    assert writer._settled_entries(changed, second.der) == {1}


def test_hold_released_by_index_is_held_again(pki: MiniPki, store: Any) -> None:
    ca_id = ca(store, pki, "ca-a")
    with store.batch(NOW) as b:
        b.apply_crl(crl(pki, ca_id, "ca-a", 1, [(7, R.certificate_hold), (5, None)]), "c1")
    with store.batch(NOW) as b:
        assert b.apply_index_line(ca_id, index("V", 7), "i") == "released"
    with store.batch(NOW) as b:
        b.apply_crl(crl(pki, ca_id, "ca-a", 2, [(7, R.certificate_hold), (5, None)]), "c2")
        assert b.result.revoked == 1
    rec = store.cert(ca_id, 7)
    assert rec is not None and rec.status is CertStatus.REVOKED and rec.reason is HOLD
    with store.batch(NOW) as b:  # a newer full CRL without the hold releases it
        b.apply_crl(crl(pki, ca_id, "ca-a", 3, [(5, None)]), "c3")
        assert b.result.released == 1
    rec = store.cert(ca_id, 7)
    assert rec is not None and rec.status is CertStatus.GOOD


def test_remove_from_crl_is_applied_again(pki: MiniPki, store: Any) -> None:
    ca_id = ca(store, pki, "ca-a")
    with store.batch(NOW) as b:
        b.apply_crl(crl(pki, ca_id, "ca-a", 1, [(7, R.remove_from_crl)]), "c1")
    with store.batch(NOW) as b:  # held again meanwhile (by the CA's own database)
        assert b.apply_index_line(ca_id, index("R", 7, HOLD), "i") == "revoked"
    with store.batch(NOW) as b:
        b.apply_crl(crl(pki, ca_id, "ca-a", 2, [(7, R.remove_from_crl)]), "c2")
    rec = store.cert(ca_id, 7)
    assert rec is not None and rec.status is CertStatus.GOOD


REASONS = [None, R.key_compromise, R.superseded, R.certificate_hold, R.certificate_hold,
           R.remove_from_crl]


@pytest.mark.parametrize("seed", range(4))
def test_same_results_as_applying_every_entry(pki: MiniPki, store: Any, seed: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """ca-a with skipping, ca-b without, fed the same random CRLs and index lines."""
    fast, full = ca(store, pki, "ca-a"), ca(store, pki, "ca-b")
    settled = writer._settled_entries
    skipped = 0

    def only_fast(c: CrlInput, previous: bytes | None) -> set[int]:
        nonlocal skipped
        got = settled(c, previous) if c.ca_id == fast else set()
        skipped += len(got)
        return got

    monkeypatch.setattr(writer, "_settled_entries", only_fast)
    rng = random.Random(seed)
    serials = range(1, 16)
    listed: dict[int, R | None] = {}
    for number in range(1, 40):
        for s in rng.sample(list(serials), 3):  # the CA's list evolves, mostly keeping entries
            if rng.random() < 0.5:
                listed[s] = rng.choice(REASONS)
            else:
                listed.pop(s, None)
        if rng.random() < 0.3:
            s, line = rng.choice(serials), rng.choice(["V", "R", "RH"])
            reason = HOLD if line == "RH" else RevocationReason.KEY_COMPROMISE
            results = []
            for ca_id in (fast, full):
                with store.batch(NOW) as b:
                    results.append(b.apply_index_line(ca_id, index(line[0], s, reason), "i"))
            assert results[0] == results[1]
        entries = sorted(listed.items())
        outcomes = []
        for ca_id, label in ((fast, "ca-a"), (full, "ca-b")):
            with store.batch(NOW) as b:
                b.apply_crl(crl(pki, ca_id, label, number, entries), f"c{number}")
                r = b.result
                outcomes.append((r.revoked, r.released, r.crls))
        assert outcomes[0] == outcomes[1], number
        assert state(store, fast, serials) == state(store, full, serials), number
    assert skipped > 0
