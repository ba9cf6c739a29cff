"""The HTTP fast path (server.ocsp.fast) against the twisted.web path, in memory.

Every exchange is run twice — on a site with the fast path and on one without — and the bytes
on the wire (Date aside), the connection's fate, the log lines and the metrics must match.
Ed25519 signs deterministically, so even signed answers compare byte for byte.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.x509 import ocsp as c_ocsp
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from server.feed import ChangeFeed
from server.metrics import Metrics, set_metrics
from server.ocsp.fast import FastChannel
from server.ocsp.http import make_http_factory
from store.model import CaId, RevocationReason, Serial
from store.sqlite import Store
from tests.ocsp.helpers import WallClock, config_for, fill_store, make_ca, request_der

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    clock = WallClock()
    ca = make_ca(tmp_path / "pki", "web", kind="ed25519", at=clock.now)
    for serial in (1, 2, 3):
        ca.subscriber(serial)
    store = Store.open(tmp_path / "store.sqlite3")
    ca_id = fill_store(store, ca, clock.now - timedelta(seconds=30))
    reactor = Clock()

    def site(fast: bool) -> Any:
        s = make_http_factory(config_for(ca), store, None, clock, reactor)
        s.fast_path = fast
        return s

    yield {"ca": ca, "ca_id": ca_id, "store": store, "clock": clock, "site": site,
           "reactor": reactor}
    store.close()


def connect(site: Any) -> tuple[Any, StringTransport]:
    proto = site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    proto.makeConnection(transport)
    return proto, transport


def exchange(site: Any, chunks: list[bytes]) -> tuple[bytes, bool | str]:
    """What was sent back, and whether the connection is closing (or how it crashed:
    twisted.web itself fails on some inputs delivered byte by byte, e.g. bare-LF heads)."""
    proto, transport = connect(site)
    try:
        for chunk in chunks:
            proto.dataReceived(chunk)
    except Exception as exc:  # noqa: BLE001 - compared between both paths
        return transport.value(), type(exc).__name__
    return transport.value(), transport.disconnecting


def normal(data: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"Date: X\r\n", data)


def post(path: bytes, der: bytes, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" " + version + b"\r\nHost: x\r\nContent-Type: application/ocsp-"
            b"request\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(der) + der)


def get(path: bytes, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    return b"GET " + path + b" " + version + b"\r\nHost: x\r\n" + extra + b"\r\n"


def b64(der: bytes) -> bytes:
    return quote(base64.b64encode(der).decode(), safe="").encode()


def scripts(ca: Any) -> dict[str, list[bytes]]:
    """Named conversations (each a list of requests sent on one connection)."""
    der1, der2 = request_der(ca, [1]), request_der(ca, [2])
    nonce = request_der(ca, [1], nonce=b"n" * 32)
    g1 = b"/ocsp/" + b64(der1)
    return {
        "post miss then hits": [post(b"/ocsp", der1), post(b"/", der1), post(b"/ocsp", der1)],
        "get miss then hit": [get(g1), get(g1), get(b"/" + b64(der2)), get(b"/" + b64(der2))],
        "get and post share": [post(b"/ocsp", der2), get(b"/ocsp/" + b64(der2))],
        "http/1.0 keep-alive": [post(b"/ocsp", der1, b"HTTP/1.0", b"Connection: keep-alive\r\n"),
                                post(b"/ocsp", der1, b"HTTP/1.0", b"Connection: Keep-Alive\r\n"),
                                post(b"/ocsp", der1, b"HTTP/1.0")],
        "http/1.0 closes": [get(g1, b"HTTP/1.0"), get(g1, b"HTTP/1.0")],
        "connection close": [post(b"/ocsp", der1), post(b"/ocsp", der1, extra=b"Connection: close"
                                                        b"\r\n"), post(b"/ocsp", der1)],
        "connection token list": [get(g1, extra=b"Connection: keep-alive, close\r\n"), get(g1)],
        "nonce": [post(b"/ocsp", nonce), post(b"/ocsp", nonce)],
        "conditional get": [get(g1), get(g1, extra=b"If-None-Match: *\r\n"),
                            get(g1, extra=b'If-None-Match: "nope"\r\n'),
                            get(g1, extra=b"If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n")],
        "errors": [post(b"/ocsp", b"\x30\x00"), get(b"/ocsp/%%%invalid"), post(b"/ocsp", b""),
                   post(b"/ocsp", request_der(ca, [7]))],
        "publication in between": [post(b"/ocsp", der1), get(b"/ca/web.crt"), post(b"/ocsp", der1),
                                   get(b"/"), get(b"/nothing"), post(b"/elsewhere", der1)],
        "oversize": [post(b"/ocsp", der1),
                     (b"POST /ocsp HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n")],
        "chunked": [b"POST /ocsp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n"
                    b"\r\n" % (len(der1), der1), post(b"/ocsp", der1)],
        "expect": [post(b"/ocsp", der1, extra=b"Expect: 100-continue\r\n")],
        "head": [b"HEAD " + g1 + b" HTTP/1.1\r\n\r\n", get(g1)],
        "query": [get(g1 + b"?x=1"), post(b"/ocsp?x", der1)],
        "put": [b"PUT /ocsp HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", post(b"/ocsp", der1)],
        "bare lf": [b"GET " + g1 + b" HTTP/1.1\nHost: x\n\n", get(g1)],
        "http/0.9": [b"GET " + g1 + b"\r\n\r\n"],
        "duplicate length": [b"POST /ocsp HTTP/1.1\r\nContent-Length: %d\r\nContent-Length: %d"
                             b"\r\n\r\n%s" % (len(der1), len(der1), der1)],
        "bad header": [b"GET " + g1 + b" HTTP/1.1\r\nBad Header: x\r\n\r\n"],
        "get with a body": [b"GET " + g1 + b" HTTP/1.1\r\nContent-Length: 2\r\n\r\nxx", get(g1)],
        "absolute form": [b"GET http://x" + g1 + b" HTTP/1.1\r\n\r\n"],
        "several certids": [post(b"/ocsp", request_der(ca, [1, 2, 3])),
                            post(b"/ocsp", request_der(ca, [1, 2, 3]))],
    }


def _names() -> list[str]:
    return ["post miss then hits", "get miss then hit", "get and post share",
            "http/1.0 keep-alive", "http/1.0 closes", "connection close", "connection token list",
            "nonce", "conditional get", "errors", "publication in between", "oversize",
            "chunked", "expect", "head", "query", "put", "bare lf", "http/0.9",
            "duplicate length", "bad header", "get with a body", "absolute form",
            "several certids"]


def _events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in events:
        if e.get("log_format") == "http request":
            out.append({k: v for k, v in e.items()
                        if not k.startswith("log_") and k != "duration"})
    return out


@pytest.mark.parametrize("delivery", ["whole", "pipelined", "byte by byte"])
@pytest.mark.parametrize("name", _names())
def test_fast_path_answers_as_twisted_web(env: dict[str, Any], name: str, delivery: str) -> None:
    script = scripts(env["ca"])[name]
    results = []
    for fast in (True, False):
        site = env["site"](fast)
        metrics = Metrics(process=False)
        set_metrics(metrics)
        try:
            if delivery == "whole":  # one request per segment, in order
                chunks = script
            elif delivery == "pipelined":  # all at once
                chunks = [b"".join(script)]
            else:
                chunks = [bytes([c]) for c in b"".join(script)]
            with capturedLogs() as events:
                data, closed = exchange(site, chunks)
            counts = {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for fam in metrics.registry.collect() if fam.name.startswith("certpub_")
                      and fam.name != "certpub_request_seconds" for s in fam.samples
                      if s.name.endswith("_total") or s.name.endswith("_count")}
        finally:
            set_metrics(None)
        results.append((normal(data), closed, _events(events), counts))
    if isinstance(results[1][1], str) and results[0][1] is True:
        # twisted.web crashes on this byte-by-byte; the fast path, which hands it the whole
        # head at once, gets twisted.web's ordinary 400 instead.
        assert results[0][0].startswith(b"HTTP/1.1 400 ")
        return
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    assert results[0][2] == results[1][2]
    assert results[0][3] == results[1][3]
    assert results[0][2] or name in ("http/0.9", "bare lf", "bad header", "absolute form",
                                     "duplicate length", "oversize", "chunked", "expect", "put",
                                     "head")


def test_hits_are_served_by_the_fast_channel_itself(env: dict[str, Any]) -> None:
    site = env["site"](True)
    der = request_der(env["ca"], [1])
    proto, transport = connect(site)
    assert isinstance(proto, FastChannel) and transport.producer is proto
    for _ in range(3):
        proto.dataReceived(post(b"/ocsp", der) + get(b"/ocsp/" + b64(der)))
    assert proto._inner is None and not transport.disconnecting
    assert transport.value().count(b"HTTP/1.1 200 OK\r\n") == 6
    proto.dataReceived(get(b"/ca/web.crt"))
    assert proto._inner is not None  # handed over for good
    proto.dataReceived(post(b"/ocsp", der))
    assert transport.value().count(b"HTTP/1.1 200 OK\r\n") == 8


def statuses(data: bytes) -> list[Any]:
    out = []
    for part in data.split(b"HTTP/1.1 200 OK\r\n")[1:]:
        head, _, rest = part.partition(b"\r\n\r\n")
        n = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        out.append(c_ocsp.load_der_ocsp_response(rest[:n]).certificate_status)
    return out


def test_change_feed_voids_fast_path_answers(env: dict[str, Any]) -> None:
    site, store = env["site"](True), env["store"]
    feed = ChangeFeed(store)
    feed.prime()
    feed.subscribe(site.service.on_changes)
    der = request_der(env["ca"], [2])
    g = get(b"/ocsp/" + b64(der))
    proto, transport = connect(site)
    proto.dataReceived(post(b"/ocsp", der) + g + post(b"/ocsp", der) + g)
    assert statuses(transport.value()) == [c_ocsp.OCSPCertStatus.GOOD] * 4
    assert site.service.cache.hits == 3
    transport.clear()
    now = env["clock"].now
    with store.batch(now) as b:
        b.revoke(CaId(env["ca_id"]), Serial(2), now, RevocationReason.KEY_COMPROMISE, "t", "t")
    feed.poll()  # the generation changed: the pre-built bytes went with the entry
    proto.dataReceived(post(b"/ocsp", der) + g + post(b"/ocsp", der) + g)
    assert statuses(transport.value()) == [c_ocsp.OCSPCertStatus.REVOKED] * 4


def test_refresh_time_voids_fast_path_answers(env: dict[str, Any]) -> None:
    site = env["site"](True)
    der = request_der(env["ca"], [1])
    g = get(b"/ocsp/" + b64(der))
    proto, transport = connect(site)
    proto.dataReceived(g + g)
    first = transport.value()
    transport.clear()
    env["clock"].now += timedelta(hours=13)  # past half the validity: re-signed
    with capturedLogs() as events:
        proto.dataReceived(g)
    assert [e["cache"] for e in events if e.get("log_format") == "http request"] == ["miss"]
    etags = re.findall(rb"ETag: (\S+)", first + transport.value())
    assert etags[0] == etags[1] != etags[2]
    assert b"max-age=" in transport.value()


def test_get_max_age_follows_the_clock(env: dict[str, Any]) -> None:
    site = env["site"](True)
    g = get(b"/ocsp/" + b64(request_der(env["ca"], [1])))
    proto, transport = connect(site)
    proto.dataReceived(g + g)
    env["clock"].now += timedelta(seconds=100)
    proto.dataReceived(g)
    ages = [int(x) for x in re.findall(rb"max-age=(\d+)", transport.value())]
    assert ages[0] == ages[1] == ages[2] + 100


def test_idle_timeout_closes_a_fast_connection(env: dict[str, Any]) -> None:
    site = env["site"](True)
    proto, transport = connect(site)
    proto.dataReceived(post(b"/ocsp", request_der(env["ca"], [1]))[:20])
    env["reactor"].advance(site.timeOut + 1)
    assert transport.disconnecting
    env["reactor"].advance(20)  # and aborts one that does not go away
    proto.connectionLost(None)
    assert not env["reactor"].getDelayedCalls()


def test_one_log_line_per_pipelined_request(env: dict[str, Any]) -> None:
    site = env["site"](True)
    der = request_der(env["ca"], [3])
    with capturedLogs() as events:
        exchange(site, [post(b"/ocsp", der) * 5])
    lines = [e for e in events if e.get("log_format") == "http request"]
    assert [e["cache"] for e in lines] == ["miss", "hit", "hit", "hit", "hit"]
    assert all(e["client"] == "127.0.0.1" and e["method"] == "POST" and e["status"] == 200
               and e["serials"] == "3" and e["statuses"] == "good" for e in lines)


def test_a_dribbled_request_gets_408_like_twisted_web(env: dict[str, Any]) -> None:
    answers = []
    for fast in (True, False):
        site = env["site"](fast)
        proto, transport = connect(site)
        whole = post(b"/ocsp", request_der(env["ca"], [1]))
        for i in range(len(whole) - 1):  # one byte every second: the idle timer never fires
            proto.dataReceived(whole[i:i + 1])
            env["reactor"].advance(1)
            if transport.disconnecting:
                break
        answers.append((transport.value(), transport.disconnecting))
    assert answers[0] == answers[1] and answers[0][0].startswith(b"HTTP/1.1 408 ")
