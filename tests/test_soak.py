"""The soak's short variant: 60 s of load, imports and kills; no wrong answer, no lost file.

``bench/soak.py`` runs ``certpub serve --workers 2`` and ``certpub importd`` on one SQLite
store, OCSP (cached and nonce) and LDAP clients at steady rates, one spool file a second, a
worker killed with SIGKILL at 20 and 40 s and the importer at 30 and 50 s (the 10-minute runs
in docs/hostile.md kill a worker every 30 s and the importer every 2 min). The PostgreSQL
variant with a database restart is run by hand (docs/hostile.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import leftover_processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def soak_main():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import soak

        yield soak.main
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_soak_60_seconds_nothing_wrong_nothing_lost(soak_main, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ldap3")
    out = tmp_path / "soak.json"
    code = soak_main(["--seconds", "60", "--worker-kill-every", "20",
                      "--importer-kill-every", "20", "--ocsp-rate", "80", "--nonce-rate", "20",
                      "--ldap-rate", "40", "--initial", "100", "--dir", str(tmp_path / "run"),
                      "--json", str(out)])
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["wrong"] == [], printed
    assert r["files_left"] == [] and r["files_rejected"] == [] and r["missing"] == [], printed
    assert code == 0, printed
    assert r["faults"]["worker"] >= 2 and r["faults"]["importer"] >= 2, printed
    assert not any(k.startswith("importer exited") for k in r["faults"]), printed
    for protocol in ("ocsp", "ocsp-nonce", "ldap"):
        assert r["served"].get(protocol, 0) > 100, printed
    assert r["files_dropped"] >= 50 and r["revocations"] >= 10, printed
    assert r["propagation"]["commit → OCSP revoked"]["n"] >= 10, printed
    assert "WRONG ANSWERS: 0" in printed and "0 left unimported" in printed
    assert leftover_processes() == {}  # serve, its workers and importd all stopped


def test_verdict_rules(soak_main) -> None:  # type: ignore[no-untyped-def]
    """What counts as wrong: only answers asked more than 1 s after the store had the fact."""
    import soak

    truth = soak.Truth()
    truth.committed.update({1: 100.0, 2: 100.0, 3: 100.0})
    truth.dropped_revocations[2] = 105.0
    truth.revoked[2] = 105.5
    truth.dropped_revocations[3] = 107.0  # dropped, not committed yet
    v = truth.verdict
    assert v(9, 200.0, says_revoked=True) is None  # never committed: not asked about
    assert v(1, 100.5, says_revoked=True) is None  # within 1 s of its own commit
    assert v(1, 101.5, says_revoked=True) == "revoked, never revoked"
    assert v(1, 101.5, says_revoked=False) is None
    assert v(2, 106.4, says_revoked=False) is None  # good within 1 s of the revocation commit
    assert v(2, 106.6, says_revoked=False) == "good 1.100 s after the revocation committed"
    assert v(2, 106.6, says_revoked=True) is None
    assert v(3, 120.0, says_revoked=False) is None  # the importer has not committed it
    assert v(3, 120.0, says_revoked=True) is None  # dropped: revoked is allowed


def test_fault_windows(soak_main) -> None:  # type: ignore[no-untyped-def]
    import soak

    tally = soak.Tally()
    tally.fault("worker kill", 10.0, 10.0)
    down = tally.fault("database down", 30.0)
    assert tally.window(9.9) == "steady" and tally.window(14.0) == "worker kill"
    assert tally.window(15.5) == "steady" and tally.window(100.0) == "database down"
    tally.fault_over(down, 36.0)
    assert tally.window(40.0) == "database down" and tally.window(41.5) == "steady"
    # a request in flight at a fault (asked before it, failed after it) is the fault's
    assert tally.window(9.95, 10.02) == "worker kill"
    assert tally.window(9.0, 9.5) == "steady" and tally.window(15.5, 16.0) == "steady"
    assert tally.window(29.9, 30.1) == "database down"
    assert tally.window(20.0, 30.1) == "steady"  # hung 10 s before the fault: not explained
