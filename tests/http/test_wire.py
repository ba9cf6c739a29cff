"""server.http.wire without a transport: requests and refusals from bytes, responses to bytes.

Every input is fed whole, byte by byte, and followed by the start of another request (trailing
bytes), and must give the same events each way.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.http import wire
from server.http.wire import Connection, Refusal, Request

MAX = 1000


def post(path: bytes, body: bytes, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" " + version + b"\r\nHost: x\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def get(path: bytes, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    return b"GET " + path + b" " + version + b"\r\nHost: x\r\n" + extra + b"\r\n"


def shape(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for e in events:
        if isinstance(e, Request):
            out.append((e.method, e.path, e.query, e.version, e.headers, e.body, e.keep_alive))
        else:
            out.append(e)
    return out


def feed_all(data: bytes, how: str, max_body: int = MAX) -> tuple[list[Any], Connection]:
    conn = Connection(max_body)
    events: list[Any] = []
    if how == "whole":
        events += conn.feed(data)
    elif how == "byte by byte":
        for i in range(len(data)):
            events += conn.feed(data[i:i + 1])
    else:  # split in three uneven parts
        a, b = len(data) // 3, 2 * len(data) // 3 + 1
        for part in (data[:a], data[a:b], data[b:]):
            events += conn.feed(part)
    return shape(events), conn


HOW = ["whole", "byte by byte", "thirds"]
TRAILING = b"GET /next HTTP/1.1\r\nHo"  # the start of a pipelined request


CASES: dict[str, tuple[bytes, list[Any]]] = {
    "post": (post(b"/ocsp", b"\x30\x03abc"[:5]),
             [(b"POST", b"/ocsp", None, b"HTTP/1.1", {b"host": b"x", b"content-length": b"5"},
               b"\x30\x03abc"[:5], True)]),
    "get with query": (get(b"/ocsp/MEQ%2F?x=1"),
                       [(b"GET", b"/ocsp/MEQ%2F", b"x=1", b"HTTP/1.1", {b"host": b"x"}, b"",
                         True)]),
    "http/1.0 closes": (get(b"/", b"HTTP/1.0"),
                        [(b"GET", b"/", None, b"HTTP/1.0", {b"host": b"x"}, b"", False)]),
    "http/1.0 keep-alive": (get(b"/", b"HTTP/1.0", b"Connection: Keep-Alive\r\n"),
                            [(b"GET", b"/", None, b"HTTP/1.0",
                              {b"host": b"x", b"connection": b"Keep-Alive"}, b"", True)]),
    "connection close token": (get(b"/", extra=b"Connection: keep-alive, close\r\n"),
                               [(b"GET", b"/", None, b"HTTP/1.1",
                                 {b"host": b"x", b"connection": b"keep-alive, close"}, b"",
                                 False)]),
    # RFC 9112 §2.3: a later HTTP/1 minor version is processed (and answered) as 1.1
    "http/1.2 is 1.1": (get(b"/", b"HTTP/1.2"),
                        [(b"GET", b"/", None, b"HTTP/1.1", {b"host": b"x"}, b"", True)]),
    "http/1.9 close": (get(b"/", b"HTTP/1.9", b"Connection: close\r\n"),
                       [(b"GET", b"/", None, b"HTTP/1.1",
                         {b"host": b"x", b"connection": b"close"}, b"", False)]),
    "absolute form": (b"GET http://x/ocsp/M HTTP/1.1\r\n\r\n",
                      [(b"GET", b"/ocsp/M", None, b"HTTP/1.1", {}, b"", True)]),
    "leading empty line": (b"\r\n" + get(b"/"),
                           [(b"GET", b"/", None, b"HTTP/1.1", {b"host": b"x"}, b"", True)]),
    "chunked": (b"POST /ocsp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n",
                [(b"POST", b"/ocsp", None, b"HTTP/1.1", {b"transfer-encoding": b"chunked"},
                  b"abcde", True)]),
    "repeated header joined": (get(b"/", extra=b"Accept: a\r\nAccept: b\r\n"),
                               [(b"GET", b"/", None, b"HTTP/1.1",
                                 {b"host": b"x", b"accept": b"a, b"}, b"", True)]),
    "same content-length twice": (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1"
                                  b"\r\n\r\nx",
                                  [(b"POST", b"/", None, b"HTTP/1.1",
                                    {b"content-length": b"1"}, b"x", True)]),
    # refusals: the connection's last event
    "oversize body": (b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n",
                      [Refusal(413, "body over max_request_bytes")]),
    "oversize chunked": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n"
                         + b"x" * 1001 + b"\r\n0\r\n\r\n",
                         [Refusal(413, "body over max_request_bytes")]),
    "bare lf": (b"GET / HTTP/1.1\nHost: x\n\n", [Refusal(400, "bare LF line ending")]),
    "http/0.9": (b"GET /\r\n\r\n", [Refusal(400, "HTTP/0.9 request")]),
    "http/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                       [Refusal(505, "HTTP version not supported")]),
    "http/3.0": (get(b"/", b"HTTP/3.0"), [Refusal(505, "HTTP version not supported")]),
    "http/0.9 line": (get(b"/", b"HTTP/0.9"), [Refusal(505, "HTTP version not supported")]),
    "http/1.x malformed": (get(b"/", b"HTTP/1.x"), [Refusal(400, "malformed request line")]),
    "bad header": (get(b"/", extra=b"Bad Header: x\r\n"),
                   [Refusal(400, "malformed header line")]),
    "folded header": (get(b"/", extra=b"X: a\r\n b\r\n"),
                      [Refusal(400, "obsolete header line folding")]),
    "two lengths": (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
                    [Refusal(400, "repeated content-length header")]),
    "length and chunked": (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: "
                           b"chunked\r\n\r\n",
                           [Refusal(400, "both Content-Length and Transfer-Encoding")]),
    "gzip coding": (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                    [Refusal(501, "unsupported Transfer-Encoding")]),
    "bad length": (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                   [Refusal(400, "malformed Content-Length")]),
    "bad chunk size": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                       [Refusal(400, "malformed chunk size")]),
    "nul in target": (b"GET /a\x00b HTTP/1.1\r\n\r\n",
                      [Refusal(400, "malformed request target")]),
    "huge head": (b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
                  [Refusal(431, "request head over 16384 bytes")]),
}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", sorted(CASES))
def test_requests_and_refusals(name: str, how: str) -> None:
    data, expected = CASES[name]
    events, conn = feed_all(data, how)
    assert events == expected
    refused = isinstance(expected[-1], Refusal)
    closing = refused or not expected[-1][6]
    assert conn.closed == closing
    # with the start of the next request behind it: the same events, the rest kept
    events, conn = feed_all(data + TRAILING, how)
    assert events == expected
    assert conn.partial == (not closing)
    if not closing:
        assert shape(conn.feed(b"st: y\r\n\r\n")) == [
            (b"GET", b"/next", None, b"HTTP/1.1", {b"host": b"y"}, b"", True)]


def test_pipelined_requests_in_one_feed() -> None:
    data = post(b"/ocsp", b"ab") + get(b"/x") + post(b"/ocsp", b"cd", extra=b"Connection: close"
                                                      b"\r\n") + get(b"/ignored")
    events = Connection(MAX).feed(data)
    assert [(e.method, e.path, e.body, e.keep_alive) for e in events] == [  # type: ignore[union-attr]
        (b"POST", b"/ocsp", b"ab", True), (b"GET", b"/x", b"", True),
        (b"POST", b"/ocsp", b"cd", False)]  # nothing after the request that closes


def test_nothing_after_a_refusal() -> None:
    conn = Connection(MAX)
    assert conn.feed(b"GET /\r\n\r\n") == [Refusal(400, "HTTP/0.9 request")]
    assert conn.feed(get(b"/")) == [] and conn.closed and not conn.partial


def test_expect_continue_once_per_request() -> None:
    conn = Connection(MAX)
    head = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    assert conn.feed(head) == [] and conn.partial
    assert conn.want_continue() and not conn.want_continue()
    assert conn.feed(b"a") == [] and not conn.want_continue()
    assert [e.body for e in conn.feed(b"bc")] == [b"abc"]  # type: ignore[union-attr]
    assert not conn.partial


def test_partial_while_a_chunked_body_is_open() -> None:
    conn = Connection(MAX)
    conn.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    assert conn.partial


# --- responses, byte for byte ----------------------------------------------------------------

DATE = b"Tue, 01 Dec 2026 22:00:00 GMT"


def test_response_bytes() -> None:
    headers = [(b"Content-Type", b"application/ocsp-response")]
    assert wire.response(200, headers, b"DER", version=b"HTTP/1.1", keep_alive=True,
                         date=DATE) == (
        b"HTTP/1.1 200 OK\r\nDate: " + DATE + b"\r\nContent-Type: application/ocsp-response\r\n"
        b"Content-Length: 3\r\n\r\nDER")
    assert wire.response(200, headers, b"DER", version=b"HTTP/1.1", keep_alive=False,
                         date=DATE).startswith(b"HTTP/1.1 200 OK\r\nConnection: close\r\n")
    assert wire.response(200, headers, b"DER", version=b"HTTP/1.0", keep_alive=True,
                         date=DATE).startswith(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n")
    assert wire.response(200, headers, b"DER", version=b"HTTP/1.0", keep_alive=False,
                         date=DATE).startswith(b"HTTP/1.0 200 OK\r\nDate: ")
    # HEAD: the length of the body it would get, no body
    assert wire.response(200, [], b"DER", version=b"HTTP/1.1", keep_alive=True, date=DATE,
                         head=True).endswith(b"Content-Length: 3\r\n\r\n")
    # 304: no body, no Content-Length
    assert wire.response(304, [(b"ETag", b'"e"')], b"DER", version=b"HTTP/1.1",
                         keep_alive=True, date=DATE) == (
        b"HTTP/1.1 304 Not Modified\r\nDate: " + DATE + b'\r\nETag: "e"\r\n\r\n')


def test_refusal_bytes() -> None:
    assert wire.refusal(Refusal(413, "body over max_request_bytes"), DATE) == (
        b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nDate: " + DATE
        + b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 28\r\n\r\n"
        b"body over max_request_bytes\n")


# --- any split of a stream of requests gives the same events --------------------------------

_REQUESTS = st.sampled_from([post(b"/ocsp", b"x" * 40), get(b"/ocsp/MEQ"), get(b"/", b"HTTP/1.0",
                                                                                 b"Connection: keep-alive\r\n"),
                             b"POST /ocsp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"4\r\nabcd\r\n0\r\n\r\n"])


@given(st.lists(_REQUESTS, min_size=1, max_size=5), st.lists(st.integers(1, 60), max_size=20))
def test_any_split_gives_the_same_events(requests: list[bytes], cuts: list[int]) -> None:
    data = b"".join(requests)
    whole = shape(Connection(MAX).feed(data))
    assert len(whole) == len(requests)
    conn, events, pos = Connection(MAX), [], 0
    for cut in cuts:
        events += conn.feed(data[pos:pos + cut])
        pos += cut
    events += conn.feed(data[pos:])
    assert shape(events) == whole
