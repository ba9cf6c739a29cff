"""What the HTTP listener publishes besides OCSP: ``/ca/<name>.crt|.pem``, ``/crl/<name>.crl``
and the index page ``/``.

Strategy: the bodies come from ``server.ocsp.publish`` (pure functions); this route reads the
store when it must (the CRL, the index's CRL numbers) — in the store threads when threaded,
answering 503 (CRL) or an index without CRL details when they are busy or the store is
unreadable — and answers ``If-None-Match`` with 304 from the ETag.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from server.http import wire
from server.ocsp import publish
from server.ocsp.service import OcspService
from store.errors import StoreError

Reply = tuple[bytes, int, int, dict[str, Any]]


def send(request: wire.Request, reply: publish.Reply, fields: dict[str, Any],
         date: bytes) -> Reply:
    """The bytes of a (status, headers, body) answer; 304 when If-None-Match matches."""
    code, headers, body = reply
    if code == 200 and request.method in (b"GET", b"HEAD"):
        inm = request.headers.get(b"if-none-match")
        etag = dict(headers).get(b"ETag")
        if inm is not None and etag is not None:
            tags = {t.strip().removeprefix(b"W/") for t in inm.split(b",")}
            if etag in tags or b"*" in tags:
                code, body = 304, b""
    data = wire.response(code, headers, body, version=request.version,
                         keep_alive=request.keep_alive, date=date,
                         head=request.method == b"HEAD")
    return data, code, len(body), fields


def not_allowed(request: wire.Request, allow: bytes, fields: dict[str, Any],
                date: bytes) -> Reply:
    return send(request, (405, [(b"Allow", allow),
                                (b"Content-Type", b"text/plain; charset=utf-8")],
                          b"method not allowed\n"), fields, date)


class PublicationRoute:
    """CA certificates, CRLs and the index page."""

    def __init__(self, service: OcspService, store: Any, access: Any = None) -> None:
        self.service = service
        # a threaded StoreAccess: CRL and index reads run in its pool
        self.access = access if access is not None and not access.inline else None
        self.store = access.store if self.access is not None else store

    def index(self, request: wire.Request, ocsp_paths: tuple[str, ...],
              date: bytes) -> Reply | Deferred[Reply]:
        fields = {"kind": "index"}

        def page(records: dict[str, Any]) -> Reply:
            return send(request, publish.index_page(list(self.service.published.values()),
                                                    records, ocsp_paths), fields, date)

        if self.access is None:
            return page(self._read_records())
        if self.access.busy():
            return page({})
        d: Deferred[dict[str, Any]] = self.access.run(self._read_records)
        return d.addCallback(page)

    def _read_records(self) -> dict[str, Any]:
        try:
            return {name: self.store.ca_by_name(name) for name in self.service.published}
        except StoreError:
            return {}

    def file(self, request: wire.Request, date: bytes) -> Reply | Deferred[Reply]:
        """``/ca/…`` or ``/crl/…``."""
        path = request.path
        kind = "ca" if path.startswith(b"/ca/") else "crl"
        name, _, ext = path.rsplit(b"/", 1)[-1].decode("latin-1").rpartition(".")
        fields = {"kind": kind, "ca": name or "-"}
        if request.method not in (b"GET", b"HEAD"):
            return not_allowed(request, b"GET, HEAD", fields, date)
        ca = self.service.published.get(name)
        if ca is None:
            return send(request, publish.not_found(), fields, date)
        if kind == "ca" and ext in ("crt", "pem"):
            return send(request, publish.ca_certificate(ca, pem=ext == "pem"), fields, date)
        if kind != "crl" or ext != "crl":
            return send(request, publish.not_found(), fields, date)

        def unavailable(failure: Failure) -> Reply:
            failure.trap(StoreError)  # type: ignore[no-untyped-call]
            return send(request, (503, [(b"Retry-After", b"10")], b"store unavailable\n"),
                        fields, date)

        def crl(record: Any) -> Reply:
            return send(request, publish.crl(record), fields, date)

        if self.access is None:
            try:
                return crl(self.store.ca_by_name(name))
            except StoreError:
                return unavailable(Failure())  # type: ignore[no-untyped-call]
        if self.access.busy():
            return unavailable(Failure(StoreError("store threads busy")))  # type: ignore[no-untyped-call]
        d: Deferred[Any] = self.access.run(self.store.ca_by_name, name)
        return d.addCallbacks(crl, unavailable)
