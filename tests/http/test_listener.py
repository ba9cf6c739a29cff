"""The HTTP listener (server.http.listener + site + routes) in memory: StringTransport, Clock.

Named conversations are run whole (a request per segment), pipelined (all at once) and byte by
byte: the bytes sent back (Date aside), the connection's fate, the log lines and the metrics
must be the same each way, and each conversation's statuses are the expected ones. Ed25519
signs deterministically, so even signed answers compare byte for byte.
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
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from server.feed import ChangeFeed
from server.http.accesslog import lines as access_lines
from server.http.listener import HttpChannel
from server.http.site import make_http_factory
from server.metrics import Metrics, set_metrics
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

    def site() -> Any:
        factory = make_http_factory(config_for(ca), store, None, clock, reactor)
        factory.access.reactor = None  # every line at once (no reactor turn here)
        return factory

    yield {"ca": ca, "ca_id": ca_id, "store": store, "clock": clock, "site": site,
           "reactor": reactor}
    store.close()


def connect(site: Any) -> tuple[Any, StringTransport]:
    proto = site.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    proto.makeConnection(transport)
    return proto, transport


def exchange(site: Any, chunks: list[bytes]) -> tuple[bytes, bool]:
    proto, transport = connect(site)
    for chunk in chunks:
        proto.dataReceived(chunk)
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


def scripts(ca: Any) -> dict[str, tuple[list[bytes], list[int], bool]]:
    """Named conversations on one connection: (requests, statuses answered, closed at end)."""
    der1, der2 = request_der(ca, [1]), request_der(ca, [2])
    nonce = request_der(ca, [1], nonce=b"n" * 32)
    g1 = b"/ocsp/" + b64(der1)
    return {
        "post miss then hits": ([post(b"/ocsp", der1), post(b"/", der1), post(b"/ocsp", der1)],
                                [200, 200, 200], False),
        "get miss then hit": ([get(g1), get(g1), get(b"/" + b64(der2)), get(b"/" + b64(der2))],
                              [200] * 4, False),
        "get and post share": ([post(b"/ocsp", der2), get(b"/ocsp/" + b64(der2))], [200] * 2,
                               False),
        "http/1.0 keep-alive": ([post(b"/ocsp", der1, b"HTTP/1.0", b"Connection: keep-alive\r\n"),
                                 post(b"/ocsp", der1, b"HTTP/1.0", b"Connection: Keep-Alive\r\n"),
                                 post(b"/ocsp", der1, b"HTTP/1.0")], [200] * 3, True),
        "http/1.0 closes": ([get(g1, b"HTTP/1.0"), get(g1, b"HTTP/1.0")], [200], True),
        "connection close": ([post(b"/ocsp", der1), post(b"/ocsp", der1,
                                                         extra=b"Connection: close\r\n"),
                              post(b"/ocsp", der1)], [200, 200], True),
        "connection token list": ([get(g1, extra=b"Connection: keep-alive, close\r\n"), get(g1)],
                                  [200], True),
        "nonce": ([post(b"/ocsp", nonce), post(b"/ocsp", nonce)], [200, 200], False),
        "conditional get": ([get(g1), get(g1, extra=b"If-None-Match: *\r\n"),
                             get(g1, extra=b'If-None-Match: "nope"\r\n'),
                             get(g1, extra=b"If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT"
                                 b"\r\n")], [200, 304, 200, 304], False),
        "errors": ([post(b"/ocsp", b"\x30\x00"), get(b"/ocsp/%%%invalid"), post(b"/ocsp", b""),
                    post(b"/ocsp", request_der(ca, [7]))], [200] * 4, False),
        "publication in between": ([post(b"/ocsp", der1), get(b"/ca/web.crt"),
                                    post(b"/ocsp", der1), get(b"/"), get(b"/nothing"),
                                    post(b"/elsewhere", der1)],
                                   [200, 200, 200, 200, 404, 404], False),
        "oversize": ([post(b"/ocsp", der1),
                      b"POST /ocsp HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n"], [200, 413],
                     True),
        "chunked": ([b"POST /ocsp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n"
                     b"\r\n" % (len(der1), der1), post(b"/ocsp", der1)], [200, 200], False),
        "head": ([b"HEAD " + g1 + b" HTTP/1.1\r\n\r\n", get(g1)], [200, 200], False),
        "query": ([get(g1 + b"?x=1"), post(b"/ocsp?x", der1)], [200, 200], False),
        "put": ([b"PUT /ocsp HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", post(b"/ocsp", der1)],
                [405, 200], False),
        "bare lf": ([b"GET " + g1 + b" HTTP/1.1\nHost: x\n\n", get(g1)], [400], True),
        "http/0.9": ([b"GET " + g1 + b"\r\n\r\n"], [400], True),
        "duplicate length": ([b"POST /ocsp HTTP/1.1\r\nContent-Length: %d\r\nContent-Length: %d"
                              b"\r\n\r\n%s" % (len(der1), len(der1), der1)], [200], False),
        "bad header": ([b"GET " + g1 + b" HTTP/1.1\r\nBad Header: x\r\n\r\n"], [400], True),
        "get with a body": ([b"GET " + g1 + b" HTTP/1.1\r\nContent-Length: 2\r\n\r\nxx", get(g1)],
                            [200, 200], False),
        "absolute form": ([b"GET http://x" + g1 + b" HTTP/1.1\r\n\r\n"], [200], False),
        "several certids": ([post(b"/ocsp", request_der(ca, [1, 2, 3])),
                             post(b"/ocsp", request_der(ca, [1, 2, 3]))], [200, 200], False),
    }


def _run(site: Any, chunks: list[bytes]) -> tuple[bytes, bool, list[dict[str, Any]], Any]:
    metrics = Metrics(process=False)
    set_metrics(metrics)
    try:
        with capturedLogs() as events:
            data, closed = exchange(site, chunks)
        counts = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for fam in metrics.registry.collect() if fam.name.startswith("certpub_")
                  and fam.name != "certpub_request_seconds" for s in fam.samples
                  if s.name.endswith("_total") or s.name.endswith("_count")}
    finally:
        set_metrics(None)
    logged = [{k: v for k, v in line.items() if k != "duration"} for line in access_lines(events)]
    return normal(data), closed, logged, counts


NAMES = ["post miss then hits", "get miss then hit", "get and post share", "http/1.0 keep-alive",
         "http/1.0 closes", "connection close", "connection token list", "nonce",
         "conditional get", "errors", "publication in between", "oversize", "chunked", "head",
         "query", "put", "bare lf", "http/0.9", "duplicate length", "bad header",
         "get with a body", "absolute form", "several certids"]


@pytest.mark.parametrize("name", NAMES)
def test_conversations_answer_alike_whatever_the_segments(env: dict[str, Any], name: str) -> None:
    script, expected, closing = scripts(env["ca"])[name]
    whole = b"".join(script)
    results = [_run(env["site"](), chunks) for chunks in
               (script, [whole], [whole[i:i + 1] for i in range(len(whole))])]
    data, closed, logged, counts = results[0]
    assert [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)] == expected
    assert closed == closing
    assert len(logged) == len(expected)  # one access line per answered request
    assert [line["status"] for line in logged] == expected
    for other in results[1:]:
        assert other == results[0]


def test_hits_are_one_lookup_and_one_write(env: dict[str, Any]) -> None:
    site = env["site"]()
    der = request_der(env["ca"], [1])
    proto, transport = connect(site)
    assert isinstance(proto, HttpChannel) and transport.producer is proto
    proto.dataReceived(post(b"/ocsp", der) + get(b"/ocsp/" + b64(der)))
    writes: list[bytes] = []
    transport.write = writes.append  # type: ignore[method-assign]
    hits = site.service.cache.hits
    for _ in range(3):
        proto.dataReceived(post(b"/ocsp", der))
        proto.dataReceived(get(b"/ocsp/" + b64(der)))
    assert len(writes) == 6 and all(w.startswith(b"HTTP/1.1 200 OK\r\n") for w in writes)
    assert site.service.cache.hits == hits + 6


def statuses(data: bytes) -> list[Any]:
    out = []
    for part in data.split(b"HTTP/1.1 200 OK\r\n")[1:]:
        head, _, rest = part.partition(b"\r\n\r\n")
        n = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        out.append(c_ocsp.load_der_ocsp_response(rest[:n]).certificate_status)
    return out


def fed_site(env: dict[str, Any]) -> tuple[Any, ChangeFeed, bytes, bytes, Any, StringTransport]:
    """A site whose OCSP service follows the store's change feed, and a connection to it:
    (site, feed, the request DER of certificate 2, its GET, protocol, transport)."""
    site = env["site"]()
    feed = ChangeFeed(env["store"])
    feed.prime()
    feed.subscribe(site.service.on_changes)
    der = request_der(env["ca"], [2])
    proto, transport = connect(site)
    return site, feed, der, get(b"/ocsp/" + b64(der)), proto, transport


def test_change_feed_voids_hot_answers(env: dict[str, Any]) -> None:
    site, feed, der, g, proto, transport = fed_site(env)
    store = env["store"]
    proto.dataReceived(post(b"/ocsp", der) + g + post(b"/ocsp", der) + g)
    assert statuses(transport.value()) == [c_ocsp.OCSPCertStatus.GOOD] * 4
    assert site.service.cache.hits == 3
    transport.clear()
    now = env["clock"].now
    with store.batch(now) as b:
        b.revoke(CaId(env["ca_id"]), Serial(2), now, RevocationReason.KEY_COMPROMISE, "t", "t")
    feed.poll()  # the generation changed: the hot bytes are no longer served
    proto.dataReceived(post(b"/ocsp", der) + g + post(b"/ocsp", der) + g)
    assert statuses(transport.value()) == [c_ocsp.OCSPCertStatus.REVOKED] * 4


def test_refresh_time_voids_hot_answers(env: dict[str, Any]) -> None:
    site = env["site"]()
    der = request_der(env["ca"], [1])
    g = get(b"/ocsp/" + b64(der))
    proto, transport = connect(site)
    proto.dataReceived(g + g)
    first = transport.value()
    transport.clear()
    env["clock"].now += timedelta(hours=13)  # past half the validity: re-signed
    with capturedLogs() as events:
        proto.dataReceived(g)
    assert [e["cache"] for e in access_lines(events)] == ["miss"]
    etags = re.findall(rb"ETag: (\S+)", first + transport.value())
    assert etags[0] == etags[1] != etags[2]
    assert b"max-age=" in transport.value()


def test_get_max_age_follows_the_clock(env: dict[str, Any]) -> None:
    site = env["site"]()
    g = get(b"/ocsp/" + b64(request_der(env["ca"], [1])))
    proto, transport = connect(site)
    proto.dataReceived(g + g)
    env["clock"].now += timedelta(seconds=100)
    proto.dataReceived(g)
    ages = [int(x) for x in re.findall(rb"max-age=(\d+)", transport.value())]
    assert ages[0] == ages[1] == ages[2] + 100


def test_idle_timeout_closes_and_aborts(env: dict[str, Any]) -> None:
    site = env["site"]()
    proto, transport = connect(site)
    proto.dataReceived(post(b"/ocsp", request_der(env["ca"], [1])))
    env["reactor"].advance(site.timeout - 1)
    assert not transport.disconnecting
    env["reactor"].advance(2)
    assert transport.disconnecting
    env["reactor"].advance(20)  # and aborts one that does not go away
    proto.connectionLost(None)
    assert not env["reactor"].getDelayedCalls()
    assert site.limits.total == 0


def test_idle_timeout_spares_a_request_arriving_in_the_same_turn(env: dict[str, Any]) -> None:
    """The soak's race, made on purpose: the client sends its next keep-alive request just as
    the idle timeout expires. The reactor runs the timer before it reads the socket, so the
    request's bytes wait unread when the timer fires; closing then would discard the request
    (the client sees RemoteDisconnected). The channel peeks, keeps the connection and answers."""
    import socket

    site = env["site"]()
    proto, transport = connect(site)
    ours, client = socket.socketpair()
    try:
        transport.socket = ours  # what tcp.Server has: the connection's socket
        der = request_der(env["ca"], [1])
        proto.dataReceived(post(b"/ocsp", der))
        assert transport.value().startswith(b"HTTP/1.1 200 ")
        transport.clear()
        env["reactor"].advance(site.timeout - 0.5)
        client.sendall(post(b"/ocsp", der))  # arrives in the turn the timer fires
        env["reactor"].advance(0.5)
        assert not transport.disconnecting
        proto.dataReceived(ours.recv(65536))  # the reactor's read, after its timers
        assert transport.value().startswith(b"HTTP/1.1 200 ")
        env["reactor"].advance(site.timeout)  # then silent: closed at the next timeout
        assert transport.disconnecting
    finally:
        ours.close()
        client.close()
    proto.connectionLost(None)


def test_idle_timeout_waits_for_an_answer_being_computed(env: dict[str, Any]) -> None:
    """A request whose answer takes longer than idle_timeout is answered, not cut off."""
    from server.http.listener import HttpFactory
    from server.limits import ConnectionLimits

    reactor = env["reactor"]
    answer: Deferred[Any] = Deferred()

    class Slow:
        def handle(self, request: Any, date: bytes, client: str = "-") -> Any:
            return answer

        def replay(self, request: Any) -> None:
            return None

    factory = HttpFactory(Slow(), max_body=1000, timeout=30.0, reactor=reactor,
                          limits=ConnectionLimits(10, 10, service="http"))
    factory.access.reactor = None
    proto, transport = connect(factory)
    proto.dataReceived(get(b"/slow"))
    reactor.advance(45)
    assert not transport.disconnecting
    answer.callback((b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200, 0, {"kind": "x"}))
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    reactor.advance(31)
    assert transport.disconnecting
    proto.connectionLost(None)


def test_one_log_line_per_pipelined_request(env: dict[str, Any]) -> None:
    site = env["site"]()
    der = request_der(env["ca"], [3])
    with capturedLogs() as events:
        exchange(site, [post(b"/ocsp", der) * 5])
    lines = access_lines(events)
    assert [e["cache"] for e in lines] == ["miss", "hit", "hit", "hit", "hit"]
    assert all(e["client"] == "127.0.0.1" and e["method"] == "POST" and e["status"] == 200
               and e["serials"] == "3" and e["statuses"] == "good" for e in lines)


def test_a_dribbled_request_gets_408(env: dict[str, Any]) -> None:
    site = env["site"]()
    proto, transport = connect(site)
    whole = post(b"/ocsp", request_der(env["ca"], [1]))
    with capturedLogs() as events:
        for i in range(len(whole) - 1):  # one byte a second: the idle timer never fires
            proto.dataReceived(whole[i:i + 1])
            env["reactor"].advance(1)
            if transport.disconnecting:
                break
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert transport.disconnecting
    assert [(e["status"], e["reason"]) for e in access_lines(events)] == [
        (408, "request not complete within idle_timeout")]


def test_deferred_answers_keep_request_order(env: dict[str, Any]) -> None:
    """A miss answered later (store threads) holds back the hits pipelined after it."""
    site = env["site"]()
    der1, der2 = request_der(env["ca"], [1]), request_der(env["ca"], [2])
    proto, transport = connect(site)
    proto.dataReceived(post(b"/ocsp", der1))  # signed: cached
    proto.dataReceived(post(b"/ocsp", der1))  # a hit: now answered from the hot table
    transport.clear()
    pending: list[Deferred[Any]] = []
    real = site.service.answer

    def later(der: bytes, now: Any, *client: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        d.addCallback(lambda _: real(der, now, *client))
        return d

    site.service.answer = later
    proto.dataReceived(post(b"/ocsp", der2) + post(b"/ocsp", der1)
                       + post(b"/ocsp", der1, extra=b"Connection: close\r\n"))
    assert transport.value() == b"" and not transport.disconnecting
    pending[0].callback(None)
    assert statuses(transport.value()) == [c_ocsp.OCSPCertStatus.GOOD] * 3
    assert transport.disconnecting  # the close waited for the answers before it


def test_lost_connection_drops_pending_answers(env: dict[str, Any]) -> None:
    site = env["site"]()
    proto, transport = connect(site)
    pending: list[Deferred[Any]] = []
    real = site.service.answer

    def later(der: bytes, now: Any, *client: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d.addCallback(lambda _: real(der, now, *client))

    site.service.answer = later
    proto.dataReceived(post(b"/ocsp", request_der(env["ca"], [2])))
    proto.connectionLost(None)
    pending[0].callback(None)
    assert transport.value() == b"" and site.limits.total == 0


def test_expect_100_continue(env: dict[str, Any]) -> None:
    site = env["site"]()
    proto, transport = connect(site)
    der = request_der(env["ca"], [1])
    proto.dataReceived(b"POST /ocsp HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n"
                       b"\r\n" % len(der))
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    proto.dataReceived(der)
    assert statuses(transport.value()) == [c_ocsp.OCSPCertStatus.GOOD]


def test_a_request_read_again_is_answered_from_the_memo(env: dict[str, Any]) -> None:
    """A read that was one whole keep-alive request answered from the hot table is answered
    again without parsing or routing, on any connection; its access line and hit count are
    the same as the parsed path's."""
    site = env["site"]()
    der = request_der(env["ca"], [1])
    g, p = get(b"/ocsp/" + b64(der)), post(b"/ocsp", der)
    proto, transport = connect(site)
    for _ in range(2):  # a miss (signed), then a hit from the hot table: remembered
        proto.dataReceived(g)
        proto.dataReceived(p)
    assert set(site.memo) == {g, p}
    expected = normal(transport.value())
    routed: list[Any] = []
    handle = site.site.handle
    site.site.handle = lambda *a: routed.append(a) or handle(*a)  # type: ignore[method-assign]
    hits = site.service.cache.hits
    other, other_transport = connect(site)
    with capturedLogs() as events:
        for chan in (proto, other):
            chan.dataReceived(g)
            chan.dataReceived(p)
    assert routed == [] and site.service.cache.hits == hits + 4
    assert normal(other_transport.value()) == expected.split(b"HTTP/1.1 200 OK")[0] + b"".join(
        b"HTTP/1.1 200 OK" + part for part in expected.split(b"HTTP/1.1 200 OK")[3:])
    lines = access_lines(events)
    assert [(e["method"], e["cache"], e["status"]) for e in lines] == [
        ("GET", "hit", 200), ("POST", "hit", 200)] * 2
    # a read that is not a whole request alone is parsed: two requests, half a request
    proto.dataReceived(p + p)
    proto.dataReceived(p[:10])
    assert len(routed) == 2
    proto.dataReceived(p[10:])
    assert len(routed) == 3 and set(site.memo) == {g, p}


def test_the_memo_follows_the_clock_the_change_feed_and_reload(env: dict[str, Any]) -> None:
    site, feed, der, g, proto, transport = fed_site(env)
    store = env["store"]
    proto.dataReceived(g)
    proto.dataReceived(g)
    assert g in site.memo
    transport.clear()
    env["clock"].now += timedelta(seconds=100)  # max-age moves with the service's clock
    proto.dataReceived(g)
    env["clock"].now += timedelta(seconds=1)
    proto.dataReceived(g)
    ages = [int(x) for x in re.findall(rb"max-age=(\d+)", transport.value())]
    assert ages[0] == ages[1] + 1
    transport.clear()
    env["clock"].now += timedelta(hours=13)  # past half the validity: re-signed
    with capturedLogs() as events:
        proto.dataReceived(g)
    assert [e["cache"] for e in access_lines(events)] == ["miss"]
    now = env["clock"].now
    proto.dataReceived(g)  # remembered again
    assert g in site.memo
    with store.batch(now) as b:
        b.revoke(CaId(env["ca_id"]), Serial(2), now, RevocationReason.KEY_COMPROMISE, "t", "t")
    feed.poll()  # the generation changed: the remembered answer is no longer served
    transport.clear()
    proto.dataReceived(g)
    proto.dataReceived(g)
    assert [s for s in re.findall(rb"HTTP/1.1 (\d+)", transport.value())] == [b"200", b"200"]
    body = transport.value().split(b"\r\n\r\n", 1)[1]
    assert c_ocsp.load_der_ocsp_response(body[:body.find(b"HTTP/1.1")]).certificate_status == \
        c_ocsp.OCSPCertStatus.REVOKED
    assert g in site.memo
    site.reload(config_for(env["ca"]))  # new signers: nothing remembered is served
    assert not site.memo


def test_a_remembered_request_waits_behind_a_pending_answer(env: dict[str, Any]) -> None:
    site = env["site"]()
    der1, der2 = request_der(env["ca"], [1]), request_der(env["ca"], [2])
    proto, transport = connect(site)
    proto.dataReceived(post(b"/ocsp", der1))
    proto.dataReceived(post(b"/ocsp", der1))
    assert post(b"/ocsp", der1) in site.memo
    transport.clear()
    pending: list[Deferred[Any]] = []
    real = site.service.answer

    def later(der: bytes, now: Any, client: str = "-") -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d.addCallback(lambda _: real(der, now, client))

    site.service.answer = later
    proto.dataReceived(post(b"/ocsp", der2))
    proto.dataReceived(post(b"/ocsp", der1))
    assert transport.value() == b""
    pending[0].callback(None)
    data = transport.value()
    assert data.count(b"HTTP/1.1 200 OK") == 2
    first = data.split(b"\r\n\r\n", 1)[1]
    response = c_ocsp.load_der_ocsp_response(first[:first.find(b"HTTP/1.1")])
    assert response.serial_number == 2  # der2's answer first, as asked


def test_access_lines_of_a_batch(env: dict[str, Any]) -> None:
    """With a reactor, lines wait FLUSH_DELAY for their batch; alike requests share an item
    rendered once, and every request still has its line and its count in the metrics."""
    from server.http.accesslog import FLUSH_DELAY
    from server.logs import render

    site = env["site"]()
    reactor = env["reactor"]
    site.access.reactor = reactor
    der = request_der(env["ca"], [3])
    metrics = Metrics(process=False)
    set_metrics(metrics)
    try:
        with capturedLogs() as events:
            proto, _ = connect(site)
            for _ in range(6):
                proto.dataReceived(post(b"/ocsp", der))
            proto.dataReceived(get(b"/nothing"))
            assert access_lines(events) == []
            reactor.advance(FLUSH_DELAY)
        metrics.flush()  # what a scrape does first
        value = metrics.registry.get_sample_value
        assert value("certpub_requests_total", {"protocol": "ocsp", "operation": "status",
                                                "result": "successful"}) == 6
        assert value("certpub_request_seconds_count", {"protocol": "ocsp",
                                                       "operation": "status"}) == 6
        assert value("certpub_ocsp_cache_total", {"result": "hit"}) == 5
    finally:
        set_metrics(None)
    lines = access_lines(events)
    assert [(e["cache"] if "cache" in e else "-", e["status"]) for e in lines] == [
        ("miss", 200)] + [("hit", 200)] * 5 + [("-", 404)]
    batch = [e for e in events if "log_batch" in e]
    assert len(batch) == 1
    text = render(batch[0], "logfmt").split("\n")
    assert len(text) == 7 and all("client=127.0.0.1" in t and "duration=" in t for t in text)
