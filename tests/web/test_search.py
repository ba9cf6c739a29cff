"""The search over the store: each kind of lookup, the allowlist, limits and paging, and
that every query is an index lookup (never a scan of certificates)."""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import urlencode

import pytest

from server.ldap.config import DEFAULT_ATTRIBUTES
from server.web.query import MAX_RESULTS, PAGE_SIZE, parse_search
from server.web.search import find

PUBLIC = frozenset(a.lower() for a in DEFAULT_ATTRIBUTES)


def search(store: Any, allowed: frozenset[str] = PUBLIC, **params: str) -> Any:
    s = parse_search(urlencode(params).encode())
    cas = {c.id: c for c in store.cas()}
    ca_id = next((c.id for c in cas.values() if c.name == s.ca), None)
    return find(store, s, cas, ca_id, allowed)


def keys(found: Any, store: Any) -> set[tuple[str, int]]:
    names = {c.id: c.name for c in store.cas()}
    return {(names[r.ca_id], r.serial) for r in found.records}


def test_by_mail_exact_and_case_insensitive(demo_store: Any, demo_pki: Any) -> None:
    c = next(c for c in demo_pki.certs if c.emails and c.state == "good")
    for text in (c.emails[0], c.emails[0].upper(), f"  {c.emails[0]} "):
        found = search(demo_store, q=text)
        assert (c.ca, c.serial) in keys(found, demo_store)
        assert all(c.emails[0].lower() in [e.lower() for e in r.emails] for r in found.records)
    assert search(demo_store, q=c.emails[0][:-1]).total == 0  # not a prefix search


@pytest.mark.parametrize("text,cn", [("陳", "陳大文"), ("陳大文", "陳大文"), ("歐陽志", "歐陽志遠"),
                                     ("joão", "João Conceição"), ("JOÃO CONCEIÇÃO", "João Conceição"),
                                     ("maria da graça", "Maria da Graça Gonçalves")])
def test_by_name_prefix_cjk_and_accented(demo_store: Any, text: str, cn: str) -> None:
    found = search(demo_store, q=text, type="name")
    assert found.total >= 1
    assert all(r.cn is not None and r.cn.casefold().startswith(text.casefold())
               for r in found.records)
    assert any(r.cn == cn for r in found.records)


@pytest.mark.parametrize("spelling", ["80", "0x80", "0x0080", "00:80", "00 80", "0X80"])
def test_by_serial_any_spelling_with_or_without_ca(demo_store: Any, spelling: str) -> None:
    everywhere = keys(search(demo_store, q=spelling, type="serial"), demo_store)
    assert everywhere == {("rsa-ca", 0x80), ("ec-ca", 0x80)}
    assert keys(search(demo_store, q=spelling, type="serial", ca="ec-ca"), demo_store) \
        == {("ec-ca", 0x80)}


def test_by_fingerprint(demo_store: Any, demo_pki: Any) -> None:
    c = demo_pki.certs[5]
    der = demo_store.certs_by_serial([ca.id for ca in demo_store.cas()], c.serial)
    digest = hashlib.sha256(next(r.der for r in der if r.der is not None)).hexdigest()
    colons = ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
    for text in (digest, colons):
        found = search(demo_store, q=text)
        assert found.total == 1 and hashlib.sha256(found.records[0].der).hexdigest() == digest


def test_nothing_not_public_is_searched(demo_store: Any, demo_pki: Any) -> None:
    c = next(c for c in demo_pki.certs if c.emails)
    assert search(demo_store, allowed=PUBLIC - {"mail"}, q=c.emails[0]).total == 0
    assert search(demo_store, allowed=PUBLIC - {"cn"}, q="陳", type="name").total == 0
    assert search(demo_store, allowed=PUBLIC - {"certpubserialnumber"}, q="0x80").total == 0
    # private subject attributes are not indexed at all: the street, the ID number
    assert search(demo_store, q="Avenida", type="name").total == 0
    assert search(demo_store, q="ID-", type="name").total == 0


def test_results_are_limited_and_paged(tmp_path: Any) -> None:
    from importer.run import import_paths
    from store import open_store
    from tests.importer.test_importer_helpers import NOW, MiniPki, pem, write

    pki = MiniPki(tmp_path / "pki")
    files = [write(tmp_path / "in" / f"{i}.pem", pem(pki.cert("ca-a" if i % 2 else "ca-b",
                                                               0x1000 + i, f"Many {i:03d}")))
             for i in range(MAX_RESULTS + 20)]
    import_paths(pki.config(), files, now=lambda: NOW, progress=None)
    store = open_store(pki.store_location, create=False)
    try:
        first = search(store, q="many", type="name")
        assert first.total == MAX_RESULTS and first.truncated and first.pages == MAX_RESULTS // PAGE_SIZE
        assert [r.cn for r in first.records] == [f"Many {i:03d}" for i in range(PAGE_SIZE)]
        last = search(store, q="many", type="name", page=str(first.pages))
        assert [r.cn for r in last.records][-1] == f"Many {MAX_RESULTS - 1:03d}"
        few = search(store, q="many 11", type="name")
        assert few.total == 10 and not few.truncated and few.pages == 1
        in_ca = search(store, q="many", type="name", ca="ca-a")
        assert in_ca.total == 60 and not in_ca.truncated
        assert all(r.ca_id == in_ca.records[0].ca_id for r in in_ca.records)
    finally:
        store.close()


def test_every_search_query_is_an_index_lookup(demo_store: Any, demo_pki: Any) -> None:
    """EXPLAIN QUERY PLAN of every statement a search runs: certs and cert_attrs are only
    SEARCHed (by index or primary key), never SCANned."""
    seen: list[tuple[str, Any]] = []
    query = demo_store._query

    def recording(sql: str, params: Any = ()) -> Any:
        seen.append((sql, params))
        return query(sql, params)

    demo_store._query = recording
    try:
        c = next(c for c in demo_pki.certs if c.emails)
        digest = hashlib.sha256(c.path.read_bytes()).hexdigest()  # a PEM: finds nothing, still a lookup
        for params in ({"q": c.emails[0]}, {"q": "陳"}, {"q": "ab"}, {"q": "0x80"},
                       {"q": digest}, {"q": "jo", "ca": "rsa-ca"}, {"q": "80", "ca": "ec-ca"}):
            search(demo_store, **params)
    finally:
        del demo_store._query
    plans = []
    for sql, params in seen:
        for row in query("EXPLAIN QUERY PLAN " + sql, params):
            plans.append((row[-1], sql))
    assert any("certs_sha256" in p for p, _ in plans)
    for detail, sql in plans:
        if re.match(r"SCAN (c|certs|a|cert_attrs)\b", detail):
            raise AssertionError(f"{detail} in {sql}")
