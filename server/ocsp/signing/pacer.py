"""The pace at which requests are handed to the signers (``SigningQueue`` asks ``Pacer``).

Strategy: a token bucket whose rate is None (unlimited) until the server process is busy and
answers needing a signature take more than their share of its time; then the rate is cut,
and it grows back each tick that is no longer so. Its inputs are passed in: the clock and the
process's CPU time here, the per-tick counts by ``SigningQueue._on_tick`` (which is given the
listener's count of requests). Pure: no Twisted, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Pacer:
    """How fast requests may be handed to the signers, so that answers needing a signature
    cannot take the event loop from those that need none.

    A request signed in a signing process still costs the server process several times what
    a cached answer does (reading and parsing it, handing it over, sending the answer). As
    long as the server process has CPU to spare, or everything it answers needs a signature,
    requests are handed over as fast as the signers take them. Once, over a ``TICK``, the
    process used ``BUSY`` of a core or more, answered ``OTHERS`` requests or more without a
    signature (a client is there to protect, not just a health check; however few they are
    next to the flood, which is what a flood does to them), and spent more than ``SHARE`` of
    the time on the signing path (``SigningQueue`` measures its own part of that cost:
    submitting, handing over, answering), the hand-over rate is cut to ``CUT`` of what it was
    (never below ``MIN_RATE``); each ``TICK`` that is no longer so it grows by ``GROW``, and
    it becomes unlimited again once well above what is handed over. Requests held back wait
    in the queue, which sheds as always when full."""

    TICK = 0.1  # seconds between looks at the load
    BUSY = 0.8  # share of one core the server process may use before signing is slowed
    SHARE = 0.1  # of the time, measured on the signing path, it may then take
    CUT = 0.7
    GROW = 1.25
    MIN_RATE = 50.0  # hand-overs per second, whatever the load
    OTHERS = 10  # answers without a signature in a tick that make a client worth protecting

    def __init__(self, clock: Callable[[], float],
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.clock = clock
        self.cpu = cpu
        self.rate: float | None = None  # hand-overs per second; None: as fast as taken
        self._tokens = 0.0
        self._at = clock()
        self.handed = 0  # hand-overs in the current tick
        self._start = (clock(), cpu())

    def allow(self) -> bool:
        """Whether one more request may be handed over now (counted if so)."""
        rate = self.rate
        if rate is not None:
            now = self.clock()
            burst = max(1.0, rate * 0.01)
            self._tokens = min(burst, self._tokens + (now - self._at) * rate)
            self._at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
        self.handed += 1
        return True

    def delay(self) -> float:
        """Seconds until ``allow`` can say yes again."""
        return 0.0 if self.rate is None else max(0.001, (1.0 - self._tokens) / self.rate)

    def tick(self, signing: int, other: int, spent: float) -> None:
        """The end of a tick in which ``signing`` requests needed a signature (``spent``
        seconds measured on their path) and ``other`` requests were answered without one."""
        now, cpu = self.clock(), self.cpu()
        wall = max(now - self._start[0], 1e-6)
        busy = (cpu - self._start[1]) / wall
        handed = self.handed / wall
        self._start = (now, cpu)
        self.handed = 0
        if busy >= self.BUSY and other >= self.OTHERS and signing and spent / wall > self.SHARE:
            base = handed if self.rate is None else min(handed, self.rate)
            self.rate = max(self.MIN_RATE, self.CUT * base)
            self._tokens = min(self._tokens, 1.0)
            self._at = now
        elif self.rate is not None:
            self.rate *= self.GROW
            if self.rate > 2.0 * handed + self.MIN_RATE:
                self.rate = None

    def reset(self) -> None:
        """Idle: nothing waits, nothing was asked for over a tick."""
        self.rate = None
        self.handed = 0
        self._start = (self.clock(), self.cpu())
