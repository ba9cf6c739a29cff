"""The signing queue's pacing (``server.ocsp.signing.Pacer``): requests that need a signature
are handed over as fast as the signers take them, until the server process is busy answering
mostly cached requests; then more slowly, and fast again once the load is gone.

Driven by hand-set clocks (wall and CPU), so every decision is checked exactly; the flood
benchmark (bench/ocsp_flood.py) shows the effect on a real server."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task

from server.ocsp.signing import Executor, Pacer, SigningQueue


class Clocks:
    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 10.0

    def run(self, seconds: float, busy: float) -> None:
        """Let seconds pass with the process using busy of a core."""
        self.wall += seconds
        self.cpu += seconds * busy


def pacer() -> tuple[Pacer, Clocks]:
    c = Clocks()
    return Pacer(lambda: c.wall, lambda: c.cpu), c


def hand_over(p: Pacer, n: int) -> int:
    return sum(1 for _ in range(n) if p.allow())


def test_unlimited_while_the_process_has_cpu_to_spare() -> None:
    p, c = pacer()
    assert hand_over(p, 5000) == 5000
    c.run(Pacer.TICK, busy=0.5)  # half a core: nothing to protect
    p.tick(signing=1000, other=4000, spent=0.05)
    assert p.rate is None and hand_over(p, 5000) == 5000


def test_unlimited_when_everything_needs_a_signature() -> None:
    p, c = pacer()
    hand_over(p, 1000)
    c.run(Pacer.TICK, busy=1.0)
    p.tick(signing=1000, other=Pacer.OTHERS - 1, spent=0.06)  # a nonce load, a health check
    assert p.rate is None


def test_cut_when_the_flood_already_outnumbers_the_cached_answers() -> None:
    """A flood that got there first leaves the cached client fewer answers than it has:
    that client is still protected (a ratio of counts would have given up on it)."""
    p, c = pacer()
    hand_over(p, 1400)
    c.run(Pacer.TICK, busy=1.0)
    p.tick(signing=1400, other=850, spent=0.07)
    assert p.rate == pytest.approx(Pacer.CUT * 14000)


def test_unlimited_when_the_signing_path_takes_little_of_a_busy_process() -> None:
    p, c = pacer()
    hand_over(p, 50)
    c.run(Pacer.TICK, busy=0.95)
    p.tick(signing=50, other=5000, spent=0.005)  # 5 %: the cached answers are the load
    assert p.rate is None


def test_cut_when_signing_crowds_out_cached_answers_then_grows_back() -> None:
    p, c = pacer()
    hand_over(p, 600)  # 6,000/s
    c.run(Pacer.TICK, busy=0.95)
    p.tick(signing=600, other=2000, spent=0.03)
    assert p.rate == pytest.approx(Pacer.CUT * 6000)
    # the tokens now pace hand-overs: about rate × elapsed, plus a small burst
    allowed = 0
    for _ in range(100):  # 10 ms in 0.1 ms steps
        c.run(0.0001, busy=1.0)
        allowed += hand_over(p, 10)
    assert 0.9 * p.rate * 0.01 <= allowed <= p.rate * 0.01 + max(1.0, p.rate * 0.01) + 1
    # still crowding: cut again, from the lower rate
    rate = p.rate
    c.run(Pacer.TICK - 0.01, busy=0.95)
    hand_over(p, 10_000)
    p.tick(signing=450, other=2000, spent=0.02)
    assert p.rate is not None and p.rate < rate
    # never below the floor
    for _ in range(50):
        c.run(Pacer.TICK, busy=1.0)
        p.tick(signing=100, other=2000, spent=0.02)
    assert p.rate == Pacer.MIN_RATE
    # the flood ends: the rate grows each tick, then the limit goes
    seen = []
    for _ in range(40):
        c.run(Pacer.TICK, busy=0.3)
        hand_over(p, 1)
        p.tick(signing=1, other=100, spent=0.0001)
        seen.append(p.rate)
        if p.rate is None:
            break
    assert seen[-1] is None
    grown = [r for r in seen if r is not None]
    assert grown == sorted(grown) and grown[0] == pytest.approx(Pacer.MIN_RATE * Pacer.GROW)


def test_reset_lifts_the_limit() -> None:
    p, c = pacer()
    hand_over(p, 500)
    c.run(Pacer.TICK, busy=1.0)
    p.tick(signing=500, other=2000, spent=0.03)
    assert p.rate is not None
    p.reset()
    assert p.rate is None and hand_over(p, 1000) == 1000


class InstantSigners(Executor):
    """Answers at once with a fixed value; counts what it was handed."""

    def __init__(self) -> None:
        self.handed = 0

    def free(self) -> bool:
        return True

    def run(self, der: bytes, now: Any, sign_unknown: bool) -> defer.Deferred[Any]:
        self.handed += 1
        return defer.Deferred()  # never answered: the test looks at the hand-overs only

    def sign_nonce(self, entry: Any, nonce: bytes, now: Any) -> defer.Deferred[Any]:
        return self.run(b"", now, True)


def test_the_queue_holds_requests_back_while_paced_and_hands_them_over_later(
        tmp_path: Any) -> None:
    """SigningQueue asks the pacer before each hand-over; held requests wait in the queue
    and are handed over when the pacer allows (a timer, not the next request)."""
    from datetime import timedelta

    from server.ocsp.service import OcspService
    from store import open_store
    from tests.ocsp.helpers import T0, config_for, fill_store, make_ca, request_der

    ca = make_ca(tmp_path / "pki", "pace")
    for serial in range(1, 6):
        ca.subscriber(serial)
    store = open_store(str(tmp_path / "store.sqlite3"))
    fill_store(store, ca, T0)
    now = T0 + timedelta(minutes=5)
    service = OcspService(config_for(ca), store, lambda: now)
    reactor = task.Clock()
    signers = InstantSigners()
    queue = SigningQueue(service, signers, config_for(ca), reactor=reactor,
                         clock=reactor.seconds, requests=lambda: 0,
                         pacer=Pacer(reactor.seconds, lambda: 0.0))
    queue.submit(request_der(ca, [1]), now, "192.0.2.1")  # starts the pacing ticks
    assert signers.handed == 1
    queue.pacer.rate = 10.0  # as a tick would after a flood: one hand-over per 0.1 s
    for serial in range(2, 6):
        queue.submit(request_der(ca, [serial]), now, "192.0.2.1")
    assert signers.handed == 1 and queue.waiting == 4
    reactor.advance(0.1)
    assert signers.handed == 2
    reactor.advance(0.1)
    reactor.advance(0.1)
    assert signers.handed == 4 and queue.waiting == 1
    # /metrics shows the limit while it holds
    from server.ocsp.signing import OverloadCollector

    families = {m.name: m for m in OverloadCollector(queue).collect()}
    [sample] = families["certpub_ocsp_signing_paced_rate"].samples
    assert sample.value == int(queue.pacer.rate or 0) > 0
    queue.stop()
    store.close()
