"""The search pages on the HTTP listener: ``/``, ``/search``, ``/cert/…``, ``/api/v1/…``,
``/static/certpub.css`` (the thin adapter).

Strategy: ``WebRoute.handle`` maps the path to a ``WebPages`` method, picks the language
(``?lang=`` or ``Accept-Language``) and runs the method with the store — in a store thread
when the server has them (refusing with 503 when their queue is full), inline otherwise;
a ``StoreError`` becomes a 503 page. It answers GET and HEAD only. The listener's
per-address and total connection limits, timeouts and request size limits apply as to OCSP:
this is the same listener. The access log gets the kind of page, never the search text.
A search (page or JSON) by a client outside the privacy policy's exempt networks
(``server.privacy``) is judged by the policy (400/403 in the page's language) and refused
with 429 and ``Retry-After`` while the client is past its budget; its rows are charged to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

from twisted.internet.defer import Deferred

from server import storeaccess
from server.http import wire
from server.http.listener import Reply
from server.http.publication import not_allowed, send
from server.web import i18n
from server.web.pages import Answer, Lang, WebPages
from server.privacy import Privacy, WebGuard
from server.web.query import QueryError, parse_search, parse_serial
from store.errors import StoreError

_EXTENSIONS = ("cer", "pem", "p7c")


def _segments(path: bytes, prefix: bytes) -> list[str] | None:
    """The percent-decoded UTF-8 segments after prefix, or None when they do not decode."""
    try:
        return [unquote_to_bytes(s).decode("utf-8", "strict")
                for s in path[len(prefix):].split(b"/")]
    except UnicodeDecodeError:
        return None


def _cert_target(parts: list[str] | None) -> tuple[str, int, str] | None:
    """(CA name, serial, extension or "") of ``<ca>/<serial>[.ext]``."""
    if parts is None or len(parts) != 2 or not parts[0] or len(parts[0]) > 64:
        return None
    serial_part, _, ext = parts[1].rpartition(".")
    if not serial_part or ext not in _EXTENSIONS:
        serial_part, ext = parts[1], ""
    serial = parse_serial(serial_part)
    return None if serial is None else (parts[0], serial, ext)


class WebRoute:
    """GET/HEAD of the search pages, certificate pages, downloads and the JSON API."""

    def __init__(self, pages: WebPages, store: Any, access: Any = None,
                 privacy: Privacy | None = None) -> None:
        self.pages = pages
        self.privacy = privacy  # the lookup policy and budget (shared with LDAP)
        self.access = access if access is not None and not access.inline else None
        self.store = access.store if self.access is not None else store

    @staticmethod
    def wants(path: bytes) -> bool:
        return (path in (b"/", b"/search", b"/static/certpub.css")
                or path.startswith((b"/cert/", b"/api/")))

    def handle(self, request: wire.Request, date: bytes,
               client: str = "-") -> Reply | Deferred[Reply]:
        path = request.path
        kind = ("static" if path.startswith(b"/static/") else
                "api" if path.startswith(b"/api/") else
                "cert" if path.startswith(b"/cert/") else "search")
        fields = {"kind": kind}
        if request.method not in (b"GET", b"HEAD"):
            return not_allowed(request, b"GET, HEAD", fields, date)
        if kind == "static":
            return send(request, self.pages.stylesheet(), fields, date)
        lang = self._lang(request)
        pages = self.pages
        if kind == "search":
            searching = b"q=" in (request.query or b"")
            if self.access is not None and self.access.busy() and not searching:
                return self._answer(request, fields, date,
                                    pages.search_page(None, request.query, lang))
            guard = self._guard(client) if searching else None
            if guard is not None and (wait := self._over_budget(guard, request.query)) > 0:
                return self._answer(request, fields, date, self._throttled(lang, wait))
            return self._run(request, fields, date, lang, pages.search_page, request.query, lang,
                             guard)
        if kind == "cert":
            target = _cert_target(_segments(path, b"/cert/"))
            if target is None:
                return self._answer(request, fields, date,
                                    pages.message(404, lang, "error_not_found_title",
                                                  "error_no_page"))
            ca, serial, ext = target
            if ext:
                fields["kind"] = "download"
                return self._run(request, fields, date, lang, pages.download, ca, serial, ext,
                                 lang)
            return self._run(request, fields, date, lang, pages.cert_page, ca, serial, lang)
        if path == b"/api/v1/cas":
            return self._run(request, fields, date, None, pages.api_cas)
        if path == b"/api/v1/search":
            guard = self._guard(client)
            if guard is not None and (wait := self._over_budget(guard, request.query)) > 0:
                return self._answer(request, fields, date, self._throttled(None, wait))
            return self._run(request, fields, date, None, pages.api_search, request.query, guard)
        if path.startswith(b"/api/v1/cert/"):
            target = _cert_target(_segments(path, b"/api/v1/cert/"))
            if target is not None and not target[2]:
                return self._run(request, fields, date, None, pages.api_cert, target[0],
                                 target[1])
        return self._answer(request, fields, date, pages.api_error(404, "error_no_page"))

    def _lang(self, request: wire.Request) -> Lang:
        query = request.query or b""
        chosen = ""
        if b"lang=" in query:
            values = parse_qs(query.decode("utf-8", "replace")).get("lang")
            chosen = values[-1] if values else ""
        code, explicit = i18n.choose(chosen, request.headers.get(b"accept-language"))
        return Lang(code, explicit, request.path.decode("latin-1"), request.query)

    def _answer(self, request: wire.Request, fields: dict[str, Any], date: bytes,
                answer: Answer) -> Reply:
        return send(request, answer, fields, date)

    def _guard(self, client: str) -> WebGuard | None:
        """The privacy policy for this client's search; None when exempt or without one."""
        privacy = self.privacy
        if privacy is None or privacy.exempt(client):
            return None
        return WebGuard(privacy, client)

    @staticmethod
    def _over_budget(guard: WebGuard, query: bytes | None) -> float:
        """Seconds the client must wait (0: none): a search by e-mail address alone costs
        nothing and is never throttled, nor is a query the page refuses anyway."""
        try:
            search = parse_search(query)
        except QueryError:
            return 0.0
        if search.mail is not None and search.name is None and search.serial is None:
            return 0.0
        return guard.privacy.over_budget(guard.host, "http")

    def _throttled(self, lang: Lang | None, wait: float) -> Answer:
        """429: the client was shown its budget of rows; ``Retry-After`` says when to retry."""
        seconds = max(1, int(wait + 0.999))
        if lang is None:
            code, headers, body = self.pages.api_error(429, "error_privacy_budget",
                                                       seconds=seconds)
        else:
            code, headers, body = self.pages.message(429, lang, "error_title",
                                                     "error_privacy_budget", seconds=seconds)
        return code, headers + [(b"Retry-After", str(seconds).encode())], body

    def _unavailable(self, lang: Lang | None) -> Answer:
        if lang is None:
            code, headers, body = self.pages.api_error(503, "error_unavailable")
        else:
            code, headers, body = self.pages.message(503, lang, "error_title",
                                                     "error_unavailable")
        return wire.unavailable(body, headers)

    def _run(self, request: wire.Request, fields: dict[str, Any], date: bytes,
             lang: Lang | None, fn: Callable[..., Answer], *args: Any) -> Reply | Deferred[Reply]:
        """fn(store, *args) in a store thread (or inline), answered; StoreError → 503."""
        def unavailable(_: StoreError) -> Reply:
            return self._answer(request, fields, date, self._unavailable(lang))

        return storeaccess.read(self.access, fn, self.store, *args, unavailable=unavailable,
                                then=lambda answer: self._answer(request, fields, date, answer))
