"""The certificates' own URLs on the public host names (server.http.urls), in memory.

The store's CRL-scope reads (``learnt_urls``, ``resolve_url``, ``crl_scope``: the contract of
issue 23) are stood in for by a proxy over a real store, so these tests pin the HTTP side:
ready-made bytes, caching headers, 304, HEAD, 404 for what is not imported, refusals of
paths no certificate prints, the fall-through for other hosts, and no store read on a hit.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from asn1crypto import cms
from twisted.internet.task import Clock

from server.http.site import make_http_factory
from server.http.urls import hostile, public_host
from store.errors import StoreError
from store.model import Change, Generation, CaId
from store.sqlite import Store
from tests.http.test_listener import b64, connect, get
from tests.ocsp.helpers import WallClock, config_for, fill_store, make_ca, request_der

HOST = b"crl.example.mo"
CRL_PATH = "/repository/web/part0.crl"


class ScopeStore:
    """A real store plus the issue-23 reads, answering from ``targets`` and counting reads."""

    def __init__(self, store: Store, targets: dict[str, Any], learnt: list[Any],
                 scopes: dict[int, Any]) -> None:
        self._store = store
        self.targets = targets
        self.learnt = learnt
        self.scopes = scopes
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def learnt_urls(self, ca_id: int | None = None) -> list[Any]:
        self.reads += 1
        return list(self.learnt)

    def resolve_url(self, url: str) -> Any:
        self.reads += 1
        return self.targets.get(url)

    def crl_scope(self, scope_id: int) -> Any:
        self.reads += 1
        return self.scopes.get(scope_id)


def learnt(url: str, kind: str = "crl", ca_id: int = 1) -> Any:
    m = re.fullmatch(r"(\w+)://([^/]+)(/[^?]*)", url)
    assert m is not None
    return SimpleNamespace(url=url, scheme=m.group(1), host=m.group(2), path=m.group(3),
                           kind=kind, ca_id=CaId(ca_id), conflict=False)


@pytest.fixture
def env(tmp_path: Path) -> Any:
    clock = WallClock()
    ca = make_ca(tmp_path / "pki", "web", kind="ed25519", at=clock.now)
    ca.subscriber(1)
    real = Store.open(tmp_path / "store.sqlite3")
    ca_id = fill_store(real, ca, clock.now - timedelta(seconds=30))
    crl_der = b"\x30\x03\x02\x01\x05"  # the bytes are the store's: served as they are
    now = clock.now
    crl = SimpleNamespace(kind="crl", ca_id=CaId(ca_id), scope_id=7, der=crl_der,
                          this_update=now - timedelta(hours=1),
                          next_update=now + timedelta(hours=2), generation=Generation(1))
    cacert = SimpleNamespace(kind="ca", ca_id=CaId(ca_id), scope_id=None, der=ca.der,
                             this_update=None, next_update=None, generation=Generation(1))
    base = "http://crl.example.mo"
    targets = {base + CRL_PATH: crl, base + "/repository/web.crt": cacert,
               base + "/repository/web.p7c": cacert, base + ":8080/p8080.crl": crl}
    urls = [learnt(base + CRL_PATH, ca_id=ca_id),
            learnt(base + "/repository/web/part1.crl", ca_id=ca_id),  # learnt, not imported
            learnt(base + "/repository/web.crt", "ca", ca_id),
            learnt(base + "/repository/web.p7c", "ca", ca_id),
            learnt("http://other.example.mo/x.crl", ca_id=ca_id),
            learnt(base + ":8080/p8080.crl", ca_id=ca_id)]
    scopes = {7: SimpleNamespace(id=7, ca_id=CaId(ca_id), delta=False, der=crl_der,
                                 this_update=crl.this_update, next_update=crl.next_update)}
    store = ScopeStore(real, targets, urls, scopes)
    config = config_for(ca)
    config = dataclasses.replace(config, http=dataclasses.replace(
        config.http, public_names=("crl.example.mo",)))
    factory = make_http_factory(config, store, None, clock, Clock())
    factory.access.reactor = None
    yield SimpleNamespace(site=factory, store=store, clock=clock, crl=crl, ca=ca, cacert=cacert)
    real.close()


def fetch(site: Any, path: bytes, host: bytes = HOST, method: bytes = b"GET",
          extra: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    proto, transport = connect(site)
    proto.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra
                       + b"\r\n")
    return parse(transport.value())


def parse(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in lines[1:])}
    return status, headers, body


def test_a_learnt_crl_url_is_answered_with_its_scope(env: Any) -> None:
    status, h, body = fetch(env.site, CRL_PATH.encode())
    assert status == 200 and body == env.crl.der
    assert h[b"content-type"] == b"application/pkix-crl"
    assert h[b"content-length"] == b"%d" % len(body)
    age = int(re.search(rb"max-age=(\d+)", h[b"cache-control"]).group(1))  # type: ignore[union-attr]
    assert 7190 <= age <= 7200  # ends at nextUpdate, two hours away
    assert h[b"expires"] and h[b"last-modified"] and h[b"etag"].startswith(b'"')
    # the Host is compared case-insensitively and a default port is ignored
    assert fetch(env.site, CRL_PATH.encode(), b"CRL.Example.MO:80")[2] == env.crl.der
    # another port is another URL: served where that port's URL was printed
    assert fetch(env.site, b"/p8080.crl", b"crl.example.mo:8080")[2] == env.crl.der
    assert fetch(env.site, b"/p8080.crl")[0] == 404
    assert fetch(env.site, CRL_PATH.encode(), b"crl.example.mo:8080")[0] == 404


def test_a_hit_reads_no_store_until_the_change_feed_says_so(env: Any) -> None:
    fetch(env.site, CRL_PATH.encode())
    reads = env.store.reads
    for _ in range(3):
        assert fetch(env.site, CRL_PATH.encode())[0] == 200
    assert env.store.reads == reads
    urls = env.site.http_site.urls
    urls.on_changes([Change(Generation(2), "cert", CaId(1), None, "x")])
    fetch(env.site, CRL_PATH.encode())
    assert env.store.reads == reads  # a certificate change leaves CRLs alone
    env.crl.der = b"\x30\x03\x02\x01\x06"
    urls.on_changes([Change(Generation(3), "crl", CaId(1), None, None)])
    assert fetch(env.site, CRL_PATH.encode())[2] == b"\x30\x03\x02\x01\x06"
    assert env.store.reads == reads + 2  # the learnt URLs and the one resolved


def test_304_on_a_matching_etag_and_head_without_body(env: Any) -> None:
    etag = fetch(env.site, CRL_PATH.encode())[1][b"etag"]
    status, h, body = fetch(env.site, CRL_PATH.encode(), extra=b"If-None-Match: " + etag + b"\r\n")
    assert status == 304 and body == b"" and h[b"etag"] == etag
    status, h, body = fetch(env.site, CRL_PATH.encode(), extra=b'If-None-Match: "other"\r\n')
    assert status == 200 and body == env.crl.der
    status, h, body = fetch(env.site, CRL_PATH.encode(), method=b"HEAD")
    assert status == 200 and body == b"" and h[b"content-length"] == b"%d" % len(env.crl.der)
    assert fetch(env.site, CRL_PATH.encode(), method=b"DELETE")[0] == 405


def test_no_max_age_past_next_update(env: Any) -> None:
    env.crl.next_update = env.clock.now - timedelta(minutes=5)
    h = fetch(env.site, CRL_PATH.encode())[1]
    assert b"max-age=0," in h[b"cache-control"]


def test_ca_certificate_der_and_certs_only_pkcs7(env: Any) -> None:
    status, h, body = fetch(env.site, b"/repository/web.crt")
    assert status == 200 and body == env.ca.der and h[b"content-type"] == b"application/pkix-cert"
    assert b"max-age=3600" in h[b"cache-control"]
    status, h, body = fetch(env.site, b"/repository/web.p7c")
    assert status == 200 and h[b"content-type"] == b"application/pkcs7-mime"
    signed = cms.ContentInfo.load(body)["content"]
    assert [c.dump() for c in signed["certificates"]] == [env.ca.der]
    assert len(signed["signer_infos"]) == 0


def test_not_imported_is_404_never_another_scope(env: Any) -> None:
    status, _, body = fetch(env.site, b"/repository/web/part1.crl")
    assert status == 404 and body == b"not found\n"
    assert fetch(env.site, b"/repository/web/part2.crl")[0] == 404  # never learnt
    # a URL learnt for another host is not served on this one
    assert fetch(env.site, b"/x.crl")[0] == 404


@pytest.mark.parametrize("path", [
    b"/repository/../web/part0.crl", b"/repository/web%2fpart0.crl", b"/repository/%2e%2e/x",
    b"/repository/web/part0.crl/..", b"/./repository", b"/a\\b", b"/caf\xc3\xa9.crl",
    b"/" + b"a" * 2000, b"/x%00.crl",
])
def test_hostile_paths_are_refused(env: Any, path: bytes) -> None:
    status, h, body = fetch(env.site, path)
    assert status == 400 and h[b"content-type"].startswith(b"text/plain")
    assert body.startswith(b"refused: ")


def test_query_string_on_a_certificate_url_is_refused(env: Any) -> None:
    status, _, body = fetch(env.site, CRL_PATH.encode() + b"?x=1")
    assert status == 400 and b"query" in body


def test_other_hosts_and_paths_keep_todays_behaviour(env: Any) -> None:
    # another host: a learnt path is not special, and nothing is refused
    assert fetch(env.site, CRL_PATH.encode(), b"ocsp.example.mo")[0] == 404
    assert fetch(env.site, b"/repository/../x", b"ocsp.example.mo")[0] == 404
    status, h, body = fetch(env.site, b"/ca/web.crt")  # certpub's own paths on a public name
    assert status == 200 and body == env.ca.der
    # OCSP GET on a public name: its percent-encoded base64 is not refused
    der = request_der(env.ca, [1])
    status, h, _ = fetch(env.site, b"/ocsp/" + b64(der))
    assert status == 200 and h[b"content-type"] == b"application/ocsp-response"


def test_scope_at_certpubs_own_path(env: Any) -> None:
    status, h, body = fetch(env.site, b"/crl/web/7.crl", b"anything")
    assert status == 200 and body == env.crl.der
    assert fetch(env.site, b"/crl/w%65b/7.crl")[2] == env.crl.der  # as pages quote names
    assert fetch(env.site, b"/crl/other/7.crl")[0] == 404  # the scope of another CA
    assert fetch(env.site, b"/crl/web/8.crl")[0] == 404


def test_a_read_again_is_replayed_from_the_memo(env: Any) -> None:
    site = env.site
    request = get(CRL_PATH.encode()).replace(b"Host: x", b"Host: crl.example.mo")
    proto, transport = connect(site)
    proto.dataReceived(request)
    proto.dataReceived(request)
    assert request in site.memo
    first, second = transport.value().split(b"HTTP/1.1 ")[1:]
    assert first == second
    env.site.http_site.urls.on_changes([Change(Generation(5), "crl", CaId(1), None, None)])
    env.crl.der = b"\x30\x00"
    proto.dataReceived(request)
    assert transport.value().endswith(b"\r\n\r\n\x30\x00")


def test_pure_helpers() -> None:
    assert public_host({b"host": b"WWW.Example.MO:80"}) == "www.example.mo"
    assert public_host({b"host": b"www.example.mo:8080"}) == "www.example.mo:8080"
    assert public_host({}) is None
    assert hostile(b"/repository/Issuing-CA-2.crl") is None
    assert hostile(b"/a/../b") == "dot segment in the path"
    assert hostile(b"/a%2Fb") is not None


def test_an_unreadable_store_is_503_and_the_urls_are_read_again_once_it_recovers(
        env: Any) -> None:
    learnt_urls = env.store.learnt_urls

    def broken(ca_id: int | None = None) -> list[Any]:
        raise StoreError("database disk image is malformed")

    env.store.learnt_urls = broken
    status, h, body = fetch(env.site, CRL_PATH.encode())
    assert status == 503 and h[b"retry-after"] and body == b"store unavailable\n"
    assert env.site.http_site.urls.learnt is None  # nothing kept from a failed read
    env.store.learnt_urls = learnt_urls
    status, _, body = fetch(env.site, CRL_PATH.encode())
    assert status == 200 and body == env.crl.der
