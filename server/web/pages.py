"""The search pages and the JSON API as answers: (status, headers, body), store-backed.

Strategy: ``WebPages`` is the service between the HTTP adapter (``server.web.route``) and
the store: each public method takes the store, the parsed request values and the language,
runs the bounded lookups of ``server.web.search``, and renders a Jinja2 template
(autoescaped: every value is escaped for HTML text and attributes, so a subscriber named
``<script>`` or ``"onload=`` shows as text) or a JSON document. The method runs in a store
thread when the server has them, so rendering stays off the reactor too. Every answer
carries the security headers; pages send ``Vary: Accept-Language`` and ``no-cache`` (a
status can change at any import).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2

from store.model import CaRecord, CertRecord
from store.errors import StoreError
from store.sqlbase import serial_text
from server.web import i18n, scopes as crl_scopes, view
from server.web.query import (
    KINDS, MAX_QUERY, MAX_RESULTS, PAGE_SIZE, QueryError, Search, parse_search,
)
from server.web.search import Found, find
from server.privacy import NOT_EXACT, WebGuard

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]

HERE = Path(__file__).parent
CSP_HTML = (b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
            b" base-uri 'none'; frame-ancestors 'none'")
CSP_OTHER = b"default-src 'none'; frame-ancestors 'none'; sandbox"
SECURITY = [
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
    (b"Cross-Origin-Opener-Policy", b"same-origin"),
    (b"Permissions-Policy", b"camera=(), microphone=(), geolocation=(), interest-cohort=()"),
]
CA_CACHE_SECONDS = 10.0  # the CA list is re-read at most this often
FILE_TYPES = {
    "cer": b"application/pkix-cert",
    "pem": b"application/x-pem-file",
    "p7c": b"application/pkcs7-mime",
}


def html_headers() -> list[tuple[bytes, bytes]]:
    return [(b"Content-Type", b"text/html; charset=utf-8"),
            (b"Content-Security-Policy", CSP_HTML), *SECURITY,
            (b"Cache-Control", b"no-cache"), (b"Vary", b"Accept-Language")]


def other_headers(content_type: bytes, cache: bytes = b"no-cache") -> list[tuple[bytes, bytes]]:
    return [(b"Content-Type", content_type), (b"Content-Security-Policy", CSP_OTHER),
            *SECURITY, (b"Cache-Control", cache)]


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Lang:
    """The language of one request and how links keep it."""

    def __init__(self, code: str, explicit: bool, path: str, query: bytes | None) -> None:
        self.code = code
        self.explicit = explicit
        self.t = i18n.Translator(code)
        self.path = path
        self.params = [(k, v) for k, v in parse_qsl((query or b"").decode("utf-8", "replace"))
                       if k != "lang"][:20]

    def url(self, path: str, params: Sequence[tuple[str, str]] = ()) -> str:
        """A link within the site that keeps an explicitly chosen language."""
        items = list(params) + ([("lang", self.code)] if self.explicit else [])
        return path + ("?" + urlencode(items) if items else "")

    def switch(self) -> list[dict[str, Any]]:
        """The language switch: this page in each language."""
        return [{"code": c, "name": i18n.NATIVE_NAMES[c], "current": c == self.code,
                 "href": self.path + "?" + urlencode(self.params + [("lang", c)])}
                for c in i18n.LANGUAGES]


class WebPages:
    """Renders the search page, certificate pages, downloads and the JSON API."""

    def __init__(self, published: Callable[[], Mapping[str, Any]], allowed: Sequence[str],
                 ocsp_paths: Sequence[str], now: Callable[[], datetime]) -> None:
        self.published = published  # name -> server.ocsp.service.PublishedCa (reloadable)
        self.configure(allowed, ocsp_paths)
        self.now = now
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined, auto_reload=False)
        self.css = (HERE / "static" / "certpub.css").read_bytes()
        self._cas: tuple[float, dict[int, CaRecord]] = (-1e9, {})
        self._scopes: tuple[float, list[Any]] = (-1e9, [])
        self.public_names: frozenset[str] = frozenset()  # [http] public_names (CRL links)

    def configure(self, allowed: Sequence[str], ocsp_paths: Sequence[str]) -> None:
        """The public attributes (the LDAP allowlist) and the OCSP paths; again on SIGHUP."""
        self.allowed = frozenset(a.lower() for a in allowed)
        self.ocsp_paths = tuple(ocsp_paths)

    # --- shared -----------------------------------------------------------------------------

    def cas(self, store: Any) -> dict[int, CaRecord]:
        """The store's CAs by id, re-read every CA_CACHE_SECONDS."""
        read_at, cas = self._cas
        if time.monotonic() - read_at > CA_CACHE_SECONDS:
            cas = {ca.id: ca for ca in store.cas()}
            self._cas = (time.monotonic(), cas)
        return cas

    def scopes(self, store: Any) -> list[Any]:
        """The store's CRL scopes (issue 23), re-read every CA_CACHE_SECONDS; [] from a
        store without them."""
        read_at, scopes = self._scopes
        if time.monotonic() - read_at > CA_CACHE_SECONDS:
            read = getattr(store, "crl_scopes", None)
            scopes = list(read()) if read is not None else []
            self._scopes = (time.monotonic(), scopes)
        return scopes

    def scope_rows(self, store: Any, cas: Mapping[int, CaRecord]) -> list[dict[str, Any]]:
        return crl_scopes.scope_rows(self.scopes(store), {i: c.name for i, c in cas.items()},
                                     self.public_names, view.when, self.now())

    def _page(self, status: int, template: str, lang: Lang, title: str,
              **values: Any) -> Answer:
        body = self.env.get_template(template).render(
            t=lang.t, m=lang.t.escaped, lang=lang.code, languages=lang.switch(), url=lang.url, title=title,
            canonical=values.pop("canonical", ""), **values)
        return status, html_headers(), body.encode()

    def message(self, status: int, lang: Lang, title_key: str, key: str,
                **args: object) -> Answer:
        return self._page(status, "message.html", lang, lang.t(title_key),
                          message=lang.t(key, **args))

    @staticmethod
    def api_error(status: int, key: str, **args: object) -> Answer:
        message = i18n.Translator("en")(key, **args)
        body = {"error": {"code": key.removeprefix("error_"), "message": message}}
        return status, api_headers(), json.dumps(body, ensure_ascii=False).encode() + b"\n"

    def _ca_id(self, cas: Mapping[int, CaRecord], name: str) -> int | None:
        return next((ca.id for ca in cas.values() if ca.name == name), None)

    # --- search -----------------------------------------------------------------------------

    def search_page(self, store: Any, query: bytes | None, lang: Lang,
                    guard: WebGuard | None = None) -> Answer:
        """The search form, with the results of a search; without a search (and only then)
        also without the store (``store`` None or unreadable: no CRL numbers). ``guard``:
        the privacy policy and budget of the client (None: exempt, or no policy)."""
        t = lang.t
        try:
            search: Search | None = parse_search(query)
            error = None
        except QueryError as exc:
            search, error = None, t(exc.key, **exc.args_)
        if search is not None and search.empty:
            # the plain page stays up without the store: the form and the CA files
            try:
                cas = self.cas(store) if store is not None else {}
                rows = self.scope_rows(store, cas) if store is not None else []
            except StoreError:
                cas, rows = {}, []
        else:
            cas = self.cas(store)
            rows = self.scope_rows(store, cas)
        values: dict[str, Any] = {
            "text": "", "kind": "any", "ca": "", "searched": False, "error": error,
            "results": [], "total": 0, "truncated": False, "page": 1, "pages": 1,
        }
        status = 400 if error else 200
        if search is not None:
            values.update(text=search.text, kind=search.kind, ca=search.ca)
            ca_id = self._ca_id(cas, search.ca) if search.ca else None
            search, refusal = judged(search, guard)
            if search.ca and ca_id is None:
                values["error"], status = t("error_unknown_ca", ca=search.ca), 404
            elif refusal is not None:
                status, key, args = refusal
                values["error"] = t(key, **args)
            elif not search.empty:
                found = find(store, search, cas, ca_id, self.allowed,
                             guard.cap if guard is not None else MAX_RESULTS)
                charge(guard, search, found)
                now = self.now()
                values.update(
                    searched=True, total=found.total, truncated=found.truncated,
                    page=search.page, pages=found.pages,
                    results=[view.summary(r, cas[r.ca_id].name, self.allowed, now, details=False)
                             for r in found.records if r.ca_id in cas])

        def page_url(n: int) -> str:
            return lang.url("/", [("q", values["text"]), ("type", values["kind"]),
                                  ("ca", values["ca"]), ("page", str(n))])

        def short(r: view.CertSummary) -> str:
            """The status line of a result, beside its badge."""
            date = {"valid": r.not_after, "expired": r.not_after, "revoked": r.revoked_at,
                    "on_hold": r.revoked_at, "not_yet_valid": r.not_before}.get(r.state, "")
            return t("short_" + r.state, date=date) if date else ""

        title = (t("results_title_for", query=values["text"]) if values["searched"]
                 else t("search_title"))
        return self._page(status, "search.html", lang, title, kinds=KINDS,
                          ca_names=sorted(ca.name for ca in cas.values()),
                          cas=self._ca_table(cas, rows), max_query=MAX_QUERY,
                          max_results=MAX_RESULTS, page_url=page_url, short=short,
                          explicit_lang=lang.explicit, **values)

    def _ca_table(self, cas: Mapping[int, CaRecord],
                  scope_rows: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        by_name = {ca.name: ca for ca in cas.values()}
        rows = []
        for name, published in sorted(self.published().items()):
            rec = by_name.get(name)
            rows.append({
                "name": name, "subject": published.subject,
                "crl_number": "" if rec is None or rec.crl_number is None else str(rec.crl_number),
                "crl_next": view.when(rec.crl_next_update) if rec is not None else "",
                "der": f"/ca/{name}.crt", "pem": f"/ca/{name}.pem", "crl": f"/crl/{name}.crl",
                # every CRL scope but the full one (the row's own CRL): partitions, deltas
                "scopes": [r for r in scope_rows if r["ca"] == name
                           and not (r["label"] == "full" and not r["delta"])]})
        return rows

    def api_cas(self, store: Any) -> Answer:
        """``/api/v1/cas``: the CAs served and every CRL scope of each (issue 23)."""
        cas = self.cas(store)
        rows = self.scope_rows(store, cas)
        by_name = {ca.name: ca for ca in cas.values()}
        doc = {"cas": [{
            "name": name, "subject": published.subject,
            "certificate": f"/ca/{name}.crt",
            "crls": crl_scopes.json_rows(r for r in rows if r["ca"] == name),
            "crl_number": getattr(by_name.get(name), "crl_number", None),
        } for name, published in sorted(self.published().items())]}
        return 200, api_headers(), json.dumps(doc, ensure_ascii=False, indent=1).encode() + b"\n"

    def api_search(self, store: Any, query: bytes | None, guard: WebGuard | None = None
                   ) -> Answer:
        try:
            search = parse_search(query)
        except QueryError as exc:
            return self.api_error(400, exc.key, **exc.args_)
        search, refusal = judged(search, guard)
        if refusal is not None:
            return self.api_error(*refusal[:2], **refusal[2])
        cas = self.cas(store)
        ca_id = self._ca_id(cas, search.ca) if search.ca else None
        if search.ca and ca_id is None:
            return self.api_error(404, "error_unknown_ca", ca=search.ca)
        found = None
        if not search.empty:
            found = find(store, search, cas, ca_id, self.allowed,
                         guard.cap if guard is not None else MAX_RESULTS)
            charge(guard, search, found)
        now = self.now()
        doc = {
            "query": {"q": search.text, "type": search.kind, "ca": search.ca or None,
                      "page": search.page},
            "total": found.total if found else 0,
            "truncated": found.truncated if found else False,
            "page": search.page, "pages": found.pages if found else 1, "page_size": PAGE_SIZE,
            "results": [self._json_summary(r, cas[r.ca_id], now)
                        for r in (found.records if found else []) if r.ca_id in cas],
        }
        return 200, api_headers(), json.dumps(doc, ensure_ascii=False, indent=1).encode() + b"\n"

    def _json_summary(self, rec: CertRecord, ca: CaRecord, now: datetime) -> dict[str, Any]:
        h = view.holder(rec, self.allowed)
        return {
            "ca": ca.name, "serial": serial_text(rec.serial),
            "url": view.cert_path(ca.name, rec.serial),
            "subject": [{"type": a, "value": v} for a, v in h.attributes],
            "emails": list(h.emails), "status": view.state_of(rec, now),
            "not_before": iso(rec.not_before), "not_after": iso(rec.not_after),
            "revoked_at": iso(rec.revoked_at),
            "reason": rec.reason.value if rec.reason is not None else None,
        }

    # --- one certificate --------------------------------------------------------------------

    def _lookup(self, store: Any, ca_name: str, serial: int) -> tuple[CertRecord, CaRecord]:
        """The certificate of ``/cert/<ca>/<serial>``; raises QueryError (a 404) when none."""
        cas = self.cas(store)
        ca_id = self._ca_id(cas, ca_name)
        if ca_id is None:
            raise QueryError("error_unknown_ca", ca=ca_name)
        if "certpubserialnumber" in self.allowed:
            found = store.certs_by_serial([ca_id], serial)
            if found:
                return found[0], cas[ca_id]
        raise QueryError("error_not_found", ca=ca_name, serial=view.serial_display(serial))

    def _view(self, rec: CertRecord, ca: CaRecord, store: Any = None) -> view.CertView:
        published = self.published().get(ca.name)
        if published is not None:  # the CA's subject as its certificate spells it
            ca = dataclasses.replace(ca, subject_dn=published.subject)
        v = view.cert_view(rec, ca, self.allowed, self.now(),
                           crl_published=ca.name in self.published(),
                           ocsp_paths=self.ocsp_paths)
        covering = crl_scopes.covering_crl(store, rec.der, ca.name, self.public_names)
        return dataclasses.replace(v, crl_url=covering) if covering else v

    def cert_page(self, store: Any, ca_name: str, serial: int, lang: Lang) -> Answer:
        t = lang.t
        try:
            rec, ca = self._lookup(store, ca_name, serial)
        except QueryError as exc:
            return self.message(404, lang, "error_not_found_title", exc.key, **exc.args_)
        v = self._view(rec, ca, store)
        reason = t("reason_" + (v.reason or "unspecified"))
        sentence = {
            "valid": lambda: t("status_valid", date=v.not_after),
            "revoked": lambda: (t("status_revoked", date=v.revoked_at, reason=reason)
                                if v.revoked_at else t("status_revoked_undated", reason=reason)),
            "on_hold": lambda: (t("status_on_hold", date=v.revoked_at) if v.revoked_at
                                else t("status_revoked_undated", reason=reason)),
            "expired": lambda: t("status_expired", date=v.not_after),
            "not_yet_valid": lambda: t("status_not_yet_valid", date=v.not_before),
            "unknown": lambda: t("status_unknown"),
        }[v.state]()
        title = (t("cert_title_named", name=v.holder.name) if v.holder.name
                 else t("cert_title_serial", serial=v.serial_hex))
        return self._page(200, "cert.html", lang, title, v=v, status_sentence=sentence,
                          canonical=v.url)

    def api_cert(self, store: Any, ca_name: str, serial: int) -> Answer:
        try:
            rec, ca = self._lookup(store, ca_name, serial)
        except QueryError as exc:
            return self.api_error(404, exc.key, **exc.args_)
        v = self._view(rec, ca, store)
        doc = self._json_summary(rec, ca, self.now())
        doc.update({
            "issuer": v.issuer_dn,
            "sha256": v.sha256.replace(":", "").lower() or None,
            "sha1": v.sha1.replace(":", "").lower() or None,
            "key": {"kind": v.key[0].removeprefix("key_"), **v.key[1]},
            "files": ({ext: f"{v.url}.{ext}" for ext in FILE_TYPES} if v.downloads else None),
            "ocsp": list(v.ocsp_urls), "crl": v.crl_url or None,
        })
        return 200, api_headers(), json.dumps(doc, ensure_ascii=False, indent=1).encode() + b"\n"

    def download(self, store: Any, ca_name: str, serial: int, ext: str, lang: Lang) -> Answer:
        try:
            rec, _ = self._lookup(store, ca_name, serial)
        except QueryError as exc:
            return self.message(404, lang, "error_not_found_title", exc.key, **exc.args_)
        if rec.der is None or "usercertificate" not in self.allowed:
            return self.message(404, lang, "error_not_found_title", "not_held")
        der = rec.der
        if ext == "cer":
            body = der
        elif ext == "pem":
            body = view.pem(der)
        else:
            known = [c.cert_der for c in self.cas(store).values()]
            known += [p.der for p in self.published().values()]
            body = view.p7c(view.chain(der, known))
        safe_ca = re.sub(r"[^A-Za-z0-9._-]", "_", ca_name)
        name = f"{safe_ca}-{serial_text(rec.serial)}.{ext}"
        headers = other_headers(FILE_TYPES[ext]) + [
            (b"Content-Disposition", b'attachment; filename="%s"' % name.encode("ascii"))]
        return 200, headers, body

    def stylesheet(self) -> Answer:
        return 200, other_headers(b"text/css; charset=utf-8", b"max-age=86400"), self.css


def judged(search: Search, guard: WebGuard | None
           ) -> tuple[Search, tuple[int, str, dict[str, object]] | None]:
    """The search as the privacy policy lets it run (a name part too short is dropped when
    an exact part remains), or its refusal: (status, catalog key, placeholders)."""
    if guard is None or search.empty:
        return search, None
    exact = search.serial is not None or search.sha256 is not None
    reason, keep = guard.judge(search.name, search.mail, exact)
    if reason == NOT_EXACT:
        return search, (403, "error_privacy_exact", {})
    if reason:
        cfg = guard.config
        return search, (400, "error_privacy_short", {"min": cfg.min_chars,
                                                      "min_cjk": cfg.min_chars_cjk})
    if not keep:
        search = dataclasses.replace(search, name=None)
    return search, None


def charge(guard: WebGuard | None, search: Search, found: Found) -> None:
    """The rows shown cost the client's budget, unless the search named the address of each
    (a lookup by e-mail address alone)."""
    if guard is None:
        return
    by_mail_only = (search.mail is not None and search.name is None and search.serial is None
                    and search.sha256 is None)
    if not by_mail_only:
        guard.charge(len(found.records))


def api_headers() -> list[tuple[bytes, bytes]]:
    return other_headers(b"application/json; charset=utf-8") + [
        (b"Access-Control-Allow-Origin", b"*")]
