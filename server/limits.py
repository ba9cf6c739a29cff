"""Connection limits shared by the listeners: in total and per client address; and
``bytes_waiting``, which both listeners ask before an idle close.

Strategy: a factory asks ``admit(host)`` in ``buildProtocol`` and returns ``None`` when it is
refused (Twisted then closes the socket at once, before reading anything); an admitted
connection gets a ``Slot`` that its protocol releases when the connection is lost. A slot
releases once however often it is asked to, so a connection closed from both ends at once
(a server-side close racing the client's) can neither leak nor free its slot twice. Refusals come in floods: one warning per burst (at most one per
``warn_interval`` seconds, saying how many were refused since the last one), never one per
connection; ``refused`` counts them all. ``TokenBuckets`` is the per-address rate bucket the
services share (the directory's privacy budget, ``server.privacy``).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

WARN_INTERVAL = 10.0  # seconds between two refusal warnings of one listener


class ConnectionLimits:
    """Counts open connections in total and per address; refuses those over the limits."""

    def __init__(self, max_total: int, max_per_address: int, *, service: str,
                 log: Logger | None = None, timer: Callable[[], float] = time.monotonic,
                 warn_interval: float = WARN_INTERVAL) -> None:
        if max_total < 1 or max_per_address < 1:
            raise ValueError("connection limits must be at least 1")
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.service = service
        self.log = log or Logger(namespace=f"certpub.{service}")
        self.timer = timer
        self.warn_interval = warn_interval
        self.total = 0
        self.per_address: Counter[str] = Counter()
        self.refused = 0  # since start, for metrics
        self._unlogged = 0  # refusals since the last warning
        self._last_warn: float | None = None

    def set_limits(self, max_total: int, max_per_address: int) -> None:
        """New limits (a reload): they apply to the connections admitted from now on."""
        if max_total < 1 or max_per_address < 1:
            raise ValueError("connection limits must be at least 1")
        self.max_total = max_total
        self.max_per_address = max_per_address

    def admit(self, host: str) -> bool:
        """Count a new connection from host; False (counted as refused) when over a limit."""
        if self.total >= self.max_total:
            self._refuse(host, "total limit")
            return False
        if self.per_address[host] >= self.max_per_address:
            self._refuse(host, "per-address limit")
            return False
        self.total += 1
        self.per_address[host] += 1
        return True

    def slot(self, host: str) -> Slot | None:
        """A Slot for an admitted connection from host, or None when refused."""
        return Slot(self, host) if self.admit(host) else None

    def release(self, host: str) -> None:
        """A connection from host, admitted earlier, has closed."""
        if self.per_address[host] <= 0:  # a bug: never let it go negative or hide it
            self.log.error("connection slot of IP={host} released but not held", host=host)
            return
        self.total -= 1
        self.per_address[host] -= 1
        if self.per_address[host] <= 0:
            del self.per_address[host]

    def _refuse(self, host: str, reason: str) -> None:
        self.refused += 1
        now = self.timer()
        if self._last_warn is not None and now - self._last_warn < self.warn_interval:
            self._unlogged += 1
            return
        self.log.warn(  # noqa: G010 - twisted.logger.Logger has no .warning
            "refusing {service} connections: {reason} (IP={host}, {total} open, "
            "{per_address} from that address; {earlier} more refused since the last warning)",
            service=self.service, reason=reason, host=host, total=self.total,
            per_address=self.per_address[host], earlier=self._unlogged)
        self._unlogged = 0
        self._last_warn = now


class Slot:
    """One admitted connection's place in its ConnectionLimits; released at most once."""

    __slots__ = ("host", "limits")

    def __init__(self, limits: ConnectionLimits, host: str) -> None:
        self.limits: ConnectionLimits | None = limits
        self.host = host

    def release(self) -> None:
        limits, self.limits = self.limits, None
        if limits is not None:
            limits.release(self.host)


def peer_host(addr: object) -> str:
    """The client address a limit counts (the host of an IPv4/IPv6 address, else str)."""
    return str(getattr(addr, "host", addr))


class TokenBuckets:
    """A token bucket per key (a client address): ``size`` tokens at most, ``rate`` more per
    second; a take may overdraw it (the cost of an answer is known only once it is sent), and
    the key then waits until the bucket holds a token again.

    Bounded: beyond ``max_keys`` keys, the buckets that refilled to full (they hold no state)
    go first, then the least recently used. Thread-safe (the search pages charge from store
    threads).
    """

    def __init__(self, size: float, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.size = size
        self.rate = rate
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def tokens(self, key: str) -> float:
        """Tokens the key holds now (``size`` for a key never seen)."""
        found = self._buckets.get(key)
        if found is None:
            return self.size
        tokens, at = found
        return min(self.size, tokens + max(self.clock() - at, 0.0) * self.rate)

    def wait(self, key: str) -> float:
        """Seconds until the key holds one token again; 0 when it holds one now."""
        missing = 1.0 - self.tokens(key)
        if missing <= 0:
            return 0.0
        return missing / self.rate if self.rate > 0 else float("inf")

    def take(self, key: str, n: float) -> None:
        """Spend n tokens of key (down to below zero)."""
        if n <= 0:
            return
        now = self.clock()
        with self._lock:
            left = self.tokens(key) - n
            buckets = self._buckets
            buckets[key] = (left, now)
            buckets.move_to_end(key)
            if len(buckets) > self.max_keys:
                self._trim(now)

    def _trim(self, now: float) -> None:
        buckets = self._buckets
        rate, size = self.rate, self.size
        full = [k for k, (t, at) in buckets.items() if t + (now - at) * rate >= size]
        for k in full[: max(len(buckets) - self.max_keys, len(buckets) // 4)]:
            del buckets[k]
        while len(buckets) > self.max_keys:
            buckets.popitem(last=False)


def network_of(host: str, v4_bits: int, v6_bits: int) -> str:
    """The network a host is counted in (``192.0.2.0/24``); the host itself when it is not
    an IP address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    bits = v4_bits if ip.version == 4 else v6_bits
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def bytes_waiting(transport: Any) -> bool:
    """Whether the client's next bytes are in the socket, not read yet (a peek, no read);
    False when the socket cannot be seen (test transports) or says end of stream."""
    sock = getattr(transport, "socket", None)
    if sock is None:  # TLS: the TCP transport under the TLS protocol
        sock = getattr(getattr(transport, "transport", None), "socket", None)
    if sock is None:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # EAGAIN: nothing there; or a broken connection, closed anyway
        return False
