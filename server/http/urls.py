"""The URLs printed in the CA's certificates, answered at their own paths (RFC 5280 §4.2.1.13
CRL distribution points, §4.2.1.15 freshest CRL, §4.2.2.1 caIssuers).

Strategy: a request whose ``Host`` is one of ``[http] public_names`` (case-insensitive, a
default ``:80`` ignored) and whose path is one the imported certificates printed (the store's
learnt URLs, read once per change of the CA/CRL data) is answered with what that URL names,
resolved by the store (``resolve_url``): a CRL scope or its latest delta (DER,
``application/pkix-crl``), or the issuing CA's certificate (DER ``application/pkix-cert``, or a
certs-only PKCS#7 ``application/pkcs7-mime`` for a ``.p7c`` path as §4.2.2.1 says). A learnt
URL that names nothing imported yet gets 404 (never another scope's CRL: the store decides).
certpub's own path for every scope, ``/crl/<ca>/<scope id>.crl``, goes through the same cache.

Each answer is ready-made: its body and fixed headers are built once, and the complete HTTP
bytes once per second and variant (version, keep-alive, HEAD, 304) as the cached OCSP answers
are (``server.http.ocsp._Hot``): ``Cache-Control: max-age`` ends at the CRL's nextUpdate (0
once it has passed), a CA certificate gets ``CA_MAX_AGE``. The cache lives until the change
feed reports a CA or CRL change (``on_changes``), so a hit reads no store. What is not a
learnt URL falls through to the other routes (OCSP, ``/crl/<ca>.crl``, the search pages), but
a path that no certificate can have printed (dot segments, an encoded ``/``, ``\\`` or NUL,
non-ASCII, over ``MAX_PATH`` bytes) is refused with 400 and a text body first; nothing here
ever reads a file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

from asn1crypto import cms
from asn1crypto import x509 as asn1x509
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from server.http import wire
from server.ocsp import publish
from store.errors import StoreError

Reply = tuple[bytes, int, int, dict[str, Any]]
Fallback = Callable[[], "Reply | Deferred[Reply]"]

CA_MAX_AGE = 3600  # seconds a CA certificate may be cached (it has no nextUpdate)
MAX_PATH = 1024  # longer paths were never printed in a certificate: 400
MAX_READY = 4096  # ready answers kept (a change of CA/CRL data clears them all)
CRL = b"application/pkix-crl"
CERT = b"application/pkix-cert"
PKCS7 = b"application/pkcs7-mime"
_HOSTILE = re.compile(rb"(?i)%(2f|5c|00|2e)|\\|[^\x21-\x7e]|(^|/)\.\.?(/|$)")
_SCOPE_PATH = re.compile(rb"/crl/([^/?]{1,256})/([0-9]{1,12})\.crl")
_MISSING = "missing"  # a ready-cache marker: learnt, nothing imported (404)


def public_host(headers: dict[bytes, bytes]) -> str | None:
    """The request's Host, lower-case, without a default ``:80`` (RFC 9110 §7.2); None
    when absent or not ASCII."""
    host = headers.get(b"host")
    if host is None:
        return None
    try:
        text = host.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.endswith(":80"):
        text = text[:-3]
    return text.rstrip(".") or None


def host_name(authority: str) -> str:
    """The host of ``host[:port]`` (an IPv6 literal keeps its brackets)."""
    if authority.startswith("["):
        return authority[:authority.find("]") + 1]
    return authority.rpartition(":")[0] if ":" in authority else authority


def hostile(path: bytes) -> str | None:
    """Why path cannot be a URL printed in a certificate, or None."""
    if len(path) > MAX_PATH:
        return "path over %d bytes" % MAX_PATH
    m = _HOSTILE.search(path)
    if m is None:
        return None
    if m.group(1) is not None:
        return "encoded '/', '\\\\', '.' or NUL in the path"
    if m.group(0).strip(b"/").startswith(b"."):
        return "dot segment in the path"
    return "character not allowed in the path"


def certs_only_pkcs7(cert_der: bytes) -> bytes:
    """A degenerate SignedData carrying one certificate (RFC 5280 §4.2.2.1, RFC 2797 §2.2)."""
    signed = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [],
        "encap_content_info": {"content_type": "data"},
        "certificates": [asn1x509.Certificate.load(cert_der)],
        "signer_infos": [],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def _not_before(cert_der: bytes) -> datetime | None:
    try:
        value = asn1x509.Certificate.load(cert_der)["tbs_certificate"]["validity"]["not_before"]
        return value.native  # type: ignore[no-any-return]
    except (ValueError, TypeError, KeyError):
        return None


def _settled(d: Deferred[Any]) -> Any:
    """d's result when it has one already (inline store reads), else d."""
    if d.called and not isinstance(d.result, (Failure, Deferred)):
        return d.result
    return d


class Ready:
    """One URL's answer: body and fixed headers, plus the complete bytes per variant for the
    current second (the Date and ``max-age`` move each second)."""

    __slots__ = ("body", "etag", "fixed", "next_update", "fields", "date", "variants")

    def __init__(self, body: bytes, ctype: bytes, last_modified: datetime | None,
                 next_update: datetime | None, fields: dict[str, Any]) -> None:
        self.body = body
        self.etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
        self.fixed = [(b"Content-Type", ctype), (b"ETag", self.etag)]
        if last_modified is not None:
            self.fixed.append((b"Last-Modified", publish.http_date(last_modified)))
        self.next_update = next_update  # None: a CA certificate (CA_MAX_AGE)
        self.fields = fields
        self.date = b""
        self.variants: dict[tuple[bytes, bool, bool, bool], bytes] = {}

    @classmethod
    def of(cls, target: Any, path: bytes, fields: dict[str, Any]) -> Ready:
        """The answer for a store ``UrlTarget`` (or a ``CrlScope``) at path."""
        if getattr(target, "kind", "crl") == "ca":
            if path.lower().endswith(b".p7c"):
                return cls(certs_only_pkcs7(target.der), PKCS7, _not_before(target.der), None,
                           fields)
            return cls(target.der, CERT, _not_before(target.der), None, fields)
        return cls(target.der, CRL, target.this_update, target.next_update, fields)

    def headers(self, now: datetime) -> list[tuple[bytes, bytes]]:
        """The caching headers at now: max-age never past nextUpdate (RFC 9111 §5.2.2.1)."""
        if self.next_update is None:
            age, expires = CA_MAX_AGE, now + timedelta(seconds=CA_MAX_AGE)
        else:
            age = max(0, int((self.next_update - now).total_seconds()))
            expires = self.next_update
        control = b"public, max-age=%d, no-transform" % age
        if self.next_update is not None:
            control += b", must-revalidate"
        return [*self.fixed, (b"Cache-Control", control), (b"Expires", publish.http_date(expires))]

    def answer(self, key: tuple[bytes, bool, bool, bool], date: bytes,
               now: Callable[[], datetime]) -> Reply:
        """The reply of variant key (version, keep-alive, HEAD, 304) at date."""
        if date != self.date:
            self.variants = {}
            self.date = date
        data = self.variants.get(key)
        if data is None:
            status = 304 if key[3] else 200
            data = wire.response(status, self.headers(now()), self.body, version=key[0],
                                 keep_alive=key[1], date=date, head=key[2])
            self.variants[key] = data
        return data, 304 if key[3] else 200, 0 if key[2] or key[3] else len(self.body), self.fields


class UrlRoute:
    """Learnt certificate URLs on the public host names, and ``/crl/<ca>/<scope id>.crl``."""

    def __init__(self, names: tuple[str, ...], store: Any, now: Callable[[], datetime],
                 access: Any = None) -> None:
        self.names = frozenset(names)
        self.access = access if access is not None and not access.inline else None
        self.store = access.store if self.access is not None else store
        self.now = now
        self.epoch = 0
        # (host, path) -> absolute URL, for the learnt http URLs on public names; None: unread
        self.learnt: dict[tuple[str, bytes], str] | None = None
        self.ca_names: dict[int, str] = {}
        self.ready: dict[bytes, Ready | str] = {}  # URL or "scope:<id>" -> answer / _MISSING

    def set_names(self, names: tuple[str, ...]) -> None:
        """A reload: the public host names may change."""
        self.names = frozenset(names)
        self.forget()

    def on_changes(self, changes: Any) -> None:
        """Change-feed subscriber: a CA, CRL or URL change voids every ready answer."""
        if any(c.kind in ("ca", "crl", "all") for c in changes):
            self.forget()

    def forget(self) -> None:
        self.epoch += 1
        self.learnt = None
        self.ready = {}

    # --- requests ---------------------------------------------------------------------------

    def host_of(self, request: wire.Request) -> str | None:
        """The authority (``host[:port]``, no default port) a request is for when its host
        is a public name, else None (served as before)."""
        if not self.names:
            return None
        authority = public_host(request.headers)
        if authority is None:
            return None
        return authority if host_name(authority) in self.names else None

    def handle(self, request: wire.Request, host: str, date: bytes, fallback: Fallback,
               check: bool = True) -> Reply | Deferred[Reply]:
        """A request for a public host: a learnt URL, a refusal, or the fallback's answer
        (``check``: refuse paths no certificate can have printed; off for OCSP GETs, whose
        base64 is percent-encoded)."""
        learnt = self.learnt
        if learnt is None:
            def read(_: None) -> Reply | Deferred[Reply]:
                return self.handle(request, host, date, fallback, check)

            def failed(failure: Failure) -> Reply | Deferred[Reply]:
                failure.trap(StoreError)  # type: ignore[no-untyped-call]
                # nothing kept: the next request reads the URLs again. An OCSP GET answers
                # tryLater itself; anything else may be a certificate URL: come back later
                return fallback() if not check else self._unavailable(request, date)

            d = self._run(self._read_learnt)
            d.addCallbacks(read, failed)
            return _settled(d)
        url = learnt.get((host, request.path))
        if url is None:
            reason = hostile(request.path) if check else None
            if reason is not None:
                return self._refuse(request, reason, date)
            return fallback()
        if request.query is not None:
            return self._refuse(request, "a certificate URL has no query string here", date)
        key = url.encode()
        return self._serve(request, key, date, lambda: self._resolve(url, request.path))

    def scope_file(self, request: wire.Request, date: bytes) -> Reply | Deferred[Reply] | None:
        """``/crl/<ca>/<scope id>.crl``: any CRL scope at certpub's own path; None when the
        path is not of that shape."""
        m = _SCOPE_PATH.fullmatch(request.path)
        if m is None:
            return None
        name, scope_id = unquote(m.group(1).decode("latin-1"), errors="replace"), int(m.group(2))
        return self._serve(request, b"scope:%d:%s" % (scope_id, m.group(1)), date,
                           lambda: self._scope(name, scope_id))

    def replay(self, request: wire.Request) -> Callable[[bytes], Reply | None] | None:
        """How to answer the same request bytes again while its answer is ready."""
        host = self.host_of(request)
        if host is None or self.learnt is None or request.query is not None:
            return None
        url = self.learnt.get((host, request.path))
        ready = self.ready.get(url.encode()) if url is not None else None
        if not isinstance(ready, Ready):
            return None
        variant = self._variant(ready, request)
        if variant is None:
            return None
        return partial(self._replay, ready, variant, self.epoch)

    def _replay(self, ready: Ready, variant: tuple[bytes, bool, bool, bool], epoch: int,
                date: bytes) -> Reply | None:
        if epoch != self.epoch:
            return None
        return ready.answer(variant, date, self.now)

    # --- answers ----------------------------------------------------------------------------

    @staticmethod
    def _variant(ready: Ready, request: wire.Request) -> tuple[bytes, bool, bool, bool] | None:
        if request.method != b"GET" and request.method != b"HEAD":
            return None
        inm = request.headers.get(b"if-none-match")
        not_mod = False
        if inm is not None:
            tags = {t.strip().removeprefix(b"W/") for t in inm.split(b",")}
            not_mod = ready.etag in tags or b"*" in tags
        return request.version, request.keep_alive, request.method == b"HEAD", not_mod

    def _serve(self, request: wire.Request, key: bytes, date: bytes,
               load: Callable[[], Ready | str]) -> Reply | Deferred[Reply]:
        if request.method != b"GET" and request.method != b"HEAD":
            from server.http.publication import not_allowed

            return not_allowed(request, b"GET, HEAD", {"kind": "url"}, date)
        ready = self.ready.get(key)
        if ready is not None:
            return self._answer(request, ready, date)
        epoch = self.epoch

        def loaded(found: Ready | str) -> Reply:
            if epoch == self.epoch:  # else read before a change: do not keep it
                if len(self.ready) >= MAX_READY:
                    self.ready = {}
                self.ready[key] = found
            return self._answer(request, found, date)

        def unavailable(failure: Failure) -> Reply:
            failure.trap(StoreError)  # type: ignore[no-untyped-call]
            return self._unavailable(request, date)

        d = self._run(load)
        d.addCallbacks(loaded, unavailable)
        return _settled(d)

    def _unavailable(self, request: wire.Request, date: bytes) -> Reply:
        from server.http.publication import send

        return send(request, wire.unavailable(b"store unavailable\n", [
            (b"Content-Type", b"text/plain; charset=utf-8")]), {"kind": "url"}, date)

    def _answer(self, request: wire.Request, ready: Ready | str, date: bytes) -> Reply:
        if not isinstance(ready, Ready):
            from server.http.publication import send

            return send(request, publish.not_found(), {"kind": "url", "url": "missing"}, date)
        variant = self._variant(ready, request)
        assert variant is not None
        return ready.answer(variant, date, self.now)

    def _refuse(self, request: wire.Request, reason: str, date: bytes) -> Reply:
        from server.http.publication import send

        body = ("refused: %s; this server answers only the URLs printed in the CA's"
                " certificates\n" % reason).encode()
        return send(request, (400, [(b"Content-Type", b"text/plain; charset=utf-8")], body),
                    {"kind": "url", "reason": reason}, date)

    # --- store reads (inline or in the store threads) ---------------------------------------

    def _run(self, fn: Callable[[], Any]) -> Deferred[Any]:
        if self.access is None:
            try:
                return succeed(fn())
            except StoreError:
                return fail(Failure())  # type: ignore[no-untyped-call]
        if self.access.busy():
            return fail(StoreError("store threads busy"))
        d: Deferred[Any] = self.access.run(fn)
        return d

    def _read_learnt(self) -> None:
        epoch = self.epoch
        table: dict[tuple[str, bytes], str] = {}
        read = getattr(self.store, "learnt_urls", None)  # a store without CRL scopes: none
        for u in (read() if read is not None else ()):
            if u.scheme != "http":
                continue  # a conflict stays in: its path answers 404, never falls through
            authority = urlsplit(u.url).netloc.lower().rpartition("@")[2]
            if authority.endswith(":80"):
                authority = authority[:-3]
            if host_name(authority) in self.names:
                table[(authority, u.path.encode("ascii", "replace") or b"/")] = u.url
        names = {ca.id: ca.name for ca in self.store.cas()}
        if epoch == self.epoch:
            self.learnt, self.ca_names = table, names

    def _resolve(self, url: str, path: bytes) -> Ready | str:
        target = self.store.resolve_url(url)
        if target is None:
            return _MISSING
        fields = {"kind": target.kind, "ca": self.ca_names.get(target.ca_id, str(target.ca_id))}
        if target.scope_id is not None:
            fields["scope"] = target.scope_id
        return Ready.of(target, path, fields)

    def _scope(self, name: str, scope_id: int) -> Ready | str:
        scope = self.store.crl_scope(scope_id)
        if scope is None:
            return _MISSING
        ca = next((c for c in self.store.cas() if c.id == scope.ca_id), None)
        if ca is None or ca.name != name:
            return _MISSING  # never another CA's CRL under this CA's name
        return Ready.of(scope, b"", {"kind": "delta" if scope.delta else "crl", "ca": name,
                                     "scope": scope_id})
