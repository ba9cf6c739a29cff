"""Rendering: escaping of hostile names, every language, every status in words."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from markupsafe import escape

from server.web import i18n
from server.web.pages import Lang, WebPages
from store.model import CaId, CertRecord, CertStatus, Generation, RevocationReason, Serial
from tests.web.conftest import HOSTILE_NAMES, pages_for


def lang(code: str = "en", query: bytes | None = None, explicit: bool = False) -> Lang:
    return Lang(code, explicit, "/", query)


def esc(text: str) -> str:
    """How the templates escape text (markupsafe: & < > " ')."""
    return str(escape(text))


def text_of(body: bytes) -> str:
    return body.decode()


# --- hostile input ---------------------------------------------------------------------------

def _no_live_markup(page: str) -> None:
    """Nothing from the hostile names became markup or a template expression."""
    assert "<script" not in page and "<img" not in page
    assert '"onload=' not in page and "onerror=alert" not in page.replace("onerror=alert(3)&gt;", "")
    assert "49 {%" not in page and ">49<" not in page  # {{ 7*7 }} was not evaluated


def test_hostile_names_show_as_text_in_results(hostile: dict[str, Any]) -> None:
    pages = pages_for(hostile["config"], hostile["now"])
    store = hostile["store"]
    for cn in HOSTILE_NAMES:
        status, headers, body = pages.search_page(store, urlencode({"q": cn, "type": "name"}).encode(),
                                                  lang(query=urlencode({"q": cn}).encode()))
        page = text_of(body)
        assert status == 200
        _no_live_markup(page)
        assert esc(cn) in page  # the name, as text, in the results
        assert "One certificate was found" in page, page
    # the mail search, the search box's value attribute and the language links
    status, _, body = pages.search_page(store, b"q=x1%40evil.example", lang(query=b"q=x1%40evil.example"))
    assert esc(HOSTILE_NAMES[1]) in text_of(body)
    _no_live_markup(text_of(body))


def test_hostile_names_show_as_text_on_certificate_pages(hostile: dict[str, Any]) -> None:
    pages = pages_for(hostile["config"], hostile["now"])
    for i, cn in enumerate(HOSTILE_NAMES):
        status, headers, body = pages.cert_page(hostile["store"], "ca-a", 0x100 + i, lang())
        page = text_of(body)
        assert status == 200
        _no_live_markup(page)
        escaped = esc(cn)
        assert f"<title>Certificate of {escaped} ·" in page
        assert f"<h1>Certificate of {escaped}</h1>" in page
        status, _, body = pages.api_cert(hostile["store"], "ca-a", 0x100 + i)
        assert json.loads(body)["subject"][0] == {"type": "cn", "value": cn}


def test_hostile_query_text_is_escaped_everywhere() -> None:
    from server.web.query import parse_search  # noqa: F401 - the same parser the page uses

    class Empty:
        def cas(self) -> list[Any]:
            return []

        def attr_match_ids(self, *args: Any, **kwargs: Any) -> tuple[list[int], bool]:
            return [], False

        def certs_by_ids(self, ids: list[int]) -> list[Any]:
            return []

    pages = WebPages(lambda: {}, ("cn", "mail"), ("/ocsp",), datetime.now)
    q = '"><script>alert(1)</script>'
    query = urlencode({"q": q, "type": "name"}).encode()
    for code in i18n.LANGUAGES:
        status, _, body = pages.search_page(Empty(), query, Lang(code, True, "/", query))
        page = text_of(body)
        assert status == 200 and "<script" not in page and '"><' not in page
        assert esc(q) in page
    # a bad serial is named in the error, escaped too
    bad = urlencode({"q": "<b>zz", "type": "serial"}).encode()
    status, _, body = pages.search_page(Empty(), bad, lang(query=bad))
    assert status == 400 and "&lt;b&gt;zz" in text_of(body) and "<b>zz" not in text_of(body)


def test_security_headers_on_every_kind_of_answer(demo_store: Any, demo_pages: WebPages,
                                                  demo_pki: Any) -> None:
    good = next(c for c in demo_pki.certs if c.state == "good")
    answers = [demo_pages.search_page(demo_store, b"q=a", lang()),
               demo_pages.cert_page(demo_store, good.ca, good.serial, lang()),
               demo_pages.download(demo_store, good.ca, good.serial, "pem", lang()),
               demo_pages.api_search(demo_store, b"q=a"), demo_pages.stylesheet(),
               demo_pages.message(404, lang(), "error_not_found_title", "error_no_page")]
    for status, headers, _ in answers:
        h = dict(headers)
        csp = h[b"Content-Security-Policy"]
        assert b"default-src 'none'" in csp and b"frame-ancestors 'none'" in csp
        assert b"script-src" not in csp and b"unsafe" not in csp
        assert h[b"X-Content-Type-Options"] == b"nosniff"
        assert h[b"Referrer-Policy"] == b"no-referrer" and h[b"X-Frame-Options"] == b"DENY"


# --- languages -------------------------------------------------------------------------------

ENGLISH_ONLY = [m for k, m in i18n.catalog("en").items()
                if len(m) > 12 and "{" not in m and all(i18n.catalog(x)[k] != m for x in ("pt", "zh-Hant"))]


@pytest.mark.parametrize("code", i18n.LANGUAGES)
def test_every_page_in_each_language(code: str, demo_store: Any, demo_pages: WebPages,
                                     demo_pki: Any) -> None:
    revoked = next(c for c in demo_pki.certs if c.state == "revoked" and c.emails)
    bodies = [
        demo_pages.search_page(demo_store, None, lang(code))[2],
        demo_pages.search_page(demo_store, urlencode({"q": revoked.emails[0]}).encode(), lang(code))[2],
        demo_pages.search_page(demo_store, b"q=zz&type=serial", lang(code))[2],
        demo_pages.cert_page(demo_store, revoked.ca, revoked.serial, lang(code))[2],
        demo_pages.cert_page(demo_store, revoked.ca, 0xDEAD, lang(code))[2],
    ]
    t = i18n.Translator(code)
    for body in bodies:
        page = text_of(body)
        assert f'<html lang="{code}">' in page
        for other in i18n.LANGUAGES:  # the switch names every language in its own language
            assert f'lang="{other}" hreflang="{other}"' in page
        if code != "en":
            leaked = [m for m in ENGLISH_ONLY if esc(m) in page]
            assert not leaked, leaked
    assert esc(t("state_revoked")) in text_of(bodies[3])
    assert esc(t("error_not_found_title")) in text_of(bodies[4])


def test_an_explicit_language_is_kept_in_links(demo_store: Any, demo_pages: WebPages) -> None:
    query = b"q=a&lang=pt"
    page = text_of(demo_pages.search_page(demo_store, query, Lang("pt", True, "/", query))[2])
    assert '<input type="hidden" name="lang" value="pt">' in page
    assert re.search(r'href="/cert/[^"?]+\?lang=pt"', page)
    assert 'href="/?q=a&amp;lang=zh-Hant"' in page  # the switch keeps the search


# --- status in words -------------------------------------------------------------------------

def _status_block(page: str) -> str:
    return page.split('<div class="status', 1)[1].split("</div>", 1)[0]


def test_every_demo_state_is_worded(demo_store: Any, demo_pages: WebPages, demo_pki: Any,
                                    demo_now: datetime) -> None:
    t = i18n.Translator("en")
    expect = {"good": "valid", "revoked": "revoked", "hold": "on_hold", "expired": "expired",
              "revoked-expired": "revoked"}
    seen = set()
    for c in demo_pki.certs:
        if c.state not in expect:
            continue
        page = text_of(demo_pages.cert_page(demo_store, c.ca, c.serial, lang())[2])
        block = _status_block(page)
        state = expect[c.state]
        assert block.startswith(f' st-{state}"'), (c.state, block)
        assert esc(t("state_" + state)) in block
        if state in ("revoked",):
            reason = c.reason if c.reason and c.reason != "unspecified" else "unspecified"
            assert esc(t("reason_" + reason)) in block, (c.reason, block)
            assert "revoked on " in block
        if c.state == "revoked-expired":
            assert "It also expired on" in block
        if state == "expired":
            assert "This certificate expired on" in block
        if state == "on_hold":
            assert "suspended (on hold) since" in block
        seen.add(c.state)
    assert seen == set(expect)


class OneRecordStore:
    """A store with one CA and one certificate record (states the demo PKI does not hold)."""

    def __init__(self, ca: Any, rec: CertRecord) -> None:
        self.ca, self.rec = ca, rec

    def cas(self) -> list[Any]:
        return [self.ca]

    def certs_by_serial(self, ca_ids: list[int], serial: int) -> list[CertRecord]:
        return [self.rec] if serial == self.rec.serial and self.ca.id in ca_ids else []

    def certs_by_ids(self, ids: list[int]) -> list[CertRecord]:
        return [self.rec] if self.rec.id in ids else []


def _record(demo_store: Any, **changes: Any) -> tuple[Any, CertRecord]:
    ca = demo_store.cas()[0]
    base = CertRecord(id=1, ca_id=CaId(ca.id), serial=Serial(0x1234), der=None,
                      subject_dn="cn=Ana", directory_dn="cn=Ana Luísa,c=MO", directory_key="",
                      emails=("ana@example.mo",), cn="Ana Luísa", not_before=None,
                      not_after=None, status=CertStatus.GOOD, revoked_at=None, reason=None,
                      imported_at=datetime(2020, 1, 1), source="test",
                      generation=Generation(1))
    return ca, replace(base, **changes)


@pytest.mark.parametrize("code", i18n.LANGUAGES)
def test_every_status_and_reason_in_words(code: str, demo_store: Any, demo_pages: WebPages,
                                          demo_now: datetime) -> None:
    t = i18n.Translator(code)
    day = timedelta(days=1)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"not_before": demo_now - day, "not_after": demo_now + day}, "valid", "status_valid"),
        ({"not_before": demo_now + day, "not_after": demo_now + 9 * day}, "not_yet_valid",
         "status_not_yet_valid"),
        ({"not_before": demo_now - 9 * day, "not_after": demo_now - day}, "expired",
         "status_expired"),
        ({}, "unknown", "status_unknown"),
        ({"status": CertStatus.REVOKED, "reason": RevocationReason.CERTIFICATE_HOLD,
          "revoked_at": demo_now - day}, "on_hold", "status_on_hold"),
        ({"status": CertStatus.REVOKED}, "revoked", "status_revoked_undated"),
    ]
    for reason in RevocationReason:
        if reason is not RevocationReason.CERTIFICATE_HOLD:
            cases.append(({"status": CertStatus.REVOKED, "reason": reason,
                           "revoked_at": demo_now - day}, "revoked", "status_revoked"))
    for changes, state, key in cases:
        ca, rec = _record(demo_store, **changes)
        status, _, body = demo_pages.cert_page(OneRecordStore(ca, rec), ca.name, 0x1234, lang(code))
        block = _status_block(text_of(body))
        assert status == 200 and f"st-{state}" in block and f"s-{state}" in block
        assert esc(t("state_" + state)) in block
        sentence = t.messages[key].split("{")[0]
        assert esc(sentence) in block, (state, block)
        if state == "revoked":
            words = t("reason_" + (rec.reason.value if rec.reason else "unspecified"))
            assert esc(words) in block
        # the result list says it too, with colour class and words
        status, _, body = demo_pages.search_page(OneRecordStore(ca, rec), b"q=0x1234&type=serial",
                                                 lang(code))
        row = text_of(body).split("<tbody>", 1)[1].split("</tbody>", 1)[0]
        assert f'class="badge s-{state}">{esc(t("state_" + state))}</span>' in row
        if state not in ("unknown",) and key != "status_revoked_undated":
            assert esc(t.messages["short_" + state].split("{")[0]) in row, (state, row)
        summary = demo_pages._json_summary(rec, ca, demo_now)
        assert summary["status"] == state


def test_the_plain_page_stays_up_without_the_store(demo_config: Any, demo_now: datetime) -> None:
    from store.sqlbase import StoreError

    demo_pages = pages_for(demo_config, demo_now)  # its own: no CA list cached yet

    class Broken:
        def cas(self) -> list[Any]:
            raise StoreError("gone")

    for store in (None, Broken()):
        status, _, body = demo_pages.search_page(store, None, lang())
        assert status == 200 and 'href="/crl/rsa-ca.crl"' in text_of(body)
    with pytest.raises(StoreError):  # a search needs it: the route answers 503
        demo_pages.search_page(Broken(), b"q=a", lang())
