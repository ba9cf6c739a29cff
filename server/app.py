"""The composition root: configuration in, a running LDAP + HTTP server out.

Strategy: the only module that knows the reactor and the wall clock. It opens the store,
starts the change feed, builds the LDAP and HTTP protocol factories from their packages, and
listens on the configured Twisted endpoint strings. ``tls:PORT:...`` endpoints are plain TCP
endpoints wrapped in TLS with the ``[tls]`` certificate (TLS 1.2 and newer only), so the
version floor does not depend on what an endpoint string says. A worker of
``certpub serve --workers N`` passes ``inherited``: sockets its parent already bound, keyed by
endpoint string, which are adopted instead of listened on (same TLS wrapping).

The store is opened from ``[store]``'s read location (a replica's URL when set: then never
migrated). With ``[store] threads > 0`` a ``StoreAccess`` pool runs every request's store
work off the reactor thread, each pool thread with a store of its own; the store opened here
then only primes the feed and answers the start-up line. Store threads share Python's GIL
with the reactor thread, so the interpreter then hands the GIL over every
``STORE_THREADS_SWITCH_INTERVAL`` seconds instead of CPython's 5 ms (see the constant).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from server.config import Config, TlsConfig
from server.feed import ChangeFeed
from server.storeaccess import StoreAccess
from store import open_store

log = Logger()


def wall_clock() -> datetime:
    return datetime.now(UTC)


def tls_options(tls: TlsConfig) -> Any:
    """Server TLS context: the configured certificate, TLS 1.2 as the lowest version.

    The certificate and key are handed over as ``cryptography`` objects: pyOpenSSL deprecates
    its own X509/PKey types there."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from twisted.internet import ssl

    return ssl.CertificateOptions(
        privateKey=load_pem_private_key(tls.key.read_bytes(), password=None),
        certificate=x509.load_pem_x509_certificate(tls.certificate.read_bytes()),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ReloadableTls:
    """The server TLS context, swapped on SIGHUP: every new handshake asks for the current one,
    established connections keep theirs."""

    def __init__(self, tls: TlsConfig) -> None:
        self.options = tls_options(tls)

    def getContext(self) -> Any:  # noqa: N802 - Twisted's context factory interface
        return self.options.getContext()

    def serverConnectionForTLS(self, protocol: Any) -> Any:  # noqa: N802 - Twisted's interface
        return self.options.serverConnectionForTLS(protocol)

    def reload(self, config: Config) -> None:
        if config.tls is None:
            raise ValueError("the [tls] section was removed; listeners need a restart")
        self.options = tls_options(config.tls)


@dataclass
class Running:
    """What ``start`` built: the store, the feed, and the listening ports by service."""

    store: Any
    feed: ChangeFeed
    access: StoreAccess | None = None
    ports: dict[str, list[IListeningPort]] = field(default_factory=dict)
    services: dict[str, Any] = field(default_factory=dict)
    loops: list[LoopingCall] = field(default_factory=list)

    def address(self, service: str, index: int = 0) -> tuple[str, int]:
        addr = self.ports[service][index].getHost()
        return addr.host, addr.port

    @defer.inlineCallbacks
    def stop(self) -> Any:
        self.feed.stop()
        for loop in self.loops:
            if loop.running:
                loop.stop()
        for ports in self.ports.values():
            for port in ports:
                yield port.stopListening()
        self.close()

    def close(self) -> None:
        """Stop the feed and the store threads, close the store (after the reactor stopped)."""
        self.feed.stop()
        if self.access is not None:
            self.access.stop()
        self.store.close()


def _listen(reactor: Any, description: str, factory: Factory, tls: Any,
            inherited: Mapping[str, socket.socket] | None = None) -> defer.Deferred[Any]:
    sock = inherited.get(description) if inherited is not None else None
    if inherited is not None and sock is None:
        raise ValueError(f"listener {description!r} was not bound by the parent process")
    if description.startswith("tls:"):
        if tls is None:
            raise ValueError(f"listener {description!r} needs a [tls] section")
        factory = _tls_factory(tls, factory)
        description = "tcp:" + description[4:]
    if sock is not None:
        return defer.succeed(reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
    return serverFromString(reactor, description).listen(factory)


def _tls_factory(tls: Any, factory: Factory) -> Any:
    """TLS around factory; a connection the inner factory refuses (a connection limit) is
    closed quietly, as on plain TCP, instead of wrapping None and logging tracebacks."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    class LimitedTls(TLSMemoryBIOFactory):  # type: ignore[misc]
        noisy = False  # no "Starting factory <...>" lines: server.app logs each listener

        def buildProtocol(self, addr: Any) -> Any:
            inner = self.wrappedFactory.buildProtocol(addr)
            return None if inner is None else self.protocol(self, inner)

    return LimitedTls(tls, False, factory)


# A store thread running Python (an unindexed LDAP filter scans for ~0.3 s) keeps the GIL
# for up to the switch interval each time the reactor thread asks for it back, and the reactor
# asks on every system call it makes. At CPython's default 5 ms, (mail=x) searches answered
# by the reactor kept 0.15x their quiet rate under 16 connections of (cn=*e*) with
# [store] threads = 2 (p99 72 ms); at 1 ms 0.26x, 0.5 ms 0.21x, 0.2 ms 0.20x
# (bench/ocsp_flood.py --no-ocsp --rounds 3, docs/performance.md "Overload").
STORE_THREADS_SWITCH_INTERVAL = 0.001


@defer.inlineCallbacks
def start(config: Config, reactor: Any, now: Callable[[], datetime] = wall_clock,
          inherited: Mapping[str, socket.socket] | None = None) -> Any:
    """Open the store, build both services and listen (or adopt inherited sockets); returns a Running."""
    from server.health import HealthCheck, OpsRoute
    from server.ldap.server import make_ldap_factory
    from server.metrics import EXPORT_EVERY, Metrics, set_metrics
    from server.http.site import make_http_factory

    sc = config.store
    location = sc.read_location
    # A replica (read_url) is read-only: only the importer's database is ever migrated.
    store = open_store(location, migrate=sc.migrate == "auto" and sc.read_url is None)
    log.info("store {store} ({threads} store threads)", store=_shown(config),
             threads=sc.threads)
    access = StoreAccess(location, sc.threads, store=store, reactor=reactor)
    if sc.threads > 0:
        sys.setswitchinterval(min(sys.getswitchinterval(), STORE_THREADS_SWITCH_INTERVAL))
    access.start()
    listen: Callable[[], Any] | None = None
    # PostgreSQL: LISTEN for commits. Not on a replica: NOTIFY is not replicated and a hot
    # standby refuses LISTEN, so a node reading a replica polls (README "Several nodes").
    if callable(getattr(store, "wait_for_change", None)) and sc.read_url is None:
        listen = partial(open_store, location, create=False, migrate=False)
    feed = ChangeFeed(access.store, access=access, listen=listen)
    metrics = Metrics(now)
    metrics.clock = reactor
    set_metrics(metrics)
    expiries: dict[str, Any] = {}  # filled once the OCSP service has loaded its signers
    metrics.watch(store=access.store, feed=feed,
                  signer_expiries=lambda: _signer_expiries(expiries))
    running = Running(store=store, feed=feed, access=access)
    try:
        feed.start(reactor=reactor)
    except BaseException:
        running.close()
        raise
    tls = ReloadableTls(config.tls) if config.tls is not None else None
    if tls is not None:
        running.services["tls"] = tls  # first, so that a bad new certificate stops the reload
    try:
        if config.ldap.listen:
            ldap_factory = make_ldap_factory(config.ldap, store, feed, tls, now, access=access,
                                             metrics=metrics)
            running.services["ldap"] = ldap_factory
            metrics.limits["ldap"] = ldap_factory.limits
            running.ports["ldap"] = []
            for desc in config.ldap.listen:
                port = yield _listen(reactor, desc, ldap_factory, tls, inherited)
                running.ports["ldap"].append(port)
                _listening("ldap", desc, port)
        http_factory = None
        if config.http.listen:
            http_factory = make_http_factory(config, store, feed, now, reactor, access=access)
            expiries["service"] = service = http_factory.service
            metrics.limits["http"] = http_factory.limits
            metrics.presigned = lambda: service.presigned
            metrics.presign_backlog = lambda: service.presign_backlog
            if service.signing is not None:
                from server.ocsp.signing import OverloadCollector

                metrics.register_worker(OverloadCollector(service.signing))
            metrics.spools = config.import_.spool
        health = HealthCheck(access.store, feed, now, lambda: _signer_expiries(expiries),
                             poll_lag=metrics.poll_lag, access=access)
        ops = OpsRoute(health, metrics, access,
                       before_scrape=http_factory.access.flush if http_factory else None)
        if http_factory is not None:
            http_factory.http_site.ops = ops
            running.services["http"] = http_factory
            running.ports["http"] = []
            for desc in config.http.listen:
                port = yield _listen(reactor, desc, http_factory, tls, inherited)
                running.ports["http"].append(port)
                _listening("http", desc, port)
        if config.ops.listen:
            ops_factory = make_ops_factory(ops, reactor)
            running.ports["ops"] = []
            for desc in config.ops.listen:
                port = yield _listen(reactor, desc, ops_factory, tls, inherited)
                running.ports["ops"].append(port)
                _listening("ops", desc, port)
    except BaseException:
        yield running.stop()
        raise
    if metrics.shared is not None:  # a worker: its own state into the shared files
        exporter = LoopingCall(metrics.export)
        exporter.clock = reactor
        exporter.start(EXPORT_EVERY, now=True)
        running.loops.append(exporter)

        def last_export() -> None:
            if http_factory is not None:
                http_factory.access.flush()
            metrics.flush()
            metrics.export()

        reactor.addSystemEventTrigger("before", "shutdown", last_export)
    _summary(config, store, running, _signer_expiries(expiries))
    return running


def _listening(service: str, description: str, port: IListeningPort) -> None:
    """certpub's one line per listener (Twisted's own start lines are filtered out)."""
    host = port.getHost()
    log.info("listening", service=service, endpoint=description,
             address=f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}")


# The [ops] listener's connection limits: a scraper and a few health checkers, not the public.
OPS_MAX_CONNECTIONS = 64
OPS_MAX_PER_ADDRESS = 16
OPS_IDLE_TIMEOUT = 30.0


def make_ops_factory(ops: Any, reactor: Any) -> Factory:
    """The ``[ops]`` listener: ``/healthz`` and ``/metrics`` only (``server.health.OpsSite``)."""
    from server.health import OpsSite
    from server.http.listener import HttpFactory
    from server.limits import ConnectionLimits

    limits = ConnectionLimits(OPS_MAX_CONNECTIONS, OPS_MAX_PER_ADDRESS, service="ops", log=log)
    return HttpFactory(OpsSite(ops), max_body=4096, timeout=OPS_IDLE_TIMEOUT, reactor=reactor,
                       limits=limits)


def _signer_expiries(holder: dict[str, Any]) -> dict[str, datetime]:
    service = holder.get("service")
    return dict(service.signer_expiries()) if service is not None else {}


def _shown(config: Config) -> str:
    """The store the servers read, without a password."""
    from store import redact_location

    if config.store.read_url is None:
        return config.store.shown
    return f"{redact_location(config.store.read_url)} (replica of {config.store.shown})"


def _summary(config: Config, store: Any, running: Running, signers: dict[str, datetime]) -> None:
    """The start-up line operators look for: version, listeners, CAs and signers, store."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("certpub")
    except PackageNotFoundError:
        ver = "unknown"
    listeners = []
    for service, ports in running.ports.items():
        for port in ports:
            host = port.getHost()
            listeners.append(f"{service}:{host.host}:{host.port}")
    cas = []
    for ca in config.cas:
        until = signers.get(ca.name)
        cas.append(f"{ca.name}(signer until {until:%Y-%m-%d})" if until else f"{ca.name}(no OCSP)")
    log.info(
        "certpub {version} serving listeners={listeners} cas={cas} store={store}"
        " generation={generation}",
        version=ver, listeners=",".join(listeners), cas=",".join(cas),
        store=_shown(config), generation=int(store.generation()),
    )
