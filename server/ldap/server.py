"""The LDAP service as a Twisted factory: ``make_ldap_factory`` is what ``server/app.py`` calls.

Strategy: the factory owns what every connection shares — the configuration, the virtual
directory over the store, the TLS context for StartTLS, the clock — and enforces the connection
limits (in total and per client address) before a protocol is built. The change feed drops the
directory's caches when the importer commits.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

from twisted.internet.protocol import ServerFactory
from twisted.internet.task import Cooperator
from twisted.logger import Logger

from server.ldap.config import LdapConfig
from server.ldap.directory import Directory, DirectoryStore
from server.ldap.protocol import KNOWN_CONTROLS, STARTTLS, WHOAMI, LdapProtocol, info_enabled
from server.ldap.schema import Allowlist

log = Logger(namespace="certpub.ldap")
VERSION = "0.1.0"
# Materialised entries each worker keeps (LRU): a subscriber entry is ~1-2 KiB, so a few MiB
# at most, whatever the size of the store.
ENTRY_CACHE = 4096


class LdapFactory(ServerFactory):
    """Builds one ``LdapProtocol`` per accepted connection, within the connection limits."""

    def __init__(self, config: LdapConfig, directory: Directory, tls: Any | None,
                 clock: Callable[[], datetime], *, timer: Callable[[], float] = time.monotonic,
                 cooperator: Cooperator | None = None,
                 call_later: Callable[..., Any] | None = None) -> None:
        self.config = config
        self.directory = directory
        self.tls = tls
        self.clock = clock
        self.timer = timer
        self.cooperator = cooperator or Cooperator()
        self.call_later = call_later
        self.connections = 0
        self.per_address: Counter[str] = Counter()
        self._next_conn = 1000
        self.log_info: bool | None = None  # per-operation info lines wanted (probed once)

    def buildProtocol(self, addr: Any) -> LdapProtocol | None:  # type: ignore[override]
        host = str(getattr(addr, "host", addr))
        peer = f"{host}:{getattr(addr, 'port', '')}"
        if self.connections >= self.config.max_connections:
            log.warn("refusing connection from IP={peer}: {n} connections open", peer=peer,
                     n=self.connections)
            return None
        if self.per_address[host] >= self.config.max_connections_per_address:
            log.warn("refusing connection from IP={peer}: per-address limit", peer=peer)
            return None
        if self.log_info is None:  # logging is set up before the first client connects
            self.log_info = info_enabled()
        self.connections += 1
        self.per_address[host] += 1
        self._next_conn += 1
        return LdapProtocol(self, self._next_conn, peer)

    def connection_closed(self, peer: str) -> None:
        host = peer.rsplit(":", 1)[0]
        self.connections -= 1
        self.per_address[host] -= 1
        if self.per_address[host] <= 0:
            del self.per_address[host]


def make_ldap_factory(config: LdapConfig, store: DirectoryStore, feed: Any,
                      tls: Any | None, now: Callable[[], datetime]) -> LdapFactory:
    """The LDAP service over a store; ``feed`` (a ChangeFeed or None) invalidates its caches."""
    extensions = [WHOAMI] + ([STARTTLS] if tls is not None else [])
    directory = Directory(
        store, Allowlist.of(config.attributes), naming_contexts=config.naming_contexts,
        scan_limit=config.scan_limit, controls=KNOWN_CONTROLS, extensions=extensions,
        version=VERSION,
    )
    if feed is not None:  # the entry cache is only correct while the feed invalidates it
        directory.entry_cache = ENTRY_CACHE
        feed.subscribe(directory.invalidate)
    return LdapFactory(config, directory, tls, now)
