"""The LDAP service as a Twisted factory: ``make_ldap_factory`` is what ``server/app.py`` calls.

Strategy: the factory owns what every connection shares — the configuration, the virtual
directory over the store, the pre-encoded answers, the TLS context for StartTLS, the clock,
the store seam (``server.storeaccess``), the metrics — and enforces the connection limits (in
total and per client address, ``server.limits``) before a protocol is built. The change feed
drops the directory's caches and the answers an import changed when the importer commits.
With a threaded ``StoreAccess`` the directory reads through the per-thread store proxy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from twisted.internet.protocol import ServerFactory
from twisted.internet.task import Cooperator
from twisted.logger import Logger

from server.ldap.answers import AnswerCache
from server.ldap.config import LdapConfig
from server.ldap.directory import Directory, DirectoryStore
from server.ldap.errors import ResultCode
from server.ldap.protocol import LdapProtocol, info_enabled
from server.ldap.schema import Allowlist
from server.ldap.session import KNOWN_CONTROLS, STARTTLS, WHOAMI
from server.limits import ConnectionLimits, peer_host
from server.storeaccess import StoreAccess

log = Logger(namespace="certpub.ldap")
VERSION = "0.1.0"
# Materialised entries each worker keeps (LRU): a subscriber entry is ~1-2 KiB, so a few MiB
# at most, whatever the size of the store.
ENTRY_CACHE = 4096


class LdapFactory(ServerFactory):
    """Builds one ``LdapProtocol`` per accepted connection, within the connection limits."""

    noisy = False  # no "Starting factory <...>" lines: server.app logs each listener

    def __init__(self, config: LdapConfig, directory: Directory, tls: Any | None,
                 clock: Callable[[], datetime], *, timer: Callable[[], float] = time.monotonic,
                 cooperator: Cooperator | None = None,
                 call_later: Callable[..., Any] | None = None,
                 access: StoreAccess | None = None, answers: AnswerCache | None = None,
                 metrics: Any = None) -> None:
        self.config = config
        # the one seam every store read goes through (inline: on the reactor thread)
        self.access = access if access is not None else StoreAccess("", 0, store=directory.store)
        self.directory = directory
        # pre-encoded answers: only correct while a change feed invalidates them
        self.answers = answers if answers is not None else AnswerCache(0)
        self.metrics = metrics
        self.feed: Any = None  # the change feed that keeps the answers current
        self._counters: dict[int, str] = {}  # result code -> its metrics label
        self.tls = tls
        self.clock = clock
        self.timer = timer
        self.cooperator = cooperator or Cooperator()
        self.call_later = call_later
        self.limits = ConnectionLimits(config.max_connections,
                                       config.max_connections_per_address, service="ldap",
                                       log=log)
        self._next_conn = 1000
        self.log_info: bool | None = None  # per-operation info lines wanted (probed once)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self.limits.total

    @property
    def per_address(self) -> Mapping[str, int]:
        """Connections open now, by client address (addresses with none are absent)."""
        return self.limits.per_address

    def buildProtocol(self, addr: Any) -> LdapProtocol | None:  # type: ignore[override]
        host = peer_host(addr)
        if not self.limits.admit(host):
            return None  # closed at once; ConnectionLimits warns once per burst
        if self.log_info is None:  # logging is set up before the first client connects
            self.log_info = info_enabled()
        self._next_conn += 1
        return LdapProtocol(self, self._next_conn, f"{host}:{getattr(addr, 'port', '')}")

    def record(self, operation: str, code: int, seconds: float) -> None:
        """Count one finished operation (``certpub_requests{protocol="ldap"}``) and its time
        (tallied in memory: ``Metrics.tally``)."""
        if self.metrics is None:
            return
        result = self._counters.get(code)
        if result is None:
            try:
                result = ResultCode(code).name.lower()
            except ValueError:
                result = str(code)
            self._counters[code] = result
        self.metrics.tally("ldap", operation, result, seconds)

    def answers_current(self) -> bool:
        """The change feed reads the store: no import can have committed unseen."""
        feed = self.feed
        if feed is not None and not feed.healthy:
            if self.answers:
                self.answers.clear()
            return False
        return True

    def record_cache(self, hit: bool) -> None:
        """Count one lookup of the pre-encoded answers."""
        self.answers.count(hit)
        if self.metrics is not None:
            self.metrics.ldap_cache(hit)

    def connection_closed(self, peer: str) -> None:
        """The protocol of ``peer`` (``host:port``) lost its connection: free its slot."""
        self.limits.release(peer.rsplit(":", 1)[0])

    def reload(self, config: Any) -> None:
        """SIGHUP: the new connection limits apply to connections accepted from now on (open
        ones stay, even above a lowered limit); the other ``[ldap]`` keys need a restart."""
        self.limits.set_limits(config.ldap.max_connections,
                               config.ldap.max_connections_per_address)


def make_ldap_factory(config: LdapConfig, store: DirectoryStore, feed: Any,
                      tls: Any | None, now: Callable[[], datetime],
                      access: StoreAccess | None = None, metrics: Any = None) -> LdapFactory:
    """The LDAP service over a store; ``feed`` (a ChangeFeed or None) invalidates its caches;
    ``access`` (threaded) makes the store calls run in its pool, through its store proxy;
    ``metrics`` (a ``server.metrics.Metrics``) counts operations and answer-cache lookups."""
    extensions = [WHOAMI] + ([STARTTLS] if tls is not None else [])
    if access is None:
        access = StoreAccess("", 0, store=store)
    else:
        store = access.store
    directory = Directory(
        store, Allowlist.of(config.attributes), naming_contexts=config.naming_contexts,
        scan_limit=config.scan_limit, controls=KNOWN_CONTROLS, extensions=extensions,
        version=VERSION,
    )
    answers = AnswerCache(0)
    if feed is not None:  # the caches are only correct while the feed invalidates them
        directory.entry_cache = ENTRY_CACHE
        answers = AnswerCache(config.answer_cache_mib * 1024 * 1024)
        feed.subscribe(directory.invalidate)
        feed.subscribe(answers.invalidate)
    factory = LdapFactory(config, directory, tls, now, access=access, answers=answers,
                          metrics=metrics)
    factory.feed = feed
    return factory
