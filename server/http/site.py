"""The HTTP listener's routes and its factory: OCSP, ``/ca/``, ``/crl/``, ``/``, the search
pages (``server.web``: ``/``, ``/search``, ``/cert/``, ``/api/``), and ``/healthz`` and
``/metrics`` only for clients in ``[ops] public_networks`` (else 404: they belong to the
``[ops]`` listener, ``server.health.OpsSite``).

Strategy: ``HttpSite.handle`` routes a parsed request on its method and raw path (so a
base64 request containing ``/`` stays whole) to a small route object — ``OcspRoute`` first,
as it is what the listener is for — and returns its reply (bytes, status, body size, log
fields) or a Deferred of it. ``make_http_factory`` builds the service, the routes and the
listener's factory from the configuration; the factory's start and stop run the service's
periodic work (re-signing cached responses before their refresh time, the daily signer
expiry warning), and ``reload`` (SIGHUP) swaps signers, paths and limits in place.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from server.http import wire
from server.http.accesslog import AccessLog
from server.http.listener import HttpFactory, Replay, Reply
from server.http.ocsp import OcspRoute
from server.health import OPS_PATHS
from server.http.publication import PublicationRoute, not_allowed, send
from server.ldap.config import DEFAULT_ATTRIBUTES
from server.limits import ConnectionLimits
from server.ocsp import publish
from server.ocsp.service import REFRESH_EVERY, OcspService
from server.web.pages import WebPages
from server.web.route import WebRoute
from server.ocsp.signing import LocalSigners, SigningQueue
from server.ocsp.signprocs import ProcessSigners

log = Logger(namespace="server.http")


class HttpSite:
    """Routes one request to the OCSP, publication or operations route."""

    def __init__(self, ocsp: OcspRoute, publication: PublicationRoute,
                 web: WebRoute | None = None) -> None:
        self.ocsp = ocsp
        self.publication = publication
        self.web = web  # the search pages; without them ``/`` is the CA files page
        self.ops: Any = None  # server.health.OpsRoute, mounted by the composition root
        # [ops] public_networks: whether a client address may fetch the ops paths here
        self.ops_allowed: Callable[[str], bool] = lambda client: False

    def handle(self, request: wire.Request, date: bytes,
               client: str = "-") -> Reply | Deferred[Reply]:
        method, path = request.method, request.path
        ocsp = self.ocsp
        if method == b"POST":
            if path in ocsp.post_paths:
                return ocsp.post(request, date, client)
        elif (method == b"GET" or method == b"HEAD") and ocsp.is_get(path):
            return ocsp.get(request, date, client)
        return self._other(request, date, client)

    def replay(self, request: wire.Request) -> Replay | None:
        """How to answer the same request bytes again (an OCSP cache hit), else None."""
        method, path = request.method, request.path
        ocsp = self.ocsp
        if (path in ocsp.post_paths if method == b"POST"
                else (method == b"GET" or method == b"HEAD") and ocsp.is_get(path)):
            return ocsp.replay(request)
        return None

    def _other(self, request: wire.Request, date: bytes,
               client: str = "-") -> Reply | Deferred[Reply]:
        method, path = request.method, request.path
        if path.startswith((b"/ca/", b"/crl/")):
            return self.publication.file(request, date)
        web = self.web
        if web is not None and web.wants(path):
            return web.handle(request, date)
        ops = self.ops
        if ops is not None and path in OPS_PATHS and self.ops_allowed(client):
            if path == b"/healthz":
                return ops.healthz(request, date)  # type: ignore[no-any-return]
            return ops.scrape(request, date)  # type: ignore[no-any-return]
        fields: dict[str, Any] = {"kind": "ocsp"}
        if method not in (b"GET", b"HEAD", b"POST"):
            return not_allowed(request, b"GET, HEAD, POST", fields, date)
        if path == b"/" and method != b"POST":
            return self.publication.index(request, self.ocsp.paths, date)
        return send(request, publish.not_found(), fields, date)


class OcspHttpFactory(HttpFactory):
    """The listener's factory with the OCSP service's periodic work and SIGHUP reload."""

    def __init__(self, site: HttpSite, service: OcspService, *, max_body: int, timeout: float,
                 reactor: Any, limits: ConnectionLimits) -> None:
        super().__init__(site, max_body=max_body, timeout=timeout, reactor=reactor,
                         limits=limits, access=AccessLog(reactor))
        self.service = service
        self.http_site = site
        self._loops: list[LoopingCall] = []

    def startFactory(self) -> None:
        if self._loops or self.reactor is None:
            return
        # the 30-day signer warning (daily) and re-signing ahead of refresh times
        for fn, every in ((self.service.warn_expiring, 86400.0),
                          (self.service.refresh_due, REFRESH_EVERY)):
            loop = LoopingCall(fn)
            loop.clock = self.reactor
            loop.start(every, now=False)
            self._loops.append(loop)

    def stopFactory(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self.service.signing is not None:
            self.service.signing.stop()
        super().stopFactory()

    def reload(self, config: Any) -> None:
        """SIGHUP: new signers and CA files; raises (keeping the old ones) when bad."""
        self.service.reload(config)
        self.memo.clear()
        self.http_site.ocsp.forget()
        self.http_site.ocsp.set_paths(config.http.ocsp_paths)
        if self.http_site.web is not None:
            self.http_site.web.pages.configure(public_attributes(config), config.http.ocsp_paths)
        self.max_body = config.http.max_request_bytes
        ops = getattr(config, "ops", None)
        if ops is not None:
            self.http_site.ops_allowed = ops.public_allows
        self.limits.set_limits(config.http.max_connections,
                               config.http.max_connections_per_address)


def public_attributes(config: Any) -> tuple[str, ...]:
    """The LDAP allowlist: what the search pages may search and show, as the directory."""
    ldap = getattr(config, "ldap", None)
    return tuple(ldap.attributes) if ldap is not None else DEFAULT_ATTRIBUTES


def make_http_factory(config: Any, store: Any, feed: Any, clock_now: Callable[[], datetime],
                      reactor: Any, access: Any = None) -> OcspHttpFactory:
    """The HTTP listener's factory; raises SignerError when a signer is unusable. ``access``
    (a threaded StoreAccess) runs its store reads in the store threads."""
    service = OcspService(config, store, clock_now, access=access)
    service.warn_expiring()
    service.signing = make_signing_queue(config, service, store, access, reactor, clock_now)
    if feed is not None:
        feed.subscribe(service.on_changes)
    pages = WebPages(lambda: service.published, public_attributes(config), config.http.ocsp_paths,
                     clock_now)
    site = HttpSite(OcspRoute(service, config.http.ocsp_paths),
                    PublicationRoute(service, store, access), WebRoute(pages, store, access))
    limits = ConnectionLimits(config.http.max_connections, config.http.max_connections_per_address,
                              service="http", log=log)
    ops = getattr(config, "ops", None)
    if ops is not None:
        site.ops_allowed = ops.public_allows
    factory = OcspHttpFactory(site, service, max_body=config.http.max_request_bytes,
                              timeout=getattr(config.http, "idle_timeout", 30.0),
                              reactor=reactor, limits=limits)
    if service.signing is not None:  # its pacing weighs the requests answered without it
        service.signing.requests = factory.access.count
    return factory


def make_signing_queue(config: Any, service: OcspService, store: Any, access: Any,
                       reactor: Any, clock_now: Callable[[], datetime]) -> SigningQueue | None:
    """The bounded signing queue and its signers: ``[http] signing_processes`` child
    processes when the store is a file or a database they can open, else in-process."""
    if reactor is None:
        return None
    from twisted.internet.interfaces import IReactorProcess

    location = access.location if access is not None else getattr(store, "path", None)
    executor: Any
    if (config.http.signing_processes > 0 and location and str(location) != ":memory:"
            and IReactorProcess.providedBy(reactor)):
        executor = ProcessSigners(config, str(location), config.http.signing_processes,
                                  reactor, clock_now)
    else:
        executor = LocalSigners(service, access, reactor)
    return SigningQueue(service, executor, config, reactor=reactor)
